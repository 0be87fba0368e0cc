from .batch_channel_norm import BatchChannelNorm, EstBN, moving_speed, set_moving_speed
from .ws_conv import WS_FORMULAS, WS_MODES, WSConv2d, standardize_weight

__all__ = [k for k in globals() if not k.startswith("_")]  # as detectron2's packages
