"""ws_d2's config keys. Call `add_ws_config(cfg)` before `cfg.merge_from_file(...)`."""

from detectron2.config import CfgNode as CN

__all__ = ["add_ws_config", "get_ws_cfg"]


def add_ws_config(cfg):
    """Add ws_d2's keys to `cfg` in place (never to detectron2's global defaults)."""
    cfg.MODEL.WS = CN()
    # The documented GN-only switch: False builds every ws_d2 component with plain convs, so a GN+WS
    # config and its GN twin differ in this key alone (same parameters, same state_dict keys).
    cfg.MODEL.WS.ENABLED = True
    # Added to the unbiased std outside the square root, as in the published checkpoints.
    cfg.MODEL.WS.EPS = 1e-5
    # Micro-batch accumulation: IMS_PER_BATCH stays the images per optimizer step; each step runs
    # ITER_SIZE forward/backward passes of IMS_PER_BATCH / (world size x ITER_SIZE) images.
    cfg.SOLVER.ITER_SIZE = 1
    return cfg


def get_ws_cfg():
    """detectron2's default config with ws_d2's keys added."""
    from detectron2.config import get_cfg

    return add_ws_config(get_cfg())
