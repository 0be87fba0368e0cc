"""Data sets for ws_d2: checked COCO-format registration and the built-in synthetic shapes set.

Importing this package registers the synthetic set's names (`ws_d2_synthetic_train`, `ws_d2_synthetic_val`
and their `_panoptic_separated` variants) with their metadata; `generate_synthetic_dataset` makes the files.
"""

from .coco import (
    IMAGE_CHECKS,
    check_dataset_names,
    check_datasets,
    gc_paused,
    load_checked_coco,
    register_coco_dataset,
)
from .synthetic import (
    SYNTHETIC_CLASSES,
    default_synthetic_root,
    generate_synthetic_dataset,
    register_synthetic_dataset,
    synthetic_batch,
    write_label_maps,
)

register_synthetic_dataset()

__all__ = [k for k in globals() if not k.startswith("_")]  # as detectron2's packages
