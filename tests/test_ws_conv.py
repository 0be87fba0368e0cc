"""The WS math of ws_d2.layers: both formulas, gradient, groups, zero variance, eval cache, autocast."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ws_d2.errors import ConfigError
from ws_d2.layers import WS_FORMULAS, WSConv2d, standardize_weight

EPS = 1e-5
# the published GN+WS form: unbiased std + eps; the BCN+WS release's: sqrt(unbiased var + eps)
EPS_INSIDE_SQRT = {"std_plus_eps": False, "sqrt_var_plus_eps": True}


def reference_ws(weight, eps=EPS, unbiased=True, eps_inside_sqrt=False):
    """The plain formula, in float64 autograd ops. Defaults: the published form."""
    flat = weight.double().reshape(weight.shape[0], -1)
    centered = flat - flat.mean(dim=1, keepdim=True)
    var = centered.pow(2).sum(dim=1, keepdim=True) / (flat.shape[1] - (1 if unbiased else 0))
    denom = (var + eps).sqrt() if eps_inside_sqrt else var.sqrt() + eps
    return (centered / denom).view_as(weight)


def small_std_weight(*shape, std=1e-3, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=dtype) * std + 0.01).to(dtype)


@pytest.mark.parametrize("formula", WS_FORMULAS)
def test_formula(formula):
    weight = small_std_weight(8, 4, 3, 3)  # std 1e-3: where eps is placed shows
    ours = standardize_weight(weight, EPS, formula)
    expected = reference_ws(weight, eps_inside_sqrt=EPS_INSIDE_SQRT[formula])
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    # float32 weights: same formula, float32 accuracy.
    torch.testing.assert_close(
        standardize_weight(weight.float(), EPS, formula), expected.float(), rtol=1e-4, atol=1e-4
    )
    # Per channel: zero mean.
    torch.testing.assert_close(ours.reshape(8, -1).mean(dim=1), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)  # fmt: skip
    # far from the biased form (paper Eq. 2 / timm) and from the other eps placement
    for unbiased, eps_inside_sqrt in [
        (False, EPS_INSIDE_SQRT[formula]),
        (True, not EPS_INSIDE_SQRT[formula]),
    ]:
        assert (
            ours - reference_ws(weight, unbiased=unbiased, eps_inside_sqrt=eps_inside_sqrt)
        ).abs().max() > 1e-3


@pytest.mark.parametrize("formula", WS_FORMULAS)
def test_gradcheck_float64(formula):
    weight = small_std_weight(6, 3, 3, 3, std=0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: standardize_weight(w, EPS, formula), (weight,))


@pytest.mark.parametrize("formula", WS_FORMULAS)
def test_gradient_matches_autograd_of_plain_formula(formula):
    weight = small_std_weight(16, 8, 3, 3, std=0.05).requires_grad_()
    grad_out = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    (ours,) = torch.autograd.grad(standardize_weight(weight, EPS, formula), weight, grad_out)
    expected = reference_ws(weight, eps_inside_sqrt=EPS_INSIDE_SQRT[formula])
    (expected,) = torch.autograd.grad(expected, weight, grad_out)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("formula", WS_FORMULAS)
def test_training_conv_gradcheck_float64(formula):
    """The fused training path (WS inside the conv's autograd): input, weight and bias gradients."""
    torch.manual_seed(0)
    conv = WSConv2d(
        4, 6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2, bias=True, formula=formula
    )
    conv = conv.double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)

    def run(x, weight, bias):
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (x,))

    weight = conv.weight.detach().clone().requires_grad_()
    bias = conv.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (x, weight, bias))


