"""Convert published GN+WS checkpoints into detectron2 checkpoints that ws_d2's configs load by exact name.

One function per source layout (rename tables in ``layouts.py``):

- ``convert_authors_checkpoint``: the authors' ImageNet GN+WS ResNet/ResNeXt (and MMDetection's re-hosted
  copies) -> the backbone of a ws_d2 model (``backbone.bottom_up.*`` for the FPN seed configs);
- ``convert_mmdet_checkpoint``: MMDetection's trained GN+WS Faster/Mask R-CNN -> a full ws_d2 model;
- ``convert_torchvision_checkpoint``: a torchvision (BatchNorm) ResNet -> the backbone of a BatchNorm config.
  A GN target is refused: BatchNorm statistics have no GroupNorm counterpart, and GN+WS fine-tuned from a
  non-WS ImageNet model does worse than GN anyway (REFERENCE.md).

Every tensor is checked by name and shape against the model ``build_model`` makes from the target config
(``--config-file``, or the seed config of the architecture inferred from the file). A missing or misshaped
target tensor, or a source tensor with no place in the model, raises ``ConversionError`` naming the keys.
"""

import dataclasses
import os
import pickle
import re
from pathlib import Path

import torch

from .checkpointer import atomic_write
from .layouts import (
    DETECTOR_RULES,
    RESNET_RULES,
    common_prefix,
    detect_layout,
    infer_resnet_architecture,
    rename,
    unwrap_state_dict,
)
from .safe_load import CheckpointError, load_checkpoint_file

__all__ = [
    "ConversionError",
    "ConversionReport",
    "build_target_state_dict",
    "convert_authors_checkpoint",
    "convert_checkpoint",
    "convert_mmdet_checkpoint",
    "convert_torchvision_checkpoint",
    "save_converted",
    "seed_config_file",
]

SOURCES = ("authors", "mmdet", "torchvision")
# the repository's configs/, or a copy installed as package data
_CONFIG_DIRS = (
    Path(__file__).resolve().parents[2] / "configs",
    Path(__file__).resolve().parents[1] / "model_zoo" / "configs",
)


class ConversionError(CheckpointError):
    """The file does not fit the target architecture (or no layout fits the file)."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class ConversionReport:
    source: str
    target: str  # the config the names and shapes were checked against
    mapped: int = 0
    dropped: dict = dataclasses.field(default_factory=dict)  # source key -> why
    unmatched: list = dataclasses.field(default_factory=list)  # source keys no rule renames
    missing: list = dataclasses.field(default_factory=list)  # target keys nothing maps to
    unexpected: dict = dataclasses.field(default_factory=dict)  # target key -> source key; not in the model
    wrong_shape: dict = dataclasses.field(default_factory=dict)  # target key -> (source key, file, model)
    not_converted: list = dataclasses.field(default_factory=list)  # model keys outside the converted part

    @property
    def problems(self):
        problems = []
        if self.missing:
            problems.append(f"{len(self.missing)} model tensors have no source: {_some(self.missing)}")
        if self.wrong_shape:
            shapes = [f"{src} {a} -> {dst} {b}" for dst, (src, a, b) in self.wrong_shape.items()]
            problems.append(f"{len(shapes)} tensors have the wrong shape: {_some(shapes)}")
        if self.unexpected:
            extra = [f"{src} -> {dst}" for dst, src in self.unexpected.items()]
            problems.append(f"{len(extra)} source tensors have no place in the model: {_some(extra)}")
        if self.unmatched:
            problems.append(
                f"{len(self.unmatched)} source keys match no rename rule: {_some(self.unmatched)}"
            )
        return problems

    def summary(self):
        lines = [f"{self.source} layout, checked against {self.target}: mapped {self.mapped} tensors"]
        by_reason = {}
        for key, why in self.dropped.items():
            by_reason.setdefault(why, []).append(key)
        lines += [f"  dropped {len(keys)} ({why}): {_some(keys)}" for why, keys in by_reason.items()]
        if self.not_converted:
            modules = {}
            for key in self.not_converted:  # e.g. backbone.fpn_lateral2.weight -> backbone.fpn_lateral
                module = re.sub(r"\d+", "", ".".join(key.split(".")[:2]))
                modules[module] = modules.get(module, 0) + 1
            counts = ", ".join(f"{module} ({n})" for module, n in modules.items())
            lines.append(f"  not in the file, left to the model's initialization: {counts}")
        lines += [f"  ERROR: {problem}" for problem in self.problems]
        return "\n".join(lines)


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _some(items, limit=6):
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def seed_config_file(architecture, mask_on=False):
    """The seed config for an inferred architecture name such as 'R_50' or 'X_101_32x4d'."""
    if mask_on:
        name = f"COCO-InstanceSegmentation/mask_rcnn_{architecture}_FPN_gn_ws_2x.yaml"
    else:
        name = f"COCO-Detection/faster_rcnn_{architecture}_FPN_gn_ws_1x.yaml"
    for config_dir in _CONFIG_DIRS:
        if (config_dir / name).is_file():
            return str(config_dir / name)
    raise ConversionError(f"no ws_d2 seed config {name} for this {architecture} file: pass --config-file")


def build_target_state_dict(config_file):
    """Names and shapes of the model ``build_model`` makes from a config (built on the meta device:
    no memory, no initialization), and the config's norm."""
    from detectron2.modeling import build_model

    from ws_d2.config import get_ws_cfg

    cfg = get_ws_cfg()
    if not os.path.isfile(config_file):
        raise ConversionError(f"{config_file}: no such config file")
    try:
        cfg.merge_from_file(config_file)
    except Exception as e:  # yaml syntax, unknown keys, bad values: one line for the user
        raise ConversionError(f"{config_file}: cannot read the config: {_first_line(e)}") from None
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, cfg.MODEL.RESNETS.NORM


