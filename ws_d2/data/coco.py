"""COCO-format data sets whose records are checked when loaded, before training starts (docs/BAD_INPUT.md)."""

import contextlib
import functools
import gc
import hashlib
import json
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.utils import comm
from PIL import Image

from ..errors import ConfigError, DatasetError, one_line
from ..files import atomic_write

IMAGE_CHECKS = ("once", "always", "never")  # once: per data set version; never: trust the files
EXIF_ORIENTATION = 0x0112
logger = logging.getLogger(__name__)


def register_coco_dataset(name, json_file, image_root, image_check="once"):
    """Register a COCO-format instances set under `name`, loaded by `load_checked_coco`."""
    if image_check not in IMAGE_CHECKS:
        raise ConfigError(f"image check {image_check!r}: not one of {', '.join(IMAGE_CHECKS)}")
    if not os.path.isfile(json_file):
        raise DatasetError(f"data set file not found: {json_file}")
    if not os.path.isdir(image_root):
        raise DatasetError(f"image directory of data set '{name}' not found: {image_root}")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
            return  # the same registration again (the launcher's and a worker's)
        raise DatasetError(f"data set name '{name}' is already registered; choose another name")
    DatasetCatalog.register(name, lambda: load_checked_coco(json_file, image_root, name, image_check))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def load_checked_coco(json_file, image_root, name=None, image_check="once"):
    """detectron2's `load_coco_json`, each record's boxes, categories and image file (header) checked."""
    try:
        with gc_paused():
            dicts = load_coco_json(json_file, image_root, name)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{json_file} is not a JSON file ({e})") from None
    except (KeyError, TypeError, ValueError, AssertionError, IndexError) as e:
        raise _named_record_error(json_file, e) from None
    for record in dicts:
        for annotation in record.get("annotations", ()):
            box = annotation.get("bbox")
            if box is not None and (len(box) != 4 or box[2] < 0 or box[3] < 0):
                raise DatasetError(
                    f"{json_file}: annotation id {_annotation_id(json_file, record['image_id'], box)} (image id "
                    f"{record['image_id']}): bbox {box} is not [x, y, width, height] with width, height >= 0"
                )
    if image_check != "never":
        _check_images(json_file, image_root, dicts, image_check == "always")
    return dicts


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic GC: it would traverse a COCO set's millions of new (acyclic) objects over and over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_images(json_file, image_root, dicts, always):
    """Check this process's share of the image files, unless a passed check of this version is remembered."""
    rank, world = comm.get_rank(), comm.get_world_size()
    markers = [_marker(json_file, image_root, 0, 1), _marker(json_file, image_root, rank, world)]
    if not always and any(os.path.isfile(m) for m in markers):
        return
    share = dicts[rank::world]
    threads = 8  # header reads wait on the file system (on network storage, milliseconds each)
    check = functools.partial(_image_problem, json_file)
    # consecutive runs of indexed records, one per thread: each stops at its first problem
    indexed, size = list(enumerate(share)), -(-len(share) // threads)
    runs = [indexed[i : i + size] for i in range(0, len(indexed), size)]
    with ThreadPoolExecutor(threads) as pool:
        found = pool.map(lambda run: next(filter(None, map(check, run)), None), runs)
        problem = min(filter(None, found), default=None)  # the first in the file's order
    if problem:
        raise DatasetError(problem[1])
    os.makedirs(os.path.dirname(markers[1]), exist_ok=True)
    with atomic_write(markers[1], "w") as f:
        json.dump({"json_file": json_file, "image_root": image_root, "images": len(share)}, f)


def _image_problem(json_file, indexed_record):
    """None, or (index, the line that names what is wrong with a record's image file)."""
    index, record = indexed_record
    path = record["file_name"]
    where = f"{json_file}: image id {record['image_id']} ({path})"
    try:
        if os.path.getsize(path) == 0:
            return index, f"{where}: empty file (0 bytes)"
        size = _jpeg_or_png_size(path)
        if size is None:  # another format, EXIF, or a header this reader does not know: PIL reads it
            with Image.open(path) as opened:  # the header only
                size = opened.size
                if opened.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # detectron2 shows it rotated
                    size = size[::-1]
    except FileNotFoundError:
        return index, f"{where}: file not found"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return index, f"{where}: not a readable image ({one_line(e)})"
    width, height = record.get("width"), record.get("height")
    if None not in (width, height) and (width, height) != tuple(size):
        return index, f"{where}: the file is {size[0]}x{size[1]} but the record says {width}x{height}"
    return None


def _jpeg_or_png_size(path):
    """(width, height) from a PNG's IHDR or a JPEG's frame header without EXIF, read in a few bytes; else None."""
    with open(path, "rb") as f:
        head = f.read(24)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if not head.startswith(b"\xff\xd8"):
            return None
        f.seek(2)
        while True:
            marker = f.read(4)
            if len(marker) < 4 or marker[0] != 0xFF or marker[1] in (0xFF, 0xE1):
                return None  # fill bytes, EXIF (APP1) or a damaged header: left to PIL
            kind, length = marker[1], struct.unpack(">H", marker[2:])[0]
            if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):  # a start of frame
                height, width = struct.unpack(">HH", f.read(5)[1:])
                return width, height
            f.seek(length - 2, os.SEEK_CUR)