def test_training_keeps_no_standardized_copy_for_backward():
    """Only the raw weight is kept from forward to backward: WS adds no weight-sized saved tensor."""
    conv = WSConv2d(16, 32, kernel_size=3, padding=1, bias=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv(torch.randn(1, 16, 4, 4)).sum()
    weight_sized = [t for t in saved if t.shape == conv.weight.shape]
    assert weight_sized and all(t.data_ptr() == conv.weight.data_ptr() for t in weight_sized)


@pytest.mark.parametrize("formula", WS_FORMULAS)
def test_grouped_conv_resnext(formula):
    """The training conv's output and weight gradient against the plain formula's autograd."""
    torch.manual_seed(0)
    conv = WSConv2d(128, 128, kernel_size=3, padding=1, groups=32, bias=False, formula=formula).double()
    assert conv.weight.shape == (128, 4, 3, 3)
    x = torch.randn(2, 128, 6, 6, dtype=torch.float64)
    out = conv(x)
    weight = conv.weight.detach().clone().requires_grad_()
    expected = reference_ws(weight, eps_inside_sqrt=EPS_INSIDE_SQRT[formula])
    expected = F.conv2d(x, expected, padding=1, groups=32)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    grad_out = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, conv.weight, grad_out)
    (ref,) = torch.autograd.grad(expected, weight, grad_out)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_zero_variance_filter_gives_finite_output_and_gradients():
    torch.manual_seed(0)
    conv = WSConv2d(4, 6, kernel_size=3, padding=1, norm=torch.nn.GroupNorm(2, 6))
    with torch.no_grad():
        conv.weight[2].fill_(0.25)  # a constant filter: std exactly 0
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = conv(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(x.grad).all()
    assert torch.count_nonzero(standardize_weight(conv.weight.detach(), EPS)[2]) == 0
    # The other filters' gradients are the plain formula's (autograd of it is NaN on filter 2).
    weight = conv.weight.detach().clone().requires_grad_()
    expected = F.group_norm(F.conv2d(x.detach(), reference_ws(weight).float(), conv.bias, padding=1), 2)
    expected.square().sum().backward()
    keep = torch.arange(6) != 2
    torch.testing.assert_close(conv.weight.grad[keep], weight.grad[keep], rtol=1e-3, atol=1e-4)


# --- eval cache: the statistics, not W_hat ------------------------------------------------------------


def make_conv():
    torch.manual_seed(0)
    return WSConv2d(8, 16, kernel_size=3, padding=1, bias=True)


def cached(conv):
    """The cached statistics after an eval forward."""
    conv.eval()
    with torch.no_grad():
        conv(torch.randn(1, conv.in_channels, 5, 5, dtype=conv.weight.dtype))
    return conv.ws_statistics()


def assert_fresh(conv, old):
    """The statistics were recomputed, and the eval W_hat is the formula's for the current weight."""
    new = cached(conv)
    assert new[0] is not old[0] and new[1] is not old[1]
    with torch.no_grad():
        w_hat = conv.standardized_weight()
    torch.testing.assert_close(w_hat, reference_ws(conv.weight.detach()).to(conv.weight.dtype))
    return new


@pytest.fixture
def statistics_runs(monkeypatch):
    """How many times the WS reductions (mean and std of every filter) have run."""
    from ws_d2.layers import ws_conv

    runs = []
    original = ws_conv._standardize_rows
    monkeypatch.setattr(ws_conv, "_standardize_rows", lambda *args: runs.append(1) or original(*args))
    return runs


def test_statistics_computed_once_and_reused_in_eval_and_for_frozen_weights(statistics_runs):
    conv = make_conv()
    x = torch.randn(1, 8, 5, 5)
    conv.eval()
    with torch.no_grad():
        first, second = conv(x), conv(x)
        w_hat = conv.standardized_weight()
    assert len(statistics_runs) == 1
    assert torch.equal(first, second)
    # Bitwise the W_hat of the training path.
    assert torch.equal(w_hat, standardize_weight(conv.weight, EPS).detach())
    torch.testing.assert_close(first, F.conv2d(x, w_hat, conv.bias, padding=1), rtol=0, atol=0)
    # A frozen stage in training: grad mode on, but the weight needs no gradient.
    conv.train()
    conv.weight.requires_grad_(False)
    runs = len(statistics_runs)
    conv(x)
    conv(x)
    assert len(statistics_runs) == runs
    # A trainable weight in grad mode is standardized on every call (it gets a gradient).
    conv.weight.requires_grad_(True)
    conv(x)
    conv(x)
    assert len(statistics_runs) == runs + 2


def test_standardized_once_shares_w_hat_across_calls_and_lets_go_after(statistics_runs):
    """A head shared by the FPN levels (RetinaNet's) standardizes once per pass, with the per-call outputs and
    gradient, and the next pass sees the updated weight."""
    from ws_d2.layers.ws_conv import standardized_once

    conv = make_conv().double()
    levels = [torch.randn(1, 8, size, size, dtype=torch.float64) for size in (9, 5, 3)]
    per_call = sum(conv(x).square().sum() for x in levels)
    (expected,) = torch.autograd.grad(per_call, conv.weight)
    runs = len(statistics_runs)
    with standardized_once(conv):
        shared = sum(conv(x).square().sum() for x in levels)
    assert len(statistics_runs) == runs + 1
    torch.testing.assert_close(shared, per_call, rtol=1e-12, atol=0)
    (gradient,) = torch.autograd.grad(shared, conv.weight)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        conv.weight.mul_(2).add_(1)
    x = levels[0]
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, reference_ws(conv.weight), conv.bias, padding=1))


