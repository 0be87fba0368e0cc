# importing backbone and the heads registers their components in detectron2's registries
from .backbone import (
    build_ws_resnet_backbone,
    build_ws_resnet_fpn_backbone,
    build_ws_retinanet_resnet_fpn_backbone,
)
from .convert import convert_to_bcn, convert_to_ws, count_bcn, count_ws_convs, fold_ws
from .heads import WSFastRCNNConvFCHead, WSMaskRCNNConvUpsampleHead, WSSemSegFPNHead
from .retinanet import WSRetinaNet, WSRetinaNetHead

__all__ = [k for k in globals() if not k.startswith("_")]  # as detectron2's packages
