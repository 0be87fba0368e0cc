"""Weight-standardized convolution with the numerics of the published checkpoints (docs/WS.md): per filter,
(W - mean) / (std + eps) with the unbiased std, or the BCN+WS release's (W - mean) / sqrt(var + eps)."""

import contextlib

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch.autograd.function import once_differentiable

from ..errors import ConfigError

WS_FORMULAS = ("std_plus_eps", "sqrt_var_plus_eps")  # the GN+WS release's, the BCN+WS release's
# the paper's Table 6 ablations (docs/WS.md#the-papers-ws-variants); the last two learn a gain (and bias)
WS_MODES = ("standardize", "center", "scale", "standardize_affine", "weight_norm")
_MODE_PARAMETERS = {"standardize_affine": ("ws_gain", "ws_bias"), "weight_norm": ("ws_gain",)}


def _checked(value, choices, what):
    if value not in choices:
        raise ConfigError(f"unknown WS {what} {value!r}; expected one of {', '.join(choices)}")
    return value


def _standardize_rows(flat, eps, formula="std_plus_eps"):
    """(W_hat, mean, std, 1 / denominator) per row; a two-pass variance, as accurate as torch.std's."""
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
    """WS with its analytic gradient (the paper's Eq. 8-9): far fewer passes over the weights than autograd."""

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
        grad_w_hat = grad_output.reshape(w_hat.shape)
        grad = _standardize_rows_backward(grad_w_hat, w_hat, std, inv_denom, ctx.formula)
        return grad.view_as(grad_output), None, None


class _WSConvolution(torch.autograd.Function):
    """conv2d(x, WS(W)) that recomputes W_hat in backward rather than keep a copy of every conv weight alive;
    the conv runs in x's dtype (autocast's, cast by the caller), the statistics in W's."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, formula, stride, padding, dilation, groups):
        # autocast off: it would run the variance's vecdot in half precision
        with torch.autocast(weight.device.type, enabled=False):
            flat = weight.reshape(weight.shape[0], -1)
            w_hat, mean, std, inv_denom = _standardize_rows(flat, eps, formula)
            w_hat = w_hat.to(x.dtype)  # cast once; the fp32 W_hat is freed before the conv
            ctx.save_for_backward(x, weight, mean, std, inv_denom)
            ctx.formula = formula
            bias_sizes = None if bias is None else list(bias.shape)
            # convolution_backward's arguments after the weight, in order
            ctx.conv_args = (bias_sizes, stride, padding, dilation, False, [0, 0], groups)
            return F.conv2d(x, w_hat.view_as(weight), bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight, mean, std, inv_denom = ctx.saved_tensors
        flat = weight.reshape(weight.shape[0], -1)
        with torch.autocast(weight.device.type, enabled=False):
            w_hat = _apply_statistics(flat, mean, inv_denom).to(x.dtype)
            needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
            mask = [needs_x, needs_weight, needs_bias and ctx.conv_args[0] is not None]
            grad_x, grad_w_hat, grad_bias = torch.ops.aten.convolution_backward(
                grad_output, x, w_hat.view_as(weight), *ctx.conv_args, mask
            )
            grad_weight = None
            if needs_weight:
                if x.dtype != weight.dtype:  # the fp32 W_hat again: never both copies alive through the conv
                    w_hat, grad_w_hat = _apply_statistics(flat, mean, inv_denom), grad_w_hat.to(weight.dtype)
                grad_w_hat = grad_w_hat.reshape(w_hat.shape)
                grad_weight = _standardize_rows_backward(grad_w_hat, w_hat, std, inv_denom, ctx.formula)
                grad_weight = grad_weight.view_as(weight)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def _compute_dtype(weight):
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def standardize_weight(
    weight: torch.Tensor, eps: float = 1e-5, formula: str = "std_plus_eps"
) -> torch.Tensor:
    """W_hat per output channel by `formula`; statistics in float32 (float64 for float64 weights) even under
    autocast, the result in the weight's dtype."""
    _check_standardizable(weight)
    formula = _checked(formula, WS_FORMULAS, "formula")
    with torch.autocast(device_type=weight.device.type, enabled=False):
        return _StandardizeWeight.apply(weight.to(_compute_dtype(weight)), eps, formula).to(weight.dtype)


def _weight_variant(weight, mode, eps, formula, gain=None, bias=None):
    """The weight of a non-default `mode`, by autograd of its plain formula (ablations: clarity over speed)."""
    with torch.autocast(device_type=weight.device.type, enabled=False):
        flat = weight.reshape(weight.shape[0], -1).to(_compute_dtype(weight))
        if mode == "center":
            out = flat - flat.mean(dim=1, keepdim=True)
        elif mode == "scale":
            out = flat / (flat.square().mean(dim=1, keepdim=True).sqrt() + eps)
        elif mode == "weight_norm":
            norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True) + eps
            out = flat / norm * gain.to(flat.dtype)[:, None]
        else:  # standardize_affine
            w_hat = _StandardizeWeight.apply(flat, eps, formula)
            out = torch.addcmul(bias.to(flat.dtype)[:, None], w_hat, gain.to(flat.dtype)[:, None])
    return out.view_as(weight).to(weight.dtype)


