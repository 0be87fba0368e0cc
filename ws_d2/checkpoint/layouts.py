"""Rename rules from published checkpoint layouts (docs/CONVERSION.md) to ws_d2 names, each ``(source regex,
target template filled from the regex's groups or None to drop the key, why it is dropped)``."""

import re

SOURCES = ("authors", "authors_bcn", "mmdet", "torchvision")  # what detect_layout tells apart
_BLOCK = r"layer(?P<layer>\d)\.(?P<block>\d+)"


def _resnet_rules(norm, norm_params):
    """Rules for a torchvision-style ResNet whose norms are named by the regex `norm` (bn1, layerL.B.bnK,
    downsample.1) and hold `norm_params`: (source regex after the norm's name, target after `.norm.`)."""
    rules = [
        (r"conv1\.weight", "stem.conv1.weight", None),
        (rf"{_BLOCK}\.conv(?P<k>\d)\.weight", "res{stage}.{block}.conv{k}.weight", None),
        (rf"{_BLOCK}\.downsample\.0\.weight", "res{stage}.{block}.shortcut.weight", None),
    ]
    for source, target in norm_params:
        rules += [
            (rf"{norm}1\.{source}", "stem.conv1.norm." + target, None),
            (rf"{_BLOCK}\.{norm}(?P<k>\d)\.{source}", "res{stage}.{block}.conv{k}.norm." + target, None),
            (rf"{_BLOCK}\.downsample\.1\.{source}", "res{stage}.{block}.shortcut.norm." + target, None),
        ]
    return rules + [
        (r"fc\.(weight|bias)", None, "ImageNet classifier: no counterpart in a detector"),
        (r".*num_batches_tracked", None, "BatchNorm step counter: not a weight"),
    ]


# the authors' ImageNet files (GroupNorms bn*), MMDetection's copies (gn*), torchvision's (BatchNorm)
RESNET_RULES = _resnet_rules("[bg]n", [(r"(?P<param>weight|bias|running_mean|running_var)", "{param}")])

# the authors' BCN+WS files: each norm is a per-group affine `weight`/`bias` and its BatchNorm2d `pbn`
BCN_RESNET_RULES = _resnet_rules(
    "bn",
    [
        (r"(?P<param>weight|bias)", "{param}"),
        (r"pbn\.(?P<param>weight|bias|running_mean|running_var)", "batch_norm.{param}"),
    ],
) + [(r".*estbn_moving_speed", None, "EstBN moving speed: ws_d2 sets it every training pass (MODEL.BCN)")]

# MMDetection's (v2) Faster/Mask R-CNN: a pure renaming (the orders coincide). One rule per line, as a table.
_CONV_MODULE = r"(?:conv\.weight|gn\.(?P<param>weight|bias))"  # mmcv ConvModule: .conv + .gn
_P = r"(?P<p>weight|bias)"
# fmt: off
DETECTOR_RULES = [
    *[(rf"backbone\.{src}", dst and f"backbone.bottom_up.{dst}", why) for src, dst, why in RESNET_RULES],
    (rf"neck\.lateral_convs\.(?P<level_index>\d)\.{_CONV_MODULE}", "backbone.fpn_lateral{level}{conv_or_norm}", None),
    (rf"neck\.fpn_convs\.(?P<level_index>\d)\.{_CONV_MODULE}", "backbone.fpn_output{level}{conv_or_norm}", None),
    (rf"rpn_head\.rpn_conv\.{_P}", "proposal_generator.rpn_head.conv.{p}", None),
    (rf"rpn_head\.rpn_cls\.{_P}", "proposal_generator.rpn_head.objectness_logits.{p}", None),
    (rf"rpn_head\.rpn_reg\.{_P}", "proposal_generator.rpn_head.anchor_deltas.{p}", None),
    (rf"roi_head\.bbox_head\.shared_convs\.(?P<index>\d)\.{_CONV_MODULE}", "roi_heads.box_head.conv{n}{conv_or_norm}", None),
    (rf"roi_head\.bbox_head\.shared_fcs\.(?P<index>\d)\.{_P}", "roi_heads.box_head.fc{n}.{p}", None),
    (rf"roi_head\.bbox_head\.fc_cls\.{_P}", "roi_heads.box_predictor.cls_score.{p}", None),
    (rf"roi_head\.bbox_head\.fc_reg\.{_P}", "roi_heads.box_predictor.bbox_pred.{p}", None),
    (rf"roi_head\.mask_head\.convs\.(?P<index>\d)\.{_CONV_MODULE}", "roi_heads.mask_head.mask_fcn{n}{conv_or_norm}", None),
    (rf"roi_head\.mask_head\.upsample\.{_P}", "roi_heads.mask_head.deconv.{p}", None),
    (rf"roi_head\.mask_head\.conv_logits\.{_P}", "roi_heads.mask_head.predictor.{p}", None),
    (r"data_preprocessor\..*", None, "pixel mean/std: set by MODEL.PIXEL_MEAN/PIXEL_STD in the config"),
]
# fmt: on


