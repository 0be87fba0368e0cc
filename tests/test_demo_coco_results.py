"""tools/demo.py --json's COCO results: perfect predictions score AP 100 with pycocotools, worse ones less."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ws_d2.errors import DatasetError

# Data set category ids 3 and 7 (not contiguous, as in COCO) are the model's classes 0 and 1.
METADATA_NAME = "ws_d2_test_coco_results"
CATEGORY_IDS = {3: 0, 7: 1}
COCO_ID_OF_CLASS = {0: 3, 1: 7}


@pytest.fixture(scope="module")
def demo(load_tool):
    return load_tool("demo")


def square(x, y, size):
    return [x, y, x + size, y, x + size, y + size, x, y + size]


def triangle(x, y, size):
    return [x, y, x + size, y + size, x, y + size]


@pytest.fixture(scope="module")
def coco_ground_truth(tmp_path_factory):
    objects = {  # image id -> [(category id, polygon)]
        1: [(3, square(8, 8, 32)), (7, triangle(40, 30, 20))],
        2: [(7, square(20, 4, 36)), (3, triangle(2, 30, 30)), (3, square(44, 44, 16))],
    }
    annotations = []
    for image_id, items in objects.items():
        for category_id, polygon in items:
            xs, ys = polygon[0::2], polygon[1::2]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": [polygon],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    dataset = {
        "images": [{"id": i, "file_name": f"img{i}.png", "height": 64, "width": 64} for i in objects],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    path.write_text(json.dumps(dataset))
    if METADATA_NAME not in MetadataCatalog.list():
        MetadataCatalog.get(METADATA_NAME).set(
            thing_classes=["cat", "dog"], thing_dataset_id_to_contiguous_id=CATEGORY_IDS
        )
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path)), path


def predictions_from_ground_truth(coco, image_id, shift=0.0):
    """Instances equal to the ground truth of one image (boxes and masks moved right by `shift` px)."""
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    instances = Instances((64, 64))
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32)
    boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
    boxes[:, 0::2] += shift
    instances.pred_boxes = Boxes(boxes)
    instances.scores = torch.linspace(0.9, 0.8, len(annotations))
    instances.pred_classes = torch.tensor([CATEGORY_IDS[a["category_id"]] for a in annotations])
    masks = np.stack([coco.annToMask(a) for a in annotations])
    instances.pred_masks = torch.from_numpy(np.roll(masks, int(shift), axis=2)).bool()
    return instances


def average_precision(coco, results, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        detections = coco.loadRes(json.loads(json.dumps(results)))  # through JSON, as the file is
        evaluation = COCOeval(coco, detections, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return 100 * evaluation.stats[0]


def results_for(demo, coco, category_ids, shift=0.0):
    results = []
    for image_id in coco.getImgIds():
        instances = predictions_from_ground_truth(coco, image_id, shift)
        results += demo.instances_to_coco_results(instances, image_id, category_ids)
    return results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_predictions_score_100_and_shifted_less(demo, coco_ground_truth, iou_type):
    coco, _ = coco_ground_truth
    _, category_ids = demo.coco_ids([], MetadataCatalog.get(METADATA_NAME))
    perfect = results_for(demo, coco, category_ids)
    assert {r["category_id"] for r in perfect} == {3, 7}
    assert all(isinstance(r["segmentation"]["counts"], str) for r in perfect)
    # every prediction equals its ground truth (IoU exactly 1): AP is 100 up to pycocotools' float sums
    assert average_precision(coco, perfect, iou_type) == pytest.approx(100.0)

    # 6 px is a fifth to a third of the 16-36 px objects: IoU ~0.5-0.7 fails most of the 0.5:0.95
    # thresholds and passes the lowest, so AP lands far from both bounds
    shifted_ap = average_precision(coco, results_for(demo, coco, category_ids, shift=6), iou_type)
    assert 0 < shifted_ap < 90


def test_category_ids_need_the_metadata_mapping(demo, coco_ground_truth):
    coco, _ = coco_ground_truth
    unmapped = results_for(demo, coco, category_ids=None)  # the model's 0/1, which are not the data set's ids
    assert {r["category_id"] for r in unmapped} == {0, 1}
    assert average_precision(coco, unmapped, "bbox") == 0
    with pytest.raises(DatasetError, match="the model's class 1 has no COCO category id"):
        results_for(demo, coco, category_ids={0: 3})


def test_boxes_are_xywh(demo, coco_ground_truth):
    coco, _ = coco_ground_truth
    result = results_for(demo, coco, COCO_ID_OF_CLASS)[0]
    # integer pixel coordinates, exact in float32
    assert result["bbox"] == pytest.approx(coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]["bbox"])


def test_image_ids(demo, coco_ground_truth, tmp_path):
    _, annotation_file = coco_ground_truth

    def image_ids(paths, annotations=None):
        return demo.coco_ids(paths, None, annotations)[0]

    assert image_ids(["a/000000000139.jpg", "b/42.png"]) == {"a/000000000139.jpg": 139, "b/42.png": 42}
    assert image_ids(["x/cat.jpg", "x/7.jpg"]) == {"x/cat.jpg": 1, "x/7.jpg": 2}
    assert image_ids(["x/7.jpg", "y/007.jpg"]) == {"x/7.jpg": 1, "y/007.jpg": 2}  # the same number twice
    assert image_ids(["d/img2.png"], str(annotation_file)) == {"d/img2.png": 2}
    with pytest.raises(DatasetError, match="lists no image named img9.png"):
        image_ids(["d/img2.png", "d/img9.png"], str(annotation_file))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"list\.json: not a COCO annotation file"):
        image_ids(["d/img2.png"], str(tmp_path / "list.json"))


def test_category_ids_from_metadata_or_annotation_file(demo, coco_ground_truth):
    _, annotation_file = coco_ground_truth
    assert demo.coco_ids([], MetadataCatalog.get(METADATA_NAME))[1] == COCO_ID_OF_CLASS
    # Names only (a set registered before detectron2 loaded it): the annotation file decides, in
    # detectron2's order, so the results score against that file.
    names_only = MetadataCatalog.get("ws_d2_test_names_only")
    names_only.thing_classes = ["cat", "dog"]
    assert demo.coco_ids([], names_only, str(annotation_file))[1] == COCO_ID_OF_CLASS
    assert demo.coco_ids([], names_only)[1] is None
