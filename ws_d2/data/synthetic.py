"""A small deterministic COCO-format instance-segmentation set of shapes, made in seconds from a seed, and its
panoptic-separated variant (docs/TRAINING.md)."""

import json
import math
import os
import zlib

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg, register_coco_instances
from detectron2.data.datasets.coco_panoptic import merge_to_panoptic
from detectron2.structures import Boxes, Instances, PolygonMasks

from ..files import atomic_write

SYNTHETIC_CLASSES = ["circle", "square", "triangle"]
# split -> (number of images, seed offset); the val images never repeat a train image
SYNTHETIC_SPLITS = {"train": (400, 0), "val": (50, 1_000_003)}
# the semantic classes of the panoptic-separated variant: detectron2's label 0 for all things, then the stuff
PANOPTIC_STUFF_CLASSES = ["things", "background"]
MISSING_HINT = "generate it with `make quickstart` or ws_d2.data.generate_synthetic_dataset()"


def default_synthetic_root():
    return os.path.join(os.environ.get("WS_D2_DATASETS", "datasets"), "ws_d2_synthetic")


def _split_paths(root, split):
    """(COCO JSON, image folder, stuff label map folder) of a split."""
    json_file = os.path.join(root, "annotations", f"instances_{split}.json")
    return json_file, os.path.join(root, split), os.path.join(root, f"panoptic_stuff_{split}")


def _background(rng, size):
    kind = rng.integers(3)
    if kind == 0:  # linear gradient between two colors, any direction
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
        t = (xs * math.cos(angle) + ys * math.sin(angle)) / math.sqrt(2) + 0.5
        c0, c1 = rng.uniform(0, 255, (2, 3))
        image = c0 + np.clip(t, 0, 1)[..., None] * (c1 - c0)
    elif kind == 1:  # flat color
        image = np.broadcast_to(rng.uniform(0, 255, 3), (size, size, 3)).astype(np.float64)
    else:  # smooth color blotches
        coarse = rng.uniform(0, 255, (4, 4, 3))
        image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    image = image + rng.normal(0, rng.uniform(2, 12), image.shape)
    return np.clip(image, 0, 255)


def _shape_polygon(category, center, radius, angle):
    corners = {"circle": 32, "square": 4, "triangle": 3}[SYNTHETIC_CLASSES[category]]
    theta = angle + np.arange(corners) * 2 * math.pi / corners
    return np.stack([center[0] + radius * np.cos(theta), center[1] + radius * np.sin(theta)], axis=1)


def _draw_image(rng, size, max_objects):
    image = _background(rng, size)
    shapes = []  # (category, polygon), drawn without overlap so each mask is the whole shape
    for _ in range(rng.integers(1, max_objects + 1)):
        for _attempt in range(20):
            radius = rng.uniform(0.08, 0.25) * size
            center = rng.uniform(radius, size - radius, 2)
            if all(np.hypot(*(center - c)) > radius + r + 2 for c, r, _ in shapes):
                break
        else:
            continue
        category = int(rng.integers(len(SYNTHETIC_CLASSES)))
        polygon = _shape_polygon(category, center, radius, rng.uniform(0, 2 * math.pi))
        # a color that stands out from the background under the shape
        under = image[int(center[1]), int(center[0])]
        color = rng.uniform(0, 255, 3)
        while np.abs(color - under).sum() < 150:
            color = rng.uniform(0, 255, 3)
        cv2.fillPoly(image, [np.round(polygon * 16).astype(np.int32)], color.tolist(), cv2.LINE_AA, shift=4)
        shapes.append((center, radius, (category, polygon)))
    return image.astype(np.uint8), [shape for _, _, shape in shapes]


def _coco_annotation(polygon, category, image_id, annotation_id):
    xs, ys = polygon[:, 0], polygon[:, 1]
    area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category + 1,
        "segmentation": [np.round(polygon, 2).reshape(-1).tolist()],
        "area": round(float(area), 2),
        "bbox": [round(float(v), 2) for v in (xs.min(), ys.min(), np.ptp(xs), np.ptp(ys))],
        "iscrowd": 0,
    }


