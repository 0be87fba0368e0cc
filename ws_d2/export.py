"""WS-free deployment: a GN+WS model saved as detectron2's stock GN model holding standardized weights.

WS is a pure function of the weights, so at inference every WS conv can hold W_hat = standardize(W) and
skip WS (`fold_ws`): the outputs are the same, and the state_dict loads into the stock GN model that
detectron2 alone builds from `stock_config(cfg)` (no ws_d2 import, no ws_d2 config key).
"""

import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY

from .checkpoint import WSCheckpointer, atomic_write
from .errors import CheckpointError, ConfigError
from .modeling import fold_ws
from .outputs import refuse_output_onto_inputs
from .predictor import WSPredictor

__all__ = ["export_stock_model", "stock_config"]

# ws_d2 component -> the detectron2 component it wraps (same parameters and state_dict keys)
STOCK_NAMES = {
    "build_ws_resnet_backbone": "build_resnet_backbone",
    "build_ws_resnet_fpn_backbone": "build_resnet_fpn_backbone",
    "WSFastRCNNConvFCHead": "FastRCNNConvFCHead",
    "WSMaskRCNNConvUpsampleHead": "MaskRCNNConvUpsampleHead",
}
COMPONENT_KEYS = {
    ("BACKBONE", "NAME"): BACKBONE_REGISTRY,
    ("ROI_HEADS", "NAME"): ROI_HEADS_REGISTRY,
    ("ROI_BOX_HEAD", "NAME"): ROI_BOX_HEAD_REGISTRY,
    ("ROI_MASK_HEAD", "NAME"): ROI_MASK_HEAD_REGISTRY,
}


def stock_config(cfg):
    """`cfg` as detectron2's own config: ws_d2 component names replaced by the stock ones they wrap, and
    every key that detectron2's get_cfg() lacks (MODEL.WS, other extensions' keys) dropped. A BCN model is
    refused: detectron2 has no Batch-Channel Normalization, and its weights must not load into GN silently."""
    bcn = cfg.MODEL.get("BCN")
    if bcn is not None and bcn.ENABLED:
        raise ConfigError(
            "MODEL.BCN.ENABLED: detectron2 has no Batch-Channel Normalization layer, so a BCN+WS model has no "
            "stock twin to export to; run it with ws_d2 (fold_ws folds its WS and keeps BCN)"
        )
    stock = _known_keys_only(cfg, get_cfg())
    for (node_name, key), registry in COMPONENT_KEYS.items():
        node = stock.MODEL[node_name]
        name = node[key] = STOCK_NAMES.get(node[key], node[key])
        if name in registry and _comes_from_ws_d2(registry.get(name)):
            raise ConfigError(f"MODEL.{node_name}.{key}={name} is a ws_d2 component with no stock twin")
    return stock


def export_stock_model(cfg, output_file):
    """Load cfg.MODEL.WEIGHTS into the model of `cfg` (safely), fold WS and save the weights as
    `output_file` (a .pth that torch.load(weights_only=True) reads), and the stock config next to it
    (same name, .yaml) with MODEL.WEIGHTS naming the checkpoint. Returns (checkpoint, config file)."""
    if not output_file.endswith(".pth"):
        raise CheckpointError(f"{output_file}: the exported checkpoint must be a .pth file")
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("MODEL.WEIGHTS is empty: there are no trained weights to export")
    config_file = os.path.splitext(output_file)[0] + ".yaml"
    if "://" not in cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise CheckpointError(f"MODEL.WEIGHTS file not found: {cfg.MODEL.WEIGHTS}")
    refuse_output_onto_inputs(output_file, [cfg.MODEL.WEIGHTS])
    refuse_output_onto_inputs(config_file, [cfg.MODEL.WEIGHTS], option="exported config")
    stock_cfg = stock_config(cfg)
    on_cpu = cfg.clone()  # folding needs no GPU; the exported config keeps the user's MODEL.DEVICE
    on_cpu.defrost()
    on_cpu.MODEL.DEVICE = "cpu"
    on_cpu.MODEL.WEIGHTS = ""  # loaded just below, refused unless they cover the whole model
    model = WSPredictor(on_cpu).model
    WSCheckpointer(model).load_covering(cfg.MODEL.WEIGHTS)
    fold_ws(model)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}

    os.makedirs(os.path.dirname(output_file) or ".", exist_ok=True)
    with atomic_write(output_file) as f:
        torch.save({"model": state, "__author__": "ws_d2 export: WS folded into the conv weights"}, f)
    stock_cfg.MODEL.WEIGHTS = output_file
    with atomic_write(config_file, "w") as f:
        f.write(stock_cfg.dump())
    return output_file, config_file


def _comes_from_ws_d2(component):
    # a ws_d2 class, a subclass of one (e.g. a user's variant of a WS head), or a ws_d2 builder function
    return any(c.__module__.startswith("ws_d2") for c in getattr(component, "__mro__", [component]))


def _known_keys_only(cfg, reference):
    """A copy of `reference` with the values `cfg` gives to the keys `reference` has (recursively)."""
    kept = reference.clone()
    kept.defrost()
    for key, value in cfg.items():
        if key in kept:
            kept[key] = _known_keys_only(value, kept[key]) if isinstance(value, type(cfg)) else value
    return kept
