"""Inference: detectron2's DefaultPredictor with safely loaded weights, and its predictions drawn."""

import os

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from .checkpoint import WSCheckpointer
from .config import check_device
from .errors import CheckpointError, ConfigError
from .modeling import fold_ws

__all__ = ["VisualizationDemo", "WSPredictor"]


class WSPredictor(DefaultPredictor):
    """detectron2's DefaultPredictor whose weights are read by WSCheckpointer.

    Calling it is DefaultPredictor's `__call__`: a BGR uint8 image in, the model's output dict out
    (resized to INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST and fed in INPUT.FORMAT). DefaultPredictor's own
    constructor is not used: it would load MODEL.WEIGHTS with DetectionCheckpointer, which unpickles
    files without restriction. `fold=True` replaces every WS conv by a plain conv holding its
    standardized weight: the outputs are the same. `covering=True` refuses (CheckpointError) weights
    that leave any model tensor at its initial value, as an export must.
    """

    def __init__(self, cfg, fold=False, covering=False):
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ConfigError(f"INPUT.FORMAT={cfg.INPUT.FORMAT}: a predictor takes RGB or BGR input")
        check_device(cfg)
        weights = cfg.MODEL.WEIGHTS
        # checked before building the model; fvcore would fail later with a bare assertion
        if weights and "://" not in weights and not os.path.isfile(weights):
            raise CheckpointError(f"MODEL.WEIGHTS file not found: {weights}")
        self.cfg = cfg.clone()  # the model may change its config
        self.model = build_model(self.cfg).eval()
        if weights:
            checkpointer = WSCheckpointer(self.model, config=self.cfg)
            if covering:
                checkpointer.load_covering(weights)
            else:
                checkpointer.load(weights)
        if fold:
            fold_ws(self.model)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        # class names and colors for drawing, COCO category ids for results
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else Metadata()


class VisualizationDemo:
    """A predictor's instances drawn by detectron2's Visualizer (an image) or VideoVisualizer (frames of a
    video, where an instance keeps its color from one frame to the next). Class names and colors come from
    `predictor.metadata`."""

    def __init__(self, predictor, instance_mode=ColorMode.IMAGE):
        self.predictor = predictor
        self.metadata = getattr(predictor, "metadata", None) or Metadata()
        self.instance_mode = instance_mode

    def run_on_image(self, image_bgr):
        """(predictions, an RGB uint8 image of the same size with the predicted instances drawn)."""
        predictions = self.predictor(image_bgr)
        visualizer = Visualizer(image_bgr[:, :, ::-1], self.metadata, instance_mode=self.instance_mode)
        return predictions, visualizer.draw_instance_predictions(_instances(predictions)).get_image()

    def run_on_video(self, frames):
        """For each BGR frame of `frames`, yield (predictions, the frame with its instances drawn, BGR).

        `frames` is a capture object (anything with `read() -> (ok, frame)`, e.g. cv2.VideoCapture, read
        until it returns no frame) or any iterable of BGR frames.
        """
        visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        for frame in _read_all(frames) if hasattr(frames, "read") else frames:
            predictions = self.predictor(frame)
            drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], _instances(predictions))
            yield predictions, drawn.get_image()[:, :, ::-1]


def _read_all(capture):
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def _instances(predictions):
    if "instances" not in predictions:
        raise ConfigError(f"the model outputs no 'instances' to draw (its outputs: {sorted(predictions)})")
    return predictions["instances"].to("cpu")