def generate_synthetic_dataset(root=None, splits=None, image_size=128, max_objects=4, seed=0):
    """Write the shapes set (PNG images + COCO JSON per split) under `root`; same arguments, same files, and
    a split already written with them is kept. `splits`: {name: images}. Returns {split: (json, image_dir)}."""
    root = root or default_synthetic_root()
    splits = splits or {name: count for name, (count, _) in SYNTHETIC_SPLITS.items()}
    categories = [
        {"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(SYNTHETIC_CLASSES, 1)
    ]
    written = {}
    for split, count in splits.items():
        json_file, image_dir, _ = _split_paths(root, split)
        written[split] = (json_file, image_dir)
        # a split not listed gets an offset from its name: stable across processes, unlike hash()
        offset = SYNTHETIC_SPLITS.get(split, (0, zlib.crc32(split.encode()) % 1_000_000))[1]
        info = {"description": "ws_d2 synthetic shapes", "images": count, "image_size": image_size,
                "max_objects": max_objects, "seed": seed + offset}  # fmt: skip
        if os.path.isfile(json_file):
            with open(json_file) as f:
                if json.load(f).get("info") == info:
                    continue
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(os.path.dirname(json_file), exist_ok=True)
        rng = np.random.default_rng(seed + offset)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image, shapes = _draw_image(rng, image_size, max_objects)
            file_name = f"{image_id:06d}.png"
            cv2.imwrite(os.path.join(image_dir, file_name), image[:, :, ::-1])  # RGB -> BGR for OpenCV
            images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
            for category, polygon in shapes:
                annotations.append(_coco_annotation(polygon, category, image_id, len(annotations) + 1))
        content = {"info": info, "images": images, "annotations": annotations, "categories": categories}
        with atomic_write(json_file, "w") as f:  # the JSON marks a complete split
            json.dump(content, f)
    for split in written:  # the panoptic-separated variant's stuff labels
        json_file, _, stuff_dir = _split_paths(root, split)
        write_label_maps(json_file, stuff_dir, dict.fromkeys(SYNTHETIC_CLASSES, 0), background=1)
    return written


def write_label_maps(json_file, label_dir, labels, background):
    """One PNG label map per image of a synthetic split's COCO file, in `label_dir`: each shape's polygon
    filled with `labels[its class name]`, every other pixel `background`; maps already made are kept."""
    with open(json_file) as f:
        content = json.load(f)
    marker = os.path.join(label_dir, "info.json")
    made_from = {"info": content["info"], "labels": labels, "background": background}
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == made_from:
                return label_dir
    os.makedirs(label_dir, exist_ok=True)
    label_of = {c["id"]: labels[c["name"]] for c in content["categories"]}  # by name, not by id arithmetic
    polygons = {image["id"]: [] for image in content["images"]}
    for annotation in content["annotations"]:
        for polygon in annotation["segmentation"]:
            polygons[annotation["image_id"]].append((label_of[annotation["category_id"]], polygon))
    for image in content["images"]:
        label = np.full((image["height"], image["width"]), background, np.uint8)
        for value, polygon in polygons[image["id"]]:
            points = np.round(np.asarray(polygon).reshape(-1, 2) * 16).astype(np.int32)
            cv2.fillPoly(label, [points], value, cv2.LINE_8, shift=4)  # the image's polygon, unblended
        cv2.imwrite(os.path.join(label_dir, image["file_name"]), label)
    with atomic_write(marker, "w") as f:  # written last: marks a complete split
        json.dump(made_from, f)
    return label_dir


def register_synthetic_dataset(root=None, prefix="ws_d2_synthetic", splits=tuple(SYNTHETIC_SPLITS)):
    """Register `{prefix}_{split}` and `{prefix}_{split}_panoptic_separated` for each split, with class names,
    whether or not the files exist yet. Returns the names."""
    root = root or default_synthetic_root()
    names = []
    for split in splits:
        name, panoptic = f"{prefix}_{split}", f"{prefix}_{split}_panoptic_separated"
        json_file, image_dir, stuff_dir = _split_paths(root, split)
        for registered in {name, panoptic} & set(DatasetCatalog.list()):
            DatasetCatalog.remove(registered)
            MetadataCatalog.remove(registered)
        metadata = {"thing_classes": list(SYNTHETIC_CLASSES), "missing_hint": MISSING_HINT}
        register_coco_instances(name, metadata, json_file, image_dir)
        # as detectron2's register_coco_panoptic_separated, from the same files
        DatasetCatalog.register(
            panoptic,
            lambda j=json_file, i=image_dir, s=stuff_dir, n=panoptic: merge_to_panoptic(
                load_coco_json(j, i, n), load_sem_seg(s, i, "png", "png")
            ),
        )
        MetadataCatalog.get(panoptic).set(
            **metadata, stuff_classes=list(PANOPTIC_STUFF_CLASSES), json_file=json_file, image_root=image_dir,
            sem_seg_root=stuff_dir, ignore_label=255, evaluator_type="coco_panoptic_seg",
        )  # fmt: skip
        names += [name, panoptic]
    return names


def synthetic_batch(cfg, size: int, batch: int, seed: int = 0, training: bool = True):
    """detectron2 input dicts: `batch` random RGB images of size x 4/3 size; for training, each with as many
    random gt instances as the RoI sampler's foreground quota, so that every step does the same work."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size, round(size * 4 / 3)
    roi_heads = cfg.MODEL.ROI_HEADS
    num_instances = max(1, round(roi_heads.BATCH_SIZE_PER_IMAGE * roi_heads.POSITIVE_FRACTION))
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        record = {"image": image, "height": height, "width": width}
        if training:
            wh = torch.rand(num_instances, 2, generator=generator) * 0.45 + 0.05  # 5-50 % of the side
            xy = torch.rand(num_instances, 2, generator=generator) * (1 - wh)
            x0, y0 = xy[:, 0] * width, xy[:, 1] * height
            x1, y1 = x0 + wh[:, 0] * width, y0 + wh[:, 1] * height
            instances = Instances((height, width))
            instances.gt_boxes = Boxes(torch.stack([x0, y0, x1, y1], dim=1))
            instances.gt_classes = torch.randint(roi_heads.NUM_CLASSES, (num_instances,), generator=generator)
            if cfg.MODEL.MASK_ON:
                # a diamond inscribed in each box: a real polygon, cheap to rasterize
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                polygons = torch.stack([cx, y0, x1, cy, cx, y1, x0, cy], dim=1).tolist()
                instances.gt_masks = PolygonMasks([[p] for p in polygons])
            record["instances"] = instances
            if cfg.MODEL.META_ARCHITECTURE == "PanopticFPN":  # its semantic head's target: a class per pixel
                classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
                record["sem_seg"] = torch.randint(classes, (height, width), generator=generator)
        inputs.append(record)
    return inputs
