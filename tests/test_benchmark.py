"""tools/benchmark.py and tools/benchmark_export.py on the tiny R-18 model: what each figure is computed from.

No assertion is on a time: the machines are shared and noisy.
"""

import json
import statistics
import subprocess
import sys

import pytest
import torch

from ws_d2.modeling import count_bcn, count_ws_convs

# Few RoIs and detections: the tiny model's heads then cost next to nothing.
FEW_ROIS = ["MODEL.RPN.POST_NMS_TOPK_TRAIN", "20", "MODEL.RPN.POST_NMS_TOPK_TEST", "20"]
FEW_ROIS += ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8", "TEST.DETECTIONS_PER_IMAGE", "3"]


@pytest.fixture(scope="module")
def benchmark(load_tool):
    return load_tool("benchmark")


@pytest.fixture
def tiny_argv(tiny_config):
    """The command line of one round of the tiny model at 64 px, batch 1, on the CPU."""
    return ["--config-file", tiny_config, "--sizes", "64", "--batches", "1", "--rounds", "1", "--warmup", "0",
            "--device", "cpu"]  # fmt: skip


def test_row_is_the_ratio_of_the_medians(benchmark):
    samples = {"ws": [3.0, 1.0, 2.0], "gn": [4.0, 8.0, 6.0], "folded": [5.0, 9.0, 7.0]}
    rows = benchmark.rows_of("inference_time", 320, 2, "s", samples)
    assert [row["metric"] for row in rows] == ["inference_time", "folded_inference_time"]
    assert (rows[0]["ws"], rows[0]["gn"], rows[0]["ratio"]) == (2.0, 6.0, 2.0 / 6.0)
    assert (rows[1]["folded"], rows[1]["gn"], rows[1]["ratio"]) == (7.0, 6.0, 7.0 / 6.0)
    assert rows[0]["ws_samples"] == [3.0, 1.0, 2.0] and rows[1]["gn_samples"] == [4.0, 8.0, 6.0]
    assert (rows[0]["size"], rows[0]["batch"], rows[0]["unit"]) == (320, 2, "s")


def test_rounds_alternate_which_model_runs_first(benchmark):
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("ws", "gn")}
    samples = benchmark.time_alternating(steps, rounds=3, warmup=1, device="cpu")
    assert calls == ["ws", "gn", "gn", "ws", "ws", "gn", "gn", "ws"]
    assert [len(samples[name]) for name in ("ws", "gn")] == [3, 3]  # the warm-up round is not kept


def test_gn_twin_differs_from_the_model_only_in_ws(benchmark, tiny_argv):
    args = benchmark.parse_args(tiny_argv)
    model, twin = benchmark.build_twin_models(
        benchmark.benchmark_config(args), benchmark.benchmark_config(args, twin=True)
    )
    assert count_ws_convs(model) == 36 and count_ws_convs(twin) == 0
    model_state, twin_state = model.state_dict(), twin.state_dict()
    assert model_state.keys() == twin_state.keys()
    assert all(torch.equal(value, twin_state[key]) for key, value in model_state.items())


def test_other_twin_shares_the_weights_it_can(benchmark, tiny_argv):
    args = benchmark.parse_args([*tiny_argv, "--twin-opts", "MODEL.BCN.ENABLED", "True"])
    model, twin = benchmark.build_twin_models(
        benchmark.benchmark_config(args), benchmark.benchmark_config(args, twin=True)
    )
    assert count_bcn(model) == 0 and count_bcn(twin) == 36
    conv = "backbone.bottom_up.res3.0.conv1.weight"
    assert torch.equal(model.state_dict()[conv], twin.state_dict()[conv])


PEAK_MEMORY_SAMPLE = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("benchmark", sys.argv[1])
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)
benchmark.release_freed_memory()  # as run_benchmark does first
freed_before = torch.ones(256 * 2**18)  # 256 MiB, freed before the sample: not counted
del freed_before
kept = []

def build_step():
    kept.append(torch.ones(128 * 2**18))  # 128 MiB alive during the step, like a model copy: counted
    return lambda: torch.ones(64 * 2**18).sum()  # 64 MiB at the step's peak: counted

print(benchmark.peak_memory_mib(build_step, "cpu"))
"""


def test_peak_memory_counts_what_the_step_keeps_and_allocates(repo_root):
    # in a fresh process, as the tool runs: a test suite's heap may hand back freed memory that is still resident
    sample = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SAMPLE, str(repo_root / "tools" / "benchmark.py")],
                            capture_output=True, text=True, check=True)  # fmt: skip
    mib = float(sample.stdout.split()[-1])
    assert 128 + 64 <= mib < 128 + 64 + 32


def test_json_has_time_and_memory_rows_of_every_model(benchmark, tiny_argv, tmp_path, capsys):
    output = tmp_path / "benchmark.json"
    assert benchmark.main([*tiny_argv, "--output", str(output), *FEW_ROIS]) == 0
    result = json.loads(output.read_text())
    assert (result["ws_convs"], result["labels"]) == (36, ["GN+WS", "GN"])
    assert [row["metric"] for row in result["rows"]] == [
        "train_time",
        "train_peak_memory",
        "inference_time",
        "folded_inference_time",
        "inference_peak_memory",
        "folded_inference_peak_memory",
    ]
    for row in result["rows"]:
        model = "folded" if row["metric"].startswith("folded") else "ws"
        assert row[model] == row[f"{model}_samples"][0] and row["ratio"] == row[model] / row["gn"]
    printed = capsys.readouterr().out
    assert "train_peak_memory" in printed and " GN+WS " in printed and f"wrote {output}" in printed


def test_other_twin_is_labelled_model_and_twin(benchmark, tiny_argv, capsys):
    argv = [*tiny_argv, "--modes", "inference", "--no-memory", "--twin-opts", "MODEL.BCN.ENABLED", "True"]
    assert benchmark.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(" model " in line and " twin " in line for line in lines)


@pytest.mark.parametrize("flags", [["--rounds", "0"], ["--sizes", "0"], ["--threads", "0"]])
def test_bad_settings_are_usage_errors(benchmark, flags):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(flags)
    assert exit_info.value.code == 2


def test_quick_settings_and_the_default_config_from_any_directory(benchmark, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = benchmark.parse_args(["--quick"])
    assert args.config_file.endswith(benchmark.DEFAULT_CONFIG)
    assert (args.sizes, args.batches, args.rounds) == ([320], [1], 3)


def test_a_missing_config_exits_1_with_one_line(benchmark, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert benchmark.main(["--config-file", str(missing)]) == 1
    assert capsys.readouterr().err.strip() == f"benchmark: error: config file not found: {missing}"


def test_export_benchmark_times_every_form_against_eager(load_tool, tiny_config, tmp_path):
    tool = load_tool("benchmark_export")
    output = tmp_path / "deploy.json"
    argv = ["--config-file", tiny_config, "--sizes", "64", "--rounds", "2", "--warmup", "0"]
    assert tool.main([*argv, "--output", str(output), *FEW_ROIS]) == 0
    rows = json.loads(output.read_text())["rows"]
    assert [(row["size"], row["variant"]) for row in rows] == [(64, variant) for variant in tool.VARIANTS]
    eager = statistics.median(rows[0]["samples"])
    for row in rows:
        assert len(row["samples"]) == 2 and row["median_s"] == statistics.median(row["samples"])
        assert row["ratio_to_eager_ws"] == row["median_s"] / eager