def _backbone_prefix(target_shapes):
    prefixes = [k[: -len("stem.conv1.weight")] for k in target_shapes if k.endswith("stem.conv1.weight")]
    if len(prefixes) != 1:
        raise ConversionError("the target config's model has no (single) ResNet stem to put the weights in")
    return prefixes[0]


def _check(renamed, origin, target_shapes, report, scope=""):
    """Compare renamed tensors with the target model's names/shapes under ``scope`` (a key prefix)."""
    for key, shape in target_shapes.items():
        if not key.startswith(scope):
            report.not_converted.append(key)
        elif key not in renamed:
            report.missing.append(key)
        elif tuple(renamed[key].shape) != shape:
            report.wrong_shape[key] = (origin[key], tuple(renamed[key].shape), shape)
    report.unexpected = {k: origin[k] for k in renamed if k not in target_shapes}
    report.mapped = len(renamed) - len(report.unexpected) - len(report.wrong_shape)
    if report.problems:
        raise ConversionError(
            f"{report.source} checkpoint does not fit {report.target}: " + "; ".join(report.problems), report
        )


def _convert_resnet(checkpoint, source, config_file):
    state_dict = unwrap_state_dict(checkpoint)
    source_prefix = common_prefix(state_dict)
    if config_file is None:
        try:
            architecture = infer_resnet_architecture(state_dict, prefix=source_prefix)["name"]
        except (KeyError, ValueError) as e:
            raise ConversionError(
                f"cannot infer the ResNet architecture from the file ({e}): pass --config-file"
            ) from None
        config_file = seed_config_file(architecture)
    target_shapes, norm = build_target_state_dict(config_file)
    report = ConversionReport(source=source, target=os.path.basename(config_file))
    has_bn_stats = any(k.endswith("running_mean") for k in state_dict)
    if has_bn_stats and norm in ("GN", "SyncGN"):
        raise ConversionError(
            f"{source} checkpoint holds BatchNorm weights (running_mean/var), which have no GroupNorm counterpart, "
            f"and {report.target} uses {norm}. GN+WS needs WS-pretrained weights (the authors' files); for a "
            "BatchNorm model pass --config-file with MODEL.RESNETS.NORM FrozenBN",
            report,
        )
    renamed, origin, report.dropped, report.unmatched = rename(state_dict, RESNET_RULES, source_prefix)
    prefix = _backbone_prefix(target_shapes)
    renamed = {prefix + k: v for k, v in renamed.items()}
    origin = {prefix + k: v for k, v in origin.items()}
    # the backbone's (bottom-up ResNet's) tensors must all come from the file; FPN and heads are new
    _check(renamed, origin, target_shapes, report, scope=prefix)
    return renamed, report


