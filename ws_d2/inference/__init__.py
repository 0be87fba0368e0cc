"""Inference with ws_d2 models: the predictor, image and video I/O, drawing, COCO results, WS-free export."""

from .coco_results import (
    assign_image_ids,
    category_ids_for,
    image_ids_from_coco_annotations,
    instances_to_coco_results,
)
from .export import STOCK_NAMES, export_stock_model, stock_config, to_stock_model
from .image_io import UnreadableImageError, expand_inputs, read_image_bgr
from .predictor import WSPredictor, check_weights_file, load_inference_cfg, metadata_for
from .runner import ImageRunResult, has_display, run_on_images, run_on_stream, write_coco_results
from .video import (
    CameraUnavailableError,
    annotate_frames,
    iter_frames,
    open_camera,
    open_video_file,
    open_video_writer,
    video_output_path,
)
from .visualize import draw_predictions

__all__ = [
    "STOCK_NAMES",
    "CameraUnavailableError",
    "ImageRunResult",
    "UnreadableImageError",
    "WSPredictor",
    "annotate_frames",
    "assign_image_ids",
    "category_ids_for",
    "check_weights_file",
    "draw_predictions",
    "expand_inputs",
    "export_stock_model",
    "has_display",
    "image_ids_from_coco_annotations",
    "instances_to_coco_results",
    "iter_frames",
    "load_inference_cfg",
    "metadata_for",
    "open_camera",
    "open_video_file",
    "open_video_writer",
    "read_image_bgr",
    "run_on_images",
    "run_on_stream",
    "stock_config",
    "to_stock_model",
    "video_output_path",
    "write_coco_results",
]
