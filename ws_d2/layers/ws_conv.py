"""Weight-standardized convolution with the numerics of the published GN+WS checkpoints.

Per output channel c of W (O x I/groups x kH x kW):  W_hat = (W - mean_c) / (std_c + eps), with the
UNBIASED std (N-1) and eps added to the std outside the square root. This is what the authors' code,
their maskrcnn-benchmark fork and mmcv's ConvWS compute; the paper's Eq. 2 (biased variance, eps inside
the root) and timm's StdConv2d differ by up to 1e-2 after GN on small-std weights, so they would not
reproduce the released checkpoints.

The authors' BCN+WS release computes WS differently, W_hat = (W - mean_c) / sqrt(var_c + eps) with the same
unbiased variance but eps INSIDE the root: `formula="sqrt_var_plus_eps"` reproduces it (docs/BCN.md).

The paper's ablations of WS are `mode`s of the same conv (docs/WS.md#the-papers-ws-variants); the default,
"standardize", is the published formula above.
"""

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch.autograd.function import once_differentiable

from ..errors import ConfigError

__all__ = ["WS_FORMULAS", "WS_MODES", "WSConv2d", "standardize_weight"]

# "std_plus_eps": (W - mean) / (std + eps), the GN+WS release (the default);
# "sqrt_var_plus_eps": (W - mean) / sqrt(var + eps), the BCN+WS release. Both with the unbiased (N-1) variance.
WS_FORMULAS = ("std_plus_eps", "sqrt_var_plus_eps")


# What the conv does to its weight before convolving (the paper's ablations, Sec. 5 and its Table 6):
# "standardize": W_hat by `formula` (the published WS, the default);
# "center": W - mean (Eq. 5 alone, "WS+MO");
# "scale": W / (sqrt(mean(W^2)) + eps) (Eq. 6 alone, no centering, "WS+DO");
# "standardize_affine": gain * W_hat + bias, one learnable gain and bias per filter ("WS+AF");
# "weight_norm": gain * W / ||W||, one learnable gain per filter (weight normalization, "WN").
WS_MODES = ("standardize", "center", "scale", "standardize_affine", "weight_norm")
_MODE_PARAMETERS = {"standardize_affine": ("ws_gain", "ws_bias"), "weight_norm": ("ws_gain",)}


def _check_mode(mode):
    if mode not in WS_MODES:
        raise ConfigError(f"unknown WS mode {mode!r}; expected one of {', '.join(WS_MODES)}")
    return mode


def _check_formula(formula):
    if formula not in WS_FORMULAS:
        raise ConfigError(f"unknown WS formula {formula!r}; expected one of {', '.join(WS_FORMULAS)}")
    return formula


def _standardize_rows(flat, eps, formula="std_plus_eps"):
    """(W_hat, mean, std, 1 / denominator) per row, in one allocating pass and two reductions. The denominator
    is std + eps, or sqrt(var + eps) for the "sqrt_var_plus_eps" formula (where `std` is then unused)."""
    n = flat.shape[1]
    mean = flat.mean(dim=1, keepdim=True)
    w_hat = flat - mean
    var = torch.linalg.vecdot(w_hat, w_hat, dim=1).div_(n - 1).unsqueeze(1)
    if formula == "sqrt_var_plus_eps":
        inv_denom = (var + eps).rsqrt_()
        return w_hat.mul_(inv_denom), mean, inv_denom, inv_denom
    std = var.sqrt_()
    inv_denom = (std + eps).reciprocal_()
    return w_hat.mul_(inv_denom), mean, std, inv_denom


def _apply_statistics(flat, mean, inv_denom):
    """W_hat from its row statistics: bitwise the W_hat that `_standardize_rows` returns."""
    return (flat - mean).mul_(inv_denom)


