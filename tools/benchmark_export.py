#!/usr/bin/env python
"""Inference time of the TorchScript and ONNX exports against eager PyTorch, side by side in one run (CPU).

  python tools/benchmark_export.py --sizes 320 800 --threads 1 [--rounds 3] [--output deploy.json]

Four forms of the config's model (random weights) compute the same detections of one uint8 image (the size x
4/3 of it): eager GN+WS, eager `fold_ws`, `model.ts` and `model.onnx` (onnxruntime). One row per size and
form: the median and its ratio to eager GN+WS. Method and figures: docs/BENCHMARK.md#deployment-formats.
Exit status 0 done, 1 failed to run, 2 usage error.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime
import torch

import ws_d2  # noqa: F401  (its detectron2 fixes and registrations come before any detectron2 import)

# isort: split
from detectron2.modeling import build_model

from ws_d2.config import load_config
from ws_d2.errors import WSD2Error, command_line
from ws_d2.files import atomic_write
from ws_d2.model_zoo import get_config_file
from ws_d2.modeling import fold_ws
from ws_d2.predictor import deployable_inference

DEFAULT_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml"
VARIANTS = ("eager_ws", "eager_folded", "torchscript", "onnxruntime")


def export(cfg, directory):
    """{format: file} written by tools/export_model.py, as a user runs it, from `cfg` saved in `directory`."""
    config_file = os.path.join(directory, "config.yaml")
    with open(config_file, "w") as f:
        f.write(cfg.dump())
    tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_model.py")
    for fmt in ("torchscript", "onnx"):
        command = [sys.executable, tool, "--config-file", config_file, "--format", fmt, "--output", directory]
        if subprocess.run(command, stdout=subprocess.DEVNULL).returncode:
            raise WSD2Error(f"tools/export_model.py could not export to {fmt} (its error above)")
    return {"torchscript": os.path.join(directory, "model.ts"), "onnx": os.path.join(directory, "model.onnx")}


def variant_calls(model, files, size):
    """{variant: a call computing the detections of one random uint8 BGR image, size x 4/3 size}."""
    image = np.random.default_rng(0).integers(0, 256, (size, round(size * 4 / 3), 3), dtype=np.uint8)
    tensor = torch.from_numpy(image)
    folded = fold_ws(copy.deepcopy(model))
    scripted = torch.jit.load(files["torchscript"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch
    session = onnxruntime.InferenceSession(files["onnx"], options, providers=["CPUExecutionProvider"])
    return {
        "eager_ws": lambda: deployable_inference(model, tensor),
        "eager_folded": lambda: deployable_inference(folded, tensor),
        "torchscript": lambda: scripted(tensor),
        "onnxruntime": lambda: session.run(None, {"image": image}),
    }


def time_alternating(calls, rounds, warmup):
    """{name: seconds per timed round}, the order reversed every other round; `warmup` rounds not kept
    (TorchScript's profiling executor optimizes the graph during its first two calls)."""
    samples = {name: [] for name in calls}
    for index in range(warmup + rounds):
        for name in list(calls) if index % 2 == 0 else reversed(list(calls)):
            start = time.perf_counter()
            calls[name]()
            if index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def run_benchmark(args, log=print):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config_file, args.opts, freeze=False)
    cfg.MODEL.DEVICE = "cpu"  # onnxruntime's CPU provider against torch on the CPU
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # every image keeps exactly TEST.DETECTIONS_PER_IMAGE
    model = build_model(cfg).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg.MODEL.WEIGHTS = os.path.join(tmp, "weights.pth")
        torch.save({"model": model.state_dict()}, cfg.MODEL.WEIGHTS)
        files = export(cfg, tmp)  # the graph does not depend on the image it was traced on
        for size in args.sizes:
            calls = variant_calls(model, files, size)
            with torch.no_grad():
                samples = time_alternating(calls, args.rounds, args.warmup)
            base = statistics.median(samples["eager_ws"])
            for variant in VARIANTS:
                median = statistics.median(samples[variant])
                log(f"{size:>4}px  {variant:<13} {median:8.3f} s  {median / base:6.3f}x eager WS")
                row = {
                    "size": size,
                    "variant": variant,
                    "median_s": median,
                    "ratio_to_eager_ws": median / base,
                }
                rows.append({**row, "samples": samples[variant]})
    return {
        "config_file": args.config_file,
        "settings": vars(args),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", help=f"model config (default: ws_d2's {DEFAULT_CONFIG})")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 800], help="shorter image side, px")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="intra-op threads of torch and onnxruntime")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    threads = 1 if args.threads is None else args.threads
    if min(args.rounds, *args.sizes, threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --sizes and --threads must be >= 1, --warmup >= 0")
    args.config_file = args.config_file or get_config_file(DEFAULT_CONFIG)
    return args


@command_line("benchmark_export")  # a WSD2Error or OSError: one line on stderr, exit status 1
def main(argv=None):
    args = parse_args(argv)
    result = run_benchmark(args, log=lambda line: print(line, flush=True))
    if args.output:
        with atomic_write(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
