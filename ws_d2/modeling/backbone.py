"""GN+WS (and BCN+WS) ResNet/ResNeXt backbones: detectron2's own builders, converted by the config."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import build_resnet_backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone, build_retinanet_resnet_fpn_backbone

from ..errors import ConfigError
from .convert import convert_to_bcn, convert_to_ws


def convert_by_config(module, cfg, prefix=""):
    """BCN in place of every GroupNorm (MODEL.BCN.ENABLED), then WS on every normalized conv (MODEL.WS)."""
    if cfg.MODEL.BCN.ENABLED:
        convert_to_bcn(module, cfg.MODEL.BCN.GROUPS, cfg.MODEL.BCN.ESTIMATE, prefix)
    if cfg.MODEL.WS.ENABLED:
        convert_to_ws(module, cfg.MODEL.WS.EPS, cfg.MODEL.WS.FORMULA, cfg.MODEL.WS.MODE)
    return module


def _build_converted(build, cfg, input_shape):
    if cfg.MODEL.BCN.ENABLED and cfg.MODEL.RESNETS.NORM != "GN":
        raise ConfigError(
            f"MODEL.BCN.ENABLED puts BCN where the model has GroupNorm, but MODEL.RESNETS.NORM is "
            f"'{cfg.MODEL.RESNETS.NORM}': set it to GN"
        )
    return convert_by_config(build(cfg, input_shape), cfg, "backbone.")


@BACKBONE_REGISTRY.register()
def build_ws_resnet_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's ResNet with WS on the stem, every block conv and every shortcut conv."""
    return _build_converted(build_resnet_backbone, cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_ws_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's ResNet-FPN with WS on the ResNet convs and the FPN lateral and output convs."""
    return _build_converted(build_resnet_fpn_backbone, cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_ws_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's RetinaNet ResNet-FPN (P3-P7) with WS as above; its P6/P7 convs carry no norm and stay plain."""
    return _build_converted(build_retinanet_resnet_fpn_backbone, cfg, input_shape)
