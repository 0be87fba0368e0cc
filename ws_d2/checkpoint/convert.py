"""Published checkpoints (docs/CONVERSION.md) -> a ws_d2 model's state_dict, checked by name and shape."""

import dataclasses

import torch
from detectron2.modeling import build_model
from fvcore.common.checkpoint import get_missing_parameters_message

from ..errors import CheckpointError
from ..layers import BatchChannelNorm, WSConv2d
from .layouts import (
    BCN_RESNET_RULES,
    DETECTOR_RULES,
    RESNET_RULES,
    SOURCES,
    common_prefix,
    detect_layout,
    rename,
    unwrap_state_dict,
)

GN_WS_SOURCES = ("authors", "mmdet")


@dataclasses.dataclass
class ConversionReport:
    source: str
    target: str  # what the names and shapes were checked against
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
            message = get_missing_parameters_message(self.not_converted)
            lines += ["    " + line for line in message.splitlines()[1:]]
        if self.source in GN_WS_SOURCES:  # GN-only and GN+WS ResNets have the same tensors
            lines.append(
                "  note: the layout cannot tell GN+WS weights from GN-only (non-WS) ones; a WS model needs "
                "WS-pretrained weights, so convert only files published as GN+WS"
            )
        return "\n".join(lines)


def _some(items, limit=6):
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def meta_model(cfg):
    """The model of `cfg` on the meta device (names and shapes, no memory): a conversion's target."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        return build_model(cfg)


def convert_state_dict(checkpoint, model, source=None, target="the model"):
    """A loaded file in layout `source` (detected if None) -> ``({name: tensor}, ConversionReport)`` for
    `model`: the backbone's tensors for an ImageNet ResNet, every tensor for an MMDetection detector."""
    state_dict = unwrap_state_dict(checkpoint)
    source = source or detect_layout(state_dict)
    if source not in SOURCES:
        raise CheckpointError(f"not a known layout ({', '.join(SOURCES)}); pass --source")
    prefix = common_prefix(state_dict)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if source == "mmdet":
        if any(k[len(prefix) :].startswith(("bbox_head.", "mask_head.")) for k in state_dict):
            raise CheckpointError(
                "MMDetection v1 layout (bbox_head/mask_head at the top level; its classifier puts the background "
                "first): upgrade it with MMDetection's tools/model_converters/upgrade_model_version.py first"
            )
        return _checked(state_dict, DETECTOR_RULES, prefix, source, target, shapes)
    stems = [k[: -len("stem.conv1.weight")] for k in shapes if k.endswith("stem.conv1.weight")]
    if len(stems) != 1:
        raise CheckpointError(f"{target} has no (single) ResNet stem to put the weights in")
    _check_resnet_target(source, state_dict, model, shapes, stems[0], target)
    rules = BCN_RESNET_RULES if source == "authors_bcn" else RESNET_RULES
    # the bottom-up ResNet's tensors must all come from the file; FPN and heads are new
    return _checked(state_dict, rules, prefix, source, target, shapes, scope=stems[0])


def _check_resnet_target(source, state_dict, model, shapes, stem, target):
    """Refuse, naming the fix, a target whose norms or WS formula the file's weights were not trained with."""
    has_bcn = any(isinstance(m, BatchChannelNorm) for m in model.modules())
    formulas = {m.formula for m in model.modules() if isinstance(m, WSConv2d)}
    if source == "authors_bcn" and not has_bcn:
        raise CheckpointError(
            f"authors_bcn checkpoint holds BCN norms (bn*.pbn.*) and {target} has MODEL.BCN.ENABLED False: pass "
            "a BCN+WS config, e.g. COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_bcn_ws_2x.yaml"
        )
    if source == "authors_bcn" and formulas - {"sqrt_var_plus_eps"}:
        raise CheckpointError(
            f"the authors' BCN+WS models were trained with WS (W - mean) / sqrt(var + eps) and {target} sets "
            f"MODEL.WS.FORMULA {', '.join(sorted(formulas))}: set it to sqrt_var_plus_eps"
        )
    if source == "authors" and has_bcn:
        raise CheckpointError(
            f"authors checkpoint holds GN+WS norms and {target} has MODEL.BCN.ENABLED True: BCN needs the "
            "authors' BCN+WS weights (--source authors_bcn), or pass a GN+WS config"
        )
    batch_norm_file = any(k.endswith("running_mean") for k in state_dict)
    if source != "authors_bcn" and batch_norm_file and f"{stem}stem.conv1.norm.running_mean" not in shapes:
        raise CheckpointError(
            f"{source} checkpoint holds BatchNorm weights (running_mean/var), which have no GroupNorm "
            f"counterpart, and {target} has none. GN+WS needs WS-pretrained weights (the authors' files); for a "
            "BatchNorm model pass --config-file with MODEL.RESNETS.NORM FrozenBN"
        )


def _checked(state_dict, rules, source_prefix, source, target, target_shapes, scope=""):
    """Rename `state_dict` by `rules` into `scope` and check it against the target's names and shapes there."""
    renamed, origin, dropped, unmatched = rename(state_dict, rules, source_prefix)
    renamed = {scope + k: v for k, v in renamed.items()}
    origin = {scope + k: v for k, v in origin.items()}
    not_converted = [k for k in target_shapes if not k.startswith(scope)]
    # a BatchNorm's step counter is no weight, and load_state_dict fills it in when absent
    in_scope = [k for k in target_shapes if k.startswith(scope) and not k.endswith("num_batches_tracked")]
    missing = [k for k in in_scope if k not in renamed]
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
        raise CheckpointError(f"{source} checkpoint does not fit {target}: " + "; ".join(problems))
    return renamed, ConversionReport(source, target, len(renamed), dropped, not_converted)
