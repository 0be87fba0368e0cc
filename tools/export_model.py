#!/usr/bin/env python
"""Export a ws_d2 model with WS folded into the weights (`fold_ws`): nothing from ws_d2 is needed to run it.

  python tools/export_model.py --config-file CFG --format weights|onnx|torchscript --output export/ \
      [--sample-image IMG] --opts MODEL.WEIGHTS model.pth

weights: export/model_stock.pth and .yaml, detectron2's stock GN model (`get_cfg`, `build_model`,
`DetectionCheckpointer` load it). onnx: export/model.onnx (onnxruntime alone); torchscript: export/model.ts
(torch + torchvision): `ws_d2.predictor.deployable_inference` traced on --sample-image (default: a synthetic
one; the graph does not depend on it), `deployment_info` inside (docs/DEMO_AND_EXPORT.md).
Exit status: 0 done, 1 refused or failed, 2 usage error.
"""

import argparse
import io
import json
import os
import sys

import ws_d2  # first: it patches what an older detectron2 needs before detectron2 is imported

# isort: split
import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter
from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, GeneralizedRCNN, PanopticFPN
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY
from detectron2.utils.logger import setup_logger

from ws_d2 import predictor
from ws_d2.errors import CheckpointError, ConfigError, command_line
from ws_d2.files import atomic_write, refuse_output_onto_inputs

DEPLOY_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
EXPORT_FORMATS = ("weights", *DEPLOY_FILES)
ONNX_OPSET = 17  # 16 is the first with RoiAlign's half-pixel (aligned) coordinates
# ws_d2 component -> the detectron2 component it wraps (same parameters and state_dict keys)
STOCK_NAMES = {
    "build_ws_resnet_backbone": "build_resnet_backbone",
    "build_ws_resnet_fpn_backbone": "build_resnet_fpn_backbone",
    "build_ws_retinanet_resnet_fpn_backbone": "build_retinanet_resnet_fpn_backbone",
    "WSRetinaNet": "RetinaNet",  # builds detectron2's RetinaNetHead with RETINANET.NORM (main; v0.6 refuses GN)
    "WSSemSegFPNHead": "SemSegFPNHead",
    "WSFastRCNNConvFCHead": "FastRCNNConvFCHead",
    "WSMaskRCNNConvUpsampleHead": "MaskRCNNConvUpsampleHead",
}
COMPONENT_KEYS = {  # (MODEL's child node, or "" for MODEL itself; key) -> registry
    ("", "META_ARCHITECTURE"): META_ARCH_REGISTRY,
    ("BACKBONE", "NAME"): BACKBONE_REGISTRY,
    ("ROI_HEADS", "NAME"): ROI_HEADS_REGISTRY,
    ("ROI_BOX_HEAD", "NAME"): ROI_BOX_HEAD_REGISTRY,
    ("ROI_MASK_HEAD", "NAME"): ROI_MASK_HEAD_REGISTRY,
    ("SEM_SEG_HEAD", "NAME"): SEM_SEG_HEADS_REGISTRY,
}


def stock_config(cfg):
    """`cfg` as detectron2's own config: stock component names, no key that get_cfg() lacks. BCN is refused:
    detectron2 has none, and its weights must not load into GN silently."""
    if cfg.MODEL.get("BCN") is not None and cfg.MODEL.BCN.ENABLED:
        raise ConfigError(
            "MODEL.BCN.ENABLED: detectron2 has no Batch-Channel Normalization layer, so a BCN+WS model has no "
            "stock twin to export to; run it with ws_d2 (fold_ws folds its WS and keeps BCN)"
        )
    stock = _known_keys_only(cfg, get_cfg())
    for (node_name, key), registry in COMPONENT_KEYS.items():
        node = stock.MODEL[node_name] if node_name else stock.MODEL
        name = node[key] = STOCK_NAMES.get(node[key], node[key])
        # a ws_d2 class, a subclass of one (a user's variant of a WS head), or a ws_d2 builder function
        component = registry.get(name) if name in registry else None
        if component and any(
            c.__module__.startswith("ws_d2") for c in getattr(component, "__mro__", [component])
        ):
            where = ".".join(filter(None, ("MODEL", node_name, key)))
            raise ConfigError(f"{where}={name} is a ws_d2 component with no stock twin")
    return stock


