#!/usr/bin/env python
"""`make quickstart`: generate the synthetic shapes set, train a small GN+WS Mask R-CNN on the CPU (minutes),
evaluate it against its untrained init, and draw its predictions on a few val images.

    python tools/quickstart.py [--config-file CFG] [--dataset-root DIR] [KEY VALUE ...]

Re-running resumes from the last checkpoint (a finished run only re-evaluates and draws).
Exit status: 0 done, 1 refused or failed, 2 usage error.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import ws_d2  # first: it patches what an older detectron2 needs before detectron2 is imported

# isort: split
import cv2
from detectron2.data.detection_utils import read_image
from detectron2.engine import default_setup

from ws_d2.data import (
    check_datasets,
    default_synthetic_root,
    generate_synthetic_dataset,
    register_synthetic_dataset,
)
from ws_d2.engine import WSTrainer
from ws_d2.errors import command_line
from ws_d2.model_zoo import get_config_file
from ws_d2.predictor import VisualizationDemo, WSPredictor

QUICKSTART_CONFIG = "quickstart/mask_rcnn_R_18_FPN_gn_ws_synthetic.yaml"


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file", default=None, metavar="FILE", help=f"default: configs/{QUICKSTART_CONFIG}"
    )
    parser.add_argument("--dataset-root", default=None, help="where to write the synthetic set")
    parser.add_argument("--demo-images", type=int, default=4, help="val images to draw predictions on")
    parser.add_argument("--num-images", type=int, nargs=2, metavar=("TRAIN", "VAL"), default=None,
                        help="a smaller synthetic set (default 400 train, 50 val images)")  # fmt: skip
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def average_precision(results, task, metric):
    value = results.get(task, {}).get(metric, float("nan"))
    return 0.0 if math.isnan(value) else value  # pycocotools gives NaN when there is no detection at all


def draw_predictions(cfg, images, output_dir):
    """The trained model's predictions drawn on `images`, written to `output_dir`; returns the files."""
    os.makedirs(output_dir, exist_ok=True)
    demo = VisualizationDemo(WSPredictor(cfg))
    written = []
    for path in images:
        _, drawn_rgb = demo.run_on_image(read_image(str(path), format="BGR"))
        written.append(os.path.join(output_dir, Path(path).name))
        cv2.imwrite(written[-1], drawn_rgb[:, :, ::-1])
    return written


@command_line("quickstart")
def main(argv=None):
    args = get_parser().parse_args(argv)
    config_file = args.config_file or get_config_file(QUICKSTART_CONFIG)
    root = args.dataset_root or default_synthetic_root()
    print(f"[quickstart] synthetic data set in {root}")
    generate_synthetic_dataset(
        root, dict(zip(("train", "val"), args.num_images)) if args.num_images else None
    )
    register_synthetic_dataset(root)
    cfg = ws_d2.load_config(config_file, args.opts)
    check_datasets(cfg)
    default_setup(cfg, argparse.Namespace(config_file=config_file, eval_only=False, opts=args.opts))

    print("[quickstart] evaluating the untrained model (random weights) for comparison")
    untrained = WSTrainer.test(cfg, WSTrainer.build_model(cfg))
    trainer = WSTrainer(cfg)
    trainer.resume_or_load(resume=True)
    steps = cfg.SOLVER.MAX_ITER - trainer.start_iter
    print(
        f"[quickstart] training {steps} iterations of {cfg.SOLVER.IMS_PER_BATCH} images (progress and ETA below)"
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trained = WSTrainer.test(cfg, trainer.model)

    final_weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    # drawn as tools/demo.py draws by default: detections scoring at least 0.5
    draw_opts = ["MODEL.WEIGHTS", final_weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.5"]
    weights_cfg = ws_d2.load_config(config_file, [*args.opts, *draw_opts])
    images = sorted((Path(root) / "val").iterdir())[: args.demo_images]
    drawn = draw_predictions(weights_cfg, images, os.path.join(cfg.OUTPUT_DIR, "demo"))
    summary = {
        "config": config_file,
        "iterations_trained": steps,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_iteration": round(train_seconds / steps, 3) if steps else None,
        "untrained": untrained,
        "trained": trained,
        "demo_images": drawn,
    }
    summary_file = os.path.join(cfg.OUTPUT_DIR, "quickstart_summary.json")
    with open(summary_file, "w") as f:
        json.dump(summary, f, indent=2)

    print("\n[quickstart] COCO AP (and mIoU) on the synthetic val set (untrained -> trained):")
    shown = {
        "bbox": ("box", ("AP", "AP50")),
        "segm": ("mask", ("AP", "AP50")),
        "sem_seg": ("sem-seg", ("mIoU",)),
    }
    for task, (label, metrics) in shown.items():
        for metric in metrics if task in trained else ():  # what the model outputs
            before, after = (
                average_precision(untrained, task, metric),
                average_precision(trained, task, metric),
            )
            print(f"  {label + ' ' + metric:<12} {before:6.1f} -> {after:6.1f}")
    if steps:
        print(
            f"[quickstart] trained {steps} iterations in {train_seconds / 60:.1f} min ({train_seconds / steps:.2f} s/iter)"
        )
    print(f"[quickstart] model: {final_weights}; results: {summary_file}")
    print(
        f"[quickstart] predictions drawn on {len(drawn)} val images in {os.path.join(cfg.OUTPUT_DIR, 'demo')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
