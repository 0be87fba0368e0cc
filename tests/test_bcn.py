"""Batch-Channel Normalization (BCN+WS): the layer against its equations, the EstBN estimates and their schedule,
the model wiring, frozen stages, ITER_SIZE and DDP semantics, a real run. Elsewhere: the WS formula of the
BCN+WS release (test_ws_conv.py), fold_ws (test_modeling.py), the export (test_export.py, test_deploy.py), the
COCO configs (test_configs.py).

The references are written from the equations (docs/BCN.md), in float64 so that the bounds do not depend on
the CPU's float32 kernels.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import ws_d2  # noqa: F401  (first, also in the Gloo test's spawned processes: detectron2's fixes)

# isort: split
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from ws_d2.data import synthetic_batch
from ws_d2.engine import WSTrainer
from ws_d2.errors import ConfigError
from ws_d2.layers import BatchChannelNorm, EstBN, WSConv2d, moving_speed, set_moving_speed
from ws_d2.modeling import count_bcn, count_ws_convs

C, G = 8, 4
BCN_OPTS = ["MODEL.BCN.ENABLED", "True", "MODEL.WS.FORMULA", "sqrt_var_plus_eps"]


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 + 0.5


def _bcn(estimate, seed=1):
    """A float64 BCN with random affines and statistics, so that a swapped term shows."""
    bcn = BatchChannelNorm(C, G, estimate=estimate).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in bcn.state_dict().items():
            if t.is_floating_point() and t.dim() > 0:
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5 if "var" in name else torch.randn(t.shape, generator=g, dtype=t.dtype))  # fmt: skip
    return bcn


def _per_channel(v):
    return v.view(1, -1, 1, 1)


def reference_bcn(x, mean, var, bn_weight, bn_bias, group_weight, group_bias, groups, eps=1e-5):
    """The three steps as written: per-channel normalization by (mean, var) with a per-channel affine, then
    per-sample group normalization (biased variance, eps inside the root), then the per-group affine."""
    y = (x - _per_channel(mean)) / torch.sqrt(_per_channel(var) + 1e-5) * _per_channel(bn_weight)
    y = y + _per_channel(bn_bias)
    n = x.shape[0]
    grouped = y.reshape(n, groups, -1)
    mu = grouped.mean(-1, keepdim=True)
    sigma2 = ((grouped - mu) ** 2).mean(-1, keepdim=True)
    z = (grouped - mu) / torch.sqrt(sigma2 + eps)
    return (z * group_weight + group_bias).reshape(x.shape)


def _batch_moments(x, around=None):
    mean = x.mean(dim=(0, 2, 3))
    center = mean if around is None else around
    return mean, ((x - _per_channel(center)) ** 2).mean(dim=(0, 2, 3))


@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_bcn_follows_the_equations(estimate, training):
    bcn = _bcn(estimate).train(training)
    step = bcn.batch_norm
    mean0, var0 = step.running_mean.clone(), step.running_var.clone()
    x = _x(3, C, 5, 4)
    r = 0.3
    if estimate:
        set_moving_speed(bcn, r)
    out = bcn(x)

    if not training:
        mean, var = mean0, var0  # both batch steps: their statistics, untouched
        assert torch.equal(step.running_mean, mean0) and torch.equal(step.running_var, var0)
    elif estimate:
        # EstBN: the estimates move first (var around the OLD mean, biased), then normalize with them
        batch_mean, batch_var = _batch_moments(x, around=mean0)
        mean, var = (1 - r) * mean0 + r * batch_mean, (1 - r) * var0 + r * batch_var
        torch.testing.assert_close(step.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(step.running_var, var, rtol=1e-12, atol=1e-12)
    else:
        mean, var = _batch_moments(x)  # BatchNorm2d: the batch's own (biased) statistics
    expected = reference_bcn(x, mean, var, step.weight, step.bias, bcn.weight, bcn.bias, G)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("estimate", [False, True])
def test_eval_output_does_not_depend_on_the_batch(estimate):
    bcn = _bcn(estimate).eval()
    x = _x(4, C, 3, 3)
    alone = torch.cat([bcn(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(bcn(x), alone, rtol=1e-12, atol=1e-12)
    # and in training the BN step does depend on it: the test can tell the modes apart
    if not estimate:
        assert not torch.allclose(bcn.train()(x)[:1], bcn(x[:2])[:1])


def test_estbn_update_identities():
    est = EstBN(C).double().train()
    mean0 = est.running_mean.clone()
    x = _x(2, C, 3, 3)
    # r = 0 (the authors' initial value): the estimates never move, and the output is the init's
    out = est(x)
    assert torch.equal(est.running_mean, mean0) and torch.equal(
        est.running_var, torch.ones(C, dtype=torch.float64)
    )
    torch.testing.assert_close(out, x / (1 + 1e-5) ** 0.5, rtol=1e-12, atol=1e-12)
    # r = 1: the batch's mean, and its second moment around the OLD mean (0 here), biased
    set_moving_speed(est, 1.0)
    est(x)
    torch.testing.assert_close(est.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(est.running_var, (x**2).mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    # ws_d2's schedule r_t = 1/(t+1): the mean estimate is the plain average of all batch means so far
    batches = [_x(2, C, 3, 3, seed=s) * (s + 1) for s in range(5)]
    for t, batch in enumerate(batches):
        set_moving_speed(est, moving_speed(t, min_speed=0.01))
        est(batch)
    average = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(est.running_mean, average, rtol=1e-12, atol=1e-12)
    # an empty input (no mask RoI) moves nothing; no gradient reaches the statistics
    before = est.running_mean.clone()
    est(torch.zeros(0, C, 3, 3, dtype=torch.float64))
    assert torch.equal(est.running_mean, before)
    assert not est.running_mean.requires_grad and "estbn_moving_speed" not in est.state_dict()


@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_empty_batch(estimate, training):
    # no RoI reaches the mask head: an empty output, and the statistics stay as they were
    bcn = _bcn(estimate).train(training)
    set_moving_speed(bcn, 0.5)
    before = {k: v.clone() for k, v in bcn.state_dict().items()}
    assert bcn(torch.zeros(0, C, 14, 14, dtype=torch.float64)).shape == (0, C, 14, 14)
    after = bcn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" in k)


def test_moving_speed_schedule():
    assert [moving_speed(t, 0.01) for t in (0, 1, 3, 99, 100, 10_000)] == [1.0, 0.5, 0.25, 0.01, 0.01, 0.01]


@pytest.mark.parametrize("estimate", [False, True])
def test_one_image_is_not_changed_in_place(estimate):
    # at N = 1 a transposed "copy" of the input is the input itself: nothing may be written into it
    bcn = _bcn(estimate).train()
    set_moving_speed(bcn, 0.5)
    x = _x(1, C, 3, 2).requires_grad_()
    kept = x.detach().clone()
    bcn(x).square().sum().backward()
    assert torch.equal(x.detach(), kept) and torch.isfinite(x.grad).all()


def test_bn_step_with_one_value_per_channel_fails_with_a_clear_message():
    bcn = BatchChannelNorm(C, G, estimate=False, name="backbone.bottom_up.res5.0.conv1.norm").train()
    with pytest.raises(
        ConfigError, match=r"backbone\.bottom_up\.res5\.0\.conv1\.norm: .*one value per channel"
    ):
        bcn(torch.randn(1, C, 1, 1))
    bcn.eval()(torch.randn(1, C, 1, 1))  # eval uses running statistics: fine
    BatchChannelNorm(C, G, estimate=True).train()(torch.randn(1, C, 1, 1))  # EstBN: fine
    with pytest.raises(ConfigError, match="12 channels do not divide into 8"):
        BatchChannelNorm(12, 8, name="x")


def _norm_places(model, kind):
    return {name.rsplit(".norm", 1)[0] for name, m in model.named_modules() if isinstance(m, kind)}


def test_bcn_goes_where_gn_was(tiny_cfg):
    gn_model = build_model(tiny_cfg("MODEL.BACKBONE.FREEZE_AT", "2"))
    model = build_model(tiny_cfg(*BCN_OPTS, "MODEL.BACKBONE.FREEZE_AT", "2"))
    assert _norm_places(model, BatchChannelNorm) == _norm_places(gn_model, nn.GroupNorm)
    assert count_bcn(model) == count_ws_convs(model) == count_ws_convs(gn_model) == 36
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert all(m.formula == "sqrt_var_plus_eps" for m in model.modules() if isinstance(m, WSConv2d))
    for head in (model.roi_heads.box_head, model.roi_heads.mask_head, model.backbone.fpn_output2):
        assert any(isinstance(m, EstBN) for m in head.modules())
    # BN batch step instead of EstBN; and MODEL.BCN on a non-GN backbone is refused
    bn_model = build_model(tiny_cfg(*BCN_OPTS, "MODEL.BCN.ESTIMATE", "False"))
    assert not any(isinstance(m, EstBN) for m in bn_model.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in bn_model.modules()) == 36
    with pytest.raises(ConfigError, match="MODEL.RESNETS.NORM is 'FrozenBN'"):
        build_model(tiny_cfg(*BCN_OPTS, "MODEL.RESNETS.NORM", "FrozenBN"))


def test_frozen_stages_stop_the_estimates(tiny_cfg):
    model = build_model(tiny_cfg(*BCN_OPTS, "MODEL.BACKBONE.FREEZE_AT", "2")).train()
    bottom_up = model.backbone.bottom_up
    frozen = [bottom_up.stem.conv1.norm, bottom_up.res2[0].conv1.norm]
    trained = bottom_up.res3[0].conv1.norm
    for bcn in frozen:
        assert isinstance(bcn.batch_norm, FrozenBatchNorm2d)
        assert not any(p.requires_grad for p in bcn.parameters())
    assert isinstance(trained.batch_norm, EstBN) and all(p.requires_grad for p in trained.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    set_moving_speed(model, 1.0)
    with EventStorage(0):
        model(synthetic_batch(tiny_cfg(*BCN_OPTS), size=64, batch=2, seed=0))
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".res2." not in k and ".stem." not in k for k in moved)
    assert "backbone.bottom_up.res3.0.conv1.norm.batch_norm.running_mean" in moved


def _train_one_step(cfg):
    """One WSTrainer step; returns the trainer and the stem EstBN's inputs of each forward pass."""
    torch.manual_seed(0)
    trainer = WSTrainer(cfg)
    stem_norm = trainer.model.backbone.bottom_up.stem.conv1.norm.batch_norm
    seen = []
    stem_norm.register_forward_pre_hook(
        lambda m, args: seen.append((m.estbn_moving_speed.item(), args[0].detach().clone()))
    )
    trainer.train()
    return trainer, stem_norm, seen