def _marker(json_file, image_root, rank, world):
    """The file that remembers a passed image check of this data set version (share `rank` of `world`)."""
    stat, folder = os.stat(json_file), os.stat(image_root)
    # a folder's mtime changes when a file is added, removed or renamed in it
    identity = [os.path.realpath(json_file), stat.st_size, stat.st_mtime_ns]
    identity += [os.path.realpath(image_root), folder.st_mtime_ns]
    key = hashlib.sha1(json.dumps(identity).encode()).hexdigest()
    cache = os.environ.get("WS_D2_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ws_d2"))
    return os.path.join(cache, "checked_images", f"{key}-{rank}of{world}.json")


def _annotation_id(json_file, image_id, box):
    # detectron2's records drop annotation ids: keeping them costs every load, so a bad box's id is looked up
    with open(json_file) as f:
        annotations = json.load(f)["annotations"]
    return next(
        (a.get("id") for a in annotations if a["image_id"] == image_id and a.get("bbox") == box), None
    )


def _named_record_error(json_file, error):
    """What load_coco_json refused, in one line naming the record: the file is read again to find it."""
    try:
        with open(json_file) as f:
            content = json.load(f)
        missing = [key for key in ("images", "annotations", "categories") if key not in content]
        if missing:
            return DatasetError(f"{json_file} is not a COCO instances file: it lacks {', '.join(missing)}")
        category_ids = {c["id"] for c in content["categories"]}
        for annotation in content["annotations"]:
            if annotation.get("category_id") not in category_ids:
                return DatasetError(
                    f"{json_file}: annotation id {annotation.get('id')} (image id {annotation.get('image_id')}): "
                    f"category_id {annotation.get('category_id')} is not in 'categories'"
                )
    except (KeyError, TypeError, AttributeError):
        pass
    return DatasetError(f"{json_file}: a record lacks a field or has a wrong type ({one_line(error)})")


def check_datasets(cfg, train=True):
    """check_dataset_names for the config's TEST (and TRAIN if `train`) data sets and NUM_CLASSES."""
    names = (*(cfg.DATASETS.TRAIN if train else ()), *cfg.DATASETS.TEST)
    check_dataset_names(names, cfg.MODEL.ROI_HEADS.NUM_CLASSES)


def check_dataset_names(names, num_classes, num_classes_key="MODEL.ROI_HEADS.NUM_CLASSES"):
    """Refuse a data set that is not registered, missing on disk or, once its classes are known (when loaded),
    has not `num_classes` (config key `num_classes_key`; None: any number)."""
    for name in names:
        if name not in DatasetCatalog.list():
            raise DatasetError(
                f"data set '{name}' is not registered (use --coco-dataset NAME JSON IMAGE_DIR or a built-in name)"
            )
        meta = MetadataCatalog.get(name)
        for path in (meta.get("json_file"), meta.get("image_root"), meta.get("sem_seg_root")):
            if path and not os.path.exists(path):
                hint = meta.get("missing_hint", "check DETECTRON2_DATASETS or the registered path")
                raise DatasetError(f"data set '{name}': {path} not found ({hint})")
        classes = meta.get("thing_classes")
        if None not in (classes, num_classes) and len(classes) != num_classes:
            raise DatasetError(
                f"data set '{name}' has {len(classes)} categories but {num_classes_key} is {num_classes}"
            )
