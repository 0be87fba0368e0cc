"""GN+WS ResNet/ResNeXt backbones: detectron2's own builders with WS put on the normalized convs.

Depth (R-18/34/50/101/152), ResNeXt groups and width, norm, stride placement and freezing all come
from detectron2's usual MODEL.RESNETS / MODEL.FPN keys; MODEL.WS.ENABLED False gives the GN twin.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import build_resnet_backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

from .ws_convert import convert_to_ws

__all__ = ["build_ws_resnet_backbone", "build_ws_resnet_fpn_backbone", "maybe_convert_to_ws"]


def maybe_convert_to_ws(module, cfg):
    return convert_to_ws(module, cfg.MODEL.WS.EPS) if cfg.MODEL.WS.ENABLED else module


@BACKBONE_REGISTRY.register()
def build_ws_resnet_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's ResNet with WS on the stem, every block conv and every shortcut conv."""
    return maybe_convert_to_ws(build_resnet_backbone(cfg, input_shape), cfg)


@BACKBONE_REGISTRY.register()
def build_ws_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's ResNet-FPN with WS on the ResNet convs and the FPN lateral and output convs."""
    return maybe_convert_to_ws(build_resnet_fpn_backbone(cfg, input_shape), cfg)
