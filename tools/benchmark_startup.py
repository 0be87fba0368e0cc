#!/usr/bin/env python
"""Start-up at COCO scale: ws_d2's checked data sets against stock detectron2, side by side.

  python tools/benchmark_startup.py --images 5000 30000 118000 --procs 1 2 --root SCRATCH_DIR

For each size it makes (once) a synthetic COCO-format set with COCO's shape (tiny real JPEGs, ~7 polygon
annotations an image, 80 categories) under --root, then times, each in a fresh process:
- loading the set: detectron2's `load_coco_json`, and ws_d2's checked load, first (images checked) and again
  (the passed check remembered);
- `tools/train_net.py` (ws_d2, first and second start on the same data) and detectron2's DefaultTrainer with
  `register_coco_instances` (stock), each until its training starts, with 1 and 2 processes.
Both trainers run detectron2's own Mask R-CNN R-50-FPN config at 64 px. --train-net times another checkout's
train_net.py (e.g. an older ws_d2). Figures: docs/BENCHMARK.md#start-up-at-coco-scale.
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

from ws_d2.files import atomic_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (64, 48)  # width, height of every image
STOCK_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"


def make_coco_set(root, num_images, seed=0):
    """`root/instances.json` and `root/images/` with `num_images` images; kept if already complete."""
    json_file, image_dir = os.path.join(root, "instances.json"), os.path.join(root, "images")
    if os.path.isfile(json_file):
        return json_file, image_dir
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    jpeg = cv2.imencode(".jpg", rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8))[1].tobytes()
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        name = f"{image_id:012d}.jpg"
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(jpeg)
        images.append({"id": image_id, "file_name": name, "width": SIZE[0], "height": SIZE[1]})
        for _ in range(rng.poisson(7)):
            x, y = rng.uniform(0, SIZE[0] - 10), rng.uniform(0, SIZE[1] - 10)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
            polygon = np.stack([x + 5 + 4 * np.cos(angles), y + 5 + 4 * np.sin(angles)], 1).round(2)
            box = [round(float(v), 2) for v in (*polygon.min(0), *(polygon.max(0) - polygon.min(0)))]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, "area": 50.0,
                                "category_id": int(rng.integers(1, 81)), "bbox": box,
                                "segmentation": [polygon.reshape(-1).tolist()]})  # fmt: skip
    categories = [{"id": i, "name": f"class_{i}", "supercategory": "thing"} for i in range(1, 81)]
    with atomic_write(json_file, "w") as f:  # the JSON marks a complete set
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file, image_dir


def timed(command, env):
    """Seconds until the command's training starts (detectron2 logs "Starting training from iteration"; the
    first iteration and the final checkpoint then cost both trainers alike), or until it ends."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    started, output = None, []
    for line in process.stdout:
        output.append(line)
        if started is None and "Starting training from iteration" in line:
            started = time.perf_counter() - start
    if process.wait():
        raise RuntimeError(f"{' '.join(command[:3])} failed: {output[-1:]}")
    return round(started or time.perf_counter() - start, 1)


def train_opts(procs, output_dir):
    return ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", str(procs),
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "100", "DATASETS.TRAIN", "('scale',)",
            "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", output_dir]  # fmt: skip


