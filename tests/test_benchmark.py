"""Smoke test of ws_d2.benchmark on a tiny R-18 model: one round, JSON-ready result, positive ratios."""

import json

import pytest

from ws_d2.benchmark import BenchmarkError, BenchmarkSettings, measure_peak_memory, run_benchmark

TINY = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "20",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "20",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "8",
    "TEST.DETECTIONS_PER_IMAGE",
    "3",
]


def tiny_settings(repo_root, **overrides):
    config = repo_root / "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml"
    fields = dict(
        config_file=str(config), sizes=[64], batches=[1], rounds=1, warmup=0, device="cpu", opts=TINY
    )
    return BenchmarkSettings(**{**fields, **overrides})


def test_one_round_gives_all_rows_with_positive_ratios(repo_root):
    result = run_benchmark(tiny_settings(repo_root, measure_memory=False), log=lambda line: None)
    json.dumps(result)  # what tools/benchmark.py --output writes
    assert result["ws_convs"] == 20 + 16
    metrics = [row["metric"] for row in result["rows"]]
    assert metrics == ["train_time", "inference_time", "folded_inference_time"]
    for row in result["rows"]:
        assert row["ratio"] > 0 and row["gn"] > 0 and row["goal"] is not None
        assert isinstance(row["pass"], bool)


def test_peak_memory_sample_runs_in_a_fresh_process(repo_root, tmp_path):
    import torch

    from ws_d2.benchmark import build_twin_models, load_config

    settings = tiny_settings(repo_root)
    ws_model, _ = build_twin_models(load_config(settings))
    weights = tmp_path / "weights.pth"
    torch.save(ws_model.state_dict(), weights)
    mib = measure_peak_memory(settings, "ws", "inference", 64, 1, str(weights))
    assert 1 < mib < 4096


PEAK_RSS_PROBE = """
import json, torch
from ws_d2.benchmark import _proc_status_kib, peak_rss_mib
baseline = _proc_status_kib("VmRSS")
kept = torch.ones(128 * 2**18)  # 128 MiB alive during the step: counted
# 256 MiB in 1 MiB blocks, freed before the step: not counted. Between them, 64 KiB tensors that stay
# (16 MiB, counted). With glibc's default, adaptive mmap threshold (raised past 1 MiB by the 2 MiB block
# freed first) the blocks land on the heap and the pins keep their freed space resident: ~460 MiB.
torch.ones(2**19)
blocks, pins = [], []
for _ in range(256):
    blocks.append(torch.ones(2**18))
    pins.append(torch.ones(2**14))
del blocks
print(json.dumps(peak_rss_mib(lambda: torch.ones(64 * 2**18).sum(), baseline)))
"""


def test_peak_rss_counts_live_memory_and_the_step_alone():
    """The CPU memory method: what is alive plus the step's own peak, not what was freed before it."""
    import subprocess
    import sys

    from ws_d2.benchmark import memory_sample_environment

    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_PROBE],
        capture_output=True,
        text=True,
        env=memory_sample_environment(),
        check=True,
    )
    mib = json.loads(done.stdout.strip().splitlines()[-1])
    assert 128 + 16 + 64 <= mib < 128 + 16 + 64 + 24


def test_missing_config_is_a_named_error(tmp_path):
    with pytest.raises(BenchmarkError, match="not found"):
        run_benchmark(BenchmarkSettings(config_file=str(tmp_path / "nope.yaml")), log=lambda line: None)


def test_inference_memory_rows_include_the_folded_model(repo_root):
    settings = tiny_settings(repo_root, modes=["inference"], memory_rounds=1, measure_memory=True)
    result = run_benchmark(settings, log=lambda line: None)
    rows = {row["metric"]: row for row in result["rows"]}
    assert set(rows) == {
        "inference_time",
        "folded_inference_time",
        "inference_peak_memory",
        "folded_inference_peak_memory",
    }
    assert rows["folded_inference_peak_memory"]["folded"] > 0 and rows["inference_peak_memory"]["ws"] > 0


def test_rounds_alternate_which_model_runs_first():
    from ws_d2.benchmark import time_alternating

    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("ws", "gn")}
    samples = time_alternating(steps, rounds=3, warmup=1, device="cpu")
    assert calls == ["ws", "gn", "gn", "ws", "ws", "gn", "gn", "ws"]
    assert [len(samples[name]) for name in ("ws", "gn")] == [3, 3]