def convert_authors_checkpoint(checkpoint, config_file=None):
    """The authors' ImageNet GN+WS ResNet/ResNeXt (bare state_dict, ``module.`` prefix, GN named ``bn*``;
    or MMDetection's re-hosted copy, ``gn*``, maybe under 'state_dict') -> ``({name: tensor}, report)``."""
    return _convert_resnet(checkpoint, "authors", config_file)


def convert_torchvision_checkpoint(checkpoint, config_file=None):
    """A torchvision ResNet (BatchNorm) -> ``({name: tensor}, report)`` for a BatchNorm target config."""
    return _convert_resnet(checkpoint, "torchvision", config_file)


def convert_mmdet_checkpoint(checkpoint, config_file=None):
    """An MMDetection (v2 layout) GN+WS Faster/Mask R-CNN FPN checkpoint -> ``({name: tensor}, report)``
    covering every tensor of the target model."""
    state_dict = unwrap_state_dict(checkpoint)
    source_prefix = common_prefix(state_dict)
    if any(k[len(source_prefix) :].startswith(("bbox_head.", "mask_head.")) for k in state_dict):
        raise ConversionError(
            "MMDetection v1 layout (bbox_head/mask_head at the top level; its classifier puts the background "
            "first): upgrade it with MMDetection's tools/model_converters/upgrade_model_version.py first"
        )
    if config_file is None:
        try:
            architecture = infer_resnet_architecture(state_dict, prefix=source_prefix + "backbone.")["name"]
        except (KeyError, ValueError) as e:
            raise ConversionError(
                f"cannot infer the backbone from the file ({e}): pass --config-file"
            ) from None
        config_file = seed_config_file(
            architecture, mask_on=any(k.startswith("roi_head.mask_head.") for k in state_dict)
        )
    target_shapes, _ = build_target_state_dict(config_file)
    report = ConversionReport(source="mmdet", target=os.path.basename(config_file))
    renamed, origin, report.dropped, report.unmatched = rename(state_dict, DETECTOR_RULES, source_prefix)
    _check(renamed, origin, target_shapes, report)
    return renamed, report


_CONVERTERS = {
    "authors": convert_authors_checkpoint,
    "mmdet": convert_mmdet_checkpoint,
    "torchvision": convert_torchvision_checkpoint,
}


def save_converted(state_dict, path):
    """Write ``{"model": ..., "__author__": "ws_d2", "matching_heuristics": False}`` (exact names: detectron2
    must not rename anything) as ``.pkl`` (numpy arrays) or ``.pth`` (tensors), atomically."""
    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.endswith(".pkl"):
        data = {
            "model": {k: v.numpy() for k, v in tensors.items()},
            "__author__": "ws_d2",
            "matching_heuristics": False,
        }
        with atomic_write(path) as f:
            pickle.dump(data, f, protocol=4)
    elif path.endswith(".pth"):
        with atomic_write(path) as f:
            torch.save({"model": tensors, "__author__": "ws_d2", "matching_heuristics": False}, f)
    else:
        raise ConversionError(f"{path}: the output must end in .pkl or .pth")


def convert_checkpoint(src, dst, source="auto", config_file=None):
    """Read ``src`` safely, convert it from its layout (``source``, or detected), check it against the target
    config, and write ``dst``. Returns the ConversionReport; raises a CheckpointError subclass on failure."""
    if source != "auto" and source not in SOURCES:
        raise ConversionError(
            f"unknown source layout {source!r}; expected auto or one of {', '.join(SOURCES)}"
        )
    if not os.fspath(dst).endswith((".pkl", ".pth")):
        raise ConversionError(f"{dst}: the output must end in .pkl or .pth")
    checkpoint = load_checkpoint_file(src)
    if source == "auto":
        if "model" in checkpoint and "__author__" in checkpoint:
            raise ConversionError(
                f"{src}: already a detectron2 checkpoint (written by {checkpoint['__author__']})"
            )
        source = detect_layout(unwrap_state_dict(checkpoint))
        if source is None:
            raise ConversionError(f"{src}: not a known layout (authors, mmdet, torchvision); pass --source")
    state_dict, report = _CONVERTERS[source](checkpoint, config_file)
    save_converted(state_dict, dst)
    return report