def _standardize_rows_backward(grad_w_hat, w_hat, std, inv_denom, formula="std_plus_eps"):
    # std + eps:       dL/dW = (g - mean(g)) / (std + eps) - W_hat * sum(g * W_hat) / ((N-1) std).
    # sqrt(var + eps): dL/dW = (g - mean(g)) / sqrt(var + eps) - W_hat * sum(g * W_hat) / ((N-1) sqrt(var + eps)).
    # A zero-variance filter has W_hat = 0, so the last term vanishes: keep its factor finite there.
    n = w_hat.shape[1]
    dot = torch.linalg.vecdot(grad_w_hat, w_hat, dim=1).unsqueeze(1)
    if formula == "sqrt_var_plus_eps":
        w_hat_coef = dot.mul_(inv_denom).div_(-(n - 1))
    else:
        w_hat_coef = torch.where(std > 0, dot / ((n - 1) * std), torch.zeros_like(dot)).neg_()
    grad = torch.addcmul(grad_w_hat.sum(dim=1, keepdim=True).mul_(inv_denom).div_(-n), grad_w_hat, inv_denom)
    return grad.addcmul_(w_hat, w_hat_coef)


class _StandardizeWeight(torch.autograd.Function):
    """WS with its analytic gradient (the paper's Eq. 8-9 with the N-1 std and eps on the std).

    Written for few passes over the weights (they dominate the cost on the CPU): forward is one
    allocating subtraction, two reductions and one in-place scale; backward is two reductions and two
    elementwise passes, far fewer than autograd of the plain formula (`torch.std_mean`'s Welford loop
    does not vectorize). The variance is taken from the centered values (two-pass), as accurate as
    `torch.std`. Measurements: docs/WS.md.
    """

    @staticmethod
    def forward(ctx, weight, eps, formula):
        w_hat, _, std, inv_denom = _standardize_rows(weight.reshape(weight.shape[0], -1), eps, formula)
        ctx.save_for_backward(w_hat, std, inv_denom)
        ctx.formula = formula
        return w_hat.view_as(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        w_hat, std, inv_denom = ctx.saved_tensors
        grad = _standardize_rows_backward(
            grad_output.reshape(w_hat.shape), w_hat, std, inv_denom, ctx.formula
        )
        return grad.view_as(grad_output), None, None


class _WSConvolution(torch.autograd.Function):
    """conv2d(x, WS(W)) that keeps the raw W (not W_hat) for backward and recomputes W_hat there.

    Composing WS and conv2d makes autograd keep W_hat alive from forward to backward: one extra copy
    of every trainable conv weight. Recomputing W_hat in backward costs one elementwise pass instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, formula, stride, padding, dilation, groups):
        flat = weight.reshape(weight.shape[0], -1)
        w_hat, mean, std, inv_denom = _standardize_rows(flat, eps, formula)
        ctx.save_for_backward(x, weight, mean, std, inv_denom)
        ctx.formula = formula
        ctx.conv_args = (None if bias is None else list(bias.shape), stride, padding, dilation, groups)
        return F.conv2d(x, w_hat.view_as(weight), bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight, mean, std, inv_denom = ctx.saved_tensors
        bias_sizes, stride, padding, dilation, groups = ctx.conv_args
        w_hat = _apply_statistics(weight.reshape(weight.shape[0], -1), mean, inv_denom)
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_x, grad_w_hat, grad_bias = torch.ops.aten.convolution_backward(
            grad_output,
            x,
            w_hat.view_as(weight),
            bias_sizes,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [needs_x, needs_weight, needs_bias and bias_sizes is not None],
        )
        grad_weight = None
        if needs_weight:
            grad_weight = _standardize_rows_backward(
                grad_w_hat.reshape(w_hat.shape), w_hat, std, inv_denom, ctx.formula
            )
            grad_weight = grad_weight.view_as(weight)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def _compute_dtype(weight):
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def standardize_weight(
    weight: torch.Tensor, eps: float = 1e-5, formula: str = "std_plus_eps"
) -> torch.Tensor:
    """Standardize a conv weight per output channel: (W - mean) / (unbiased std + eps), or with
    `formula="sqrt_var_plus_eps"` (W - mean) / sqrt(unbiased var + eps).

    Statistics are computed in float32 (or float64 for float64 weights) even under autocast, and the
    result has the weight's dtype.
    """
    _check_standardizable(
        weight.shape[1:].numel() if weight.dim() > 1 else 0, weight.dtype, tuple(weight.shape)
    )
    with torch.autocast(device_type=weight.device.type, enabled=False):
        w_hat = _StandardizeWeight.apply(weight.to(_compute_dtype(weight)), eps, _check_formula(formula))
    return w_hat.to(weight.dtype)


def _weight_variant(weight, mode, eps, formula, gain=None, bias=None):
    """The weight of a non-default `mode`, by autograd of its plain formula (ablations: clarity over speed)."""
    with torch.autocast(device_type=weight.device.type, enabled=False):
        flat = weight.reshape(weight.shape[0], -1).to(_compute_dtype(weight))
        if mode == "center":
            out = flat - flat.mean(dim=1, keepdim=True)
        elif mode == "scale":
            out = flat / (flat.square().mean(dim=1, keepdim=True).sqrt() + eps)
        elif mode == "weight_norm":
            out = (
                flat
                / (torch.linalg.vector_norm(flat, dim=1, keepdim=True) + eps)
                * gain.to(flat.dtype)[:, None]
            )
        else:  # standardize_affine
            w_hat = _StandardizeWeight.apply(flat, eps, formula)
            out = torch.addcmul(bias.to(flat.dtype)[:, None], w_hat, gain.to(flat.dtype)[:, None])
    return out.view_as(weight).to(weight.dtype)


def _check_standardizable(filter_size, dtype, shape):
    # each output channel's filter needs >= 2 elements: the unbiased std of one value divides by N-1 = 0
    if filter_size < 2:
        raise ConfigError(
            f"cannot weight-standardize a weight of shape {shape}: each output channel's filter needs at least "
            "2 elements (a conv weight O x I/groups x kH x kW; 1 input channel with a 1x1 kernel has 1)"
        )
    if not dtype.is_floating_point:
        raise ConfigError(f"cannot weight-standardize a weight of dtype {dtype}: it must be floating point")


def conv2d_arguments(conv: Conv2d) -> dict:
    """The constructor arguments that rebuild `conv` (detectron2 Conv2d or WSConv2d) with its norm and
    activation, for swapping its class while sharing its parameters."""
    names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    arguments = {name: getattr(conv, name) for name in (*names, "padding_mode", "norm", "activation")}
    return {**arguments, "bias": conv.bias is not None}


class WSConv2d(Conv2d):
    """detectron2's Conv2d (conv + optional norm + activation) with a weight-standardized weight.

    Same constructor (plus `eps`, `formula`, one of WS_FORMULAS, and `mode`, one of WS_MODES), same
    parameters and state_dict keys as Conv2d in the default mode: checkpoints store the raw weight and WS is
    applied on every forward. The "standardize_affine" and "weight_norm" modes add `ws_gain` (and `ws_bias`).
    In training, WS runs inside the conv's autograd node so that only the raw weight is kept for backward (no
    extra weight-sized memory).

    When no gradient is needed for the weight (eval under no_grad, or a frozen stage), the per-filter
    statistics (mean and 1 / (std + eps): the two reductions, most of the cost of WS) are computed once
    and reused until the weight changes: in place (optimizer step, load_state_dict, `copy_` under
    no_grad), by `.to()`/`.cuda()`/`.half()`, or by assigning a new Parameter or `.data`. Each forward
    then applies them in one subtraction and one in-place scale into a temporary that is freed after
    the conv: bitwise the training forward's W_hat. Caching W_hat itself would keep a second copy of
    every conv weight alive for a small saving (docs/WS.md).

    Writes through `.data` (`conv.weight.data.copy_(w)`) bypass PyTorch's version counter and cannot
    be seen: write under `torch.no_grad()` instead, or call `clear_ws_cache()` afterwards.
    """

    def __init__(
        self,
        *args,
        eps: float = 1e-5,
        formula: str = "std_plus_eps",
        mode: str = "standardize",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        _check_standardizable(self.weight.shape[1:].numel(), self.weight.dtype, tuple(self.weight.shape))
        self.eps = eps
        self.formula = _check_formula(formula)
        self.mode = _check_mode(mode)
        self._ws_statistics = None
        self._init_mode_parameters(self.weight.device, self.weight.dtype)

    def _init_mode_parameters(self, device, dtype):
        # gain 1, bias 0: "standardize_affine" starts as plain WS
        for name in _MODE_PARAMETERS.get(self.mode, ()):
            init = torch.ones if name == "ws_gain" else torch.zeros
            setattr(self, name, torch.nn.Parameter(init(self.out_channels, device=device, dtype=dtype)))

    @classmethod
    def from_conv2d(
        cls, conv: Conv2d, eps: float = 1e-5, formula: str = "std_plus_eps", mode: str = "standardize"
    ) -> "WSConv2d":
        """A WSConv2d sharing `conv`'s parameters, norm and activation (plus its own gain/bias in the
        modes that have them)."""
        # conv's parameters replace these just below: allocate nothing for them
        ws = cls(**conv2d_arguments(conv), eps=eps, formula=formula, mode=mode, device="meta")
        ws.weight = conv.weight
        ws.bias = conv.bias
        ws._init_mode_parameters(conv.weight.device, conv.weight.dtype)
        ws.train(conv.training)
        return ws

    def extra_repr(self):
        formula = "" if self.formula == "std_plus_eps" else f", ws_formula={self.formula}"
        mode = "" if self.mode == "standardize" else f", ws_mode={self.mode}"
        return super().extra_repr() + f", ws_eps={self.eps}" + formula + mode

    def standardized_weight(self) -> torch.Tensor:
        """The weight the conv convolves with: W_hat of the current weight (or its `mode`'s variant),
        differentiable when a parameter needs a gradient, else (W_hat) built from the cached statistics."""
        weight = self.weight
        if self.mode != "standardize":
            extra = [getattr(self, name) for name in _MODE_PARAMETERS.get(self.mode, ())]
            return _weight_variant(weight, self.mode, self.eps, self.formula, *extra)
        if torch.is_grad_enabled() and weight.requires_grad:
            return standardize_weight(weight, self.eps, self.formula)
        mean, inv_denom = self.ws_statistics()
        with torch.autocast(device_type=weight.device.type, enabled=False):
            flat = weight.detach().reshape(weight.shape[0], -1).to(mean.dtype)
            w_hat = _apply_statistics(flat, mean, inv_denom)
        return w_hat.view_as(weight).to(weight.dtype)

    def ws_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / denominator) per output channel, as (out_channels, 1) float32/float64 columns,
        recomputed only when the weight has changed since the last call."""
        weight = self.weight
        # Any change of the weight's values changes its address, its in-place version counter or its
        # dtype. The cache holds the weight's storage, so its address cannot be reused meanwhile.
        key = (
            weight.data_ptr(),
            weight._version,
            weight.dtype,
            weight.device,
            weight.shape,
            self.eps,
            self.formula,
        )
        cache = self._ws_statistics
        if cache is None or cache[0] != key:
            # Outside inference mode: statistics cached under torch.inference_mode() must stay usable
            # by a later training forward of a frozen stage, which saves W_hat for backward.
            with torch.inference_mode(False), torch.no_grad():
                with torch.autocast(device_type=weight.device.type, enabled=False):
                    flat = weight.reshape(weight.shape[0], -1).to(_compute_dtype(weight))
                    _, mean, _, inv_denom = _standardize_rows(flat, self.eps, self.formula)
            self._ws_statistics = cache = (key, weight.untyped_storage(), mean, inv_denom)
        return cache[2], cache[3]

    def clear_ws_cache(self):
        self._ws_statistics = None

    # The key already tells a moved or reloaded weight apart; clearing here also lets go of the old
    # weight's storage (held by the cache) right away, e.g. the CPU copy after `.cuda()`.
    def _apply(self, fn, *args, **kwargs):
        self._ws_statistics = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._ws_statistics = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x):
        # detectron2's Conv2d check, kept: SyncBatchNorm fails on an empty batch with an obscure error
        if x.numel() == 0 and self.training:
            assert not isinstance(self.norm, torch.nn.SyncBatchNorm), (
                "SyncBatchNorm does not support empty inputs!"
            )
        weight = self.weight
        if (
            self.mode == "standardize"
            and torch.is_grad_enabled()
            and weight.requires_grad
            and weight.dtype in (torch.float32, torch.float64)
            and not isinstance(self.padding, str)
            and not torch.is_autocast_enabled(x.device.type)
        ):
            # Training: the memory-lean fused path. Under autocast (or for half weights) the composite
            # path below keeps the statistics in fp32 and lets autocast cast W_hat for the conv.
            x = _WSConvolution.apply(
                x,
                weight,
                self.bias,
                self.eps,
                self.formula,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
            )
        else:
            x = F.conv2d(
                x,
                self.standardized_weight(),
                self.bias,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
            )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x
