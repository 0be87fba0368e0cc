"""tools/benchmark.py on the tiny R-18 model: one round, JSON-ready result, positive ratios, the memory method."""

import json
import subprocess
import sys

import pytest
import torch

from ws_d2.errors import ConfigError

# Few RoIs and detections: the tiny model's heads then cost next to nothing.
FEW_ROIS = [
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "20",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "20",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "8",
    "TEST.DETECTIONS_PER_IMAGE",
    "3",
]


@pytest.fixture(scope="module")
def benchmark(load_tool):
    return load_tool("benchmark")


@pytest.fixture
def tiny_settings(benchmark, tiny_config):
    """`tiny_settings(**overrides)`: one round of the tiny model at 64 px, batch 1, on the CPU."""

    def make(**overrides):
        fields = dict(
            config_file=tiny_config, sizes=[64], batches=[1], rounds=1, warmup=0, device="cpu", opts=FEW_ROIS
        )
        return benchmark.BenchmarkSettings(**{**fields, **overrides})

    return make


def test_one_round_gives_all_rows_with_positive_ratios(benchmark, tiny_settings):
    result = benchmark.run_benchmark(tiny_settings(measure_memory=False), log=lambda line: None)
    json.dumps(result)  # what tools/benchmark.py --output writes
    assert result["ws_convs"] == 20 + 16
    metrics = [row["metric"] for row in result["rows"]]
    assert metrics == ["train_time", "inference_time", "folded_inference_time"]
    for row in result["rows"]:
        assert row["ratio"] > 0 and row["gn"] > 0 and row["goal"] is not None
        assert isinstance(row["pass"], bool)


def test_default_twin_is_the_gn_twin_with_the_same_weights(benchmark, tiny_settings):
    settings = tiny_settings()
    model, twin = benchmark.build_twin_models(
        benchmark.benchmark_config(settings), benchmark.benchmark_config(settings, twin=True)
    )
    assert settings.labels == ("GN+WS", "GN")
    assert benchmark.count_ws_convs(model) == 36 and benchmark.count_ws_convs(twin) == 0
    twin_state = twin.state_dict()
    assert all(torch.equal(value, twin_state[key]) for key, value in model.state_dict().items())


def test_other_twin_compares_bcn_with_gn_ws(benchmark, tiny_settings):
    from ws_d2.modeling import count_bcn

    # the GN+WS model against its BCN+WS twin: shared weights where names and shapes agree
    settings = tiny_settings(measure_memory=False, twin_opts=["MODEL.BCN.ENABLED", "True"])
    assert settings.labels == ("model", "twin")
    model, twin = benchmark.build_twin_models(
        benchmark.benchmark_config(settings), benchmark.benchmark_config(settings, twin=True)
    )
    assert count_bcn(model) == 0 and count_bcn(twin) == 36
    conv = "backbone.bottom_up.res3.0.conv1.weight"
    assert torch.equal(model.state_dict()[conv], twin.state_dict()[conv])
    result = benchmark.run_benchmark(settings, log=lambda line: None)
    report = benchmark.format_report(result)
    assert (
        "against its twin (MODEL.BCN.ENABLED True)" in report and " model " in report and " twin " in report
    )
    assert all(row["ratio"] > 0 for row in result["rows"])


@pytest.mark.slow
def test_peak_memory_sample_runs_in_a_fresh_process(benchmark, tiny_settings, tmp_path):
    settings = tiny_settings()
    twin_cfg = benchmark.benchmark_config(settings, twin=True)
    ws_model, _ = benchmark.build_twin_models(benchmark.benchmark_config(settings), twin_cfg)
    weights = tmp_path / "weights.pth"
    torch.save(ws_model.state_dict(), weights)
    mib = benchmark.measure_peak_memory(settings, "ws", "inference", 64, 1, str(weights))
    assert 1 < mib < 4096


# Run with the tool's path as argv[1]: loads the tool as a module, measures a step of known size.
PEAK_RSS_PROBE = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("benchmark_tool", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
baseline = tool.proc_status_kib("VmRSS")
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
print(json.dumps(tool.peak_rss_mib(lambda: torch.ones(64 * 2**18).sum(), baseline)))
"""


@pytest.mark.slow
def test_peak_rss_counts_live_memory_and_the_step_alone(benchmark):
    """The CPU memory method: what is alive plus the step's own peak, not what was freed before it."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_PROBE, benchmark.__file__],
        capture_output=True,
        text=True,
        env=benchmark.memory_sample_environment(),
        check=True,
    )
    mib = json.loads(done.stdout.strip().splitlines()[-1])
    assert 128 + 16 + 64 <= mib < 128 + 16 + 64 + 24


def test_missing_config_is_a_named_error(benchmark, tmp_path):
    settings = benchmark.BenchmarkSettings(config_file=str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        benchmark.run_benchmark(settings, log=lambda line: None)


@pytest.mark.slow
def test_inference_memory_rows_include_the_folded_model(benchmark, tiny_settings):
    settings = tiny_settings(modes=["inference"], memory_rounds=1, measure_memory=True)
    result = benchmark.run_benchmark(settings, log=lambda line: None)
    rows = {row["metric"]: row for row in result["rows"]}
    assert set(rows) == {
        "inference_time",
        "folded_inference_time",
        "inference_peak_memory",
        "folded_inference_peak_memory",
    }
    assert rows["folded_inference_peak_memory"]["folded"] > 0 and rows["inference_peak_memory"]["ws"] > 0


def test_rounds_alternate_which_model_runs_first(benchmark):
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("ws", "gn")}
    samples = benchmark.time_alternating(steps, rounds=3, warmup=1, device="cpu")
    assert calls == ["ws", "gn", "gn", "ws", "ws", "gn", "gn", "ws"]
    assert [len(samples[name]) for name in ("ws", "gn")] == [3, 3]


def test_sample_environment_appends_the_malloc_tunable(benchmark, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    env = benchmark.memory_sample_environment()
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536"


@pytest.mark.parametrize("flags", [["--rounds", "0"], ["--memory-rounds", "-1"], ["--sizes", "0"]])
def test_bad_settings_are_usage_errors(benchmark, flags):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(flags)
    assert exit_info.value.code == 2


def test_the_default_config_is_found_from_any_directory(benchmark, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = benchmark.settings_from_args(benchmark.get_parser().parse_args(["--quick"]))
    assert settings.config_file.endswith(benchmark.DEFAULT_CONFIG)
    assert (settings.sizes, settings.batches, settings.rounds, settings.memory_rounds) == ([320], [1], 3, 1)


def test_a_missing_config_exits_1_with_one_line(benchmark, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert benchmark.main(["--config-file", str(missing)]) == 1
    assert capsys.readouterr().err.strip() == f"benchmark: error: config file not found: {missing}"


def test_deploy_mode_times_every_format_against_eager(benchmark, tiny_settings):
    result = benchmark.run_deploy_benchmark(tiny_settings(warmup=0), log=lambda line: None)
    json.dumps(result)
    assert [row["variant"] for row in result["rows"]] == list(benchmark.DEPLOY_VARIANTS)
    assert result["rows"][0]["ratio_to_eager_ws"] == 1.0
    assert all(row["median_s"] > 0 and len(row["samples"]) == 1 for row in result["rows"])
