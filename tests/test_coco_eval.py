"""COCO evaluation: without detectron2's compiled COCOeval, its fast path is faster-coco-eval, whose every
AP and AR figure (bbox and segm, per category too) is pycocotools'; TEST.FAST_COCO_EVAL False forces
pycocotools."""

import contextlib
import copy
import io

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO

from ws_d2 import compat

SIZE = 128  # room for small, medium and large objects (COCO's area ranges: 32^2, 96^2 pixels)


def _rle(x, y, w, h):
    mask = np.zeros((SIZE, SIZE), np.uint8, order="F")
    mask[int(y) : int(y + h), int(x) : int(x + w)] = 1
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _synthetic_set(crowd=True, seed=0):
    """(ground truth COCO, results): 60 images of 128 px, 3 categories, one in 6 images empty, ~15% crowd
    regions; 4 detections per object (jittered, some of another category) plus false positives on the
    empty images."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, 61):
        images.append({"id": image_id, "height": SIZE, "width": SIZE, "file_name": f"{image_id}.png"})
        if image_id % 6 == 0:
            for _ in range(2):  # detections on an image with no ground truth
                x, y, w, h = *rng.uniform(0, 40, 2), *rng.uniform(4, 20, 2)
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(rng.integers(1, 4)),
                        "score": float(rng.random()),
                        "bbox": [x, y, w, h],
                        "segmentation": _rle(x, y, w, h),
                    }  # fmt: skip
                )
            continue
        for _ in range(int(rng.integers(1, 6))):
            w, h = rng.uniform(4, 112, 2)
            x, y = rng.uniform(0, SIZE - w), rng.uniform(0, SIZE - h)
            category = int(rng.integers(1, 4))
            rle = _rle(x, y, w, h)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": float(mask_util.area(rle)),
                    "segmentation": rle,
                    "iscrowd": int(crowd and rng.random() < 0.15),
                }  # fmt: skip
            )
            for _ in range(4):
                dx, dy = rng.normal(0, 3, 2)
                label = category if rng.random() < 0.8 else int(rng.integers(1, 4))
                box = [x + dx, y + dy, w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": label,
                        "score": float(rng.random()),
                        "bbox": box,
                        "segmentation": _rle(*box),
                    }  # fmt: skip
                )
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
    return ground_truth, results


def _figures(ground_truth, results, iou_type, use_fast_impl):
    """The 12 summary figures (AP and AR), then per category: AP, AP50, AP75 and AR at 100 detections, from the
    COCOeval that COCOEvaluator calls: the fast slot (`coco_evaluation.COCOeval_opt`) or pycocotools'."""
    from detectron2.evaluation import coco_evaluation
    from pycocotools.cocoeval import COCOeval

    if iou_type == "segm":  # as COCOEvaluator does: mask areas, not box areas, make small/medium/large
        results = [{key: value for key, value in r.items() if key != "bbox"} for r in results]
    coco_eval = coco_evaluation.COCOeval_opt if use_fast_impl else COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = coco_eval(ground_truth, ground_truth.loadRes(copy.deepcopy(results)), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    precision = np.asarray(evaluation.eval["precision"], dtype=np.float64)  # T x R x K x area x maxDets
    recall = np.asarray(evaluation.eval["recall"], dtype=np.float64)  # T x K x area x maxDets

    def mean_valid(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else -1.0

    per_category = [
        [
            mean_valid(precision[:, :, k, 0, -1]),
            mean_valid(precision[0, :, k, 0, -1]),
            mean_valid(precision[5, :, k, 0, -1]),
            mean_valid(recall[:, k, 0, -1]),
        ]  # fmt: skip
        for k in range(precision.shape[2])
    ]
    return np.asarray(evaluation.stats[:12], dtype=np.float64), np.asarray(per_category), type(evaluation)


@pytest.mark.skipif(compat.HAS_COMPILED_OPS, reason="detectron2's compiled COCOeval is the fast path")
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_fast_path_is_faster_coco_eval_with_pycocotools_figures(iou_type):
    from faster_coco_eval import COCOeval_faster
    from pycocotools.cocoeval import COCOeval

    ground_truth, results = _synthetic_set()
    fast, fast_per_category, fast_class = _figures(ground_truth, results, iou_type, use_fast_impl=True)
    slow, slow_per_category, slow_class = _figures(ground_truth, results, iou_type, use_fast_impl=False)
    assert issubclass(fast_class, COCOeval_faster) and slow_class is COCOeval
    # the figures are ratios of integer counts over the same matches: any difference beyond float
    # rounding (1e-4 is far above it) is a matching or accumulation difference
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fast_per_category, slow_per_category, rtol=0, atol=1e-4)
    assert (slow > 0.05).all() and (slow_per_category > 0.05).all()  # matches at every area range
    # the crowd regions change the figures: the comparison above covers their handling
    ground_truth_no_crowd, _ = _synthetic_set(crowd=False)
    no_crowd, _, _ = _figures(ground_truth_no_crowd, results, iou_type, use_fast_impl=False)
    assert np.abs(no_crowd - slow).max() > 1e-3


def test_config_key_forces_pycocotools(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ws_d2 import load_config
    from ws_d2.engine import WSTrainer

    name = "ws_d2_test_coco_eval_choice"
    annotations = tmp_path / "annotations.json"
    annotations.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}')
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file=str(annotations), thing_classes=["a"])
    try:
        for fast in (True, False):
            cfg = load_config(None, ["TEST.FAST_COCO_EVAL", str(fast), "OUTPUT_DIR", str(tmp_path)])
            assert WSTrainer.build_evaluator(cfg, name)._use_fast_impl is fast
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
