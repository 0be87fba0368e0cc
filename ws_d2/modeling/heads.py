"""GN+WS (and BCN+WS) heads: detectron2's 4conv1fc box head, mask head and Panoptic FPN's semantic head,
converted by the config."""

from typing import Optional

from detectron2.config import configurable
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead

from .convert import convert_to_bcn, convert_to_ws


class WSHeadMixin:
    """Put before a detectron2 head class: WS on the head's normalized convs (ws_eps=None: the plain head),
    after BCN in place of its GroupNorms (bcn: convert_to_bcn's keyword arguments; None: keep GN)."""

    _bcn_prefix = ""

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        ws_eps: Optional[float] = 1e-5,
        ws_formula: str = "std_plus_eps",
        ws_mode: str = "standardize",
        bcn: Optional[dict] = None,
        **kwargs,
    ):
        super().__init__(input_shape, **kwargs)
        if bcn is not None:
            convert_to_bcn(self, prefix=self._bcn_prefix, **bcn)
        if ws_eps is not None:
            convert_to_ws(self, ws_eps, ws_formula, ws_mode)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ws, bcn = cfg.MODEL.WS, cfg.MODEL.BCN
        arguments = {"ws_eps": ws.EPS if ws.ENABLED else None, "ws_formula": ws.FORMULA, "ws_mode": ws.MODE}
        arguments["bcn"] = {"groups": bcn.GROUPS, "estimate": bcn.ESTIMATE} if bcn.ENABLED else None
        return {**super().from_config(cfg, input_shape), **arguments}


@ROI_BOX_HEAD_REGISTRY.register()
class WSFastRCNNConvFCHead(WSHeadMixin, FastRCNNConvFCHead):
    _bcn_prefix = "roi_heads.box_head."


@ROI_MASK_HEAD_REGISTRY.register()
class WSMaskRCNNConvUpsampleHead(WSHeadMixin, MaskRCNNConvUpsampleHead):
    _bcn_prefix = "roi_heads.mask_head."


@SEM_SEG_HEADS_REGISTRY.register()
class WSSemSegFPNHead(WSHeadMixin, SemSegFPNHead):
    _bcn_prefix = "sem_seg_head."
