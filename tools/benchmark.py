#!/usr/bin/env python
"""GN+WS against its GN twin, side by side in one process with the same weights: time and peak memory.

  python tools/benchmark.py --output benchmark.json
  python tools/benchmark.py --quick [--threads 1]

Prints one row per (metric, size, batch) with the GN+WS / GN ratio and PASS/FAIL against the goals. Exit
status 0 when every goal is met, 1 when one is not or the benchmark fails, 2 on a usage error.

The GN twin is the same config with MODEL.WS.ENABLED False and the WS model's state_dict loaded, so
the two differ only in the standardization of the conv weights. Timings alternate between the
models round by round (WS, GN, GN, WS, WS, GN, ...: the order is reversed every other round) so that
load from other processes hits both alike, and the medians are compared. At inference the WS model
folded into plain convs (`fold_ws`) runs exactly the GN twin's ops: its ratio gauges the noise.

The workload is made deterministic so that both models do the same work whatever their (random)
weights predict: every training image carries `ROI_HEADS.BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION`
ground-truth instances (128 for the seed recipe), which fills the foreground quota of the RoI sampler
(ground truth is appended to the proposals), so the mask head always sees the same number of RoIs,
as in steady-state training. At inference the score threshold is 0, so each image keeps exactly
TEST.DETECTIONS_PER_IMAGE detections for the mask head.

Peak memory on the CPU: PyTorch keeps no allocator statistics for the CPU and tracemalloc does not
see its allocations, so each memory sample runs in a fresh Python process (this script, with the
internal flag --memory-sample) that imports the libraries, records its resident set size (VmRSS),
builds the model, loads the shared weights and runs one warm-up step; then it resets the kernel's
peak-RSS counter (/proc/self/clear_refs) and runs the measured step. The sample is the peak resident
set size during that step (VmHWM) minus the RSS after the imports: model, optimizer state, cached WS
statistics, activations, and nothing of the model's construction. The sample process runs with glibc's
mmap threshold fixed at 64 KiB, so that every tensor is unmapped when freed and the RSS follows the live
tensors rather than the blocks glibc keeps for reuse (with glibc's default, adaptive threshold, samples
of one step disagree widely: docs/BENCHMARK.md). On CUDA the sample is
`torch.cuda.max_memory_allocated()` over the measured step, in process.
"""

import argparse
import copy
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

import ws_d2  # noqa: F401  (its detectron2 fixes and registrations come before any detectron2 import)

# isort: split
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from ws_d2.config import load_config
from ws_d2.data import synthetic_batch
from ws_d2.errors import ConfigError, WSD2Error, command_line
from ws_d2.model_zoo import get_config_file
from ws_d2.modeling import count_ws_convs, fold_ws

DEFAULT_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml"

# Ratio goals of issue 3 (GN+WS / GN). The training-step goal is 1.05x at 320 px and 1.02x at 800 px:
# sizes below 800 px get the 320 px goal.
GOALS = {
    "train_time": {320: 1.05, 800: 1.02},
    "inference_time": 1.02,
    "folded_inference_time": 1.02,
    "train_peak_memory": 1.02,
    "inference_peak_memory": 1.02,
    "folded_inference_peak_memory": 1.02,
}

GN_TWIN_OPTS = ["MODEL.WS.ENABLED", "False"]

# Appended to the caller's own GLIBC_TUNABLES, if any, in a memory-sample process (see the docstring).
SAMPLE_MALLOC_TUNABLE = "glibc.malloc.mmap_threshold=65536"


def goal_for(metric: str, size: int) -> float:
    goal = GOALS[metric]
    if isinstance(goal, dict):
        return goal[800] if size >= 800 else goal[320]
    return goal