def test_eval_keeps_no_weight_sized_tensor():
    """Only O(out_channels) numbers are cached: no second copy of the weight stays alive."""
    conv = WSConv2d(64, 128, kernel_size=3, padding=1, bias=False)
    cached(conv)
    held = []
    for value in vars(conv).values():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, torch.Tensor) and not isinstance(item, torch.nn.Parameter):
                held.append(item)
    assert held, "the statistics are cached on the module"
    assert sum(t.numel() for t in held) == 2 * 128


def test_cache_invalidated_by_optimizer_step():
    conv = make_conv()
    old = cached(conv)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    conv.train()
    conv(torch.randn(2, 8, 5, 5)).sum().backward()
    optimizer.step()
    assert_fresh(conv, old)


def test_cache_invalidated_by_inplace_copy():
    conv = make_conv()
    old = cached(conv)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
    assert_fresh(conv, old)


def test_cache_invalidated_by_load_state_dict():
    conv = make_conv()
    other = make_conv()
    with torch.no_grad():
        other.weight.mul_(3).add_(1)
    old = cached(conv)
    conv.load_state_dict(other.state_dict())
    assert_fresh(conv, old)


def test_cache_invalidated_by_dtype_and_device_moves():
    conv = make_conv()
    old = cached(conv)
    conv.double()
    new = assert_fresh(conv, old)
    assert new[0].dtype == new[1].dtype == torch.float64
    conv.float()
    newer = assert_fresh(conv, new)
    assert newer[0].dtype == newer[1].dtype == torch.float32
    # .to(device) and .cuda() go through Module._apply; so does any parameter conversion.
    conv._apply(lambda t: t.clone())
    assert_fresh(conv, newer)


def test_cache_invalidated_by_new_parameter_or_data():
    conv = make_conv()
    old = cached(conv)
    conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))
    new = assert_fresh(conv, old)
    conv.weight.data = torch.randn_like(conv.weight)
    assert_fresh(conv, new)


def test_cache_invalidated_by_formula_change():
    conv = make_conv().double()
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    for formula in ("std_plus_eps", "sqrt_var_plus_eps", "std_plus_eps"):
        conv.formula = formula
        expected = reference_ws(conv.weight.detach(), eps_inside_sqrt=EPS_INSIDE_SQRT[formula])
        with torch.no_grad():
            conv.eval()(x)  # fills the cache
            torch.testing.assert_close(conv(x), F.conv2d(x, expected, conv.bias, padding=1), rtol=1e-10, atol=1e-10)  # fmt: skip


