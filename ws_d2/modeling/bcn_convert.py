"""Put Batch-Channel Normalization wherever a detectron2 module normalizes a conv with GroupNorm."""

import torch
from detectron2.layers import Conv2d

from ws_d2.layers import BatchChannelNorm

__all__ = ["convert_to_bcn", "count_bcn"]


def convert_to_bcn(module: torch.nn.Module, groups: int = 32, estimate: bool = True, prefix: str = "") -> int:
    """Replace the GroupNorm of every detectron2 `Conv2d` in `module` by a `BatchChannelNorm` (where the authors'
    BCN+WS ResNets have BCN); returns how many. A frozen GroupNorm (a frozen stage) gives a frozen BCN."""
    replaced = 0
    convs = [(name, m) for name, m in module.named_modules() if isinstance(m, Conv2d)]
    for name, conv in convs:
        norm = conv.norm
        if isinstance(norm, torch.nn.GroupNorm):
            frozen = norm.weight is not None and not norm.weight.requires_grad
            bcn = BatchChannelNorm(
                norm.num_channels, groups, estimate=estimate, frozen=frozen, name=f"{prefix}{name}.norm"
            )
            conv.norm = bcn.to(norm.weight.device) if norm.weight is not None else bcn
            replaced += 1
    return replaced


def count_bcn(module: torch.nn.Module) -> int:
    return sum(isinstance(m, BatchChannelNorm) for m in module.modules())
