from . import backbone as _backbone  # noqa: F401  (registration)
from . import heads as _heads  # noqa: F401  (registration)
from . import retinanet as _retinanet  # noqa: F401  (registration)
from . import sem_seg_head as _sem_seg_head  # noqa: F401  (registration)
from .backbone import (
    build_ws_resnet_backbone,
    build_ws_resnet_fpn_backbone,
    build_ws_retinanet_resnet_fpn_backbone,
)
from .bcn_convert import convert_to_bcn, count_bcn
from .heads import WSFastRCNNConvFCHead, WSMaskRCNNConvUpsampleHead
from .retinanet import WSRetinaNet, WSRetinaNetHead
from .sem_seg_head import WSSemSegFPNHead
from .ws_convert import convert_to_ws, count_ws_convs, fold_ws

__all__ = [
    "WSFastRCNNConvFCHead",
    "WSMaskRCNNConvUpsampleHead",
    "WSRetinaNet",
    "WSRetinaNetHead",
    "WSSemSegFPNHead",
    "build_ws_resnet_backbone",
    "build_ws_resnet_fpn_backbone",
    "build_ws_retinanet_resnet_fpn_backbone",
    "convert_to_bcn",
    "convert_to_ws",
    "count_bcn",
    "count_ws_convs",
    "fold_ws",
]
