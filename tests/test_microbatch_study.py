"""projects/MicroBatch/run_study.py: the study's machinery (not its outcome) on its --quick version."""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

RESULT_KEYS = {"arm", "seed", "ims_per_step", "lr", "iterations", "bbox_AP", "segm_AP", "loss_auc",
               "loss_curve", "command", "machine", "wall_time_s", "diverged"}  # fmt: skip
PLOTS = ("loss_curves.png", "ap_bars.png", "lr_sensitivity.png", "ap_vs_ims.png")  # without a 2,000-image run


@pytest.fixture
def project(repo_root):
    """projects/MicroBatch's modules, imported in this process (run_study imports its neighbours by name)."""
    folder = str(repo_root / "projects" / "MicroBatch")
    sys.path.insert(0, folder)
    try:
        yield SimpleNamespace(
            arms=importlib.import_module("arms"), run_study=importlib.import_module("run_study")
        )
    finally:
        sys.path.remove(folder)
        for name in ("arms", "runs", "report", "run_study"):
            sys.modules.pop(name, None)


def study(repo_root, *args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    command = [sys.executable, str(repo_root / "projects" / "MicroBatch" / "run_study.py"), *map(str, args)]
    return subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_study_runs_records_resumes_and_reruns(repo_root, tmp_path):
    out = tmp_path / "study"
    first = study(repo_root, "--quick", "--output", out, "--jobs", 2)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "3 runs: 0 finished, 3 to run" in first.stdout

    results = json.loads((out / "results" / "results.json").read_text())
    assert sorted(r["arm"] for r in results) == ["BN", "GN", "GN+WS"]
    for r in results:
        assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
        assert (r["seed"], r["ims_per_step"], r["lr"], r["iterations"]) == (0, 1, 0.01, 6)
        assert r["loss_curve"] and r["loss_curve"][-1][0] == 6  # logged at the last iteration
        assert r["machine"]["threads"] == 1 and r["wall_time_s"] > 0
        assert "tools/train_net.py --resume" in r["command"] and str(tmp_path) in r["command"]
    # --quick makes a small data set of its own inside --output, not over the full set
    assert len(os.listdir(out / "datasets" / "ws_d2_synthetic" / "train")) == 8
    bn = next(r for r in results if r["arm"] == "BN")
    assert "bbox_AP_batch_statistics" in bn  # BN's train/eval gap was evaluated
    table = (out / "results" / "table.md").read_text()
    assert "| GN+WS | 6 | 1 | 0.01 | 1 |" in table and "GN+WS - GN" in table
    for name in PLOTS:
        assert (out / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second invocation redoes nothing; a run killed before it finished is run again, alone
    finished = out / "runs" / "gn-ims1-lr0.01-seed0" / "model_final.pth"
    stamp = finished.stat().st_mtime_ns
    (out / "runs" / "bn-ims1-lr0.01-seed0" / "eval_results.json").unlink()
    unrecorded = [r for r in results if r["arm"] != "BN"]  # killed before it finished: never recorded
    (out / "results" / "results.json").write_text(json.dumps(unrecorded))
    again = study(repo_root, "--quick", "--output", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "3 runs: 2 finished, 1 to run" in again.stdout and "bn-ims1-lr0.01-seed0" in again.stdout
    assert finished.stat().st_mtime_ns == stamp
    # results.json is the record: a recorded run whose folder is gone (another machine) is not run again
    shutil.rmtree(out / "runs" / "gn-ims1-lr0.01-seed0")
    third = study(repo_root, "--quick", "--output", out)
    assert third.returncode == 0 and "3 runs: 3 finished, 0 to run" in third.stdout, third.stderr[-2000:]
    after = {r["arm"]: r for r in json.loads((out / "results" / "results.json").read_text())}
    assert sorted(after) == ["BN", "GN", "GN+WS"] and after["GN"] == next(
        r for r in results if r["arm"] == "GN"
    )

    # one cell again, alone, into another folder: the same run gives the same AP (same machine, one thread)
    rerun = study(repo_root, "--quick", "--rerun", "GN+WS", 0, 1, 0.01, "--output", tmp_path / "rerun",
                  "--results", out / "results")  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    recorded = next(r for r in results if r["arm"] == "GN+WS")
    assert (
        f"box AP {recorded['bbox_AP']:.2f}, mask AP {recorded['segm_AP']:.2f}"
        in rerun.stdout.splitlines()[-2]
    )


def test_print_commands_gives_one_train_net_command_per_run(project, tmp_path, capsys):
    argv = ["--print-commands", "--output", str(tmp_path), "--arms", "GN", "BN", "--seeds", "0", "1"]
    assert project.run_study.main([*argv, "--lrs", "0.005", "0.01", "--ims-per-step", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 2 * 2 and all(" python tools/train_net.py --resume " in line for line in lines)
    assert sum("MODEL.RESNETS.NORM BN" in line for line in lines) == 4
    # 2 images per step: half the iterations of the 1-image schedule, the same images seen
    assert all("SOLVER.IMS_PER_BATCH 2" in line and "SOLVER.MAX_ITER 250" in line for line in lines)
    # the default study: phase 1 (5 main arms x 3 LRs x 3 seeds) until its results exist
    argv = ["--print-commands", "--output", str(tmp_path), "--results", str(tmp_path / "none")]
    assert project.run_study.main(argv) == 0
    printed = capsys.readouterr()
    assert len(printed.out.splitlines()) == 45 and "next phases" in printed.err


def test_unknown_arm_is_refused_in_one_line(project, tmp_path, capsys):
    assert project.run_study.main(["--arms", "GN", "LN", "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "run_study: error: unknown arm(s) LN; the arms are GN, GN+WS, BN, none, BN+WS, BCN+WS, GN+WS-MO, "
        "GN+WS-DO, GN+WS-AF, GN+WN"
    ]


def test_full_study_plans_its_phases_from_results(project):
    arms = project.arms

    def results_of(cells, ap):
        return [
            dict(arm=c.arm, seed=c.seed, ims_per_step=c.ims_per_step, lr=c.lr, bbox_AP=ap(c)) for c in cells
        ]

    phase1, complete = arms.full_study([])
    assert not complete and len(phase1) == 5 * 3 * 3
    # GN best at the lowest LR, GN+WS at the highest, BN in the middle: GN and GN+WS get one LR more
    ap = {"GN": lambda c: -c.lr, "GN+WS": lambda c: c.lr, "BN": lambda c: -abs(c.lr - 0.01)}
    done = results_of(phase1, lambda c: ap.get(c.arm, lambda c: c.seed)(c))
    phase2, complete = arms.full_study(done)
    extra = {(c.arm, c.lr) for c in phase2[len(phase1) :]}
    assert not complete and extra == {("GN", 0.0025), ("GN+WS", 0.04)}
    done += results_of(phase2[len(phase1) :], lambda c: ap[c.arm](c))
    phase3, complete = arms.full_study(done)
    assert not complete
    last = {(c.arm, c.ims_per_step, c.lr) for c in phase3[len(phase2) :] if c.ims_per_step <= 2}
    ablations = {(arm, 1, 0.04) for arm in arms.ABLATION_ARMS}  # at the best GN+WS LR, extension included
    two_images = {("GN+WS", 2, 0.08), ("BN", 2, 0.02)}  # twice each arm's best LR
    assert last == ablations | two_images
    # part 2: BN at 8 and 16 images per step over the 1-image grid x k, extended while its best is at an edge
    large = {(c.ims_per_step, c.lr) for c in phase3 if c.ims_per_step > 2}
    assert large == {(k, k * lr) for k in (8, 16) for lr in (0.0025, 0.005, 0.01)}
    # at 8 the best is the grid's lowest LR, at 16 inside it (and better): 8 gets a lower LR, 16 none
    best = {8: 0.02, 16: 0.08}
    ap = dict(ap, BN=lambda c: c.ims_per_step - abs(c.lr - best.get(c.ims_per_step, 0.01)))
    done += results_of(phase3[len(phase2) :], lambda c: ap.get(c.arm, lambda c: c.seed)(c))
    phase4, complete = arms.full_study(done)
    assert not complete and {(c.ims_per_step, c.lr) for c in phase4[len(phase3) :]} == {(8, 0.01)}
    done += results_of(phase4[len(phase3) :], ap["BN"])
    phase5, complete = arms.full_study(done)
    assert complete
    long_budget = {(c.arm, c.ims_per_step, c.lr) for c in phase5[len(phase4) :] if c.images == 2000}
    assert long_budget == {("GN", 1, 0.0025), ("GN", 1, 0.005), ("GN+WS", 1, 0.04), ("GN+WS", 1, 0.08),
                           ("BCN+WS", 1, 0.005), ("BCN+WS", 1, 0.01), ("BN", 16, 0.08), ("BN", 16, 0.16)}  # fmt: skip
    bn_ws = {(c.arm, c.ims_per_step, c.lr, c.images) for c in phase5[len(phase4) :] if c.arm == "BN+WS"}
    assert bn_ws == {("BN+WS", 16, 0.08, None)}  # at BN's best large batch and LR
    assert len(phase5) == len(set(phase5)) == 45 + 6 + 12 + 6 + 18 + 3 + 8 * 3 + 3
    # a study whose runs are all recorded runs none and returns them, both budgets, in one order
    done += results_of(phase5[len(phase4) :], lambda c: c.seed)
    done = [dict(r, images=c.images) for r, c in zip(done, phase5)]
    recorded = project.run_study.run_cells(SimpleNamespace(output="unused", threads=1), phase5, 2, done)
    assert [arms.Cell.of(r) for r in recorded] == sorted(phase5)


def test_report_answers_part_two_from_paired_seeds(project, tmp_path):
    sys.path.insert(0, str(Path(project.arms.__file__).parent))
    try:
        report = importlib.import_module("report")
    finally:
        sys.path.pop(0)
        sys.modules.pop("report", None)

    def cells(arm, ims, lr, box_aps, images=None):
        return [dict(arm=arm, seed=seed, ims_per_step=ims, lr=lr, images=images, bbox_AP=ap, segm_AP=ap / 2,
                     iterations=(images or 500) // ims, loss_auc=1.0, diverged=False, loss_curve=[[10, 2.0], [(images or 500) // ims, 1.0]])
                for seed, ap in enumerate(box_aps)]  # fmt: skip

    results = [*cells("GN+WS", 1, 0.02, [10, 12, 14]), *cells("GN+WS", 1, 0.01, [1, 1, 1]),
               *cells("GN", 1, 0.005, [20, 22, 24]), *cells("BN", 8, 0.04, [15, 15, 15]),
               *cells("BN", 16, 0.08, [5, 5, 5]), *cells("GN+WS", 1, 0.02, [20, 21, 22], 2000),
               *cells("GN+WS", 1, 0.04, [0, 0, 0], 2000), *cells("GN", 1, 0.005, [22, 22, 22], 2000),
               *cells("BN", 8, 0.04, [16, 17, 18], 2000)]  # fmt: skip
    rows = {
        (question, budget): [box for _, box, _ in pairs]
        for question, budget, *_, pairs in report.headline(results)
    }
    assert rows == {
        ("GN+WS at 1 image - BN at 8", 500): [-5, -3, -1],  # BN's best large batch is 8, its best LR 0.04
        ("GN+WS - GN, 1 image", 500): [-10, -10, -10],
        ("GN+WS at 1 image - BN at 8", 2000): [4, 4, 4],  # GN+WS at its best LR for 2,000 images, 0.02
        ("GN+WS - GN, 1 image", 2000): [-2, -1, 0],
        ("change of GN+WS - GN", "500 to 2000"): [8, 9, 10],  # the gap closes in every seed
    }
    written = report.write_report(results, tmp_path)
    assert {"ap_vs_images_seen.png", "loss_curves_long.png"} <= {path.name for path in written}
    assert "| GN+WS | 2000 | 1 | 0.02 | 3 | 21.0 ± 1.0 (20.0-22.0) |" in (tmp_path / "table.md").read_text()


def test_bn_batch_statistics_survive_eval_mode(project):
    """BN's train/eval gap needs BatchNorm to use the test image's statistics although evaluation calls eval()."""
    sys.path.insert(0, str(Path(project.arms.__file__).parent))
    try:
        use_batch_statistics = importlib.import_module("eval_batch_statistics").use_batch_statistics
    finally:
        sys.path.pop(0)
        sys.modules.pop("eval_batch_statistics", None)
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():  # running statistics far from any batch's
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(100.0)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    model = use_batch_statistics(torch.nn.Sequential(bn)).eval()
    expected = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / (
        x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + bn.eps
    ).sqrt()
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
