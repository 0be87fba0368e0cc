"""Synthetic checkpoints in the published layouts, shared by the conversion, safe-loading and URL tests.

They are built from the documented key patterns (docs/CONVERSION.md) with random values, so a tensor landing in
the wrong place shows: torchvision's ResNet with GroupNorm(32) gives the authors' GN+WS names (bn*,
downsample.0/1, fc) and shapes; with BCNorm modules, the authors' BCN+WS layout; MMDetection's neck and heads
are listed with their documented shapes.
"""

import os

import torch
import torchvision
from torch import nn


def random_(module):
    """Random values everywhere (GN affine too)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.state_dict().values():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return module


def gn_resnet(arch):
    """The authors' ImageNet GN+WS architecture: torchvision's ResNet with GroupNorm(32) named bn*."""
    return random_(getattr(torchvision.models, arch)(norm_layer=lambda channels: nn.GroupNorm(32, channels)))


def mmdet_neck_and_heads(mask=True):
    """MMDetection's FPN, RPN and 4conv1fc / 4conv mask heads of a ResNet-50 detector, as documented."""
    shapes = {}
    for i, in_channels in enumerate([256, 512, 1024, 2048]):
        shapes[f"neck.lateral_convs.{i}.conv.weight"] = (256, in_channels, 1, 1)
        shapes[f"neck.fpn_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        for conv in ("lateral_convs", "fpn_convs"):
            shapes[f"neck.{conv}.{i}.gn.weight"] = shapes[f"neck.{conv}.{i}.gn.bias"] = (256,)
    for name, out_channels, k in [("rpn_conv", 256, 3), ("rpn_cls", 3, 1), ("rpn_reg", 12, 1)]:
        shapes[f"rpn_head.{name}.weight"], shapes[f"rpn_head.{name}.bias"] = (
            (out_channels, 256, k, k),
            (out_channels,),
        )
    heads = {"bbox_head": "shared_convs", "mask_head": "convs"} if mask else {"bbox_head": "shared_convs"}
    for head, convs in heads.items():
        for i in range(4):
            shapes[f"roi_head.{head}.{convs}.{i}.conv.weight"] = (256, 256, 3, 3)
            shapes[f"roi_head.{head}.{convs}.{i}.gn.weight"] = shapes[
                f"roi_head.{head}.{convs}.{i}.gn.bias"
            ] = (256,)
    for name, shape in [
        ("shared_fcs.0", (1024, 256 * 7 * 7)),
        ("fc_cls", (81, 1024)),
        ("fc_reg", (320, 1024)),
    ]:
        shapes[f"roi_head.bbox_head.{name}.weight"], shapes[f"roi_head.bbox_head.{name}.bias"] = (
            shape,
            shape[:1],
        )
    if mask:
        shapes["roi_head.mask_head.upsample.weight"], shapes["roi_head.mask_head.upsample.bias"] = (
            (256, 256, 2, 2),
            (256,),
        )
        shapes["roi_head.mask_head.conv_logits.weight"] = (80, 256, 1, 1)
        shapes["roi_head.mask_head.conv_logits.bias"] = (80,)
    generator = torch.Generator().manual_seed(2)
    return {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}


class ReferenceBCNorm(nn.Module):
    """BCN from its equations: BatchNorm2d (running statistics in eval), group normalization without affine
    (biased variance, eps inside the root), per-group affine."""

    def __init__(self, channels, groups=32, eps=1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(1, groups, 1))
        self.bias = nn.Parameter(torch.zeros(1, groups, 1))
        self.pbn = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = self.pbn(x).reshape(x.shape[0], self.groups, -1)
        mean = y.mean(-1, keepdim=True)
        var = ((y - mean) ** 2).mean(-1, keepdim=True)
        y = (y - mean) / torch.sqrt(var + self.eps)
        return (y * self.weight + self.bias).reshape(x.shape)


class ReferenceBCNWSConv2d(nn.Conv2d):
    """WS as the BCN+WS release does it: (W - mean) / sqrt(unbiased var + 1e-5) per output channel."""

    def forward(self, x):
        w = self.weight.flatten(1)
        w = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, keepdim=True) + 1e-5)
        return self._conv_forward(x, w.view_as(self.weight), self.bias)


def bcn_ws_resnet(arch):
    """A reference BCN+WS ResNet in the authors' key layout: BCNorm modules (a per-group affine `weight`/`bias`
    of shape (1, 32, 1) and a BatchNorm2d child `pbn`), random values."""
    resnet = getattr(torchvision.models, arch)(norm_layer=ReferenceBCNorm)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in resnet.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=generator) + 0.5)
            elif name.endswith("conv1.weight") or ".conv" in name or "downsample.0" in name:
                t.copy_(
                    torch.randn(t.shape, generator=generator) * 0.05
                )  # conv weights: their scale matters not
            else:
                t.copy_(
                    torch.randn(t.shape, generator=generator) * 0.3
                    + (1.0 if name.endswith("weight") else 0.0)
                )
    for module in resnet.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = ReferenceBCNWSConv2d
    return resnet


def save_authors_file(resnet, path):
    """`resnet`'s state dict as the authors' ImageNet files hold it (DataParallel's `module.` prefix)."""
    torch.save({"module." + k: v for k, v in resnet.state_dict().items()}, path)
    return path


class RunsShellCommand:
    """Pickles as a call to os.system: loading it unrestricted would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
