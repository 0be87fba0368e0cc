"""Drawing predictions (boxes, masks, class names, scores) with detectron2's Visualizer."""

import numpy as np
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_predictions"]


def draw_predictions(image_rgb: np.ndarray, predictions: dict, metadata, instance_mode=ColorMode.IMAGE):
    """An RGB uint8 image of the same size with `predictions["instances"]` drawn on `image_rgb`.

    Class names and colors come from `metadata` (thing_classes / thing_colors); without them the
    Visualizer labels instances by class index.
    """
    visualizer = Visualizer(image_rgb, metadata, instance_mode=instance_mode)
    if "instances" not in predictions:
        raise ValueError(f"no 'instances' in the model output (keys: {sorted(predictions)})")
    return visualizer.draw_instance_predictions(predictions["instances"].to("cpu")).get_image()
