"""MODEL.WS.MODE: the paper's WS ablations (MO, DO, AF, WN) as modes of WSConv2d, against their equations
(fold_ws of every mode: test_modeling.py)."""

import pytest
import torch

import ws_d2
from ws_d2.errors import ConfigError
from ws_d2.layers import WS_MODES, WSConv2d, standardize_weight

EPS = 1e-5


def weight64(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.1 + 0.03


def conv(mode, weight):
    c = WSConv2d(weight.shape[1], weight.shape[0], weight.shape[2], padding=1, bias=False, mode=mode).double()
    with torch.no_grad():
        c.weight.copy_(weight)
    return c


def equation(mode, weight, gain=None, bias=None):
    """Each mode written out from its equation, per filter (row), in float64."""
    flat = weight.reshape(weight.shape[0], -1)
    n = flat.shape[1]
    mean = flat.sum(dim=1, keepdim=True) / n
    if mode == "center":  # Eq. 5 alone
        out = flat - mean
    elif mode == "scale":  # Eq. 6 alone: root mean square, no centering
        out = flat / ((flat**2).sum(dim=1, keepdim=True) / n).sqrt().add(EPS)
    elif mode == "weight_norm":
        out = gain[:, None] * flat / ((flat**2).sum(dim=1, keepdim=True).sqrt() + EPS)
    else:
        std = ((flat - mean) ** 2).sum(dim=1, keepdim=True).div(n - 1).sqrt()
        out = (flat - mean) / (std + EPS)
        if mode == "standardize_affine":
            out = gain[:, None] * out + bias[:, None]
    return out.view_as(weight)


@pytest.mark.parametrize("mode", WS_MODES)
def test_each_mode_is_its_equation(mode):
    weight = weight64(6, 4, 3, 3)
    c = conv(mode, weight)
    gain = bias = None
    if mode in ("standardize_affine", "weight_norm"):
        with torch.no_grad():  # away from the initial 1 / 0, so a mode that ignored them would fail
            c.ws_gain.copy_(torch.linspace(0.5, 2.0, 6, dtype=torch.float64))
            gain = c.ws_gain.detach()
            if mode == "standardize_affine":
                c.ws_bias.copy_(torch.linspace(-0.3, 0.3, 6, dtype=torch.float64))
                bias = c.ws_bias.detach()
    expected = equation(mode, weight, gain, bias)
    for grad in (True, False):  # the training path and the inference path
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(c.standardized_weight(), expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        c(x), torch.nn.functional.conv2d(x, expected, padding=1), rtol=1e-12, atol=1e-12
    )


def test_modes_differ_from_each_other_and_default_is_published_ws():
    weight = weight64(6, 4, 3, 3)
    outputs = {mode: conv(mode, weight).standardized_weight().detach() for mode in WS_MODES}
    torch.testing.assert_close(outputs["standardize"], standardize_weight(weight, EPS), rtol=0, atol=0)
    # AF starts as plain WS (gain 1, bias 0); every other pair differs
    torch.testing.assert_close(outputs["standardize_affine"], outputs["standardize"], rtol=1e-12, atol=1e-12)
    distinct = ["standardize", "center", "scale", "weight_norm"]
    for i, a in enumerate(distinct):
        for b in distinct[i + 1 :]:
            assert (outputs[a] - outputs[b]).abs().max() > 1e-2, (a, b)


@pytest.mark.parametrize("mode", WS_MODES)
def test_gradcheck_through_the_conv(mode):
    c = conv(mode, weight64(4, 3, 3, 3))
    c.norm = torch.nn.GroupNorm(2, 4).double()  # as in the models: a norm after the conv
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    names = [name for name, p in c.named_parameters() if not name.startswith("norm.")]

    def run(*params):
        return torch.func.functional_call(c, dict(zip(names, params)), (x,))

    params = [c.get_parameter(name).detach().clone().requires_grad_() for name in names]
    assert torch.autograd.gradcheck(run, params)
    names = {name for name, _ in c.named_parameters()}
    extra = {"standardize_affine": {"ws_gain", "ws_bias"}, "weight_norm": {"ws_gain"}}.get(mode, set())
    assert names == {"weight", "norm.weight", "norm.bias"} | extra


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ConfigError, match="unknown WS mode 'mean'"):
        WSConv2d(3, 4, 3, mode="mean")


def test_config_key_puts_the_mode_on_every_ws_conv(tiny_config):
    from ws_d2.engine import WSTrainer

    cfg = ws_d2.load_config(tiny_config, ["MODEL.WS.MODE", "standardize_affine"])
    model = WSTrainer.build_model(cfg)
    ws_convs = [m for m in model.modules() if isinstance(m, WSConv2d)]
    assert ws_convs and all(m.mode == "standardize_affine" for m in ws_convs)
    # the per-filter gain and bias are trained: in the optimizer with the other parameters
    optimizer = WSTrainer.build_optimizer(cfg, model)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(m.ws_gain) in trained and id(m.ws_bias) in trained for m in ws_convs)
    default = WSTrainer.build_model(ws_d2.load_config(tiny_config))
    assert {m.mode for m in default.modules() if isinstance(m, WSConv2d)} == {"standardize"}
