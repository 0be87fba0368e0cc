"""WS-free deployment: a GN+WS model becomes detectron2's stock GN model holding standardized weights.

WS is a pure function of the weights, so at inference every WS conv can hold W_hat = standardize(W)
and skip WS: the outputs are the same, and the state_dict loads into the stock GN model built by
detectron2 alone from `stock_config(cfg)` (no ws_d2 import, no ws_d2 config key).
"""

import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY

from ws_d2.checkpoint import WSCheckpointer, atomic_write
from ws_d2.modeling import count_ws_convs, fold_ws

__all__ = ["STOCK_NAMES", "export_stock_model", "stock_config", "to_stock_model"]

# ws_d2 component -> the detectron2 component it wraps (same parameters and state_dict keys).
STOCK_NAMES = {
    "build_ws_resnet_backbone": "build_resnet_backbone",
    "build_ws_resnet_fpn_backbone": "build_resnet_fpn_backbone",
    "WSFastRCNNConvFCHead": "FastRCNNConvFCHead",
    "WSMaskRCNNConvUpsampleHead": "MaskRCNNConvUpsampleHead",
}
_NAME_KEYS = {
    ("MODEL", "BACKBONE", "NAME"): BACKBONE_REGISTRY,
    ("MODEL", "ROI_HEADS", "NAME"): ROI_HEADS_REGISTRY,
    ("MODEL", "ROI_BOX_HEAD", "NAME"): ROI_BOX_HEAD_REGISTRY,
    ("MODEL", "ROI_MASK_HEAD", "NAME"): ROI_MASK_HEAD_REGISTRY,
}


def to_stock_model(model):
    """Fold every WS conv of `model` into a plain conv holding its standardized weight (in place)."""
    fold_ws(model)
    assert count_ws_convs(model) == 0
    return model


def stock_config(cfg):
    """`cfg` as detectron2's own config: ws_d2 component names replaced by the stock ones they wrap, and
    every key detectron2's get_cfg() lacks (MODEL.WS, other extensions' keys) dropped."""
    stock = _keep_known_keys(cfg, get_cfg())
    for keys, registry in _NAME_KEYS.items():
        node = stock
        for key in keys[:-1]:
            node = node[key]
        name = node[keys[-1]]
        name = node[keys[-1]] = STOCK_NAMES.get(name, name)
        if name in registry and _comes_from_ws_d2(registry.get(name)):
            raise ValueError(
                f"{'.'.join(keys)}={name} is a ws_d2 component with no stock detectron2 equivalent"
            )
    return stock


def export_stock_model(cfg, output_file):
    """Build the model of `cfg`, load cfg.MODEL.WEIGHTS (WSCheckpointer), fold WS and save the weights
    as `output_file` (a .pth that torch.load(weights_only=True) reads), and the stock config next to
    it (same name, .yaml) with MODEL.WEIGHTS pointing at the checkpoint. Returns (checkpoint, yaml)."""
    if not output_file.endswith(".pth"):
        raise ValueError(f"{output_file}: the exported checkpoint must be a .pth file")
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: there are no trained weights to export")
    stock_cfg = stock_config(cfg)
    on_cpu = cfg.clone()  # folding needs no GPU; the exported config keeps the user's MODEL.DEVICE
    on_cpu.defrost()
    on_cpu.MODEL.DEVICE = "cpu"
    model = build_model(on_cpu)
    WSCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    to_stock_model(model)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}

    os.makedirs(os.path.dirname(output_file) or ".", exist_ok=True)
    with atomic_write(output_file) as f:
        torch.save({"model": state, "__author__": "ws_d2 export: WS folded into the conv weights"}, f)
    stock_cfg.MODEL.WEIGHTS = output_file
    config_file = os.path.splitext(output_file)[0] + ".yaml"
    with atomic_write(config_file, "w") as f:
        f.write(stock_cfg.dump())
    return output_file, config_file


def _comes_from_ws_d2(component):
    # A ws_d2 class, a subclass of one (e.g. a user's variant of a WS head), or a ws_d2 builder function.
    return any(c.__module__.startswith("ws_d2") for c in getattr(component, "__mro__", [component]))


def _keep_known_keys(cfg, reference):
    """A copy of `cfg` restricted to the keys `reference` has (recursively)."""
    kept = reference.clone()
    kept.defrost()
    for key, value in cfg.items():
        if key not in kept:
            continue
        if isinstance(value, type(cfg)):
            kept[key] = _keep_known_keys(value, kept[key])
        else:
            kept[key] = value
    return kept
