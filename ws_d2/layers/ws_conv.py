"""Weight-standardized convolution with the numerics of the published GN+WS checkpoints.

Per output channel c of W (O x I/groups x kH x kW):  W_hat = (W - mean_c) / (std_c + eps), with the
UNBIASED std (N-1) and eps added to the std outside the square root. This is what the authors' code,
their maskrcnn-benchmark fork and mmcv's ConvWS compute; the paper's Eq. 2 (biased variance, eps inside
the root) and timm's StdConv2d differ by up to 1e-2 after GN on small-std weights, so they would not
reproduce the released checkpoints.
"""

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d

__all__ = ["WSConv2d", "standardize_weight"]


class _StandardizeWeight(torch.autograd.Function):
    """WS with its analytic gradient (the paper's Eq. 8-9 with the N-1 std and eps on the std).

    Autograd of the plain formula walks the weights about eight times per step; this walks them three
    times in backward and saves only W_hat and two per-channel vectors.
    """

    @staticmethod
    def forward(ctx, weight, eps):
        flat = weight.reshape(weight.shape[0], -1)
        std, mean = torch.std_mean(flat, dim=1, keepdim=True)
        denom = std + eps
        w_hat = (flat - mean) / denom
        ctx.save_for_backward(w_hat, std, denom)
        return w_hat.view_as(weight)

    @staticmethod
    def backward(ctx, grad_output):
        w_hat, std, denom = ctx.saved_tensors
        n = w_hat.shape[1]
        g = grad_output.reshape(w_hat.shape)
        # dL/dW = (g - mean(g) - W_hat * k) / (std + eps),  k = sum(g * W_hat) * (std + eps) / ((N-1) std).
        # A zero-variance filter has W_hat = 0, so its k term vanishes: keep k finite there.
        safe_std = torch.where(std > 0, std, torch.ones_like(std))
        k = (g * w_hat).sum(dim=1, keepdim=True) * (denom / ((n - 1) * safe_std))
        k = torch.where(std > 0, k, torch.zeros_like(k))
        grad = (g - g.mean(dim=1, keepdim=True) - w_hat * k) / denom
        return grad.view_as(grad_output), None


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Standardize a conv weight per output channel: (W - mean) / (unbiased std + eps).

    Statistics are computed in float32 (or float64 for float64 weights) even under autocast, and the
    result has the weight's dtype.
    """
    compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    device_type = weight.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        w_hat = _StandardizeWeight.apply(weight.to(compute_dtype), eps)
    return w_hat.to(weight.dtype)


class WSConv2d(Conv2d):
    """detectron2's Conv2d (conv + optional norm + activation) with a weight-standardized weight.

    Same constructor (plus `eps`), same parameters and state_dict keys as Conv2d: checkpoints store
    the raw weight and WS is applied on every forward. When no gradient is needed for the weight (eval
    under no_grad, or a frozen stage), the standardized weight is computed once and reused until the
    weight changes: in place (optimizer step, load_state_dict), by `.to()`/`.cuda()`/`.half()`, or by
    assigning a new tensor.
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps
        self._ws_cache = None

    @classmethod
    def from_conv2d(cls, conv: Conv2d, eps: float = 1e-5) -> "WSConv2d":
        """A WSConv2d sharing `conv`'s parameters, norm and activation."""
        ws = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            norm=conv.norm,
            activation=conv.activation,
            eps=eps,
            device="meta",  # parameters are replaced just below: allocate nothing
        )
        ws.weight = conv.weight
        ws.bias = conv.bias
        ws.train(conv.training)
        return ws

    def extra_repr(self):
        return super().extra_repr() + f", ws_eps={self.eps}"

    def standardized_weight(self) -> torch.Tensor:
        weight = self.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            self._ws_cache = None
            return standardize_weight(weight, self.eps)
        # Any change of the weight's values changes its address, its in-place version counter or its
        # dtype. The cache holds the weight's storage, so its address cannot be reused meanwhile.
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape, self.eps)
        cache = self._ws_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                self._ws_cache = cache = (key, weight.untyped_storage(), standardize_weight(weight, self.eps))
        return cache[2]

    def _apply(self, fn, *args, **kwargs):
        self._ws_cache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._ws_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x):
        x = F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x