def test_cache_survives_deepcopy_correctly():
    conv = make_conv()
    old = cached(conv)
    clone = copy.deepcopy(conv)
    with torch.no_grad():
        clone.weight.mul_(2.0).add_(1.0)
    assert_fresh(clone, old)
    assert conv.ws_statistics()[0] is old[0]


def test_cache_filled_in_inference_mode_serves_a_frozen_training_forward():
    conv = make_conv()
    conv.eval()
    with torch.inference_mode():
        conv(torch.randn(1, 8, 5, 5))
    conv.train()
    conv.weight.requires_grad_(False)
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    conv(x).sum().backward()  # saves the cached weight for backward: must not be an inference tensor
    assert torch.isfinite(x.grad).all()


# --- autocast ----------------------------------------------------------------------------------------


def large_mean_weight():
    """Mean 100, std 0.01: bfloat16 (8 bits of mantissa, spacing 0.5 at 100) cannot hold the spread."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, 3, 3, generator=generator) * 0.01 + 100.0


def test_autocast_bf16_standardizes_in_fp32_before_the_cast():
    conv = WSConv2d(4, 8, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(large_mean_weight())
    x = torch.randn(2, 4, 6, 6)
    expected = F.conv2d(x.double(), reference_ws(conv.weight.detach()), padding=1)
    scale = expected.abs().max()
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16
        assert (out.double() - expected).abs().max() < 0.03 * scale
    # What the test guards against: standardizing the bfloat16-cast weight is far off.
    wrong = F.conv2d(x.double(), reference_ws(conv.weight.detach().bfloat16()).nan_to_num(), padding=1)
    assert (wrong - expected).abs().max() > 0.3 * scale


def test_autocast_bf16_backward_is_finite_and_close():
    conv = WSConv2d(4, 8, kernel_size=3, padding=1, bias=False)
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x).float().sum().backward()
    grad_bf16 = conv.weight.grad.clone()
    conv.weight.grad = None
    conv(x).sum().backward()
    assert torch.isfinite(grad_bf16).all()
    torch.testing.assert_close(
        grad_bf16, conv.weight.grad, rtol=0.05, atol=0.05 * conv.weight.grad.abs().max()
    )


def test_bf16_weights_get_fp32_statistics():
    weight = large_mean_weight().bfloat16()
    out = standardize_weight(weight, EPS)
    assert out.dtype == torch.bfloat16
    expected = reference_ws(weight)
    torch.testing.assert_close(out.double(), expected, rtol=0.02, atol=0.02)


def test_empty_input_as_detectron2_conv2d():
    # detectron2's Conv2d accepts an empty batch, but refuses it in training when its norm is SyncBatchNorm
    conv = WSConv2d(4, 8, 3, padding=1, norm=torch.nn.GroupNorm(2, 8))
    assert conv(torch.zeros(0, 4, 5, 5)).shape == (0, 8, 5, 5)
    sync = WSConv2d(4, 8, 3, padding=1, norm=torch.nn.SyncBatchNorm(8))
    with pytest.raises(AssertionError, match="SyncBatchNorm does not support empty inputs"):
        sync(torch.zeros(0, 4, 5, 5))


@pytest.mark.parametrize(
    "make",
    [
        lambda: WSConv2d(1, 4, kernel_size=1),  # 1 element per filter: the unbiased std divides by 0
        lambda: standardize_weight(torch.randn(5)),
        lambda: standardize_weight(torch.ones(4, 3, 3, 3, dtype=torch.int64)),
    ],
    ids=["one-element filters", "1-D weight", "integer weight"],
)
def test_weight_that_cannot_be_standardized(make):
    with pytest.raises(ConfigError, match="cannot weight-standardize a weight of (shape|dtype)"):
        make()


def test_standardizable_edges_still_work():
    # the smallest valid filter (2 elements) and a 2-D weight stay accepted and follow the formula
    conv = WSConv2d(2, 4, kernel_size=1).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    expected = F.conv2d(x, reference_ws(conv.weight.detach()), conv.bias)
    torch.testing.assert_close(conv(x), expected, rtol=1e-9, atol=1e-9)
    weight = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(standardize_weight(weight), reference_ws(weight), rtol=1e-10, atol=1e-10)


def fused_and_composite_under_autocast(device, dtype, bias=True):
    """The fused conv under autocast, and the composite (autograd of standardize_weight, then autocast's conv),
    on the same input: (outputs, gradients of x, W and bias, the fused forward's saved tensors, its grad_fn)."""
    torch.manual_seed(0)
    conv = WSConv2d(16, 32, kernel_size=3, padding=1, bias=bias).to(device)
    x = torch.randn(2, 16, 6, 6, device=device)  # 1152 values: not weight-sized (4608)
    leaves = [x.clone().requires_grad_(), conv.weight, conv.bias]
    copies = [t.detach().clone().requires_grad_() for t in leaves if t is not None]
    saved = []
    with torch.autocast(device, dtype=dtype):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fused = conv(leaves[0])
        composite = F.conv2d(copies[0], standardize_weight(copies[1], EPS), *copies[2:], padding=1)
    grad = torch.randn_like(fused)
    fused.backward(grad)
    composite.backward(grad)
    grads = [(a.grad, b.grad) for a, b in zip([t for t in leaves if t is not None], copies)]
    return (fused, composite), grads, saved, conv.weight, type(fused.grad_fn).__name__


@pytest.mark.parametrize("bias", [False, True])
def test_autocast_takes_the_fused_path_and_keeps_only_the_raw_weight(bias):
    outputs, grads, saved, weight, grad_fn = fused_and_composite_under_autocast("cpu", torch.bfloat16, bias)
    assert grad_fn == "_WSConvolutionBackward" and outputs[0].dtype == torch.bfloat16
    # the one weight-sized tensor kept for backward is the fp32 parameter itself: no W_hat, fp32 or bf16
    weight_sized = [t for t in saved if t.numel() == weight.numel()]
    assert len(weight_sized) == 1 and weight_sized[0].data_ptr() == weight.data_ptr()
    assert [t.dtype for t in saved if t.dim() == 4 and t.shape[0] == 2] == [torch.bfloat16]  # x, cast once
    # the same kernels on the same bf16 operands, the same fp32 statistics: bitwise the composite's
    assert torch.equal(*outputs)
    for fused_grad, composite_grad in grads:
        assert fused_grad.dtype == torch.float32 and torch.equal(fused_grad, composite_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (make cuda-check)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_fused_path_matches_the_composite(dtype):
    outputs, grads, saved, weight, grad_fn = fused_and_composite_under_autocast("cuda", dtype)
    assert grad_fn == "_WSConvolutionBackward" and outputs[0].dtype == dtype
    assert [t.data_ptr() for t in saved if t.numel() == weight.numel()] == [weight.data_ptr()]
    # cuDNN may pick another algorithm per call: equal up to the half type's rounding
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(*outputs, rtol=tolerance, atol=tolerance)
    for fused_grad, composite_grad in grads:
        scale = composite_grad.abs().max()
        torch.testing.assert_close(fused_grad, composite_grad, rtol=tolerance, atol=tolerance * scale)


def test_near_zero_variance_filters_stay_finite_under_bf16():
    torch.manual_seed(0)
    conv = WSConv2d(4, 6, kernel_size=3, padding=1, norm=torch.nn.GroupNorm(2, 6))
    with torch.no_grad():
        conv.weight[2].fill_(0.25)  # std exactly 0
        conv.weight[3] = 0.3 + 1e-7 * torch.randn(4, 3, 3)  # std 1e-7, far below eps; bf16 cannot hold it
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        out.float().square().sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(conv.weight.grad).all()
