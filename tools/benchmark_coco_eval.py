#!/usr/bin/env python
"""COCO evaluation time of pycocotools' COCOeval against faster-coco-eval's, side by side in one run.

  nice python tools/benchmark_coco_eval.py --output coco_eval_benchmark.json
  python tools/benchmark_coco_eval.py --images 200   # a quick look

The result set is COCO-val-sized and synthetic: 5,000 images of 480 x 640, ~7 ground-truth instances each
(COCO val2017 has 36,781 over 5,000 images; 1 in 10 of them crowd regions, 1 in 50 images empty), 80
categories, and 100 scored detections per image jittered around the ground truth and at random (what a
detector with TEST.DETECTIONS_PER_IMAGE 100 hands in). Masks are the RLEs of the boxes: mask IoU then costs
what it costs on real masks of that size. Each implementation runs evaluate + accumulate + summarize on the
same COCO objects, as detectron2's COCOEvaluator calls it, for bbox and for segm; the two are timed in
alternating order and their 12 summary figures compared. Exit 0 when they agree to 1e-4, 1 when not.
"""

import argparse
import contextlib
import io
import json
import sys
import time

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ws_d2.errors import WSD2Error, command_line

HEIGHT, WIDTH, CATEGORIES = 480, 640, 80


def synthetic_coco(num_images, detections_per_image, seed=0):
    """(ground-truth COCO, detection results list) as described in the module docstring."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": HEIGHT, "width": WIDTH, "file_name": f"{image_id}.jpg"})
        count = 0 if image_id % 50 == 0 else int(rng.integers(1, 14))
        xy = rng.uniform(0, [WIDTH - 40, HEIGHT - 40], (count, 2))
        wh = rng.uniform(8, 300, (count, 2))
        wh = np.minimum(wh, [WIDTH, HEIGHT] - xy)
        boxes = np.concatenate([xy, wh], axis=1)
        categories = rng.integers(1, CATEGORIES + 1, count)
        for box, rle, category in zip(boxes, _rles(boxes), categories):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(category),
                    "bbox": [float(v) for v in box],
                    "area": float(mask_util.area(rle)),
                    "iscrowd": int(rng.random() < 0.1),
                    "segmentation": rle,
                }
            )
        # about half the detections near a ground-truth box (same or other category), the rest at random
        near = rng.integers(0, count, detections_per_image // 2) if count else np.zeros(0, int)
        jitter = rng.normal(0, 0.1, (len(near), 4)) * np.repeat(boxes[near, 2:], 2, axis=1) if count else 0
        det_boxes = np.concatenate(
            [
                boxes[near] + jitter if count else np.zeros((0, 4)),
                np.concatenate(
                    [
                        rng.uniform(0, [WIDTH - 40, HEIGHT - 40], (detections_per_image - len(near), 2)),
                        rng.uniform(8, 300, (detections_per_image - len(near), 2)),
                    ],
                    axis=1,
                ),
            ]
        )
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], 1.0)
        det_categories = np.where(
            rng.random(detections_per_image) < 0.7,
            np.concatenate(
                [categories[near], rng.integers(1, CATEGORIES + 1, detections_per_image - len(near))]
            ),
            rng.integers(1, CATEGORIES + 1, detections_per_image),
        )
        scores = rng.random(detections_per_image)
        for box, rle, category, score in zip(det_boxes, _rles(det_boxes), det_categories, scores):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(category),
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                    "segmentation": rle,
                }
            )
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class {c}"} for c in range(1, CATEGORIES + 1)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
    return ground_truth, results


def _rles(boxes):
    rles = mask_util.frPyObjects(np.asarray(boxes, dtype=np.float64), HEIGHT, WIDTH) if len(boxes) else []
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def evaluate(evaluator_class, ground_truth, results, iou_type):
    """(seconds, 12 summary figures) of one COCOeval run, as detectron2's COCOEvaluator makes it."""
    if iou_type == "segm":  # COCOEvaluator drops the box so that the mask area defines small/medium/large
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    else:
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        detections = ground_truth.loadRes(results)
        start = time.perf_counter()
        evaluation = evaluator_class(ground_truth, detections, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        seconds = time.perf_counter() - start
    return seconds, np.asarray(evaluation.stats[:12], dtype=np.float64)


@command_line("benchmark_coco_eval")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections-per-image", type=int, default=100)
    parser.add_argument("--output", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError as e:
        raise WSD2Error(f"faster-coco-eval is not installed ({e}): pip install -r requirements.txt") from None

    start = time.perf_counter()
    ground_truth, results = synthetic_coco(args.images, args.detections_per_image)
    print(
        f"{args.images} images, {len(ground_truth.anns)} ground-truth instances, {len(results)} detections "
        f"(made in {time.perf_counter() - start:.0f} s)"
    )
    rows, agree = [], True
    for iou_type in ("bbox", "segm"):
        pairs = [("pycocotools", COCOeval), ("faster-coco-eval", COCOeval_faster)]
        if iou_type == "segm":  # alternate which runs first
            pairs.reverse()
        measured = {name: evaluate(cls, ground_truth, results, iou_type) for name, cls in pairs}
        (slow, slow_stats), (fast, fast_stats) = measured["pycocotools"], measured["faster-coco-eval"]
        difference = float(np.abs(slow_stats - fast_stats).max())
        agree &= difference <= 1e-4
        rows.append(
            {
                "iou_type": iou_type,
                "pycocotools_s": round(slow, 2),
                "faster_coco_eval_s": round(fast, 2),
                "speedup": round(slow / fast, 1),
                "max_stat_difference": difference,
                "AP": round(float(slow_stats[0]) * 100, 3),
            }
        )
        print(
            f"{iou_type}: pycocotools {slow:.1f} s, faster-coco-eval {fast:.1f} s, speedup {slow / fast:.1f}x, "
            f"AP {slow_stats[0] * 100:.2f}, largest difference of the 12 figures {difference:.2e}"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"images": args.images, "detections": len(results), "rows": rows}, f, indent=2)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