def _known_keys_only(cfg, reference):
    kept = reference.clone()
    kept.defrost()
    for key, value in cfg.items():
        if key in kept:
            kept[key] = _known_keys_only(value, kept[key]) if isinstance(value, type(cfg)) else value
    return kept


def export_stock_model(cfg, output_file):
    """`output_file` (.pth), WS folded, and its stock config beside it (.yaml) naming it as MODEL.WEIGHTS."""
    if not output_file.endswith(".pth"):
        raise CheckpointError(f"{output_file}: the exported checkpoint must be a .pth file")
    config_file = os.path.splitext(output_file)[0] + ".yaml"
    refuse_output_onto_inputs(output_file, [cfg.MODEL.WEIGHTS])
    refuse_output_onto_inputs(config_file, [cfg.MODEL.WEIGHTS], option="exported config")
    stock_cfg = stock_config(cfg)
    on_cpu = cfg.clone()  # folding needs no GPU; the exported config keeps the user's MODEL.DEVICE
    on_cpu.defrost()
    on_cpu.MODEL.DEVICE = "cpu"
    model = predictor.WSPredictor(on_cpu, fold=True, covering=True).model
    os.makedirs(os.path.dirname(output_file) or ".", exist_ok=True)
    with atomic_write(output_file) as f:
        state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        torch.save({"model": state, "__author__": "ws_d2 export: WS folded into the conv weights"}, f)
    stock_cfg.MODEL.WEIGHTS = output_file
    with atomic_write(config_file, "w") as f:
        f.write(stock_cfg.dump())
    return output_file, config_file


