"""detectron2's DeepLabV3+ head with WS on its normalized convs (the ASPP and decoder convs) and, with
MODEL.BCN.ENABLED, BCN in place of their GroupNorms. The ASPP's image-pooling conv and the predictor carry no
norm in detectron2 and stay plain."""

from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab import DeepLabV3PlusHead

from ws_d2.modeling.heads import WSHeadMixin

__all__ = ["WSDeepLabV3PlusHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class WSDeepLabV3PlusHead(WSHeadMixin, DeepLabV3PlusHead):
    """DeepLabV3PlusHead with WS on its normalized convs."""

    _bcn_prefix = "sem_seg_head."
