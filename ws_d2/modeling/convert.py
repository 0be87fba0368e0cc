"""WS on exactly the convs a norm follows, BCN in place of their GroupNorms; WS folded back for deployment."""

import torch
from detectron2.layers import Conv2d

from ..layers import BatchChannelNorm, WSConv2d
from ..layers.ws_conv import conv2d_arguments


def convert_to_ws(
    module: torch.nn.Module, eps: float = 1e-5, formula: str = "std_plus_eps", mode: str = "standardize"
) -> torch.nn.Module:
    """Replace every detectron2 `Conv2d` that carries a norm by a `WSConv2d` sharing its parameters, in place.
    Returns `module` (a `Conv2d` passed directly comes back converted)."""
    if type(module) is Conv2d and module.norm is not None:
        return WSConv2d.from_conv2d(module, eps, formula, mode)
    return _map_children(module, lambda child: convert_to_ws(child, eps, formula, mode))


def fold_ws(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every `WSConv2d` by a plain `Conv2d` holding its standardized weight, in place: the same
    outputs, and a state_dict that detectron2's stock GN model loads (BCN layers stay: detectron2 has none)."""
    if not isinstance(module, WSConv2d):
        return _map_children(module, fold_ws)
    conv = Conv2d(**conv2d_arguments(module), device="meta")  # its parameters are set just below
    with torch.no_grad():
        weight = module.standardized_weight().detach()
    conv.weight = torch.nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    conv.bias = module.bias
    return conv.train(module.training)


def convert_to_bcn(module: torch.nn.Module, groups: int = 32, estimate: bool = True, prefix: str = "") -> int:
    """Replace the GroupNorm of every detectron2 `Conv2d` in `module` by a `BatchChannelNorm` (where the
    authors' BCN+WS ResNets have BCN); returns how many. A frozen GroupNorm (a frozen stage) gives a frozen BCN."""
    convs = [(name, m) for name, m in module.named_modules() if isinstance(m, Conv2d)]
    norms = [(name, conv, conv.norm) for name, conv in convs if isinstance(conv.norm, torch.nn.GroupNorm)]
    for name, conv, norm in norms:
        frozen = norm.weight is not None and not norm.weight.requires_grad
        bcn = BatchChannelNorm(
            norm.num_channels, groups, estimate=estimate, frozen=frozen, name=f"{prefix}{name}.norm"
        )
        conv.norm = bcn.to(norm.weight.device) if norm.weight is not None else bcn
    return len(norms)


def count_ws_convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, WSConv2d) for m in module.modules())


def count_bcn(module: torch.nn.Module) -> int:
    return sum(isinstance(m, BatchChannelNorm) for m in module.modules())


def _map_children(module, convert):
    """Replace each child of `module` by `convert(child)`, in place; returns `module`."""
    for name, child in module.named_children():
        new = convert(child)
        if new is not child:
            setattr(module, name, new)
            # detectron2's FPN also keeps its lateral and output convs in plain Python lists (not ModuleLists)
            # that its forward iterates: those must reach the new module too, or it is never called.
            for value in vars(module).values():
                if isinstance(value, list):
                    value[:] = [new if item is child else item for item in value]
    return module