def _template_fields(groups):
    fields = {k: v for k, v in groups.items() if v is not None}
    if "layer" in fields:
        fields["stage"] = int(fields["layer"]) + 1  # torchvision layer1 is detectron2 res2
    if "level_index" in fields:
        fields["level"] = int(fields["level_index"]) + 2  # MMDetection's FPN index 0 is for C2/P2
    if "index" in fields:
        fields["n"] = int(fields["index"]) + 1  # detectron2 numbers head layers from 1
    # a ConvModule's conv weight has no `param` group; its GroupNorm does
    fields["conv_or_norm"] = f".norm.{fields['param']}" if "param" in fields else ".weight"
    return fields


def rename(state_dict, rules, prefix=""):
    """Apply a rule table to the keys after ``prefix`` (e.g. DataParallel's ``module.``). Returns
    ``(renamed {target: tensor}, origin {target: source key}, dropped {source key: why}, unmatched [source keys])``
    with source keys as written in the file."""
    compiled = [(re.compile(pattern), template, why) for pattern, template, why in rules]
    renamed, origin, dropped, unmatched = {}, {}, {}, []
    for key, value in state_dict.items():
        for pattern, template, why in compiled:
            match = pattern.fullmatch(key[len(prefix) :]) if key.startswith(prefix) else None
            if match is None:
                continue
            if template is None:
                dropped[key] = why
            else:
                target = template.format(**_template_fields(match.groupdict()))
                if target in renamed:  # two source keys for one target: the table is wrong for this file
                    unmatched.append(key)
                else:
                    renamed[target], origin[target] = value, key
            break
        else:
            unmatched.append(key)
    return renamed, origin, dropped, unmatched


def unwrap_state_dict(checkpoint):
    """The state_dict inside a loaded file: MMDetection's is under 'state_dict', the others' bare."""
    if isinstance(checkpoint.get("state_dict"), dict):
        return checkpoint["state_dict"]
    return checkpoint


def common_prefix(state_dict, prefix="module."):
    """``prefix`` if every key has it (DataParallel's ``module.``: the authors' files have it), else ''."""
    return prefix if state_dict and all(key.startswith(prefix) for key in state_dict) else ""


def detect_layout(state_dict):
    """'mmdet', 'authors', 'authors_bcn' or 'torchvision' for a state_dict; None if it is none of them."""
    prefix = common_prefix(state_dict)
    keys = [key[len(prefix) :] for key in state_dict]
    if any(k.startswith("backbone.") for k in keys) and any(
        k.startswith(("neck.", "rpn_head.", "roi_head.")) for k in keys
    ):
        return "mmdet"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        if any(k.startswith("bn1.pbn.") for k in keys):  # the stem norm is a BCNorm with its batch step
            return "authors_bcn"
        return "torchvision" if any(k.endswith("running_mean") for k in keys) else "authors"
    return None
