"""ws_d2's model zoo, with detectron2's model-zoo API: configs from the installed package (copied at build
time) or a checkout's `configs/`; published weights by URL, downloaded once and converted on load."""

import os
from pathlib import Path

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model

from ..checkpoint import WSCheckpointer
from ..config import load_config
from ..errors import ConfigError
from ..files import require_weights_file
from . import published

__all__ = ["get", "get_checkpoint_url", "get_config", "get_config_file", "imagenet_weights"]

_CONFIG_DIRS = (Path(__file__).parent / "configs", Path(__file__).resolve().parents[2] / "configs")


def get_config_file(config_path: str) -> str:
    """The absolute path of a ws_d2 config, e.g. "COCO-Detection/faster_rcnn_R_50_FPN_gn_ws_1x.yaml"."""
    for root in _CONFIG_DIRS:
        if (root / config_path).is_file():
            return str(root / config_path)
    raise ConfigError(f"{config_path} is not one of ws_d2's configs")


def get_checkpoint_url(config_path: str) -> str:
    """The URL of a config's published trained weights (MMDetection's); a `.py` config has its YAML twin's."""
    get_config_file(config_path)  # a name that is no config at all gets that error first
    try:
        return published.TRAINED[os.path.splitext(config_path)[0] + ".yaml"]
    except KeyError:
        raise ConfigError(
            f"{config_path} has no published trained weights (those are: {len(published.TRAINED)} GN+WS "
            "configs under COCO-Detection/ and COCO-InstanceSegmentation/)"
        ) from None


def get_config(config_path: str, trained: bool = False):
    """The config (for a `.py` name the LazyConfig), with the published trained weights if `trained`, else its
    own (`imagenet_weights`)."""
    path = get_config_file(config_path)
    lazy = path.endswith(".py")
    cfg = LazyConfig.load(path) if lazy else load_config(path, freeze=False)
    weights = cfg.train.init_checkpoint if lazy else cfg.MODEL.WEIGHTS
    weights = get_checkpoint_url(config_path) if trained else imagenet_weights(weights)
    if lazy:
        cfg.train.init_checkpoint = weights
    else:
        cfg.MODEL.WEIGHTS = weights
    return cfg


def imagenet_weights(weights: str) -> str:
    """`weights`, or for a converted ImageNet backbone under pretrained/ that is not there yet, the URL of
    MMDetection's copy of the authors' model (loaded and converted in memory)."""
    if not os.path.isfile(weights) and weights in published.IMAGENET:
        return published.IMAGENET[weights]
    return weights


def get(config_path: str, trained: bool = False, device=None):
    """A model built from a ws_d2 config with its weights loaded (safely; by URL, converted, if published),
    on `device` (default: the config's, or the CPU when CUDA is not available)."""
    cfg = get_config(config_path, trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    lazy = config_path.endswith(".py")
    weights = cfg.train.init_checkpoint if lazy else cfg.MODEL.WEIGHTS
    require_weights_file(weights, "train.init_checkpoint" if lazy else "MODEL.WEIGHTS")
    if lazy:
        model = instantiate(cfg.model).to(device or cfg.train.device)
    else:
        cfg.MODEL.DEVICE = device or cfg.MODEL.DEVICE
        model = build_model(cfg)
    WSCheckpointer(model).load(weights)
    return model
