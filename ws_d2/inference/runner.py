"""The demo's loops: a predictor over image files or a frame stream, drawing, saving, showing, scoring.

A bad input never stops a run: it is logged in one line naming the file and counted in the result.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import cv2

from .coco_results import instances_to_coco_results
from .image_io import UnreadableImageError, read_image_bgr
from .video import annotate_frames, iter_frames, open_video_writer
from .visualize import draw_predictions

__all__ = [
    "ImageRunResult",
    "has_display",
    "image_output_path",
    "run_on_images",
    "run_on_stream",
    "write_coco_results",
]

logger = logging.getLogger(__name__)
WINDOW_NAME = "ws_d2 demo"
ESC = 27


@dataclass
class ImageRunResult:
    done: list = field(default_factory=list)  # input paths processed
    failed: list = field(default_factory=list)  # one-line messages, each naming its input
    coco_results: list = field(default_factory=list)


def has_display():
    """Whether an OpenCV window can be shown (on Linux: an X11 or Wayland display is set)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def image_output_path(output, input_path, several_inputs):
    """Where the drawing of `input_path` goes: `output` itself when it names a file and there is one
    input; inside `output` (created) when it is a folder, ends with a separator, or there are several."""
    if several_inputs or os.path.isdir(output) or output.endswith(("/", os.sep)):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.basename(input_path))
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    return output


def run_on_images(predictor, paths, metadata, output=None, show=False, image_ids=None, category_ids=None):
    """Predict, draw and save (to `output`) or show each image; with `image_ids` ({path: COCO id})
    also collect COCO-format results (category ids mapped by `category_ids`, see category_ids_for).
    Returns an ImageRunResult."""
    result = ImageRunResult()
    written = set()
    for path in paths:
        try:
            image = read_image_bgr(path)
        except UnreadableImageError as e:
            logger.warning("skipped %s", e)
            result.failed.append(str(e))
            continue
        predictions = predictor(image)
        instances = predictions["instances"]
        logger.info("%s: %d instances", path, len(instances))
        if image_ids is not None:
            result.coco_results.extend(instances_to_coco_results(instances, image_ids[path], category_ids))
        if output or show:
            drawing_bgr = draw_predictions(image[:, :, ::-1], predictions, metadata)[:, :, ::-1]
        if output:
            target = _unique(image_output_path(output, path, len(paths) > 1), written)
            if not cv2.imwrite(target, drawing_bgr):
                message = f"{target}: cannot write the drawing of {path} (unsupported image extension?)"
                logger.warning("skipped %s", message)
                result.failed.append(message)
                continue
            written.add(target)
        if show:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, drawing_bgr)
            if cv2.waitKey(0) == ESC:
                break
        result.done.append(path)
    return result


def run_on_stream(predictor, source, metadata, output=None, fps=30.0, show=False, max_frames=None):
    """Annotate the frames of `source` (a capture object or an iterable of BGR frames), writing them
    to the video file `output` (.mp4/.avi) and/or showing them (ESC stops). Returns the frame count."""
    frames = iter_frames(source)
    if max_frames is not None:
        frames = (frame for _, frame in zip(range(max_frames), frames))
    writer, count = None, 0
    try:
        for drawn in annotate_frames(predictor, frames, metadata):
            if output:
                if writer is None:
                    height, width = drawn.shape[:2]
                    writer = open_video_writer(output, fps, (width, height))
                writer.write(drawn)
            count += 1
            if show:
                cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
                cv2.imshow(WINDOW_NAME, drawn)
                if cv2.waitKey(1) == ESC:
                    break
    finally:
        if writer is not None:
            writer.release()
        if show:
            cv2.destroyAllWindows()
    return count


def write_coco_results(results, json_file):
    os.makedirs(os.path.dirname(json_file) or ".", exist_ok=True)
    with open(json_file, "w") as f:
        json.dump(results, f)
    if not results:
        # pycocotools' loadRes cannot read an empty list: say so rather than fail later.
        logger.warning(
            "%s: no predictions above the threshold; pycocotools cannot load an empty list", json_file
        )


def _unique(path, taken):
    # Two inputs with the same base name (from different folders) must not overwrite each other.
    stem, extension = os.path.splitext(path)
    candidate, n = path, 1
    while candidate in taken:
        candidate, n = f"{stem}_{n}{extension}", n + 1
    return candidate