def _check_standardizable(weight):
    # each output channel's filter needs >= 2 elements: the unbiased std of one value divides by N-1 = 0
    if weight.dim() < 2 or weight.shape[1:].numel() < 2:
        raise ConfigError(
            f"cannot weight-standardize a weight of shape {tuple(weight.shape)}: each output channel's filter "
            "needs at least 2 elements (a conv weight O x I/groups x kH x kW; 1 input channel, 1x1 kernel: 1)"
        )
    if not weight.dtype.is_floating_point:
        raise ConfigError(f"cannot weight-standardize a weight of dtype {weight.dtype}: not floating point")


def conv2d_arguments(conv: Conv2d) -> dict:
    """The constructor arguments that rebuild `conv` (Conv2d or WSConv2d) with its norm and activation."""
    names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    arguments = {name: getattr(conv, name) for name in (*names, "padding_mode", "norm", "activation")}
    return {**arguments, "bias": conv.bias is not None}


class WSConv2d(Conv2d):
    """detectron2's Conv2d (same parameters and state_dict keys) convolving with its weight standardized by
    `eps`, `formula` and `mode` (docs/WS.md). A weight that needs no gradient has its statistics cached until
    it changes: after a write through `.data`, call `clear_ws_cache()`."""

    def __init__(
        self, *args, eps: float = 1e-5, formula: str = "std_plus_eps", mode: str = "standardize", **kwargs
    ):
        super().__init__(*args, **kwargs)
        _check_standardizable(self.weight)
        self.eps = eps
        self.formula = _checked(formula, WS_FORMULAS, "formula")
        self.mode = _checked(mode, WS_MODES, "mode")
        self._ws_statistics = None
        self._shared_weight = None  # set by standardized_once
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
        """A WSConv2d sharing `conv`'s parameters, norm and activation."""
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
        """The weight the conv convolves with: differentiable when it needs a gradient, else from the cache."""
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
        """(mean, 1 / denominator) per output channel as columns, recomputed when the weight changed."""
        weight = self.weight
        # Any change of the weight's values changes its address, its in-place version counter or its
        # dtype. The cache holds the weight's storage, so its address cannot be reused meanwhile.
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape)
        key += (self.eps, self.formula)
        cache = self._ws_statistics
        if cache is None or cache[0] != key:
            # outside inference mode: a later training forward of a frozen stage saves W_hat for backward
            with torch.inference_mode(False), torch.no_grad():
                with torch.autocast(device_type=weight.device.type, enabled=False):
                    flat = weight.reshape(weight.shape[0], -1).to(_compute_dtype(weight))
                    _, mean, _, inv_denom = _standardize_rows(flat, self.eps, self.formula)
            self._ws_statistics = cache = (key, weight.untyped_storage(), mean, inv_denom)
        return cache[2], cache[3]

    def clear_ws_cache(self):
        self._ws_statistics = None

    # clearing lets go of the old weight's storage (held by the cache) at once, e.g. the CPU copy after .cuda()
    def _apply(self, fn, *args, **kwargs):
        self._ws_statistics = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        # detectron2's Conv2d check, kept: SyncBatchNorm fails on an empty batch with an obscure error
        empty_sync_bn = x.numel() == 0 and self.training and isinstance(self.norm, torch.nn.SyncBatchNorm)
        assert not empty_sync_bn, "SyncBatchNorm does not support empty inputs!"
        weight, device = self.weight, x.device.type
        # autocast's rule for a conv: fp32 operands in its half type (float64 stays)
        half = torch.is_autocast_enabled(device) and weight.dtype == torch.float32
        dtype = torch.get_autocast_dtype(device) if half else weight.dtype
        conv_args = (self.stride, self.padding, self.dilation, self.groups)
        fused = self.mode == "standardize" and torch.is_grad_enabled() and weight.requires_grad
        fused = fused and weight.dtype in (torch.float32, torch.float64) and not isinstance(self.padding, str)
        if self._shared_weight is not None:
            x = F.conv2d(x, self._shared_weight.to(dtype), self.bias, *conv_args)
        elif fused:  # the memory-lean path, under autocast too (statistics in fp32, the conv in half)
            bias = None if self.bias is None else self.bias.to(dtype)
            x = _WSConvolution.apply(x.to(dtype), weight, bias, self.eps, self.formula, *conv_args)
        else:  # cast once, before the conv: no fp32 W_hat beside it
            x = F.conv2d(x, self.standardized_weight().to(dtype), self.bias, *conv_args)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


@contextlib.contextmanager
def standardized_once(module: torch.nn.Module):
    """Inside the block, every WSConv2d of `module` convolves with W_hat computed once on entry, instead of on
    each call: for a head that runs the same convs on every FPN level (its gradient accumulates, as W's would)."""
    convs = [m for m in module.modules() if isinstance(m, WSConv2d)]
    try:
        for conv in convs:
            conv._shared_weight = conv.standardized_weight()
        yield
    finally:
        for conv in convs:
            conv._shared_weight = None