@dataclass
class BenchmarkSettings:
    config_file: str
    sizes: Sequence[int] = (320, 800)
    batches: Sequence[int] = (1, 2)
    rounds: int = 7
    memory_rounds: int = 3
    warmup: int = 1
    modes: Sequence[str] = ("train", "inference")
    measure_memory: bool = True
    device: Optional[str] = None  # None: cuda when available, else cpu
    opts: list[str] = field(default_factory=list)
    seed: int = 0
    # torch intra-op threads (None: torch's default). On a loaded machine 1 avoids OpenMP barrier stalls
    # (a parallel op waits for a descheduled thread), which inflate every elementwise op many times over.
    threads: Optional[int] = None
    # The overrides that make the twin of the config's model: by default its GN twin. Others compare other
    # models, e.g. a BCN+WS config against its GN+WS twin (MODEL.BCN.ENABLED False MODEL.WS.FORMULA ...).
    twin_opts: list[str] = field(default_factory=lambda: list(GN_TWIN_OPTS))

    @property
    def labels(self) -> tuple[str, str]:
        """How the report names the config's model and its twin."""
        return ("GN+WS", "GN") if list(self.twin_opts) == GN_TWIN_OPTS else ("model", "twin")


def benchmark_device(settings: BenchmarkSettings) -> str:
    return settings.device or ("cuda" if torch.cuda.is_available() else "cpu")


def benchmark_config(settings: BenchmarkSettings, twin: bool = False):
    """The config of the model (or, with `twin`, of its twin: settings.twin_opts) with random weights."""
    opts = [*settings.opts, *(settings.twin_opts if twin else [])]
    cfg = load_config(settings.config_file, opts, freeze=False)
    cfg.MODEL.DEVICE = benchmark_device(settings)
    cfg.MODEL.WEIGHTS = ""  # random weights, shared by both models: the benchmark needs no checkpoint
    # Every image keeps exactly DETECTIONS_PER_IMAGE detections (see the module docstring).
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    return cfg


def build_twin_models(cfg, twin_cfg):
    """(model, twin) with the same weights wherever their names and shapes agree (everywhere for the GN twin)."""
    ws_model = build_model(cfg)
    gn_model = build_model(twin_cfg)
    load_shared_weights(gn_model, ws_model.state_dict())
    return ws_model, gn_model


def load_shared_weights(model, state_dict):
    """Load the tensors of `state_dict` that `model` has under the same name and shape; the rest of `model`
    keeps its initialization (e.g. BCN's batch step against a GN twin)."""
    own = model.state_dict()
    shared = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)


def model_variants(mode: str) -> tuple[str, ...]:
    """The models measured in a mode: the folded model runs at inference only."""
    return ("ws", "gn") if mode == "train" else ("ws", "gn", "folded")


class _TrainStep:
    """forward + backward + optimizer step with detectron2's optimizer for the config."""

    def __init__(self, cfg, model, inputs):
        self.model, self.inputs = model, inputs
        self.optimizer = build_optimizer(cfg, model)

    def __call__(self):
        self.model.train()
        with EventStorage(0):  # the losses log statistics there
            losses = self.model(self.inputs)
        loss = sum(losses.values())
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


class _InferenceStep:
    def __init__(self, model, inputs):
        self.model, self.inputs = model, inputs

    def __call__(self):
        self.model.eval()
        with torch.no_grad():
            self.model(self.inputs)