def test_iter_size_counts_micro_batches(tmp_path, tiny_cfg, tiny_dataset, exact_step_opts):
    """r counts forward passes (micro-batches): one step of ITER_SIZE 2 sets r = 1 then 1/2, so the mean estimate
    is the average of the two micro-batches' means, which on equal-size images is the 4-image batch's mean that
    ITER_SIZE 1 estimates (before the optimizer step the stem's input depends on the images alone)."""
    data_opts, _ = tiny_dataset(tmp_path / "data", "bcn_iter_size", num_train=4, max_objects=1)
    opts = [*data_opts, *exact_step_opts, *BCN_OPTS]  # exact_step_opts: no evaluation
    _, big_norm, big_seen = _train_one_step(tiny_cfg(*opts, "OUTPUT_DIR", str(tmp_path / "big")))
    _, micro_norm, micro_seen = _train_one_step(
        tiny_cfg(*opts, "SOLVER.ITER_SIZE", "2", "OUTPUT_DIR", str(tmp_path / "micro"))
    )
    assert [r for r, _ in big_seen] == [1.0] and [r for r, _ in micro_seen] == [1.0, 0.5]
    assert [x.shape[0] for _, x in big_seen] == [4] and [x.shape[0] for _, x in micro_seen] == [2, 2]
    big_mean = big_seen[0][1].double().mean(dim=(0, 2, 3))
    torch.testing.assert_close(big_norm.running_mean.double(), big_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(micro_norm.running_mean.double(), big_mean, rtol=1e-5, atol=1e-5)
    assert big_mean.abs().max() > 1e-2  # a real estimate, not the zero init


def _gloo_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    est = EstBN(C).double().train()
    for t in range(3):
        set_moving_speed(est, 1.0 / (t + 1))
        # rank-dependent data of rank-dependent size: the estimates must still agree
        est(_x(rank + 1, C, 3, 3, seed=10 * t + rank) * (rank + 1))
    torch.save({"mean": est.running_mean, "var": est.running_var}, os.path.join(out_dir, f"{rank}.pth"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_end_with_identical_estimates(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    torch.multiprocessing.spawn(_gloo_worker, args=(2, init_file, str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"{rank}.pth") for rank in (0, 1))
    assert torch.equal(zero["mean"], one["mean"]) and torch.equal(zero["var"], one["var"])
    # and they are those of one process on the union of both processes' batches
    est = EstBN(C).double().train()
    for t in range(3):
        set_moving_speed(est, 1.0 / (t + 1))
        est(torch.cat([_x(rank + 1, C, 3, 3, seed=10 * t + rank) * (rank + 1) for rank in (0, 1)]))
    torch.testing.assert_close(zero["mean"], est.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zero["var"], est.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_quickstart_bcn_config_trains_evaluates_and_draws(tmp_path, repo_root, tiny_dataset):
    """A short real run of the quickstart-size BCN+WS config: the loss falls, the estimates moved (EstBN starts
    at mean 0, var 1), and the trained model evaluates and draws."""
    opts, flags = tiny_dataset(tmp_path / "data", "bcn_quick", num_train=8, num_val=2, max_objects=2)
    config = str(repo_root / "configs/quickstart/mask_rcnn_R_18_FPN_bcn_ws_synthetic.yaml")
    output = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    train = [sys.executable, str(repo_root / "tools/train_net.py"), "--config-file", config, *flags, *opts]
    train += ["SOLVER.MAX_ITER", "40", "SOLVER.WARMUP_ITERS", "10", "SOLVER.STEPS", "()"]
    train += ["SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(output)]
    done = subprocess.run(train, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert len(losses) >= 2 and losses[-1] < 0.9 * losses[0], losses
    assert "bbox" in json.loads((output / "eval_results.json").read_text())

    model = torch.load(output / "model_final.pth", weights_only=True)["model"]
    estimate = "backbone.bottom_up.res3.0.conv1.norm.batch_norm.running_{}"
    assert model[estimate.format("mean")].abs().max() > 1e-3
    assert (model[estimate.format("var")] - 1).abs().max() > 1e-3

    demo = [sys.executable, str(repo_root / "tools/demo.py"), "--config-file", config]
    demo += ["--input", str(tmp_path / "data" / "val"), "--output", str(tmp_path / "drawn")]
    demo += ["--opts", "MODEL.WEIGHTS", str(output / "model_final.pth")]
    done = subprocess.run(demo, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "drawn").iterdir())) == 2


@pytest.mark.parametrize("estimate", [False, True])
def test_autocast_runs_bcn_in_fp32(estimate):
    """Under bf16 autocast the batch step (EstBN's estimates too) and the group normalization run in fp32, as
    autocast runs BatchNorm and GroupNorm: bitwise the fp32 layer on the bf16 input, an fp32 output."""
    amp, fp32 = _bcn(estimate).float().train(), _bcn(estimate).float().train()
    set_moving_speed(amp, 0.5), set_moving_speed(fp32, 0.5)  # the estimates move
    x = _x(4, C, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = amp(x)
    assert out.dtype == torch.float32 and torch.equal(out, fp32(x.float()))
    assert not torch.equal(fp32.batch_norm.running_mean, _bcn(estimate).batch_norm.running_mean.float())
    for name, value in fp32.batch_norm.state_dict().items():
        assert torch.equal(amp.batch_norm.state_dict()[name], value), name


def test_bf16_training_step_of_the_bcn_ws_model(tmp_path, tiny_cfg, tiny_dataset, exact_step_opts):
    data_opts, _ = tiny_dataset(tmp_path / "data", "bcn_bf16", num_train=4, max_objects=1)
    amp = ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"]
    trainer, stem_norm, seen = _train_one_step(
        tiny_cfg(*data_opts, *exact_step_opts, *BCN_OPTS, *amp, "OUTPUT_DIR", str(tmp_path / "out"))
    )
    assert [x.dtype for _, x in seen] == [torch.float32]  # the stem's bf16 conv output, BCN's fp32 step
    assert stem_norm.running_mean.dtype == torch.float32 and torch.isfinite(stem_norm.running_mean).all()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
