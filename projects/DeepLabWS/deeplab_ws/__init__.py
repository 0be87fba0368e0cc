"""DeepLabV3+ semantic segmentation on a GN+WS or BCN+WS ResNet: detectron2's DeepLab project with WS (and BCN)
put on every conv that a norm follows. Importing this package registers its backbone, head and data sets."""

import ws_d2  # noqa: F401  (first: the fixes the installed detectron2 needs, and ws_d2's registrations)

# isort: split
from . import backbone as _backbone  # noqa: F401  (registration)
from . import head as _head  # noqa: F401  (registration)
from .backbone import build_ws_resnet_deeplab_backbone
from .config import add_deeplab_ws_config, load_config
from .data import SEM_SEG_CLASSES, generate_synthetic_sem_seg, register_synthetic_sem_seg
from .head import WSDeepLabV3PlusHead

register_synthetic_sem_seg()

__all__ = [
    "SEM_SEG_CLASSES",
    "WSDeepLabV3PlusHead",
    "add_deeplab_ws_config",
    "build_ws_resnet_deeplab_backbone",
    "generate_synthetic_sem_seg",
    "load_config",
    "register_synthetic_sem_seg",
]