def make_step(cfg, model, mode: str, inputs):
    return _TrainStep(cfg, model, inputs) if mode == "train" else _InferenceStep(model, inputs)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(step, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def time_alternating(
    steps: dict[str, object], rounds: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call of each step, measured in alternating order, `rounds` times after `warmup`.

    The order is reversed every other round, so that neither model always runs first (right after the
    other's memory-heavy step) or last.
    """
    samples = {name: [] for name in steps}
    for index in range(warmup + rounds):
        order = list(steps.items())
        for name, step in order if index % 2 == 0 else reversed(order):
            seconds = _timed(step, device)
            if index >= warmup:
                samples[name].append(seconds)
    return samples


def make_row(metric, size, batch, ws_samples, gn_samples, unit, first="ws") -> dict:
    """The medians of two models' samples, their ratio and its verdict against the metric's goal."""
    ws, gn = statistics.median(ws_samples), statistics.median(gn_samples)
    limit = goal_for(metric, size)
    ratio = ws / gn
    return {
        "metric": metric,
        "size": size,
        "batch": batch,
        "unit": unit,
        first: ws,
        "gn": gn,
        "ratio": ratio,
        "goal": limit,
        "pass": ratio <= limit,
        f"{first}_samples": list(ws_samples),
        "gn_samples": list(gn_samples),
    }


def ratio_rows(metric: str, size: int, batch: int, samples: dict, unit: str) -> list[dict]:
    """GN+WS against GN, and the folded model against GN when it was measured."""
    rows = [make_row(metric, size, batch, samples["ws"], samples["gn"], unit)]
    if "folded" in samples:
        rows.append(
            make_row(f"folded_{metric}", size, batch, samples["folded"], samples["gn"], unit, "folded")
        )
    return rows


def time_rows(settings, cfg, models: dict, size: int, batch: int, mode: str) -> list[dict]:
    """Time rows of one (size, batch, mode) setting, the models alternating in one process."""
    inputs = synthetic_batch(cfg, size, batch, settings.seed, training=mode == "train")
    steps = {variant: make_step(cfg, models[variant], mode, inputs) for variant in model_variants(mode)}
    samples = time_alternating(steps, settings.rounds, settings.warmup, cfg.MODEL.DEVICE)
    return ratio_rows(f"{mode}_time", size, batch, samples, "s")


def memory_rows(settings, weights_file: str, size: int, batch: int, mode: str) -> list[dict]:
    """Peak-memory rows of one (size, batch, mode) setting, one fresh-process sample per model and round."""
    samples = {variant: [] for variant in model_variants(mode)}
    for _ in range(settings.memory_rounds):
        for variant in samples:
            samples[variant].append(measure_peak_memory(settings, variant, mode, size, batch, weights_file))
    return ratio_rows(f"{mode}_peak_memory", size, batch, samples, "MiB")


def run_benchmark(settings: BenchmarkSettings, log=print) -> dict:
    """Time and memory rows for every (size, batch, mode); see the module docstring for the method."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    cfg = benchmark_config(settings)
    ws_model, gn_model = build_twin_models(cfg, benchmark_config(settings, twin=True))
    ws_convs = count_ws_convs(ws_model)
    if ws_convs == 0:
        raise ConfigError(f"{settings.config_file} builds no WS conv: not a GN+WS config")
    models = {"ws": ws_model, "gn": gn_model, "folded": fold_ws(copy.deepcopy(ws_model)).eval()}
    initial_state = {key: value.clone() for key, value in ws_model.state_dict().items()}
    measure_memory = settings.measure_memory and settings.memory_rounds > 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights_file = os.path.join(tmp, "weights.pth")
        torch.save(initial_state, weights_file)
        for size, batch, mode in itertools.product(settings.sizes, settings.batches, settings.modes):
            # Same starting weights for every setting: training steps change them.
            ws_model.load_state_dict(initial_state)
            load_shared_weights(gn_model, initial_state)
            new_rows = time_rows(settings, cfg, models, size, batch, mode)
            log_rows(new_rows, log, settings.labels)
            if measure_memory:
                memory = memory_rows(settings, weights_file, size, batch, mode)
                log_rows(memory, log, settings.labels)
                new_rows += memory
            rows += new_rows
    return {
        "config_file": settings.config_file,
        "labels": list(settings.labels),
        "settings": asdict(settings),
        "device": cfg.MODEL.DEVICE,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ws_convs": ws_convs,
        "rows": rows,
        "all_pass": all(row["pass"] for row in rows),
    }


def measure_peak_memory(settings, variant, mode, size, batch, weights_file) -> float:
    """Peak memory in MiB of one warm-up + one measured step in a fresh process (see module docstring)."""
    request = {
        "settings": asdict(settings),
        "variant": variant,
        "mode": mode,
        "size": size,
        "batch": batch,
        "weights_file": weights_file,
    }
    if benchmark_device(settings).startswith("cuda"):
        return memory_sample(request)
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-sample", json.dumps(request)],
        capture_output=True,
        text=True,
        env=memory_sample_environment(),
    )
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise WSD2Error(f"memory sample failed: {last_line}")
    return float(done.stdout.strip().splitlines()[-1])


def memory_sample_environment() -> dict:
    """The environment of a CPU memory-sample process: this one's, with glibc's mmap threshold fixed."""
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), SAMPLE_MALLOC_TUNABLE]))
    return env