def sample_image(cfg, seed=0):
    """A BGR uint8 image of the test size, with a few flat rectangles for the RPN to find."""
    rng = np.random.default_rng(seed)
    height = cfg.INPUT.MIN_SIZE_TEST
    width = min(round(height * 4 / 3), max(cfg.INPUT.MAX_SIZE_TEST, height))
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[y : y + height // 3, x : x + width // 3] = rng.integers(0, 256, 3)
    return image


def export_deployable(cfg, output_dir, fmt, image=None):
    """Write `output_dir/model.ts` or `model.onnx`: the model of `cfg`, WS folded, traced on `image` (BGR
    uint8). Returns the file written."""
    if fmt not in DEPLOY_FILES:
        raise ConfigError(f"export format {fmt!r}: not one of {', '.join(DEPLOY_FILES)}")
    path = os.path.join(output_dir, DEPLOY_FILES[fmt])
    refuse_output_onto_inputs(path, [cfg.MODEL.WEIGHTS])
    model = predictor.WSPredictor(
        cfg, fold=True, covering=True
    ).model  # an export must not carry initial values
    # PanopticFPN is a GeneralizedRCNN whose semantic and panoptic outputs the graph does not carry
    if not isinstance(model, (GeneralizedRCNN, RetinaNet)) or isinstance(model, PanopticFPN):
        raise ConfigError(
            f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE}: only detectors (Faster, Mask and Cascade "
            "R-CNN, RetinaNet) are exported to TorchScript/ONNX, not semantic or panoptic outputs"
        )
    if cfg.MODEL.KEYPOINT_ON:
        raise ConfigError("MODEL.KEYPOINT_ON: keypoint outputs are not part of the exported graph")
    resized = predictor.resize_for_model(sample_image(cfg) if image is None else image, cfg)
    inputs = (torch.from_numpy(np.array(resized)).to(model.device),)
    adapter = TracingAdapter(model, inputs, predictor.deployable_inference)
    masks = cfg.MODEL.MASK_ON and not isinstance(model, RetinaNet)  # RetinaNet ignores MASK_ON
    output_names = list(predictor.DEPLOYED_OUTPUTS[: 4 if masks else 3])
    info = json.dumps(deployment_info(cfg, output_names))
    os.makedirs(output_dir, exist_ok=True)
    with predictor.tracing_quietly(), atomic_write(path) as f:
        if fmt == "torchscript":
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
            torch.jit.save(traced, f, _extra_files={"ws_d2.json": info})
        else:
            f.write(_onnx_bytes(adapter, output_names, info))
    return path


def deployment_info(cfg, output_names):
    """What a user of the exported file needs besides the graph: how to resize, what the outputs mean."""
    classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes") if cfg.DATASETS.TEST else None
    return {
        "input": f"{predictor.DEPLOYED_INPUT}: uint8 H x W x 3, BGR, 0-255, resized: shorter side "
        f"{cfg.INPUT.MIN_SIZE_TEST}, longer side at most {cfg.INPUT.MAX_SIZE_TEST}",
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "outputs": output_names,
        "score_threshold": predictor.score_threshold(cfg),
        "mask_threshold": 0.5,
        "thing_classes": list(classes) if classes else None,
    }


def _group_norm_any_batch(g, x, num_groups, weight, bias, eps, cudnn_enabled):
    """torch's ONNX group_norm with the reshape's size computed, not -1: onnxruntime cannot infer a -1 in an
    empty tensor, and the mask head gets an empty batch on an image without detections."""
    from torch.onnx.symbolic_helper import _get_const

    groups, epsilon = _get_const(num_groups, "i", "num_groups"), _get_const(eps, "f", "eps")
    dtype = torch.float32 if x.type().scalarType() == "Float" else torch.float64
    batch = g.op("Shape", x, start_i=0, end_i=1)
    per_sample = g.op("ReduceProd", g.op("Shape", x, start_i=1), keepdims_i=1)
    group_count = g.op("Constant", value_t=torch.tensor([groups]))
    grouped = g.op("Concat", batch, group_count, g.op("Div", per_sample, group_count), axis_i=0)
    ones = g.op("Constant", value_t=torch.ones(groups, dtype=dtype))
    zeros = g.op("Constant", value_t=torch.zeros(groups, dtype=dtype))
    normalized = g.op("InstanceNormalization", g.op("Reshape", x, grouped), ones, zeros, epsilon_f=epsilon)
    out = g.op("Reshape", normalized, g.op("Shape", x))
    per_channel = g.op("Constant", value_t=torch.tensor([-1] + [1] * (x.type().dim() - 2)))  # C x 1 x 1
    if not weight.node().mustBeNone():
        out = g.op("Mul", out, g.op("Reshape", weight, per_channel))
    if not bias.node().mustBeNone():
        out = g.op("Add", out, g.op("Reshape", bias, per_channel))
    return out


def _onnx_bytes(adapter, output_names, info):
    """The traced graph as ONNX, with `info` as its "ws_d2" metadata_props entry."""
    import onnx

    buffer = io.BytesIO()
    dynamic_axes = {name: {0: "detections"} for name in output_names}
    dynamic_axes[predictor.DEPLOYED_INPUT] = {0: "height", 1: "width"}
    # dynamo=False: the TorchScript-based exporter, as detectron2's models are traced, not torch.export-ed
    options = dict(
        input_names=[predictor.DEPLOYED_INPUT], output_names=output_names, dynamic_axes=dynamic_axes
    )
    options.update(opset_version=ONNX_OPSET, dynamo=False)
    torch.onnx.register_custom_op_symbolic("aten::group_norm", _group_norm_any_batch, ONNX_OPSET)
    try:
        torch.onnx.export(adapter, adapter.flattened_inputs, buffer, **options)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::group_norm", ONNX_OPSET)
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = "ws_d2", info
    return proto.SerializeToString()


def get_parser():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="ws_d2 model config (yaml)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="weights", help="default: weights")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder (weights: or a FILE.pth)")
    parser.add_argument("--sample-image", metavar="IMG", help="image to trace with (torchscript, onnx)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="overrides: KEY VALUE ...")
    return parser


@command_line("export_model")
def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.sample_image and args.format == "weights":
        parser.error("--sample-image is for --format torchscript or onnx")
    setup_logger(name="fvcore")
    setup_logger()
    for output in (args.output, os.path.splitext(args.output)[0] + ".yaml"):
        refuse_output_onto_inputs(output, [args.config_file])
    cfg = ws_d2.load_config(args.config_file, args.opts)
    image = read_image(args.sample_image, format="BGR") if args.sample_image else None
    # weights: an --output with an extension names the .pth itself; the graphs go into a folder
    named_file = os.path.splitext(args.output.rstrip("/" + os.sep))[1]
    if args.format == "weights":
        output = args.output if named_file else os.path.join(args.output, "model_stock.pth")
        written = export_stock_model(cfg, output)
    elif named_file:
        raise ConfigError(f"{args.output}: --output is the folder to write {DEPLOY_FILES[args.format]} into")
    else:
        written = [export_deployable(cfg, args.output, args.format, image)]
    print(f"wrote {' and '.join(written)} ({args.format}, WS folded into the weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
