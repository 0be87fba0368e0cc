#!/usr/bin/env python
"""GN+WS vs its GN twin (same weights, one process): training step, inference, peak memory.

Thin CLI over ws_d2.benchmark; see that module for the method. Examples:
  python tools/benchmark.py --output benchmark.json
  python tools/benchmark.py --quick
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ws_d2  # noqa: E402,F401  (compat fixes and registration before detectron2)
from ws_d2.benchmark import BenchmarkError, BenchmarkSettings, format_report, run_benchmark  # noqa: E402

DEFAULT_CONFIG = "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
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
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = BenchmarkSettings(
        config_file=args.config_file,
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
    )
    try:
        result = run_benchmark(settings, log=lambda line: print(line, flush=True))
    except BenchmarkError as e:
        sys.exit(f"benchmark: {e}")
    print(format_report(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.output}")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