def measure(json_file, image_dir, procs, train_net, env, repeat):
    """{what: median seconds over `repeat` interleaved rounds} for one data set."""
    me = [sys.executable, os.path.abspath(__file__)]
    env = dict(env, OMP_NUM_THREADS="1")
    config = subprocess.run([sys.executable, "-c", "import ws_d2; from detectron2 import model_zoo as z; "
                             f"print(z.get_config_file({STOCK_CONFIG!r}))"], env=env, capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    samples = {}
    for _ in range(repeat):
        loads = tempfile.mkdtemp(prefix="ws_d2_cache_")  # a fresh cache per round: nothing checked yet
        runs = {
            "detectron2 load_coco_json": ([*me, "--load", "detectron2", json_file, image_dir], loads),
            "ws_d2 load, checked": ([*me, "--load", "ws_d2", json_file, image_dir], loads),
            "ws_d2 load, remembered": ([*me, "--load", "ws_d2", json_file, image_dir], loads),
        }
        for n in procs:
            out, cache = tempfile.mkdtemp(prefix="ws_d2_startup_"), tempfile.mkdtemp(prefix="ws_d2_cache_")
            ws = [sys.executable, train_net, "--config-file", config, "--num-cpu-procs", str(n),
                  "--coco-dataset", "scale", json_file, image_dir]  # fmt: skip
            stock = [
                *me,
                "--stock-train",
                str(n),
                json_file,
                image_dir,
                config,
                *train_opts(n, out + "/stock"),
            ]
            runs[f"detectron2, {n} proc"] = (stock, cache)
            runs[f"ws_d2, {n} proc"] = ([*ws, *train_opts(n, out + "/ws1")], cache)
            runs[f"ws_d2 again, {n} proc"] = ([*ws, *train_opts(n, out + "/ws2")], cache)
        for name, (command, cache) in runs.items():
            samples.setdefault(name, []).append(timed(command, dict(env, WS_D2_CACHE=cache)))
        for folder in glob.glob(os.path.join(tempfile.gettempdir(), "ws_d2_startup_*")):
            shutil.rmtree(folder, ignore_errors=True)  # the runs' checkpoints
    return {name: statistics.median(times) for name, times in samples.items()}


def load(kind, json_file, image_dir):
    import ws_d2.data  # first: detectron2 v0.6 needs its fixes

    if kind == "detectron2":
        from detectron2.data.datasets import load_coco_json

        load_coco_json(json_file, image_dir, "scale")
    elif hasattr(ws_d2.data, "load_checked_coco"):
        ws_d2.data.load_checked_coco(json_file, image_dir, "scale")
    else:  # an older ws_d2, which parsed and checked at registration
        ws_d2.data.register_coco_dataset("scale", json_file, image_dir)


def stock_train(procs, json_file, image_dir, config, opts):
    """detectron2 alone, as its tools/train_net.py: its config, register_coco_instances, default_setup,
    DefaultTrainer (ws_d2 only launches the Gloo processes, which detectron2 v0.6 cannot)."""
    from ws_d2.engine import launch  # first: detectron2 v0.6 needs its fixes

    launch(_stock_worker, procs, args=(json_file, image_dir, config, opts), use_cuda=False)


def _stock_worker(json_file, image_dir, config, opts):
    from detectron2.config import get_cfg
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, defaults
    from torch.nn.parallel import DistributedDataParallel

    # detectron2 pins DDP to a GPU (device_ids); a CPU model takes none
    defaults.create_ddp_model = lambda model, **kwargs: (
        DistributedDataParallel(model) if defaults.comm.get_world_size() > 1 else model
    )
    register_coco_instances("scale", {}, json_file, image_dir)
    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(opts)
    default_setup(cfg, default_argument_parser().parse_args(["--config-file", config]))  # as its train_net
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, nargs="+", default=[5000, 30000, 118000])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "ws_d2_coco_scale"))
    parser.add_argument("--train-net", default=os.path.join(REPO, "tools", "train_net.py"))
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--output", help="write the figures as JSON here")
    parser.add_argument("--load", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--stock-train", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        return load(*args.load)
    if args.stock_train:
        procs, json_file, image_dir, config, *opts = args.stock_train
        return stock_train(int(procs), json_file, image_dir, config, opts)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(args.train_net)),
                                                         os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    results = {}
    for n in args.images:
        json_file, image_dir = make_coco_set(os.path.join(args.root, str(n)), n)
        results[n] = measure(
            json_file, image_dir, args.procs, os.path.abspath(args.train_net), env, args.repeat
        )
        print(json.dumps({n: results[n]}), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
