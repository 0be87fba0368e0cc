"""GN+WS RetinaNet: its head's subnet convs normalized by MODEL.RETINANET.NORM, with WS. detectron2's head
builds plain nn.Conv2d, unseen by `convert_to_ws` (and v0.6's refuses GN), so this one is swapped in."""

from typing import Optional

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from torch import nn

from ..errors import ConfigError
from ..layers import WSConv2d
from ..layers.ws_conv import standardized_once


class WSRetinaNetHead(RetinaNetHead):
    """RetinaNetHead with `norm` after each subnet conv and WS on those convs (ws_eps=None: the GN twin). The
    state_dict is that of detectron2's head with the same norm (cls_subnet.{0,1,3,4,...}: conv, norm)."""

    @configurable
    def __init__(
        self,
        *,
        input_shape: list[ShapeSpec],
        norm: str = "",
        ws_eps: Optional[float] = 1e-5,
        ws_formula: str = "std_plus_eps",
        ws_mode: str = "standardize",
        **kwargs,
    ):
        if norm in ("BN", "SyncBN"):  # detectron2's own head keeps per-level BN statistics for these
            raise ConfigError(f"MODEL.RETINANET.NORM {norm}: use META_ARCHITECTURE RetinaNet for BatchNorm")
        # v0.6 probes get_norm(norm, 1), which GroupNorm(32, 1) refuses: built plain, normalized below
        super().__init__(input_shape=input_shape, norm="", **kwargs)
        if not norm:
            return
        for name in ("cls_subnet", "bbox_subnet"):
            layers = []
            for layer in getattr(self, name):
                if isinstance(layer, nn.Conv2d):
                    layer = _with_ws(layer, ws_eps, ws_formula, ws_mode)
                    layers += [layer, get_norm(norm, layer.out_channels)]
                else:
                    layers.append(layer)
            setattr(self, name, nn.Sequential(*layers))

    def forward(self, features):
        with standardized_once(self):  # the subnets run on every level: W_hat once, not once a level
            return super().forward(features)

    @classmethod
    def from_config(cls, cfg, input_shape: list[ShapeSpec]):
        if cfg.MODEL.BCN.ENABLED:
            raise ConfigError(
                "MODEL.BCN.ENABLED: RetinaNet's head shares its norms across the FPN levels, where batch "
                "statistics would mix the levels' scales; ws_d2's RetinaNet is GN+WS only"
            )
        return {
            **super().from_config(cfg, input_shape),
            "ws_eps": cfg.MODEL.WS.EPS if cfg.MODEL.WS.ENABLED else None,
            "ws_formula": cfg.MODEL.WS.FORMULA,
            "ws_mode": cfg.MODEL.WS.MODE,
        }


def _with_ws(conv: nn.Conv2d, eps, formula, mode):
    """`conv` as a detectron2 Conv2d sharing its parameters, WS unless `eps` is None."""
    shared = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None, device="meta")  # fmt: skip
    shared.weight, shared.bias = conv.weight, conv.bias
    return shared if eps is None else WSConv2d.from_conv2d(shared, eps, formula, mode)


@META_ARCH_REGISTRY.register()
class WSRetinaNet(RetinaNet):
    """detectron2's RetinaNet with WSRetinaNetHead; P6/P7 and the predictors carry no norm and stay plain."""

    @classmethod
    def from_config(cls, cfg):
        stock = cfg.clone()
        stock.defrost()
        stock.MODEL.RETINANET.NORM = ""  # the stock head that v0.6 can build, replaced just below
        arguments = super().from_config(stock)
        shapes = arguments["backbone"].output_shape()
        arguments["head"] = WSRetinaNetHead(cfg, [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
        return arguments
