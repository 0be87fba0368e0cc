"""The project's config: detectron2's defaults, ws_d2's keys and detectron2's DeepLab keys."""

from detectron2.projects.deeplab import add_deeplab_config

import ws_d2
from ws_d2 import get_ws_cfg

__all__ = ["add_deeplab_ws_config", "load_config"]


def add_deeplab_ws_config(cfg):
    """Add ws_d2's and detectron2's DeepLab keys to `cfg` in place; a config that has them keeps its values."""
    if "ASPP_CHANNELS" not in cfg.MODEL.SEM_SEG_HEAD:
        add_deeplab_config(cfg)
    return cfg


def load_config(config_file, opts=(), freeze=True):
    """`ws_d2.load_config` with the DeepLab keys among the defaults."""
    return ws_d2.load_config(config_file, opts, freeze, defaults=add_deeplab_ws_config(get_ws_cfg()))
