from .ws_conv import WSConv2d, standardize_weight

__all__ = ["WSConv2d", "standardize_weight"]
