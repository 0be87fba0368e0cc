"""Convert published GN+WS checkpoints into detectron2 checkpoints that ws_d2's configs load by exact name.

One function per source layout (rename tables in ``layouts.py``):

- ``convert_authors_checkpoint``: the authors' ImageNet GN+WS ResNet/ResNeXt (and MMDetection's re-hosted
  copies) -> the backbone of a ws_d2 model (``backbone.bottom_up.*`` for the FPN seed configs);
- ``convert_authors_bcn_checkpoint``: the authors' ImageNet BCN+WS ResNet/ResNeXt -> the backbone of a BCN+WS
  config (MODEL.BCN.ENABLED, MODEL.WS.FORMULA sqrt_var_plus_eps: the WS their models were trained with);
- ``convert_mmdet_checkpoint``: MMDetection's trained GN+WS Faster/Mask R-CNN -> a full ws_d2 model;
- ``convert_torchvision_checkpoint``: a torchvision (BatchNorm) ResNet -> the backbone of a BatchNorm config.
  A GN target is refused: BatchNorm statistics have no GroupNorm counterpart, and WS needs WS-pretrained
  backbones anyway.

Every tensor is checked by name and shape against the model ``build_model`` makes from the target config
(``--config-file``, or the seed config of the architecture inferred from the file). A missing or misshaped
target tensor, or a source tensor with no place in the model, raises ``CheckpointError`` naming the keys.
"""

import dataclasses
import os
import pickle

import torch
from detectron2.config import CfgNode
from fvcore.common.checkpoint import get_missing_parameters_message

from ..config import load_config
from ..errors import CheckpointError, ConfigError
from ..model_zoo import get_config_file
from ..outputs import refuse_output_onto_inputs
from .checkpointer import atomic_write
from .layouts import (
    BCN_RESNET_RULES,
    DETECTOR_RULES,
    RESNET_RULES,
    common_prefix,
    detect_layout,
    infer_resnet_architecture,
    rename,
    unwrap_state_dict,
)
from .safe_load import load_checkpoint_file

__all__ = [
    "ConversionReport",
    "convert_authors_bcn_checkpoint",
    "convert_authors_checkpoint",
    "convert_checkpoint",
    "convert_in_memory",
    "convert_mmdet_checkpoint",
    "convert_torchvision_checkpoint",
    "seed_config_file",
]

SOURCES = ("authors", "authors_bcn", "mmdet", "torchvision")
GN_WS_SOURCES = ("authors", "mmdet")


@dataclasses.dataclass
class ConversionReport:
    source: str
    target: str  # the config the names and shapes were checked against
    mapped: int = 0
    dropped: dict = dataclasses.field(default_factory=dict)  # source key -> why
    not_converted: list = dataclasses.field(default_factory=list)  # model keys outside the converted part

    def summary(self):
        lines = [f"{self.source} layout, checked against {self.target}: mapped {self.mapped} tensors"]
        by_reason = {}
        for key, why in self.dropped.items():
            by_reason.setdefault(why, []).append(key)
        lines += [f"  dropped {len(keys)} ({why}): {_some(keys)}" for why, keys in by_reason.items()]
        if self.not_converted:  # grouped by module, as detectron2 reports a checkpoint's missing keys
            lines.append("  not in the file, left to the model's initialization:")
            lines += [
                "    " + line for line in get_missing_parameters_message(self.not_converted).splitlines()[1:]
            ]
        if self.source in GN_WS_SOURCES:  # GN-only and GN+WS ResNets have the same tensors
            lines.append(
                "  note: the layout cannot tell GN+WS weights from GN-only (non-WS) ones; a WS model needs "
                "WS-pretrained weights, so convert only files published as GN+WS"
            )
        return "\n".join(lines)


def _some(items, limit=6):
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def seed_config_file(architecture, mask_on=False, bcn=False):
    """The seed config for an inferred architecture name such as 'R_50' or 'X_101_32x4d' (with `bcn`: the
    BCN+WS Mask R-CNN config)."""
    if bcn:
        name = f"COCO-InstanceSegmentation/mask_rcnn_{architecture}_FPN_bcn_ws_2x.yaml"
    elif mask_on:
        name = f"COCO-InstanceSegmentation/mask_rcnn_{architecture}_FPN_gn_ws_2x.yaml"
    else:
        name = f"COCO-Detection/faster_rcnn_{architecture}_FPN_gn_ws_1x.yaml"
    try:
        return get_config_file(name)
    except ConfigError:
        raise CheckpointError(
            f"no ws_d2 seed config {name} for this {architecture} file: pass --config-file"
        ) from None


