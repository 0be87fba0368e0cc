"""Deployment: a ws_d2 model as detectron2's stock GN model, as TorchScript, or as ONNX.

WS is a pure function of the weights, so `fold_ws` gives every WS conv W_hat = standardize(W): the outputs are
the same, and the state_dict loads into the stock GN model that detectron2 alone builds from `stock_config`.
The folded model traced through detectron2's `TracingAdapter` runs without ws_d2: `model.ts` (torch +
torchvision) or `model.onnx` (onnxruntime alone), on a resized BGR uint8 image; the graph's contract is in
docs/DEMO_AND_EXPORT.md, and `ws_d2.predictor.DeployedPredictor` resizes before it and pastes masks after it.
"""

import io
import json
import os

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.export import TracingAdapter
from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, GeneralizedRCNN, PanopticFPN
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY

from .errors import CheckpointError, ConfigError
from .files import atomic_write, refuse_output_onto_inputs
from .predictor import (
    DEPLOYED_INPUT,
    DEPLOYED_OUTPUTS,
    WSPredictor,
    resize_for_model,
    score_threshold,
    tracing_quietly,
)

__all__ = ["EXPORT_FORMATS", "export_deployable", "export_stock_model", "stock_config"]

DEPLOY_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
EXPORT_FORMATS = ("weights", *DEPLOY_FILES)  # weights: detectron2's stock GN model (export_stock_model)
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
    """`cfg` as detectron2's own config: stock component names, no key that get_cfg() lacks. A BCN model is
    refused: detectron2 has no Batch-Channel Normalization, and its weights must not load into GN silently."""
    bcn = cfg.MODEL.get("BCN")
    if bcn is not None and bcn.ENABLED:
        raise ConfigError(
            "MODEL.BCN.ENABLED: detectron2 has no Batch-Channel Normalization layer, so a BCN+WS model has no "
            "stock twin to export to; run it with ws_d2 (fold_ws folds its WS and keeps BCN)"
        )
    stock = _known_keys_only(cfg, get_cfg())
    for (node_name, key), registry in COMPONENT_KEYS.items():
        node = stock.MODEL[node_name] if node_name else stock.MODEL
        name = node[key] = STOCK_NAMES.get(node[key], node[key])
        if name in registry and _comes_from_ws_d2(registry.get(name)):
            where = ".".join(filter(None, ("MODEL", node_name, key)))
            raise ConfigError(f"{where}={name} is a ws_d2 component with no stock twin")
    return stock


def export_stock_model(cfg, output_file):
    """The model of `cfg` with WS folded as `output_file` (.pth) and its stock config beside it (.yaml) naming
    it as MODEL.WEIGHTS. Returns (checkpoint, config file)."""
    if not output_file.endswith(".pth"):
        raise CheckpointError(f"{output_file}: the exported checkpoint must be a .pth file")
    config_file = os.path.splitext(output_file)[0] + ".yaml"
    refuse_output_onto_inputs(output_file, [cfg.MODEL.WEIGHTS])
    refuse_output_onto_inputs(config_file, [cfg.MODEL.WEIGHTS], option="exported config")
    stock_cfg = stock_config(cfg)
    on_cpu = cfg.clone()  # folding needs no GPU; the exported config keeps the user's MODEL.DEVICE
    on_cpu.defrost()
    on_cpu.MODEL.DEVICE = "cpu"
    model = WSPredictor(on_cpu, fold=True, covering=True).model
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}

    os.makedirs(os.path.dirname(output_file) or ".", exist_ok=True)
    with atomic_write(output_file) as f:
        torch.save({"model": state, "__author__": "ws_d2 export: WS folded into the conv weights"}, f)
    stock_cfg.MODEL.WEIGHTS = output_file
    with atomic_write(config_file, "w") as f:
        f.write(stock_cfg.dump())
    return output_file, config_file


def _comes_from_ws_d2(component):
    # a ws_d2 class, a subclass of one (e.g. a user's variant of a WS head), or a ws_d2 builder function
    return any(c.__module__.startswith("ws_d2") for c in getattr(component, "__mro__", [component]))


def _known_keys_only(cfg, reference):
    kept = reference.clone()
    kept.defrost()
    for key, value in cfg.items():
        if key in kept:
            kept[key] = _known_keys_only(value, kept[key]) if isinstance(value, type(cfg)) else value
    return kept


def deployable_inference(model, image):
    """What the exported graph computes, as a tuple of tensors: R-CNN's stops before its postprocessing (mask
    pasting is not traceable), as detectron2's own export does; RetinaNet's, at the input's own size, only clips."""
    chw = image.permute(2, 0, 1).float()
    if model.input_format == "RGB":
        chw = chw.flip(0)
    if isinstance(model, RetinaNet):
        instances = model([{"image": chw}])[0]["instances"]
    else:
        instances = model.inference([{"image": chw}], do_postprocess=False)[0]
    outputs = (instances.pred_boxes.tensor, instances.scores, instances.pred_classes)
    if instances.has("pred_masks"):
        outputs += (instances.pred_masks[:, 0],)  # N x 1 x M x M -> N x M x M
    return outputs


