#!/usr/bin/env python
"""`make cuda-check`: the mixed-precision checks that need one GPU, in under 10 minutes: the CUDA tests, the
benchmark (GN+WS against GN) at fp32, fp16 and bf16, 50 AMP iterations of the quickstart model per half type
through the NCCL launcher (torchrun, 1 process), and that model's export on CUDA.

    python tools/cuda_check.py [--output DIR] [--dry-run]

Every check runs even when one before it failed; the summary names each. Exit status: 0 all passed, 1 a check
failed, 2 usage error.
"""

import argparse
import subprocess
import sys
import time

QUICKSTART = "configs/quickstart/mask_rcnn_R_18_FPN_gn_ws_synthetic.yaml"
PRECISIONS = ("float16", "bfloat16")
TIMEOUT_S = 240  # one hung check must not take the GPU's whole lease


def commands(output, python=sys.executable):
    """[(name, argv)] of every check, in order."""
    checks = [
        (
            "cuda tests",
            [python, "-m", "pytest", "-q", "-rs", "-k", "cuda", "tests/test_amp.py", "tests/test_ws_conv.py"],
        )
    ]
    for amp in ("float32", *PRECISIONS):
        flags = [] if amp == "float32" else ["--amp", amp]
        benchmark = [python, "tools/benchmark.py", "--device", "cuda", "--quick", *flags]
        checks.append((f"benchmark {amp}", [*benchmark, "--output", f"{output}/benchmark_{amp}.json"]))
    data = "from ws_d2.data import generate_synthetic_dataset; generate_synthetic_dataset()"
    checks.append(("synthetic data", [python, "-c", data]))
    for amp in PRECISIONS:
        torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        opts = ["MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", amp]
        opts += ["SOLVER.MAX_ITER", "50", "OUTPUT_DIR", f"{output}/train_{amp}"]
        checks.append((f"train {amp}", [*torchrun, "tools/train_net.py", "--config-file", QUICKSTART, *opts]))
    weights = f"{output}/train_bfloat16/model_final.pth"
    for fmt in ("torchscript", "onnx"):
        export = [python, "tools/export_model.py", "--config-file", QUICKSTART, "--format", fmt]
        opts = ["--opts", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cuda"]
        checks.append((f"export {fmt}", [*export, "--output", f"{output}/export_{fmt}", *opts]))
    return checks


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="output/cuda_check", metavar="DIR")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    results = []
    for name, argv in commands(args.output):
        print(f"[cuda_check] {name}: {' '.join(argv)}", flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        try:
            status = subprocess.run(argv, timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
        results.append((name, status, time.perf_counter() - start))
    for name, status, seconds in results:
        print(f"[cuda_check] {'ok  ' if status == 0 else 'FAIL'} {name} ({seconds:.0f} s, status {status})")
    return int(any(status != 0 for _, status, _ in results))


if __name__ == "__main__":
    sys.exit(main())
