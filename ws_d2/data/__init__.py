"""Checked COCO-format data sets and the synthetic shapes set, whose names importing this registers."""

from .coco import IMAGE_CHECKS, check_dataset_names, check_datasets, load_checked_coco, register_coco_dataset
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
