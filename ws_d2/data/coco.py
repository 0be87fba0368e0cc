"""COCO-format data sets registered with checks, so bad input fails early with one clear line.

detectron2's `register_coco_instances` defers every check to the first time the data is loaded, deep
inside the data loader; here the file, its structure and its categories are checked when the data set is
registered or when a config is about to use it.
"""

import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..errors import DatasetError

__all__ = ["check_datasets", "read_coco_categories", "register_coco_dataset"]

COCO_KEYS = ("images", "annotations", "categories")


def read_coco_categories(json_file):
    """The class names of a COCO instances file, in detectron2's order (sorted by category id)."""
    if not os.path.isfile(json_file):
        raise DatasetError(f"data set file not found: {json_file}")
    try:
        with open(json_file) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{json_file} is not a JSON file ({e})") from None
    missing = [key for key in COCO_KEYS if not isinstance(content, dict) or key not in content]
    if missing:
        raise DatasetError(f"{json_file} is not a COCO instances file: it lacks {', '.join(missing)}")
    try:
        categories = sorted(content["categories"], key=lambda c: c["id"])
        return [c["name"] for c in categories]
    except (TypeError, KeyError):
        raise DatasetError(f"{json_file}: every COCO category needs an 'id' and a 'name'") from None


def register_coco_dataset(name, json_file, image_root):
    """Register a COCO-format instances set under `name` after checking it (detectron2 loads it lazily)."""
    if not os.path.isdir(image_root):
        raise DatasetError(f"image directory of data set '{name}' not found: {image_root}")
    classes = read_coco_categories(json_file)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
            return classes  # the same registration again (e.g. checked by the launcher, then by a worker)
        raise DatasetError(f"data set name '{name}' is already registered; choose another name")
    register_coco_instances(name, {"thing_classes": classes}, json_file, image_root)
    return classes


def check_datasets(cfg, train=True):
    """Check that every data set the config uses (TEST, and TRAIN if `train`) is registered, present on disk
    and has MODEL.ROI_HEADS.NUM_CLASSES classes."""
    for name in (*(cfg.DATASETS.TRAIN if train else ()), *cfg.DATASETS.TEST):
        if name not in DatasetCatalog.list():
            raise DatasetError(
                f"data set '{name}' is not registered (use --coco-dataset NAME JSON IMAGE_DIR or a built-in name)"
            )
        meta = MetadataCatalog.get(name)
        for path in (meta.get("json_file"), meta.get("image_root")):
            if path and not os.path.exists(path):
                hint = meta.get("missing_hint", "check DETECTRON2_DATASETS or the registered path")
                raise DatasetError(f"data set '{name}': {path} not found ({hint})")
        classes = meta.get("thing_classes")
        if classes is None and meta.get("json_file"):
            classes = read_coco_categories(meta.json_file)
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise DatasetError(
                f"data set '{name}' has {len(classes)} categories but MODEL.ROI_HEADS.NUM_CLASSES is "
                f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}"
            )
