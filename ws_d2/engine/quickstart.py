"""The quickstart: synthetic shapes -> a small GN+WS Mask R-CNN trained on the CPU -> COCO AP -> drawn images.

`make quickstart` runs `run_quickstart()`; re-running resumes (a finished run only re-evaluates).
The untrained model (same config, random weights) is evaluated first, so the summary shows what training adds.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from detectron2.engine import default_setup

from ..config import get_ws_cfg
from ..data import (
    check_datasets,
    default_synthetic_root,
    generate_synthetic_dataset,
    register_synthetic_dataset,
)
from .trainer import WSTrainer

__all__ = ["QUICKSTART_CONFIG", "run_quickstart"]

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_CONFIG = REPO / "configs" / "quickstart" / "mask_rcnn_R_18_FPN_gn_ws_synthetic.yaml"
DEMO_TOOL = REPO / "tools" / "demo.py"


def _ap(results, task, metric):
    value = results.get(task, {}).get(metric, float("nan"))
    return 0.0 if math.isnan(value) else value  # pycocotools gives NaN when there is no detection at all


def _summary_rows(untrained, trained):
    rows = []
    for task, label in (("bbox", "box"), ("segm", "mask")):
        for metric in ("AP", "AP50"):
            rows.append((f"{label} {metric}", _ap(untrained, task, metric), _ap(trained, task, metric)))
    return rows


def run_demo(cfg, config_file, opts, images, output_dir):
    """tools/demo.py on `images` with the trained weights; returns the drawn files (None: no demo tool)."""
    if not DEMO_TOOL.is_file():
        return None
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    os.makedirs(output_dir, exist_ok=True)  # an existing folder: the demo draws into it even for one image
    command = [
        sys.executable,
        str(DEMO_TOOL),
        "--config-file",
        str(config_file),
        "--input",
        *map(str, images),
    ]
    command += ["--output", str(output_dir), "--opts", *opts, "MODEL.WEIGHTS", weights]
    try:
        subprocess.run(command, check=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            f"the demo step failed (exit status {e.returncode}): {' '.join(command)}"
        ) from None
    return sorted(str(p) for p in Path(output_dir).iterdir())


def run_quickstart(
    config_file=QUICKSTART_CONFIG, opts=(), dataset_root=None, splits=None, demo_images=4, log=print
):
    """Generate the data, evaluate the untrained model, train, evaluate, draw; returns the summary dict.

    `splits` ({"train": n, "val": m}) shrinks the synthetic set, e.g. for a smoke test.
    """
    root = dataset_root or default_synthetic_root()
    log(f"[quickstart] synthetic data set in {root}")
    generate_synthetic_dataset(root, splits)
    register_synthetic_dataset(root)
    cfg = get_ws_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    check_datasets(cfg)
    default_setup(cfg, argparse.Namespace(config_file=str(config_file), eval_only=False, opts=list(opts)))

    log("[quickstart] evaluating the untrained model (random weights) for comparison")
    untrained = WSTrainer.test(cfg, WSTrainer.build_model(cfg))

    trainer = WSTrainer(cfg)
    trainer.resume_or_load(resume=True)
    steps = cfg.SOLVER.MAX_ITER - trainer.start_iter
    log(
        f"[quickstart] training {steps} iterations of {cfg.SOLVER.IMS_PER_BATCH} images (progress and ETA below)"
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trained = WSTrainer.test(cfg, trainer.model)

    summary = {
        "config": str(config_file),
        "iterations_trained": steps,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_iteration": round(train_seconds / steps, 3) if steps else None,
        "untrained": untrained,
        "trained": trained,
    }
    val_dir = Path(root) / "val"
    images = sorted(val_dir.iterdir())[:demo_images]
    drawn = run_demo(cfg, config_file, list(opts), images, Path(cfg.OUTPUT_DIR) / "demo")
    summary["demo_images"] = drawn
    with open(os.path.join(cfg.OUTPUT_DIR, "quickstart_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    log("\n[quickstart] COCO AP on the synthetic val set (untrained -> trained):")
    for name, before, after in _summary_rows(untrained, trained):
        log(f"  {name:<9} {before:6.1f} -> {after:6.1f}")
    if steps:
        log(f"[quickstart] trained {steps} iterations in {train_seconds / 60:.1f} min "
            f"({train_seconds / steps:.2f} s/iter)")  # fmt: skip
    log(f"[quickstart] model: {os.path.join(cfg.OUTPUT_DIR, 'model_final.pth')}; "
        f"results: {os.path.join(cfg.OUTPUT_DIR, 'quickstart_summary.json')}")  # fmt: skip
    if drawn is None:
        log("[quickstart] demo step skipped: tools/demo.py is missing")
    else:
        log(
            f"[quickstart] drawn predictions for {len(images)} val images in {Path(cfg.OUTPUT_DIR) / 'demo'}:"
        )
        for path in drawn:
            log(f"  {path}")
    return summary
