"""The project's config: detectron2's defaults, ws_d2's keys and detectron2's DeepLab keys."""

import os

from detectron2.projects.deeplab import add_deeplab_config

from ws_d2 import get_ws_cfg
from ws_d2.errors import ConfigError, one_line

__all__ = ["add_deeplab_ws_config", "load_config"]


def add_deeplab_ws_config(cfg):
    """Add ws_d2's and detectron2's DeepLab keys to `cfg` in place; a config that has them keeps its values."""
    if "ASPP_CHANNELS" not in cfg.MODEL.SEM_SEG_HEAD:
        add_deeplab_config(cfg)
    return cfg


def load_config(config_file, opts=(), freeze=True):
    """The defaults, then `config_file`, then the `KEY VALUE` overrides; a bad file or key raises ConfigError."""
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file not found: {config_file}")
    cfg = add_deeplab_ws_config(get_ws_cfg())
    try:
        cfg.merge_from_file(config_file)
    except Exception as e:  # yaml syntax, unknown key, bad value: yacs raises many types
        raise ConfigError(f"{config_file}: {one_line(e)}") from None
    try:
        cfg.merge_from_list(list(opts))
    except Exception as e:
        raise ConfigError(f"config override: {one_line(e)}") from None
    if freeze:
        cfg.freeze()
    return cfg
