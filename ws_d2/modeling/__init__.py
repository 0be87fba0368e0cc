# importing backbone and heads registers their components in detectron2's registries
from .backbone import build_ws_resnet_backbone, build_ws_resnet_fpn_backbone
from .convert import convert_to_bcn, convert_to_ws, count_bcn, count_ws_convs, fold_ws
from .heads import WSFastRCNNConvFCHead, WSMaskRCNNConvUpsampleHead

__all__ = [
    "WSFastRCNNConvFCHead",
    "WSMaskRCNNConvUpsampleHead",
    "build_ws_resnet_backbone",
    "build_ws_resnet_fpn_backbone",
    "convert_to_bcn",
    "convert_to_ws",
    "count_bcn",
    "count_ws_convs",
    "fold_ws",
]
