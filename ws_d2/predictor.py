"""Inference: detectron2's DefaultPredictor with safely loaded weights; what an exported graph computes and its
runner; their predictions drawn."""

import contextlib
import json
import os
import warnings

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet, build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from .checkpoint import WSCheckpointer
from .config import check_device
from .errors import ConfigError, one_line
from .files import require_weights_file
from .modeling import fold_ws

__all__ = [
    "DeployedPredictor",
    "VisualizationDemo",
    "WSPredictor",
    "deployable_inference",
    "resize_for_model",
]

DEPLOYED_INPUT = "image"  # the exported graph's input and outputs (docs/DEMO_AND_EXPORT.md)
DEPLOYED_OUTPUTS = ("boxes", "scores", "classes", "masks")  # "masks" for mask models only


def resize_for_model(image, cfg):
    """`image` (H x W x C) resized as the predictor does at test time (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST)."""
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    return resize.get_transform(image).apply_image(image)


def score_threshold(cfg):
    """The score a detection must exceed: RetinaNet's own key, or R-CNN's."""
    dense = issubclass(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), RetinaNet)
    return (cfg.MODEL.RETINANET if dense else cfg.MODEL.ROI_HEADS).SCORE_THRESH_TEST


def deployable_inference(model, image):
    """What the exported graph computes from a resized BGR uint8 image, as a tuple of tensors: R-CNN's stops before
    its postprocessing (mask pasting is not traceable), as detectron2's own export does; RetinaNet's only clips."""
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


def _test_metadata(cfg):
    # class names and colors for drawing, COCO category ids for results
    return MetadataCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else Metadata()


class WSPredictor(DefaultPredictor):
    """detectron2's DefaultPredictor (same `__call__`) whose weights WSCheckpointer reads: DefaultPredictor's
    constructor would unpickle MODEL.WEIGHTS without restriction. `fold=True` folds WS into plain convs (the
    same outputs); `covering=True` refuses weights that leave any model tensor at its initial value (exports)."""

    def __init__(self, cfg, fold=False, covering=False):
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ConfigError(f"INPUT.FORMAT={cfg.INPUT.FORMAT}: a predictor takes RGB or BGR input")
        check_device(cfg)
        weights = cfg.MODEL.WEIGHTS
        if covering and not weights:
            raise ConfigError("MODEL.WEIGHTS is empty: there are no trained weights to export")
        require_weights_file(weights)  # before the model is built
        self.cfg = cfg.clone()  # the model may change its config
        self.model = build_model(self.cfg).eval()
        if weights:
            checkpointer = WSCheckpointer(self.model)
            (checkpointer.load_covering if covering else checkpointer.load)(weights)
        if fold:
            fold_ws(self.model)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        self.metadata = _test_metadata(cfg)


class DeployedPredictor:
    """An exported `model.onnx` (onnxruntime) or `model.ts` (TorchScript) used as WSPredictor is: it resizes
    before the graph and runs detectron2's `detector_postprocess` after. `cfg` is the exported model's."""

    def __init__(self, cfg, model_file):
        if not os.path.isfile(model_file):
            raise ConfigError(f"{model_file}: no such exported model file")
        self.cfg = cfg.clone()
        self.device = cfg.MODEL.DEVICE
        if model_file.endswith(".onnx"):
            self._run = _onnxruntime_runner(model_file, self.device)
        elif model_file.endswith(".ts"):
            self._run = _torchscript_runner(model_file, self.device)
        else:
            raise ConfigError(f"{model_file}: an exported model is a .onnx or a .ts file")
        self.metadata = _test_metadata(cfg)

    def __call__(self, image_bgr):
        height, width = image_bgr.shape[:2]
        resized = np.array(resize_for_model(image_bgr, self.cfg))  # a writable copy
        outputs = {name: torch.as_tensor(value) for name, value in self._run(resized).items()}
        # a threshold above the exported one gives the eager model's result: NMS keeps the same top scores
        keep = outputs["scores"] > score_threshold(self.cfg)
        outputs = {name: value[keep] for name, value in outputs.items()}
        boxes, scores, classes = Boxes(outputs["boxes"]), outputs["scores"], outputs["classes"]
        instances = Instances(resized.shape[:2], pred_boxes=boxes, scores=scores, pred_classes=classes)
        if "masks" in outputs:
            instances.pred_masks = outputs["masks"][:, None]  # N x 1 x M x M, as the eager model gives them
        return {"instances": detector_postprocess(instances, height, width)}


