"""detectron2's DeepLab ResNet (dilated res5, multi-grid) with WS on every normalized conv and, with
MODEL.BCN.ENABLED, BCN in place of every GroupNorm."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.projects.deeplab import build_resnet_deeplab_backbone

from ws_d2.errors import ConfigError
from ws_d2.modeling.backbone import convert_by_config

__all__ = ["build_ws_resnet_deeplab_backbone", "check_bcn_norms"]


def check_bcn_norms(cfg):
    """BCN replaces GroupNorm: with another norm it would silently not be there."""
    if not cfg.MODEL.BCN.ENABLED:
        return
    for key in ("RESNETS", "SEM_SEG_HEAD"):
        if cfg.MODEL[key].NORM != "GN":
            raise ConfigError(
                f"MODEL.BCN.ENABLED puts BCN where the model has GroupNorm, but MODEL.{key}.NORM is "
                f"'{cfg.MODEL[key].NORM}': set it to GN"
            )


@BACKBONE_REGISTRY.register()
def build_ws_resnet_deeplab_backbone(cfg, input_shape: ShapeSpec):
    """With MODEL.RESNETS.STEM_TYPE basic, its state_dict keys are those of the seed configs' ResNet, so the
    authors' ImageNet GN+WS (or BCN+WS) weights load as they do there."""
    check_bcn_norms(cfg)
    return convert_by_config(build_resnet_deeplab_backbone(cfg, input_shape), cfg, "backbone.")
