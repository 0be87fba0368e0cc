"""ws_d2's model zoo, with detectron2's model-zoo API and names.

The configs are found inside the installed package (copied there at build time by setup.py) or, in a source
checkout, in its top-level `configs/` folder. `trained=True` points MODEL.WEIGHTS at MMDetection's published
detector for the config (`published.py`); WSCheckpointer downloads it once into detectron2's file cache and
converts it in memory.
"""

import os
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from . import published

__all__ = ["get", "get_checkpoint_url", "get_config", "get_config_file"]

_CONFIG_DIRS = (Path(__file__).parent / "configs", Path(__file__).resolve().parents[2] / "configs")


def get_config_file(config_path: str) -> str:
    """The absolute path of a ws_d2 config, e.g. "COCO-Detection/faster_rcnn_R_50_FPN_gn_ws_1x.yaml"."""
    for root in _CONFIG_DIRS:
        if (root / config_path).is_file():
            return str(root / config_path)
    raise ConfigError(f"{config_path} is not one of ws_d2's configs")


def get_checkpoint_url(config_path: str) -> str:
    """The URL of the published trained weights of a config (MMDetection's GN+WS detectors)."""
    get_config_file(config_path)  # a name that is no config at all gets that error first
    try:
        return published.TRAINED[config_path]
    except KeyError:
        raise ConfigError(
            f"{config_path} has no published trained weights (those are: {len(published.TRAINED)} GN+WS "
            "configs under COCO-Detection/ and COCO-InstanceSegmentation/)"
        ) from None


def get_config(config_path: str, trained: bool = False):
    """The config (ws_d2's keys included); `trained=True` sets MODEL.WEIGHTS to the published trained weights.
    Otherwise MODEL.WEIGHTS is the config's own: for the GN+WS seed configs, the converted ImageNet backbone
    under pretrained/ if it is there, else the URL of MMDetection's copy of the authors' ImageNet model."""
    from ..config import load_config

    cfg = load_config(get_config_file(config_path), freeze=False)
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint_url(config_path)
    elif not os.path.isfile(cfg.MODEL.WEIGHTS) and cfg.MODEL.WEIGHTS in published.IMAGENET:
        cfg.MODEL.WEIGHTS = published.IMAGENET[cfg.MODEL.WEIGHTS]
    return cfg


def get(config_path: str, trained: bool = False, device=None):
    """A model built from a ws_d2 config with its weights loaded (safely; by URL, converted, if published),
    on `device` (default: MODEL.DEVICE, or the CPU when CUDA is not available)."""
    import torch
    from detectron2.modeling import build_model

    from ..checkpoint import WSCheckpointer

    cfg = get_config(config_path, trained)
    if device is not None:
        cfg.MODEL.DEVICE = device
    elif not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise CheckpointError(f"MODEL.WEIGHTS file not found: {weights} (relative to {os.getcwd()})")
    model = build_model(cfg)
    WSCheckpointer(model, config=cfg).load(weights)
    return model