def _target(config_file, state_dict, prefix, mask_on=False, bcn=False):
    """(config name, {name: shape} of the model it builds, its config); `config_file` is a file, a config, or
    None for the seed config of the ResNet architecture under `prefix` in `state_dict`. The model is built on the meta device: no memory."""
    from detectron2.modeling import build_model

    if config_file is None:
        try:
            architecture = infer_resnet_architecture(state_dict, prefix=prefix)["name"]
        except (KeyError, ValueError) as e:
            raise CheckpointError(
                f"cannot infer the ResNet architecture from the file ({e}): pass --config-file"
            ) from None
        config_file = seed_config_file(architecture, mask_on, bcn)
    if isinstance(config_file, CfgNode):  # the config of the model being loaded (WSCheckpointer)
        cfg = config_file.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "meta"
        config_file = "the model's config"
    else:
        cfg = load_config(config_file, ["MODEL.DEVICE", "meta"])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    return config_file, shapes, cfg


def _checked(state_dict, rules, source_prefix, source, config_file, target_shapes, scope=""):
    """Rename `state_dict` by `rules`, prefix the names with `scope`, and check them against the target model's
    names and shapes under `scope`. Returns ({name: tensor}, report); raises CheckpointError on any mismatch."""
    renamed, origin, dropped, unmatched = rename(state_dict, rules, source_prefix)
    renamed = {scope + k: v for k, v in renamed.items()}
    origin = {scope + k: v for k, v in origin.items()}
    report = ConversionReport(source, os.path.basename(config_file), dropped=dropped)
    report.not_converted = [k for k in target_shapes if not k.startswith(scope)]
    # a BatchNorm's step counter is no weight, and load_state_dict fills it in when absent
    missing = [
        k
        for k in target_shapes
        if k.startswith(scope) and k not in renamed and not k.endswith("num_batches_tracked")
    ]
    wrong_shape = [
        f"{origin[k]} {tuple(renamed[k].shape)} -> {k} {shape}"
        for k, shape in target_shapes.items()
        if k in renamed and tuple(renamed[k].shape) != shape
    ]
    unexpected = [f"{origin[k]} -> {k}" for k in renamed if k not in target_shapes]
    problems = [
        f"{len(keys)} {what}: {_some(keys)}"
        for keys, what in [
            (missing, "model tensors have no source"),
            (wrong_shape, "tensors have the wrong shape"),
            (unexpected, "source tensors have no place in the model"),
            (unmatched, "source keys match no rename rule"),
        ]
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source} checkpoint does not fit {report.target}: " + "; ".join(problems))
    report.mapped = len(renamed)
    return renamed, report


def _convert_resnet(checkpoint, source, config_file):
    state_dict = unwrap_state_dict(checkpoint)
    prefix = common_prefix(state_dict)
    bcn = source == "authors_bcn"
    config_file, target_shapes, cfg = _target(config_file, state_dict, prefix, bcn=bcn)
    name, norm = os.path.basename(config_file), cfg.MODEL.RESNETS.NORM
    if bcn and not cfg.MODEL.BCN.ENABLED:
        raise CheckpointError(
            f"authors_bcn checkpoint holds BCN norms (bn*.pbn.*) and {name} has MODEL.BCN.ENABLED False: pass "
            "a BCN+WS config, e.g. COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_bcn_ws_2x.yaml"
        )
    if bcn and cfg.MODEL.WS.FORMULA != "sqrt_var_plus_eps":
        raise CheckpointError(
            f"the authors' BCN+WS models were trained with WS (W - mean) / sqrt(var + eps) and {name} sets "
            f"MODEL.WS.FORMULA {cfg.MODEL.WS.FORMULA}: set it to sqrt_var_plus_eps"
        )
    if source == "authors" and cfg.MODEL.BCN.ENABLED:
        raise CheckpointError(
            f"authors checkpoint holds GN+WS norms and {name} has MODEL.BCN.ENABLED True: BCN needs the "
            "authors' BCN+WS weights (--source authors_bcn), or pass a GN+WS config"
        )
    if not bcn and any(k.endswith("running_mean") for k in state_dict) and norm in ("GN", "SyncGN"):
        raise CheckpointError(
            f"{source} checkpoint holds BatchNorm weights (running_mean/var), which have no GroupNorm counterpart, "
            f"and {name} uses {norm}. GN+WS needs WS-pretrained weights (the authors' "
            "files); for a BatchNorm model pass --config-file with MODEL.RESNETS.NORM FrozenBN"
        )
    stems = [k[: -len("stem.conv1.weight")] for k in target_shapes if k.endswith("stem.conv1.weight")]
    if len(stems) != 1:
        raise CheckpointError("the target config's model has no (single) ResNet stem to put the weights in")
    # the backbone's (bottom-up ResNet's) tensors must all come from the file; FPN and heads are new
    rules = BCN_RESNET_RULES if bcn else RESNET_RULES
    return _checked(state_dict, rules, prefix, source, config_file, target_shapes, scope=stems[0])


