"""Frames in, annotated frames out: video files, cameras, or any iterable of BGR frames."""

import contextlib
import os

import cv2
from detectron2.utils.video_visualizer import VideoVisualizer

__all__ = [
    "CameraUnavailableError",
    "annotate_frames",
    "iter_frames",
    "open_camera",
    "open_video_file",
    "open_video_writer",
    "video_output_path",
]

# What this OpenCV build can write without extra codecs (H.264 needs a hardware or GPL encoder).
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}


class CameraUnavailableError(RuntimeError):
    """No camera could be opened."""


def iter_frames(source):
    """BGR frames from a capture object (anything with `read() -> (ok, frame)`, e.g. cv2.VideoCapture)
    or from any iterable of frames."""
    if hasattr(source, "read"):
        while True:
            ok, frame = source.read()
            if not ok:
                return
            yield frame
    else:
        yield from source


def annotate_frames(predictor, frames, metadata):
    """Run `predictor` on each BGR frame and yield it with the predictions drawn (BGR).

    detectron2's VideoVisualizer keeps an instance's color stable from frame to frame.
    """
    visualizer = VideoVisualizer(metadata)
    for frame in frames:
        predictions = predictor(frame)
        drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], predictions["instances"].to("cpu"))
        yield drawn.get_image()[:, :, ::-1]


def open_video_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"{path}: OpenCV cannot read this video")
    return capture


def video_output_path(output, source_name):
    """`output` itself when it names a .mp4/.avi file; `<output>/<source stem>.mp4` when it is a folder
    (existing, ending with a separator, or without extension; created); None without output."""
    if not output:
        return None
    if os.path.isdir(output) or output.endswith(("/", os.sep)) or not os.path.splitext(output)[1]:
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.splitext(os.path.basename(source_name))[0] + ".mp4")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    return output


def open_camera(index=0, capture_factory=None):
    """cv2.VideoCapture(index), or `capture_factory(index)`; raises CameraUnavailableError if it is closed."""
    with _opencv_log_silenced():  # OpenCV logs several lines per backend that fails to find a camera
        capture = (capture_factory or cv2.VideoCapture)(index)
    if not capture.isOpened():
        raise CameraUnavailableError(f"no camera found: cv2.VideoCapture({index}) did not open")
    return capture


@contextlib.contextmanager
def _opencv_log_silenced():
    log = getattr(getattr(cv2, "utils", None), "logging", None)
    if log is None:
        yield
        return
    level = log.getLogLevel()
    log.setLogLevel(log.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        log.setLogLevel(level)


def open_video_writer(path, fps, frame_size):
    """A cv2.VideoWriter for `path` (.mp4 or .avi), frame_size = (width, height)."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in VIDEO_CODECS:
        raise ValueError(f"{path}: video output must end in {' or '.join(VIDEO_CODECS)}")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*VIDEO_CODECS[extension]), fps, frame_size, True)
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write this video file")
    return writer
