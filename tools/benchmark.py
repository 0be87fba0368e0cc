#!/usr/bin/env python
"""Time and peak memory of a GN+WS model against its GN twin with the same weights, side by side in one run.

  python tools/benchmark.py --quick --output benchmark.json
  python tools/benchmark.py --config-file CFG --twin-opts MODEL.BCN.ENABLED False MODEL.WS.FORMULA std_plus_eps

Prints one row per (metric, size, batch): the medians of the model and its twin and their ratio. The method
and the measured figures: docs/BENCHMARK.md. Exit status 0 done, 1 failed to run, 2 usage error.
"""

import argparse
import copy
import ctypes
import functools
import gc
import itertools
import json
import statistics
import sys
import time

import torch

import ws_d2  # noqa: F401  (its detectron2 fixes and registrations come before any detectron2 import)

# isort: split
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from ws_d2.config import load_config
from ws_d2.data import synthetic_batch
from ws_d2.errors import ConfigError, command_line
from ws_d2.files import atomic_write
from ws_d2.model_zoo import get_config_file
from ws_d2.modeling import count_ws_convs, fold_ws

DEFAULT_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml"
GN_TWIN_OPTS = ["MODEL.WS.ENABLED", "False"]
LIBC = ctypes.CDLL(None)  # the C library this process runs with (glibc: mallopt, malloc_trim)


def benchmark_config(args, twin=False):
    """The config of the model, or of its twin (args.twin_opts), with random weights."""
    cfg = load_config(args.config_file, [*args.opts, *(args.twin_opts if twin else [])], freeze=False)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""  # both models share the model's random weights: no checkpoint needed
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # every image keeps exactly TEST.DETECTIONS_PER_IMAGE
    return cfg


def load_shared_weights(model, state_dict):
    """Load the tensors `model` has under the same name and shape; the rest keeps its initialization."""
    own = model.state_dict()
    shared = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)


def build_twin_models(cfg, twin_cfg):
    """(model, twin): the twin holds the model's weights wherever names and shapes agree."""
    model, twin = build_model(cfg), build_model(twin_cfg)
    load_shared_weights(twin, model.state_dict())
    return model, twin


def make_step(cfg, model, mode, inputs, amp=None):
    """One training step (forward, backward, detectron2's optimizer) or one inference call of `model`, under
    autocast to `amp` (float16 training scales the loss, as detectron2's AMPTrainer)."""
    device = torch.device(cfg.MODEL.DEVICE).type
    autocast = functools.partial(torch.autocast, device, getattr(torch, amp) if amp else None, bool(amp))
    if mode == "inference":
        model.eval()

        def inference_step():
            with autocast():
                return model(inputs)

        return inference_step
    model.train()
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device, enabled=amp == "float16")

    def train_step():
        with EventStorage(0), autocast():  # the losses log to an EventStorage
            loss = sum(model(inputs).values())
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return train_step


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_alternating(steps, rounds, warmup, device):
    """{name: seconds of each timed round}: every step once per round, the order reversed every other round
    so that neither model always runs first; `warmup` rounds come first and are not kept."""
    samples = {name: [] for name in steps}
    for index in range(warmup + rounds):
        for name in list(steps) if index % 2 == 0 else reversed(list(steps)):
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            if index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def release_freed_memory():
    """Collect garbage and hand glibc's free heap back, with a fixed mmap threshold: RSS follows live tensors."""
    gc.collect()
    if hasattr(LIBC, "mallopt"):  # glibc
        LIBC.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        LIBC.malloc_trim(0)


