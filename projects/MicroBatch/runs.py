"""One cell of the study as an ordinary training run of ws_d2: its command, its folder, and its result.

A run is `tools/train_net.py --resume` into its own OUTPUT_DIR, so a killed run continues from its last
checkpoint and a finished one is never redone. Its result is read back from the files train_net writes
(metrics.json, eval_results.json); nothing is kept in memory between runs.
"""

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ws_d2.errors import WSD2Error

REPO = Path(__file__).resolve().parents[2]
TRAIN_NET = "tools/train_net.py"
EVAL_BATCH_STATISTICS = "projects/MicroBatch/eval_batch_statistics.py"
DIVERGED_MARK = "Loss became infinite or NaN"  # detectron2's FloatingPointError text


class RunFailed(WSD2Error):
    """A run that stopped for another reason than a diverging loss: the study stops and names its log."""


def schedule_opts(iterations, ims_per_step):
    """The solver schedule for `iterations` at 1 image per step, scaled so every run sees as many images."""
    n = max(2, iterations // ims_per_step)
    steps = f"({min(round(0.75 * n), n - 1)}, {min(round(0.92 * n), n - 1)})"
    return [
        "SOLVER.MAX_ITER", str(n), "SOLVER.STEPS", steps, "SOLVER.WARMUP_ITERS", str(max(1, n // 6)),
        "SOLVER.CHECKPOINT_PERIOD", str(max(1, n // 2)),
    ]  # fmt: skip


def run_dir(output, cell):
    return Path(output) / "runs" / cell.name


def train_command(cell, arm_opts, config_file, output, iterations):
    """The train_net argument list (relative to the repository root) that makes `cell`."""
    opts = [*arm_opts, "SEED", str(cell.seed), "SOLVER.IMS_PER_BATCH", str(cell.ims_per_step),
            "SOLVER.BASE_LR", repr(cell.lr)]  # fmt: skip
    iterations = cell.images or iterations  # a cell's own budget in images is its iterations at 1 image/step
    if iterations:
        opts += schedule_opts(iterations, cell.ims_per_step)
    opts += ["OUTPUT_DIR", _display_path(run_dir(output, cell))]
    return [TRAIN_NET, "--resume", "--config-file", _display_path(config_file), *opts]


def shell_command(args, threads, env_extra):
    """`args` as one shell line, with the thread count and any environment it needs."""
    env = {"OMP_NUM_THREADS": str(threads), **env_extra}
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "python", *map(shlex.quote, args)])


def is_finished(directory):
    directory = Path(directory)
    return (directory / "diverged.json").is_file() or (
        (directory / "eval_results.json").is_file() and (directory / "model_final.pth").is_file()
    )


def execute(cell, args, directory, threads, env_extra):
    """Run train_net for `cell` (resuming what a killed run left) and return its wall time in seconds.
    A run whose loss became NaN/inf is recorded as diverged; any other failure raises RunFailed."""
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **env_extra}
    start = time.perf_counter()
    with open(directory / "stdout.txt", "a") as log:
        returncode = subprocess.call([sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=log)
    wall = time.perf_counter() - start
    info = {"command": shell_command(args, threads, env_extra), "wall_time_s": round(wall, 1),
            "machine": machine(threads)}  # fmt: skip
    if returncode != 0:
        if DIVERGED_MARK not in (directory / "stdout.txt").read_text(errors="replace"):
            raise RunFailed(f"run {cell.name} failed (exit {returncode}); see {directory / 'stdout.txt'}")
        (directory / "diverged.json").write_text(json.dumps(info, indent=1))
    (directory / "run_info.json").write_text(json.dumps(info, indent=1))
    for checkpoint in directory.glob("model_0*.pth"):  # only kept for resuming
        checkpoint.unlink()
    return wall


def machine(threads):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": threads, "cores": os.cpu_count()}


def loss_curve(directory):
    """[(iteration, total loss)] as detectron2's JSONWriter logged it (median over its window)."""
    curve = []
    path = Path(directory) / "metrics.json"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "total_loss" in record:
                curve.append((record["iteration"] + 1, record["total_loss"]))
    # a resumed run logs its iterations again from its checkpoint: keep the last value of each
    return sorted(dict(curve).items())


def average_precision(results, task):
    value = results.get(task, {}).get("AP", float("nan"))
    return 0.0 if math.isnan(value) else round(value, 3)  # pycocotools gives NaN with no detection at all


def collect(cell, directory, iterations):
    """The results.json entry of a finished run."""
    directory = Path(directory)
    iterations = cell.images or iterations
    info = (
        json.loads((directory / "run_info.json").read_text())
        if (directory / "run_info.json").is_file()
        else {}
    )
    curve = loss_curve(directory)
    finite = [loss for _, loss in curve if math.isfinite(loss)]
    diverged = (directory / "diverged.json").is_file()
    results = {} if diverged else json.loads((directory / "eval_results.json").read_text())
    entry = {
        "arm": cell.arm,
        "seed": cell.seed,
        "ims_per_step": cell.ims_per_step,
        "lr": cell.lr,
        "images": cell.images,
        "iterations": max(1, iterations // cell.ims_per_step) if iterations else None,
        "bbox_AP": average_precision(results, "bbox"),
        "segm_AP": average_precision(results, "segm"),
        # the mean logged loss: the area under the curve over the iterations run
        "loss_auc": round(sum(finite) / len(finite), 4) if finite else None,
        "diverged": diverged,
        "loss_curve": [[i, round(loss, 4)] for i, loss in curve],
        "command": info.get("command"),
        "machine": info.get("machine"),
        "wall_time_s": info.get("wall_time_s"),
    }
    batch_statistics = directory / "bn_batch_statistics" / "eval_results.json"
    if batch_statistics.is_file():
        results = json.loads(batch_statistics.read_text())
        entry["bbox_AP_batch_statistics"] = average_precision(results, "bbox")
        entry["segm_AP_batch_statistics"] = average_precision(results, "segm")
    return entry


def evaluate_with_batch_statistics(args, directory, threads, env_extra):
    """BN's train/eval gap: evaluate the final model again with batch statistics (eval_batch_statistics.py)."""
    directory = Path(directory)
    out = directory / "bn_batch_statistics"
    if (out / "eval_results.json").is_file() or (directory / "diverged.json").is_file():
        return
    config_file, opts = args[3], list(args[4:])
    opts[opts.index("OUTPUT_DIR") + 1] = _display_path(out)
    opts += ["MODEL.WEIGHTS", _display_path(directory / "model_final.pth")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env_extra}
    with open(directory / "stdout.txt", "a") as log:
        returncode = subprocess.call([sys.executable, EVAL_BATCH_STATISTICS, config_file, *opts], cwd=REPO,
                                     env=env, stdout=log, stderr=log)  # fmt: skip
    if returncode != 0:
        raise RunFailed(f"batch-statistics evaluation of {directory} failed; see {directory / 'stdout.txt'}")


def _display_path(path):
    """`path` relative to the repository root when inside it, so recorded commands name no machine path."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)
