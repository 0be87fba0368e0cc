"""Batch-Channel Normalization (BCN) with the numerics of the authors' code (docs/BCN.md): a per-channel batch
step, group normalization over G groups without affine, then a per-group affine of shape (1, G, 1)."""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils import comm
from torch import nn

from ..errors import ConfigError


class EstBN(nn.Module):
    """BatchNorm by estimated statistics, in training too: each training forward first moves them by r
    (``estbn_moving_speed``, set by the trainer, not saved) towards the batch's moments over all processes."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("estbn_moving_speed", torch.zeros(()), persistent=False)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"

    @torch.no_grad()
    def update_estimates(self, x: torch.Tensor):
        """One moving-average step of the estimates with the batch moments of `x` (all ranks' batches)."""
        dims = [d for d in range(x.dim()) if d != 1]
        mean_old = self.running_mean.view(1, -1, *([1] * (x.dim() - 2)))
        # out of place: never write into `x` (a transposed copy of it is `x` itself at N = 1)
        dtype = self.running_mean.dtype
        n = self.running_mean.new_tensor([x.numel() // max(x.shape[1], 1)])  # values per channel
        moments = torch.cat([x.sum(dims, dtype=dtype), (x - mean_old).square().sum(dims, dtype=dtype), n])
        if comm.get_world_size() > 1:
            dist.all_reduce(moments)
        count = moments[-1]
        batch_mean, batch_var = (moments[:-1] / count.clamp(min=1)).split(self.num_features)
        r = self.estbn_moving_speed * (count > 0)  # an empty batch (e.g. no mask RoI anywhere) moves nothing
        self.running_mean.lerp_(batch_mean, r)
        self.running_var.lerp_(batch_var, r)

    def forward(self, x):
        if self.training:
            self.update_estimates(x)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )


def moving_speed(t: int, min_speed: float) -> float:
    """EstBN's r for the t-th training forward pass (micro-batch); see "The r schedule" in docs/BCN.md."""
    return max(1.0 / (t + 1), min_speed)


def set_moving_speed(module: nn.Module, speed: float) -> int:
    """Set r of every EstBN in `module` (for a training loop of one's own); returns how many there are."""
    estimators = [m for m in module.modules() if isinstance(m, EstBN)]
    for m in estimators:
        m.estbn_moving_speed.fill_(speed)
    return len(estimators)


class BatchChannelNorm(nn.Module):
    """BCN over C channels (module docstring). `frozen` (a frozen backbone stage) fixes the batch step's
    statistics (FrozenBatchNorm2d, as detectron2 freezes BatchNorm) and every parameter; `name` is for errors."""

    def __init__(self, num_channels, num_groups=32, eps=1e-5, estimate=True, frozen=False, name=""):
        super().__init__()
        self.name = name or "BatchChannelNorm"
        if num_channels % num_groups:
            raise ConfigError(
                f"{self.name}: {num_channels} channels do not divide into {num_groups} BCN groups"
            )
        self.num_channels, self.num_groups, self.eps, self.estimate = num_channels, num_groups, eps, estimate
        self.weight = nn.Parameter(torch.ones(1, num_groups, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_groups, 1))
        if frozen:
            self.batch_norm = FrozenBatchNorm2d(num_channels)
            for p in self.parameters():
                p.requires_grad_(False)
        else:
            self.batch_norm = EstBN(num_channels) if estimate else nn.BatchNorm2d(num_channels)

    def extra_repr(self):
        return f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}"

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):  # in fp32, as autocast runs BatchNorm and GroupNorm
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.float())
        if self.training and isinstance(self.batch_norm, nn.BatchNorm2d) and x.numel() == x.shape[1]:
            raise ConfigError(
                f"{self.name}: the BN step of batch-channel norm needs more than one value per channel in "
                f"training, got an input of shape {tuple(x.shape)} (one image, 1x1 map): use larger images "
                "or batches, or MODEL.BCN.ESTIMATE True"
            )
        x = self.batch_norm(x)
        # explicit sizes: an empty batch (no RoI for the mask head) has no -1 to infer
        per_group = math.prod(x.shape[1:]) // self.num_groups
        out = F.group_norm(x, self.num_groups, eps=self.eps).view(x.shape[0], self.num_groups, per_group)
        return torch.addcmul(self.bias, out, self.weight).view_as(x)