def _onnxruntime_runner(model_file, device):
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = onnxruntime.InferenceSession(model_file, providers=providers)
    except Exception as e:  # onnxruntime's own exception types, e.g. for a file that is not ONNX
        raise ConfigError(f"{model_file}: onnxruntime cannot load it ({one_line(e)})") from None
    names = [output.name for output in session.get_outputs()]
    return lambda image: dict(zip(names, session.run(None, {DEPLOYED_INPUT: image})))


def _torchscript_runner(model_file, device):
    import torchvision  # noqa: F401  (registers the torchvision::nms / roi_align ops the graph calls)

    extra_files = {"ws_d2.json": ""}
    try:
        with tracing_quietly():
            module = torch.jit.load(model_file, map_location=device, _extra_files=extra_files)
    except RuntimeError as e:
        raise ConfigError(f"{model_file}: TorchScript cannot load it ({one_line(e)})") from None
    if not extra_files["ws_d2.json"]:
        raise ConfigError(f"{model_file}: not a model written by ws_d2's export (no ws_d2.json inside)")
    names = json.loads(extra_files["ws_d2.json"])["outputs"]

    def run(image):
        with torch.no_grad():
            return dict(zip(names, module(torch.from_numpy(image).to(device))))

    return run


@contextlib.contextmanager
def tracing_quietly():
    """Silence what tracing detectron2's model always prints and does not apply to it (its shape logic is
    trace-safe; it indexes with nonzero() and arange() results only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", r"Exporting aten::index operator of advanced indexing", UserWarning)
        yield


class VisualizationDemo:
    """A predictor's output drawn by detectron2's Visualizer, or its VideoVisualizer for frames, as detectron2's
    demo draws it: panoptic segments, else instances (boxes, masks), else the semantic map (its argmax)."""

    def __init__(self, predictor, instance_mode=ColorMode.IMAGE):
        self.predictor = predictor
        self.metadata = getattr(predictor, "metadata", None) or Metadata()
        self.instance_mode = instance_mode

    def run_on_image(self, image_bgr):
        """(predictions, an RGB uint8 image of the same size with the predictions drawn)."""
        predictions = self.predictor(image_bgr)
        visualizer = Visualizer(image_bgr[:, :, ::-1], self.metadata, instance_mode=self.instance_mode)
        return predictions, _draw(predictions, visualizer).get_image()

    def run_on_video(self, frames):
        """(predictions, the frame drawn, BGR) for each BGR frame of a capture (`read()`) or an iterable."""
        visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        for frame in _read_all(frames) if hasattr(frames, "read") else frames:
            predictions = self.predictor(frame)
            drawn = _draw(predictions, visualizer, frame[:, :, ::-1])
            yield predictions, drawn.get_image()[:, :, ::-1]


def _read_all(capture):
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def _draw(predictions, visualizer, *frame):
    # Visualizer draws on the image it holds, VideoVisualizer on the `frame` passed (same names but panoptic's)
    if "panoptic_seg" in predictions:
        segments, segments_info = predictions["panoptic_seg"]
        draw = getattr(visualizer, "draw_panoptic_seg", None) or visualizer.draw_panoptic_seg_predictions
        return draw(*frame, segments.to("cpu"), segments_info)
    if "instances" in predictions:
        return visualizer.draw_instance_predictions(*frame, predictions["instances"].to("cpu"))
    if "sem_seg" in predictions:
        return visualizer.draw_sem_seg(*frame, predictions["sem_seg"].argmax(dim=0).to("cpu"))
    raise ConfigError(f"the model outputs nothing to draw (its outputs: {sorted(predictions)})")
