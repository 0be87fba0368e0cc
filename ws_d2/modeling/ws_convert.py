"""Put WS on exactly the convs a normalization layer follows, in any detectron2 module."""

import torch
from detectron2.layers import Conv2d

from ws_d2.layers import WSConv2d
from ws_d2.layers.ws_conv import conv2d_arguments

__all__ = ["convert_to_ws", "fold_ws", "count_ws_convs"]


def convert_to_ws(
    module: torch.nn.Module, eps: float = 1e-5, formula: str = "std_plus_eps", mode: str = "standardize"
) -> torch.nn.Module:
    """Replace every detectron2 `Conv2d` that carries a norm by a `WSConv2d` sharing its parameters, in place;
    the RPN convs, predictors and mask deconv carry none and stay plain, as in the published GN+WS models.
    Returns `module` (a `Conv2d` passed directly comes back converted)."""
    if _needs_ws(module):
        return WSConv2d.from_conv2d(module, eps, formula, mode)
    for name, child in module.named_children():
        converted = convert_to_ws(child, eps, formula, mode)
        if converted is not child:
            _replace_child(module, name, child, converted)
    return module


def fold_ws(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every `WSConv2d` by a plain `Conv2d` holding its standardized weight, in place: the same outputs,
    and a state_dict that detectron2's stock GN model loads (BCN layers stay: detectron2 has none)."""
    if isinstance(module, WSConv2d):
        return _fold_one(module)
    for name, child in module.named_children():
        folded = fold_ws(child)
        if folded is not child:
            _replace_child(module, name, child, folded)
    return module


def count_ws_convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, WSConv2d) for m in module.modules())


def _replace_child(parent, name, old, new):
    setattr(parent, name, new)
    # detectron2's FPN also keeps its lateral and output convs in plain Python lists (not ModuleLists)
    # that its forward iterates: those must reach the new module too, or it is never called.
    for value in vars(parent).values():
        if isinstance(value, list):
            value[:] = [new if item is old else item for item in value]


def _needs_ws(module):
    return type(module) is Conv2d and module.norm is not None


def _fold_one(ws: WSConv2d) -> Conv2d:
    weight = ws.weight
    conv = Conv2d(**conv2d_arguments(ws), device="meta")  # its parameters are set just below
    with torch.no_grad():
        standardized = ws.standardized_weight().detach()
    conv.weight = torch.nn.Parameter(standardized, requires_grad=weight.requires_grad)
    conv.bias = ws.bias
    conv.train(ws.training)
    return conv
