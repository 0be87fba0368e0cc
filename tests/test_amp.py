"""Mixed precision (SOLVER.AMP.*): the config checks, bf16 training on the CPU against fp32, micro-batches, resume
with the GradScaler's state, export of an AMP-trained model, and tools/cuda_check.py's command lines. Tests whose
name has `cuda` need a GPU (`make cuda-check` runs them) and skip without one."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import ws_d2
import ws_d2.engine.trainer as trainer_module
from ws_d2.engine import WSTrainer, check_trainable
from ws_d2.errors import ConfigError
from ws_d2.predictor import DeployedPredictor, WSPredictor

BF16 = ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"]
FP16 = ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "float16"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (make cuda-check)")


def train(cfg, resume=False):
    torch.manual_seed(0)  # the same initial weights for every run
    trainer = WSTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def gradients(trainer):
    # the last step's gradients: MicroBatchTrainer zeroes them at the start of a step, not after it
    return {n: p.grad.double() for n, p in trainer.model.named_parameters() if p.grad is not None}


def relative_difference(a, b):
    """||a - b|| / ||b|| over all tensors of two {name: tensor} dicts with the same names."""
    assert a.keys() == b.keys() and a
    difference = sum((a[k] - b[k]).norm() ** 2 for k in b) ** 0.5
    return (difference / sum(v.norm() ** 2 for v in b.values()) ** 0.5).item()


def test_precision_key_and_what_the_cpu_refuses(tiny_cfg):
    cfg = tiny_cfg(*BF16)
    check_trainable(cfg, world_size=1)  # bf16 on the CPU trains
    assert tiny_cfg().SOLVER.AMP.PRECISION == "float16"  # detectron2's AMPTrainer default
    with pytest.raises(ConfigError, match="needs a CUDA device for SOLVER.AMP.PRECISION float16"):
        check_trainable(tiny_cfg(*FP16), world_size=1)
    with pytest.raises(ConfigError, match="must be float16 or bfloat16, got 'half'"):
        check_trainable(tiny_cfg("SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "half"), 1)
    check_trainable(tiny_cfg("SOLVER.AMP.PRECISION", "half"), 1)  # unused while AMP is off


@pytest.fixture(scope="module")
def step_data(tmp_path_factory, tiny_dataset, exact_step_opts):
    """One exact optimizer step (conftest's exact_step_opts) on 4 one-object images: no proposal ranking that
    bf16 noise could reorder, so fp32 and bf16 train the same RoIs and their gradients are comparable."""
    data_opts, _ = tiny_dataset(tmp_path_factory.mktemp("amp_data"), "amp", num_train=4, max_objects=1)
    return [*exact_step_opts, *data_opts]


def test_bf16_step_is_finite_and_close_to_fp32(tmp_path, tiny_cfg, step_data):
    fp32 = train(tiny_cfg(*step_data, "OUTPUT_DIR", str(tmp_path / "fp32")))
    bf16 = train(tiny_cfg(*step_data, *BF16, "OUTPUT_DIR", str(tmp_path / "bf16")))
    assert bf16._trainer.precision == torch.bfloat16 and bf16._trainer.grad_scaler is None
    losses = {k: v.latest() for k, v in bf16.storage.histories().items() if k.startswith("loss")}
    assert len(losses) == 5 and all(np.isfinite(v) for v in losses.values())
    for name, value in losses.items():  # measured: within 4 % (loss_box_reg), the others 0.1 %
        assert abs(value - fp32.storage.history(name).latest()) <= 0.1 * abs(value) + 1e-4, name
    grad_bf16, grad_fp32 = gradients(bf16), gradients(fp32)
    assert all(torch.isfinite(g).all() for g in grad_bf16.values())
    # bf16 keeps 8 significant bits: each conv adds ~0.3 % of error (its input, weight and output rounded by
    # up to 2^-9), which GN keeps and ~30 convs accumulate: the features entering the heads differ by 3-7 %
    # (measured), and so do the weight gradients of the heads that no GN follows (measured: at most 8 %).
    heads = ("rpn_head.", "cls_score.", "mask_head.deconv.", "mask_head.predictor.")
    for name in [n for n in grad_fp32 if any(h in n for h in heads)]:
        assert relative_difference({0: grad_bf16[name]}, {0: grad_fp32[name]}) < 0.15, name
    # Deeper in, this random-init gradient is ill-conditioned in any precision: GN over the near-constant
    # features of flat synthetic shapes amplifies perturbations (up to 1 / sqrt(eps)), and bbox_pred's L1
    # gradient is the sign of deltas that are ~0 on ground-truth RoIs. Measured: fp32 weights times
    # (1 + 2^-9 noise), bf16's own rounding, move the whole gradient by 40 %; bf16 moves it by 46 %.
    torch.manual_seed(0)
    perturbed = WSTrainer(tiny_cfg(*step_data, "OUTPUT_DIR", str(tmp_path / "perturbed")))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in perturbed.model.parameters():
            p.mul_(1 + 2**-9 * torch.randn(p.shape, generator=generator))
    perturbed.train()
    floor = relative_difference(gradients(perturbed), grad_fp32)
    assert relative_difference(grad_bf16, grad_fp32) < 1.5 * floor


def test_bf16_micro_batches_equal_one_big_batch(tmp_path, tiny_cfg, step_data):
    def update(*opts):
        torch.manual_seed(0)
        trainer = WSTrainer(tiny_cfg(*step_data, *BF16, *opts))
        before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        after = trainer.model.state_dict()
        return {k: (after[k] - before[k]).double() for k in before if before[k].is_floating_point()}

    big = update("OUTPUT_DIR", str(tmp_path / "big"))
    micro = update("OUTPUT_DIR", str(tmp_path / "micro"), "SOLVER.ITER_SIZE", "2")
    # fp32 agrees to 5e-6 (tests/test_train_micro_batch.py); bf16 rounds each image's activations the same
    # way in a batch of 2 or 4, so only the summation order differs again. Measured: 0.3 %. A wrong average
    # (no 1/ITER_SIZE, a lost micro-batch) is off by 50-100 %.
    assert relative_difference(micro, big) < 0.02


def test_fp16_resume_restores_the_grad_scaler(tmp_path, tiny_cfg, step_data, monkeypatch):
    """float16 with a GradScaler, on the CPU's emulated fp16 kernels (slow but right): the checkpoint keeps the
    scaler's state under detectron2's key and --resume restores it."""
    monkeypatch.setattr(trainer_module, "check_trainable", lambda cfg, world_size: None)
    opts = [*step_data, *FP16, "OUTPUT_DIR", str(tmp_path), "SOLVER.CHECKPOINT_PERIOD", "1"]
    first = train(tiny_cfg(*opts, "SOLVER.MAX_ITER", "2"))
    saved = first._trainer.grad_scaler.state_dict()
    assert first._trainer.precision == torch.float16
    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert checkpoint["trainer"]["_trainer"]["grad_scaler"] == saved

    torch.manual_seed(0)
    resumed = WSTrainer(tiny_cfg(*opts, "SOLVER.MAX_ITER", "3"))
    assert resumed._trainer.grad_scaler.state_dict() != saved  # a fresh scaler
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2 and resumed._trainer.grad_scaler.state_dict() == saved
    resumed.train()
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


@pytest.fixture(scope="module")
def bf16_trained(tmp_path_factory, tiny_cfg, tiny_dataset):
    """The model_final.pth of the tiny model trained 3 steps under bf16 autocast."""
    root = tmp_path_factory.mktemp("amp_trained")
    data_opts, _ = tiny_dataset(root / "data", "amp_trained", num_train=4)
    opts = [*data_opts, *BF16, "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", "OUTPUT_DIR", str(root)]
    train(tiny_cfg(*opts, freeze=True))
    return root / "model_final.pth"


def test_export_of_bf16_trained_model_matches_the_fp32_eager_model(
    tmp_path, tiny_cfg, bf16_trained, export_tool
):
    # its weights stay fp32 (autocast casts per op); the export runs in fp32 as the eager model does
    cfg = tiny_cfg(
        "MODEL.WEIGHTS", str(bf16_trained), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "TEST.DETECTIONS_PER_IMAGE", "5", freeze=True,
    )  # fmt: skip
    weights = torch.load(bf16_trained, weights_only=False)["model"].values()
    assert all(v.dtype == torch.float32 for v in weights if v.is_floating_point())
    image = np.random.default_rng(0).integers(0, 255, (80, 112, 3), dtype=np.uint8)
    image[20:60, 30:80] = (40, 200, 90)
    expected = WSPredictor(cfg)(image)["instances"]
    model_file = export_tool.export_deployable(cfg, str(tmp_path), "torchscript", image)
    actual = DeployedPredictor(cfg, model_file)(image)["instances"]
    assert len(expected) > 0 and len(actual) == len(expected)
    # the same W_hat values, fp32 both: equal up to kernel summation order (tests/test_export.py)
    torch.testing.assert_close(actual.pred_boxes.tensor, expected.pred_boxes.tensor, atol=1e-4, rtol=0)
    torch.testing.assert_close(actual.scores, expected.scores, atol=1e-4, rtol=0)
    assert torch.equal(actual.pred_classes, expected.pred_classes)


def test_bf16_autocast_inference_runs_on_the_cpu(tiny_cfg, bf16_trained):
    predictor = WSPredictor(tiny_cfg("MODEL.WEIGHTS", str(bf16_trained), freeze=True))
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        instances = predictor(image)["instances"]
    assert (
        torch.isfinite(instances.pred_boxes.tensor).all() and torch.isfinite(instances.scores.float()).all()
    )


@pytest.mark.slow
def test_bf16_through_two_gloo_processes(tmp_path, tiny_dataset, start_train_net):
    data_opts, flags = tiny_dataset(tmp_path / "data", "amp_gloo", num_train=4)
    args = [
        *flags,
        "--num-cpu-procs",
        "2",
        *data_opts,
        *BF16,
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.ITER_SIZE",
        "2",
    ]
    args += ["SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")]
    process = start_train_net(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    state = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# --- tools/cuda_check.py: its command lines are valid here; the checks themselves run on a GPU ----------------


def test_cuda_check_command_lines_parse(load_tool, repo_root):
    cuda_check = load_tool("cuda_check")
    checks = cuda_check.commands("out", python="python")
    names = [name for name, _ in checks]
    assert "cuda tests" in names and len(names) == len(set(names))
    parsers = {tool: load_tool(tool) for tool in ("train_net", "export_model", "benchmark")}
    for name, argv in checks:
        tool = next((t for t in parsers if f"tools/{t}.py" in argv), None)
        if tool is None:
            continue
        args = argv[argv.index(f"tools/{tool}.py") + 1 :]
        if tool == "benchmark":
            assert parsers[tool].parse_args(args).device == "cuda", name
            continue
        parsed = parsers[tool].get_parser().parse_args(args)
        if tool != "benchmark":
            cfg = ws_d2.load_config(str(repo_root / parsed.config_file), parsed.opts)
            assert cfg.MODEL.DEVICE == "cuda", name
    trainings = [argv for name, argv in checks if name.startswith("train")]
    assert trainings and all(
        argv[1:4] == ["-m", "torch.distributed.run", "--standalone"] for argv in trainings
    )
    # the CUDA tests it selects exist (here they skip)
    pytest_argv = dict(checks)["cuda tests"]
    collected = subprocess.run(
        [sys.executable, *pytest_argv[1:], "--collect-only", "-q"],
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert collected.returncode == 0 and " 0 tests" not in collected.stdout, collected.stdout[-2000:]


def test_cuda_check_dry_run_prints_every_command(repo_root):
    run = subprocess.run(
        [sys.executable, "tools/cuda_check.py", "--dry-run", "--output", "somewhere"],
        cwd=repo_root, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("torch.distributed.run") == 2 and "--amp bfloat16" in run.stdout


# --- CUDA (make cuda-check) ---------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("precision", [FP16, BF16])
def test_cuda_amp_training_and_resume(tmp_path, tiny_cfg, step_data, precision):
    opts = [*step_data, *precision, "MODEL.DEVICE", "cuda", "OUTPUT_DIR", str(tmp_path)]
    first = train(tiny_cfg(*opts, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"))
    scaler = first._trainer.grad_scaler
    assert (scaler is not None) == (precision is FP16) and first._trainer.device_type == "cuda"
    assert all(torch.isfinite(g).all() for g in gradients(first).values())
    resumed = train(tiny_cfg(*opts, "SOLVER.MAX_ITER", "3"), resume=True)
    if scaler is not None:
        assert resumed._trainer.grad_scaler.get_scale() > 0
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