def memory_sample(request: dict) -> float:
    """One peak-memory sample in MiB (see the module docstring); on the CPU, in a fresh process."""
    settings = BenchmarkSettings(**request["settings"])
    if settings.threads:
        torch.set_num_threads(settings.threads)
    cfg = benchmark_config(settings, twin=request["variant"] == "gn")
    device = cfg.MODEL.DEVICE
    on_cuda = device.startswith("cuda")
    baseline_kib = 0 if on_cuda else proc_status_kib("VmRSS")
    model = build_model(cfg)
    load_shared_weights(model, torch.load(request["weights_file"], map_location=device, weights_only=True))
    if request["variant"] == "folded":
        model = fold_ws(model)
    inputs = synthetic_batch(
        cfg, request["size"], request["batch"], settings.seed, training=request["mode"] == "train"
    )
    step = make_step(cfg, model, request["mode"], inputs)
    step()  # warm-up: optimizer state, cached WS statistics
    if on_cuda:
        return cuda_peak_mib(step)
    return peak_rss_mib(step, baseline_kib)


def cuda_peak_mib(step) -> float:
    """Peak CUDA memory allocated while `step()` runs, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def peak_rss_mib(step, baseline_kib: int) -> float:
    """Peak resident set size while `step()` runs, in MiB above `baseline_kib` (Linux)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)
    except OSError as e:
        raise WSD2Error(f"cannot reset the peak RSS through /proc/self/clear_refs: {e}") from None
    step()
    return (proc_status_kib("VmHWM") - baseline_kib) / 1024