def proc_status_kib(name):
    """A size field of /proc/self/status (VmRSS, VmHWM) in KiB (Linux, as is /proc/self/clear_refs)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(name + ":"))


def peak_memory_mib(build_step, device):
    """Peak memory of the step `build_step()` makes, after a warm-up call, above the memory in use before the
    build: the model copy, its gradients and optimizer state, the activations."""
    cuda = device.startswith("cuda")
    release_freed_memory()
    _sync(device)
    before = torch.cuda.memory_allocated() if cuda else proc_status_kib("VmRSS") * 1024
    step = build_step()
    step()  # warm-up: optimizer state, lazily allocated buffers
    release_freed_memory()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)
    step()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if cuda else proc_status_kib("VmHWM") * 1024
    return (peak - before) / 2**20


def rows_of(metric, size, batch, unit, samples):
    """The model ("ws"), and the folded model where measured, against the twin ("gn"): medians and ratio."""
    twin, rows = statistics.median(samples["gn"]), []
    for name in [name for name in ("ws", "folded") if name in samples]:
        value = statistics.median(samples[name])
        row = {"metric": metric if name == "ws" else f"folded_{metric}", "size": size, "batch": batch}
        row.update({"unit": unit, name: value, "gn": twin, "ratio": value / twin})
        rows.append({**row, f"{name}_samples": list(samples[name]), "gn_samples": list(samples["gn"])})
    return rows


def setting_rows(args, cfg, models, size, batch, mode, memory=False):
    """Rows of one setting: the models' times, alternating; or (`memory`) one peak-memory sample of a fresh
    copy of each model, so that its weights and optimizer state count too."""
    inputs = synthetic_batch(cfg, size, batch, seed=0, training=mode == "train")
    names = ["ws", "gn"] if mode == "train" else ["ws", "gn", "folded"]

    def step(name, fresh=False):
        return make_step(cfg, copy.deepcopy(models[name]) if fresh else models[name], mode, inputs, args.amp)

    with torch.set_grad_enabled(mode == "train"):
        if memory:
            samples = {n: [peak_memory_mib(lambda n=n: step(n, fresh=True), args.device)] for n in names}
        else:
            samples = time_alternating({n: step(n) for n in names}, args.rounds, args.warmup, args.device)
    metric, unit = (f"{mode}_peak_memory", "MiB") if memory else (f"{mode}_time", "s")
    return rows_of(metric, size, batch, unit, samples)


def format_row(row, labels=("GN+WS", "GN")):
    name = "folded" if "folded" in row else "ws"
    value = ("{:.3f} s" if row["unit"] == "s" else "{:.0f} MiB").format
    model = labels[0] + (" folded" if name == "folded" else "")
    return (
        f"{row['metric']:<28} {row['size']:>4}px x{row['batch']}  {model} {value(row[name]):>10}  "
        f"{labels[1]} {value(row['gn']):>10}  ratio {row['ratio']:.3f}x"
    )


def run_benchmark(args):
    """Time and (unless args.no_memory) peak-memory rows of every size, batch and mode."""
    release_freed_memory()  # from the start: samples taken after a dynamic-threshold heap were not stable
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = benchmark_config(args)
    model, twin = build_twin_models(cfg, benchmark_config(args, twin=True))
    if not (ws_convs := count_ws_convs(model)):
        raise ConfigError(f"{args.config_file} builds no WS conv: not a GN+WS config")
    models = {"ws": model, "gn": twin, "folded": fold_ws(copy.deepcopy(model))}
    initial = copy.deepcopy(model.state_dict())
    labels = ("GN+WS", "GN") if args.twin_opts == GN_TWIN_OPTS else ("model", "twin")
    rows = []
    for size, batch, mode in itertools.product(args.sizes, args.batches, args.modes):
        model.load_state_dict(initial)  # training steps change the weights: every setting starts alike
        load_shared_weights(twin, initial)
        for memory in [False] if args.no_memory else [False, True]:
            for row in setting_rows(args, cfg, models, size, batch, mode, memory):
                print(format_row(row, labels), flush=True)
                rows.append(row)
    environment = {"device": args.device, "amp": args.amp, "torch": torch.__version__}
    return {"config_file": args.config_file, "labels": list(labels), "settings": vars(args), **environment,
            "threads": torch.get_num_threads(), "ws_convs": ws_convs, "rows": rows}  # fmt: skip


def parse_args(argv=None):
    """The options, with --quick and the defaults applied; settings that cannot run exit 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", help=f"GN+WS model config (default: ws_d2's {DEFAULT_CONFIG})")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 800], help="shorter image side, px")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="images per step")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory samples")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="320 px, batch 1, 3 rounds")
    parser.add_argument("--amp", choices=["float16", "bfloat16"], help="both models under autocast to this")
    parser.add_argument("--output", help="write the results as JSON here")
    twin_help = "overrides that make the twin (default: MODEL.WS.ENABLED False, the GN twin)"
    parser.add_argument("--twin-opts", nargs="+", default=GN_TWIN_OPTS, metavar="KEY VALUE", help=twin_help)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    threads = 1 if args.threads is None else args.threads
    if min(args.rounds, *args.sizes, *args.batches, threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --sizes, --batches and --threads must be >= 1, --warmup >= 0")
    if args.quick:
        args.sizes, args.batches, args.rounds = [320], [1], 3
    args.config_file = args.config_file or get_config_file(DEFAULT_CONFIG)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


@command_line("benchmark")  # a WSD2Error or OSError: one line on stderr, exit status 1
def main(argv=None):
    args = parse_args(argv)
    result = run_benchmark(args)
    if args.output:
        with atomic_write(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
