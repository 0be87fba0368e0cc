"""ws_d2's config keys, and the one way to read a config file into a ws_d2 config."""

import os

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .errors import ConfigError, one_line

__all__ = ["add_ws_config", "check_device", "get_ws_cfg", "load_config"]


def add_ws_config(cfg):
    """Add ws_d2's keys to `cfg` in place (never to detectron2's global defaults), keeping any already set."""
    if "WS" in cfg.MODEL:
        return cfg
    cfg.MODEL.WS = CN()
    cfg.MODEL.WS.ENABLED = True  # False: the GN twin, with the same parameters and state_dict keys
    cfg.MODEL.WS.EPS = 1e-5  # added to the unbiased std outside the root, as in the published weights
    cfg.MODEL.WS.FORMULA = "std_plus_eps"  # sqrt_var_plus_eps: the authors' BCN+WS weights (docs/BCN.md)
    cfg.MODEL.WS.MODE = "standardize"  # or one of the paper's ablations (docs/WS.md#the-papers-ws-variants)
    cfg.MODEL.BCN = CN()
    cfg.MODEL.BCN.ENABLED = False  # Batch-Channel Normalization wherever the model has GroupNorm
    cfg.MODEL.BCN.ESTIMATE = True  # EstBN's estimated statistics, for micro-batches; False: BatchNorm2d
    cfg.MODEL.BCN.GROUPS = 32  # of the channel step and the per-group affine, as the authors'
    cfg.MODEL.BCN.MIN_MOVING_SPEED = 0.01  # EstBN's r = max(1 / (t + 1), this): ws_d2.layers.moving_speed
    cfg.SOLVER.ITER_SIZE = 1  # forward/backward passes per step of IMS_PER_BATCH images
    cfg.SOLVER.AMP.PRECISION = "float16"  # d2go's key; bfloat16 (CUDA, CPU) has fp32's range: no GradScaler
    cfg.TEST.FAST_COCO_EVAL = True  # detectron2's fast COCOeval (docs/EVALUATION.md); False: pycocotools'
    return cfg


def get_ws_cfg():
    """detectron2's default config with ws_d2's keys added."""
    return add_ws_config(get_cfg())


def load_config(config_file, opts=(), freeze=True, defaults=None):
    """ws_d2's defaults (or `defaults`, e.g. with a project's keys), then `config_file`, then the `opts`
    overrides (KEY VALUE ...); a bad file, key or value raises ConfigError in one line naming it."""
    cfg = get_ws_cfg() if defaults is None else defaults.clone()
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file not found: {config_file}")
        _check_yaml_mapping(config_file)
        try:
            cfg.merge_from_file(config_file)
        except Exception as e:  # yaml syntax, unknown key, bad value: yacs raises many types
            raise ConfigError(f"{config_file}: {one_line(e)}") from None
    try:
        cfg.merge_from_list(list(opts))
    except Exception as e:
        raise ConfigError(f"config override: {one_line(e)}") from None
    if cfg.MODEL.WS.EPS < 0:  # std + eps would cross zero: weights of +-inf or NaN
        raise ConfigError(f"MODEL.WS.EPS must be >= 0, got {cfg.MODEL.WS.EPS}")
    if freeze:
        cfg.freeze()
    return cfg


def check_device(cfg):
    """Refuse a MODEL.DEVICE this machine does not have, rather than fail deep in torch."""
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"MODEL.DEVICE is '{device}' but CUDA is not available here: pass MODEL.DEVICE cpu to run on the CPU"
        )


def _check_yaml_mapping(config_file):
    """Refuse, naming the file, one that is not UTF-8 YAML mapping keys: yacs' message names neither."""
    try:
        with open(config_file, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"{config_file}: not a UTF-8 text (YAML) file") from None
    except yaml.constructor.ConstructorError:
        return  # a python tag that detectron2's own loader may accept: left to it
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"{config_file}: YAML syntax error{where} ({problem})") from None
    if content is None:
        raise ConfigError(f"{config_file}: empty config file")
    if not isinstance(content, dict):
        raise ConfigError(f"{config_file}: the top level is a {type(content).__name__}, not a mapping")
