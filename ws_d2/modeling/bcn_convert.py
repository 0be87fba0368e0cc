"""Put Batch-Channel Normalization wherever a detectron2 module normalizes a conv with GroupNorm."""

import torch
from detectron2.layers import Conv2d

from ws_d2.layers import BatchChannelNorm

__all__ = ["convert_to_bcn", "count_bcn"]


def convert_to_bcn(module: torch.nn.Module, groups: int = 32, estimate: bool = True, prefix: str = "") -> int:
    """Replace the GroupNorm of every detectron2 `Conv2d` in `module` by a `BatchChannelNorm` over the same
    channels; returns how many were replaced.

    In the GN+WS models these are the ResNet stem, block and shortcut convs, the FPN lateral and output convs
    and the 4 box-head and 4 mask-head convs, which is where the authors' BCN+WS ResNets have BCN. A
    GroupNorm whose parameters are frozen (detectron2's `freeze()` of the stem and early stages, which runs
    when the backbone is built) gives a frozen BCN: its batch step is a FrozenBatchNorm2d, so neither
    batch statistics nor EstBN estimates move there. `prefix` names the layers in error messages.
    """
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
