"""The synthetic shapes set: deterministic, valid COCO instance annotations, registered with its classes, and
its panoptic-separated variant."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools import mask as mask_utils

from ws_d2.config import get_ws_cfg
from ws_d2.data import (
    SYNTHETIC_CLASSES,
    check_dataset_names,
    check_datasets,
    generate_synthetic_dataset,
    register_coco_dataset,
    register_synthetic_dataset,
)
from ws_d2.errors import DatasetError

SPLITS = {"train": 6, "val": 3}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    first = generate_synthetic_dataset(tmp_path / "a", SPLITS, image_size=64)
    second = generate_synthetic_dataset(tmp_path / "b", SPLITS, image_size=64)
    other = generate_synthetic_dataset(tmp_path / "c", SPLITS, image_size=64, seed=1)
    for split in SPLITS:
        json_a, json_b = first[split][0], second[split][0]
        assert json.loads(open(json_a).read()) == json.loads(open(json_b).read())
        for name in sorted(p.name for p in (tmp_path / "a" / split).iterdir()):
            assert (tmp_path / "a" / split / name).read_bytes() == (
                tmp_path / "b" / split / name
            ).read_bytes()
    assert open(first["train"][0]).read() != open(other["train"][0]).read()
    # train and val never share an image
    assert (tmp_path / "a/train/000001.png").read_bytes() != (tmp_path / "a/val/000001.png").read_bytes()


def test_annotations_are_valid_instances(tmp_path):
    json_file, _ = generate_synthetic_dataset(tmp_path, {"train": 20}, image_size=96)["train"]
    content = json.loads(open(json_file).read())
    assert [c["name"] for c in content["categories"]] == SYNTHETIC_CLASSES
    assert {a["category_id"] for a in content["annotations"]} == {1, 2, 3}
    for annotation in content["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96.01 and y + h <= 96.01 and w > 5 and h > 5
        rle = mask_utils.frPyObjects(annotation["segmentation"], 96, 96)
        pixels = mask_utils.area(mask_utils.merge(rle))
        assert abs(pixels - annotation["area"]) <= 0.15 * annotation["area"] + 10  # polygon matches its mask
    # the shapes vary in size
    assert np.std([a["bbox"][2] for a in content["annotations"]]) > 2


def test_names_registered_on_import_with_classes():
    for name in ("ws_d2_synthetic_train", "ws_d2_synthetic_val"):
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).thing_classes == SYNTHETIC_CLASSES


def test_checks_name_the_problem(tmp_path):
    cfg = get_ws_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("not_registered",), ()
    with pytest.raises(DatasetError, match="'not_registered' is not registered"):
        check_datasets(cfg)
    json_file, image_dir = generate_synthetic_dataset(tmp_path, {"val": 2}, image_size=64)["val"]
    register_coco_dataset("checked_val", json_file, image_dir)
    cfg.DATASETS.TRAIN = ("checked_val",)
    check_datasets(cfg)  # its classes are not known before it is loaded: nothing is parsed to register it
    DatasetCatalog.get("checked_val")
    with pytest.raises(DatasetError, match="has 3 categories but MODEL.ROI_HEADS.NUM_CLASSES is 80"):
        check_datasets(cfg)
    (tmp_path / "broken.json").write_text("{not json")
    register_coco_dataset("broken", str(tmp_path / "broken.json"), image_dir)
    with pytest.raises(DatasetError, match="is not a JSON file"):
        DatasetCatalog.get("broken")


def test_an_unlisted_split_has_the_same_files_in_every_process(tmp_path):
    # its seed offset must not come from hash(), which Python randomizes per process: this one's is random,
    # the other process's is fixed (PYTHONHASHSEED=0)
    code = "import sys, ws_d2.data as d; d.generate_synthetic_dataset(sys.argv[1], {'holdout': 2}, image_size=32)"
    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "other")], check=True, env=env, capture_output=True
    )
    generate_synthetic_dataset(str(tmp_path / "this"), {"holdout": 2}, image_size=32)
    for name in ("000001.png", "000002.png"):
        assert (tmp_path / "this" / "holdout" / name).read_bytes() == (
            tmp_path / "other" / "holdout" / name
        ).read_bytes()


def test_panoptic_separated_variant_labels_every_shape_0_and_the_rest_1(tmp_path):
    """As detectron2's *_panoptic_separated sets: the instance records, each with a stuff label map in which
    all things are 0 and the background (the one stuff class) is 1."""
    generate_synthetic_dataset(tmp_path, {"train": 4}, image_size=96)
    names = register_synthetic_dataset(str(tmp_path), "panoptic_test", splits=("train",))
    name = names[1]
    try:
        meta = MetadataCatalog.get(name)
        assert meta.stuff_classes == ["things", "background"] and meta.thing_classes == SYNTHETIC_CLASSES
        records = DatasetCatalog.get(name)
        assert len(records) == 4
        for record in records:
            label = cv2.imread(record["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
            assert label.shape == (96, 96) and set(np.unique(label)) == {0, 1}
            polygons = [a["segmentation"] for a in record["annotations"]]
            shapes = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(sum(polygons, []), 96, 96)))
            things = label == 0
            assert (things & (shapes == 1)).sum() >= 0.8 * (things | (shapes == 1)).sum()  # IoU: edges differ
        shutil.rmtree(tmp_path / "panoptic_stuff_train")
        with pytest.raises(DatasetError, match="panoptic_stuff_train not found"):
            check_dataset_names([name], 3)
    finally:
        for registered in names:
            DatasetCatalog.remove(registered)
            MetadataCatalog.remove(registered)