def convert_authors_checkpoint(checkpoint, config_file=None):
    """The authors' ImageNet GN+WS ResNet/ResNeXt (bare state_dict, ``module.`` prefix, GN named ``bn*``;
    or MMDetection's re-hosted copy, ``gn*``, maybe under 'state_dict') -> ``({name: tensor}, report)``."""
    return _convert_resnet(checkpoint, "authors", config_file)


def convert_authors_bcn_checkpoint(checkpoint, config_file=None):
    """The authors' ImageNet BCN+WS ResNet/ResNeXt (bare state_dict, ``module.`` prefix; each norm ``bn*`` or
    ``downsample.1`` a BCNorm: group affine (1, 32, 1) plus a BatchNorm2d ``pbn``) -> ``({name: tensor},
    report)`` for a BCN+WS config. The ``pbn`` statistics become the BCN batch step's running statistics (the
    initial EstBN estimates, or a frozen stage's fixed ones)."""
    return _convert_resnet(checkpoint, "authors_bcn", config_file)


def convert_torchvision_checkpoint(checkpoint, config_file=None):
    """A torchvision ResNet (BatchNorm) -> ``({name: tensor}, report)`` for a BatchNorm target config."""
    return _convert_resnet(checkpoint, "torchvision", config_file)


def convert_mmdet_checkpoint(checkpoint, config_file=None):
    """An MMDetection (v2 layout) GN+WS Faster/Mask R-CNN FPN checkpoint -> ``({name: tensor}, report)``
    covering every tensor of the target model."""
    state_dict = unwrap_state_dict(checkpoint)
    prefix = common_prefix(state_dict)
    if any(k[len(prefix) :].startswith(("bbox_head.", "mask_head.")) for k in state_dict):
        raise CheckpointError(
            "MMDetection v1 layout (bbox_head/mask_head at the top level; its classifier puts the background "
            "first): upgrade it with MMDetection's tools/model_converters/upgrade_model_version.py first"
        )
    mask_on = any(k[len(prefix) :].startswith("roi_head.mask_head.") for k in state_dict)
    config_file, target_shapes, _ = _target(config_file, state_dict, prefix + "backbone.", mask_on)
    return _checked(state_dict, DETECTOR_RULES, prefix, "mmdet", config_file, target_shapes)


_CONVERTERS = {
    "authors": convert_authors_checkpoint,
    "authors_bcn": convert_authors_bcn_checkpoint,
    "mmdet": convert_mmdet_checkpoint,
    "torchvision": convert_torchvision_checkpoint,
}


def save_converted(state_dict, path):
    """Write ``{"model": ..., "__author__": "ws_d2", "matching_heuristics": False}`` (exact names: detectron2
    must not rename anything) as ``.pkl`` (numpy arrays) or ``.pth`` (tensors), atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    pkl = os.fspath(path).endswith(".pkl")
    data = {"model": {k: v.numpy() for k, v in tensors.items()} if pkl else tensors}
    data.update(__author__="ws_d2", matching_heuristics=False)
    with atomic_write(path) as f:
        if pkl:
            pickle.dump(data, f, protocol=4)
        else:
            torch.save(data, f)


def convert_in_memory(checkpoint, source, config=None):
    """Convert a loaded file in layout `source` for `config` (a config file, a config, or None for the seed
    config of the file's architecture) -> ``({name: tensor}, report)``, the converter's rules and checks."""
    return _CONVERTERS[source](checkpoint, config)


def convert_checkpoint(src, dst, source="auto", config_file=None):
    """Read ``src`` safely, convert it from its layout (``source``, or detected), check it against the target
    config, and write ``dst`` (.pkl or .pth). Returns the ConversionReport; raises CheckpointError."""
    if source != "auto" and source not in SOURCES:
        raise CheckpointError(
            f"unknown source layout {source!r}; expected auto or one of {', '.join(SOURCES)}"
        )
    if not os.fspath(dst).endswith((".pkl", ".pth")):
        raise CheckpointError(f"{dst}: the output must end in .pkl or .pth")
    refuse_output_onto_inputs(dst, [src, config_file], option="DST")
    checkpoint = load_checkpoint_file(src)
    if source == "auto":
        if "model" in checkpoint and "__author__" in checkpoint:
            raise CheckpointError(
                f"{src}: already a detectron2 checkpoint (written by {checkpoint['__author__']})"
            )
        source = detect_layout(unwrap_state_dict(checkpoint))
        if source is None:
            raise CheckpointError(f"{src}: not a known layout ({', '.join(SOURCES)}); pass --source")
    state_dict, report = convert_in_memory(checkpoint, source, config_file)
    save_converted(state_dict, dst)
    return report