def proc_status_kib(field_name: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise WSD2Error(f"/proc/self/status has no {field_name}: peak memory needs Linux")


def format_row(row, labels=("GN+WS", "GN")) -> str:
    other = "folded" if "folded" in row else "ws"
    verdict = "PASS" if row["pass"] else "FAIL"
    unit = row["unit"]
    model, twin = labels
    name = f"{model} folded" if other == "folded" else model
    value = "{:.3f} {}" if unit == "s" else "{:.0f} {}"
    return (
        f"{row['metric']:<22} {row['size']:>4}px x{row['batch']}  {name} {value.format(row[other], unit):>10}"
        f"  {twin} {value.format(row['gn'], unit):>10}  ratio {row['ratio']:.3f}x  (goal <= {row['goal']:.2f}x) {verdict}"
    )


def log_rows(rows, log, labels=("GN+WS", "GN")):
    for row in rows:
        log(format_row(row, labels))


def format_report(result: dict) -> str:
    twin_opts = " ".join(result["settings"]["twin_opts"])
    lines = [
        f"{result['config_file']} against its twin ({twin_opts})  device {result['device']}  torch {result['torch']}"
    ]
    lines += [format_row(row, result["labels"]) for row in result["rows"]]
    lines.append("all goals met" if result["all_pass"] else "some goals FAILED")
    return "\n".join(lines)


# --deploy: the exported graphs against eager PyTorch (docs/BENCHMARK.md#deployment-formats).
DEPLOY_VARIANTS = ("eager_ws", "eager_folded", "torchscript", "onnxruntime")


def deploy_steps(settings: BenchmarkSettings, cfg, model, directory: str, size: int) -> dict:
    """One call per variant computing the same detections of one uint8 BGR image of size x 4/3 size: the
    traced function (deployable_inference) in eager PyTorch with WS and folded, and the exported files."""
    import numpy as np
    import onnxruntime

    from ws_d2.export import deployable_inference, export_deployable

    image = np.random.default_rng(settings.seed).integers(
        0, 256, (size, round(size * 4 / 3), 3), dtype=np.uint8
    )
    tensor = torch.from_numpy(image)
    files = {fmt: export_deployable(cfg, directory, fmt, image) for fmt in ("torchscript", "onnx")}
    folded = fold_ws(copy.deepcopy(model)).eval()
    scripted = torch.jit.load(files["torchscript"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(files["onnx"], options, providers=["CPUExecutionProvider"])

    def eager(m):
        def step():
            with torch.no_grad():
                deployable_inference(m, tensor)

        return step

    def traced():
        with torch.no_grad():
            scripted(tensor)

    return {
        "eager_ws": eager(model),
        "eager_folded": eager(folded),
        "torchscript": traced,
        "onnxruntime": lambda: session.run(None, {"image": image}),
    }


def run_deploy_benchmark(settings: BenchmarkSettings, log=print) -> dict:
    """Inference time of the exported TorchScript and ONNX files against eager PyTorch, per size, in one
    process, alternating the variants round by round; ratios are against the eager WS model."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    cfg = benchmark_config(settings)
    if not cfg.MODEL.DEVICE == "cpu":
        raise ConfigError("--deploy measures onnxruntime's CPU provider: run it with --device cpu")
    model = build_model(cfg).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg.MODEL.WEIGHTS = os.path.join(tmp, "weights.pth")
        torch.save({"model": model.state_dict()}, cfg.MODEL.WEIGHTS)
        for size in settings.sizes:
            steps = deploy_steps(settings, cfg, model, tmp, size)
            samples = time_alternating(steps, settings.rounds, settings.warmup, "cpu")
            base = statistics.median(samples["eager_ws"])
            for variant in DEPLOY_VARIANTS:
                median = statistics.median(samples[variant])
                row = {"size": size, "variant": variant, "median_s": median, "ratio_to_eager_ws": median / base,
                       "samples": samples[variant]}  # fmt: skip
                log(f"{size:>4}px  {variant:<13} {median:8.3f} s  {median / base:6.3f}x eager WS")
                rows.append(row)
    return {
        "config_file": settings.config_file,
        "mode": "deploy",
        "settings": asdict(settings),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", help=f"GN+WS model config (default: ws_d2's {DEFAULT_CONFIG})")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 800], help="shorter image side, px")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed rounds (median)")
    parser.add_argument(
        "--memory-rounds", type=int, default=3, help="fresh-process peak-memory samples per model"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory samples")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="320 px, batch 1, 3 rounds, 1 memory round")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--deploy", action="store_true",
                        help="time the TorchScript and ONNX exports against eager PyTorch (inference only)")  # fmt: skip
    parser.add_argument("--twin-opts", nargs="+", default=GN_TWIN_OPTS, metavar="KEY VALUE",
                        help="overrides that make the twin (default: MODEL.WS.ENABLED False, the GN twin)")  # fmt: skip
    # internal: one peak-memory sample (a JSON request) in this fresh process, printed on stdout
    parser.add_argument("--memory-sample", metavar="REQUEST", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def check_args(parser, args):
    """Settings the benchmark cannot run are usage errors (exit 2)."""
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.memory_rounds < 0 or args.warmup < 0:
        parser.error("--memory-rounds and --warmup must be >= 0")
    if min(args.sizes) < 1 or min(args.batches) < 1:
        parser.error("--sizes and --batches must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")


def settings_from_args(args) -> BenchmarkSettings:
    return BenchmarkSettings(
        config_file=args.config_file or get_config_file(DEFAULT_CONFIG),
        sizes=[320] if args.quick else args.sizes,
        batches=[1] if args.quick else args.batches,
        rounds=3 if args.quick else args.rounds,
        memory_rounds=1 if args.quick else args.memory_rounds,
        warmup=args.warmup,
        modes=args.modes,
        measure_memory=not args.no_memory,
        device=args.device,
        threads=args.threads,
        opts=args.opts,
        twin_opts=args.twin_opts,
    )


@command_line("benchmark")  # a WSD2Error or OSError: one line on stderr, exit status 1
def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.memory_sample:
        print(json.dumps(memory_sample(json.loads(args.memory_sample))))
        return 0
    check_args(parser, args)
    if args.deploy:
        result = run_deploy_benchmark(settings_from_args(args), log=lambda line: print(line, flush=True))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2))
        return 0
    result = run_benchmark(settings_from_args(args), log=lambda line: print(line, flush=True))
    print(format_report(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.output}")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