def sample_image(cfg, seed=0):
    """A BGR uint8 image of the test size to trace with: tracing records the ops, not the values."""
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
    uint8), with `deployment_info` inside (`ws_d2.json` / metadata_props). Returns the file written."""
    if fmt not in DEPLOY_FILES:
        raise ConfigError(f"export format {fmt!r}: not one of {', '.join(DEPLOY_FILES)}")
    path = os.path.join(output_dir, DEPLOY_FILES[fmt])
    refuse_output_onto_inputs(path, [cfg.MODEL.WEIGHTS])
    model = WSPredictor(cfg, fold=True, covering=True).model  # an export must not carry initial values
    # PanopticFPN is a GeneralizedRCNN whose semantic and panoptic outputs the graph does not carry
    if not isinstance(model, (GeneralizedRCNN, RetinaNet)) or isinstance(model, PanopticFPN):
        raise ConfigError(
            f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE}: only detectors (Faster, Mask and Cascade "
            "R-CNN, RetinaNet) are exported to TorchScript/ONNX, not semantic or panoptic outputs"
        )
    if cfg.MODEL.KEYPOINT_ON:
        raise ConfigError("MODEL.KEYPOINT_ON: keypoint outputs are not part of the exported graph")
    resized = resize_for_model(sample_image(cfg) if image is None else image, cfg)
    adapter = TracingAdapter(model, (torch.from_numpy(np.array(resized)).to(model.device),),
                             deployable_inference)  # fmt: skip
    masks = cfg.MODEL.MASK_ON and not isinstance(model, RetinaNet)  # RetinaNet ignores MASK_ON
    output_names = list(DEPLOYED_OUTPUTS[: 4 if masks else 3])
    info = json.dumps(deployment_info(cfg, output_names))
    os.makedirs(output_dir, exist_ok=True)
    with tracing_quietly():
        if fmt == "torchscript":
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
            with atomic_write(path) as f:
                torch.jit.save(traced, f, _extra_files={"ws_d2.json": info})
        else:
            with atomic_write(path) as f:
                f.write(_onnx_bytes(adapter, output_names, info))
    return path


def deployment_info(cfg, output_names):
    """What a user of the exported file needs besides the graph: how to resize, what the outputs mean."""
    classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes") if cfg.DATASETS.TEST else None
    return {
        "input": f"{DEPLOYED_INPUT}: uint8 H x W x 3, BGR, 0-255, resized: shorter side "
        f"{cfg.INPUT.MIN_SIZE_TEST}, longer side at most {cfg.INPUT.MAX_SIZE_TEST}",
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "outputs": output_names,
        "score_threshold": score_threshold(cfg),
        "mask_threshold": 0.5,
        "thing_classes": list(classes) if classes else None,
    }


def _group_norm_any_batch(g, x, num_groups, weight, bias, eps, cudnn_enabled):
    """torch's ONNX group_norm, except that the reshape's size is computed, not -1: onnxruntime cannot infer
    a -1 in an empty tensor, and the mask head gets an empty batch on an image without detections."""
    from torch.onnx.symbolic_helper import _get_const

    groups = _get_const(num_groups, "i", "num_groups")
    epsilon = _get_const(eps, "f", "eps")
    dtype = torch.float32 if x.type().scalarType() == "Float" else torch.float64
    shape = g.op("Shape", x)
    batch = g.op("Shape", x, start_i=0, end_i=1)
    per_sample = g.op("ReduceProd", g.op("Shape", x, start_i=1), keepdims_i=1)
    group_count = g.op("Constant", value_t=torch.tensor([groups]))
    grouped = g.op("Concat", batch, group_count, g.op("Div", per_sample, group_count), axis_i=0)
    ones = g.op("Constant", value_t=torch.ones(groups, dtype=dtype))
    zeros = g.op("Constant", value_t=torch.zeros(groups, dtype=dtype))
    normalized = g.op("InstanceNormalization", g.op("Reshape", x, grouped), ones, zeros, epsilon_f=epsilon)
    out = g.op("Reshape", normalized, shape)
    rank = x.type().dim()
    per_channel = g.op("Constant", value_t=torch.tensor([-1] + [1] * (rank - 2)))  # C x 1 x 1
    if not weight.node().mustBeNone():
        out = g.op("Mul", out, g.op("Reshape", weight, per_channel))
    if not bias.node().mustBeNone():
        out = g.op("Add", out, g.op("Reshape", bias, per_channel))
    return out


def _onnx_bytes(adapter, output_names, info):
    """The traced graph as ONNX, with `info` as its "ws_d2" metadata_props entry."""
    import onnx

    buffer = io.BytesIO()
    dynamic_axes = {DEPLOYED_INPUT: {0: "height", 1: "width"}}
    dynamic_axes.update({name: {0: "detections"} for name in output_names})
    torch.onnx.register_custom_op_symbolic("aten::group_norm", _group_norm_any_batch, ONNX_OPSET)
    names = {"input_names": [DEPLOYED_INPUT], "output_names": output_names, "dynamic_axes": dynamic_axes}
    try:  # dynamo=False: the TorchScript-based exporter, as detectron2's models are traced, not torch.export-ed
        torch.onnx.export(
            adapter, adapter.flattened_inputs, buffer, **names, opset_version=ONNX_OPSET, dynamo=False
        )
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::group_norm", ONNX_OPSET)
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = "ws_d2", info
    return proto.SerializeToString()
