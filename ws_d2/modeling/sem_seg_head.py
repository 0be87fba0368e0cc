"""GN+WS (and BCN+WS) semantic segmentation head of Panoptic FPN: detectron2's SemSegFPNHead with WS on its
normalized convs (the 1x1 predictor carries no norm and stays plain)."""

from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

from .heads import WSHeadMixin


@SEM_SEG_HEADS_REGISTRY.register()
class WSSemSegFPNHead(WSHeadMixin, SemSegFPNHead):
    """SemSegFPNHead with WS on its convs."""

    _bcn_prefix = "sem_seg_head."
