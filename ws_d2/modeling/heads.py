"""GN+WS RoI heads: detectron2's 4conv1fc box head and mask head with WS on their normalized convs.

Subclasses (not copies) of detectron2's heads, registered under new names; the fc layers, the box
predictor, the mask deconv and the mask predictor stay plain.
"""

from typing import Optional

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead

from .ws_convert import convert_to_ws

__all__ = ["WSFastRCNNConvFCHead", "WSMaskRCNNConvUpsampleHead"]


class _WSConvs:
    """Put before a detectron2 head class: WS on the head's normalized convs (ws_eps=None: the plain head)."""

    @configurable
    def __init__(self, input_shape, *, ws_eps: Optional[float] = 1e-5, **kwargs):
        super().__init__(input_shape, **kwargs)
        if ws_eps is not None:
            convert_to_ws(self, ws_eps)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ws_eps = cfg.MODEL.WS.EPS if cfg.MODEL.WS.ENABLED else None
        return {**super().from_config(cfg, input_shape), "ws_eps": ws_eps}


@ROI_BOX_HEAD_REGISTRY.register()
class WSFastRCNNConvFCHead(_WSConvs, FastRCNNConvFCHead):
    """FastRCNNConvFCHead with WS on its convs."""


@ROI_MASK_HEAD_REGISTRY.register()
class WSMaskRCNNConvUpsampleHead(_WSConvs, MaskRCNNConvUpsampleHead):
    """MaskRCNNConvUpsampleHead with WS on its convs."""
