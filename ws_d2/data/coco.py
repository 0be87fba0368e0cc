"""COCO-format data sets registered with checks, so bad input fails early with one clear line.

detectron2's `register_coco_instances` defers every check to the first time the data is loaded, deep
inside the data loader; here the file, its structure and its categories are checked when the data set is
registered or when a config is about to use it.
"""

import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from ..errors import DatasetError, one_line

__all__ = ["check_coco_records", "check_datasets", "read_coco_categories", "register_coco_dataset"]

COCO_KEYS = ("images", "annotations", "categories")
EXIF_ORIENTATION = 0x0112
logger = logging.getLogger(__name__)


def read_coco_categories(json_file):
    """The class names of a COCO instances file, in detectron2's order (sorted by category id)."""
    return _category_names(json_file, _read_coco(json_file))


def _read_coco(json_file):
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
    return content


def _category_names(json_file, content):
    try:
        categories = sorted(content["categories"], key=lambda c: c["id"])
        return [c["name"] for c in categories]
    except (TypeError, KeyError):
        raise DatasetError(f"{json_file}: every COCO category needs an 'id' and a 'name'") from None


def register_coco_dataset(name, json_file, image_root):
    """Register a COCO-format instances set under `name` after checking it (detectron2 loads it lazily)."""
    if not os.path.isdir(image_root):
        raise DatasetError(f"image directory of data set '{name}' not found: {image_root}")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
            return list(meta.thing_classes)  # the same registration again (e.g. checked by the launcher)
        raise DatasetError(f"data set name '{name}' is already registered; choose another name")
    content = _read_coco(json_file)
    classes = _category_names(json_file, content)
    check_coco_records(json_file, image_root, content)
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


def check_coco_records(json_file, image_root, content):
    """Check a COCO instances file's records before any training: every image file exists, is not empty
    and has the size its record gives (read from the file header); every annotation has a known category
    and a box of non-negative width and height. Raises DatasetError naming the file and the record;
    annotations of an image the file does not list (detectron2 ignores them) are a counted warning."""
    try:
        category_ids = {c["id"] for c in content["categories"]}
        images = {image["id"]: image for image in content["images"]}
        for image in images.values():
            _check_image_record(json_file, image_root, image)
        orphans = []
        for annotation in content["annotations"]:
            record = f"{json_file}: annotation id {annotation.get('id')} (image id {annotation['image_id']})"
            if annotation["image_id"] not in images:
                orphans.append(str(annotation.get("id")))
            if annotation.get("category_id") not in category_ids:
                raise DatasetError(
                    f"{record}: category_id {annotation.get('category_id')} is not in 'categories'"
                )
            box = annotation.get("bbox")
            if box is not None and (len(box) != 4 or box[2] < 0 or box[3] < 0):
                raise DatasetError(
                    f"{record}: bbox {box} is not [x, y, width, height] with width, height >= 0"
                )
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{json_file}: a record lacks a field or has a wrong type ({e!r})") from None
    if orphans:
        logger.warning(
            "%s: %d annotations of images the file does not list are ignored (ids %s%s)",
            json_file, len(orphans), ", ".join(orphans[:5]), ", ..." if len(orphans) > 5 else "",
        )  # fmt: skip


def _check_image_record(json_file, image_root, image):
    path = os.path.join(image_root, image["file_name"])
    record = f"{json_file}: image id {image['id']} ({path})"
    if not os.path.isfile(path):
        raise DatasetError(f"{record}: file not found")
    if os.path.getsize(path) == 0:
        raise DatasetError(f"{record}: empty file (0 bytes)")
    try:
        with Image.open(path) as opened:  # reads the header only
            width, height = opened.size
            if opened.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # shown rotated by 90 degrees
                width, height = height, width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{record}: not a readable image ({one_line(e)})") from None
    expected = (image.get("width"), image.get("height"))
    if None not in expected and expected != (width, height):
        raise DatasetError(
            f"{record}: the file is {width}x{height} but the record says {expected[0]}x{expected[1]}"
        )
