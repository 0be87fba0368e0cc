#!/usr/bin/env python
"""Draw a ws_d2 (or any detectron2) model's predictions on images, a video or the webcam.

  python tools/demo.py --config-file CFG --input a.jpg photos/ 'shots/*.png' --output out/ \\
      --opts MODEL.WEIGHTS model.pth
  python tools/demo.py --config-file CFG --video-input clip.mp4 --output drawn.mp4 --opts ...
  python tools/demo.py --config-file CFG --webcam [--output cam.avi] [--max-frames N] --opts ...

Without --output the drawings are shown in a window (ESC quits). Exit status: 0 done, 1 an input failed or
was refused (each named in one line), 2 usage error. More: docs/DEMO_AND_EXPORT.md.
"""

import argparse
import contextlib
import glob
import itertools
import logging
import os
import sys

import ws_d2  # first: it patches what an older detectron2 needs before detectron2 is imported

# isort: split
import cv2
import numpy as np
from detectron2.data.detection_utils import read_image
from PIL import Image, UnidentifiedImageError

from ws_d2.errors import WSD2Error, command_line, one_line
from ws_d2.files import atomic_output_path, atomic_write, refuse_output_onto_inputs
from ws_d2.predictor import DeployedPredictor, VisualizationDemo, WSPredictor

# A folder is searched for these; a file named or globbed is tried whatever its name, so that it is reported.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}  # what OpenCV writes without extra codecs
WINDOW_NAME, ESC = "ws_d2 demo", 27
logger = logging.getLogger("demo")


class UnreadableImageError(WSD2Error):
    """An input that is missing or not a decodable image, or a drawing that cannot be written: named first."""


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--config-file", required=True, metavar="FILE", help="model config (yaml)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH", help="image files, folders or globs")
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0")
    add("--output", metavar="PATH", help="a folder, or a file for one image or a video (.mp4, .avi)")
    add("--confidence-threshold", type=float, default=0.5, help="minimum score to keep")
    add("--max-frames", type=int, metavar="N", help="stop a video or webcam after N frames")
    add("--fold-ws", action="store_true", help="fold WS into the conv weights (same outputs)")
    add("--onnx", metavar="FILE", help="run this model.onnx (tools/export_model.py) instead")
    add("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def setup_logging():
    """Progress (the demo's, detectron2's, fvcore's) on stdout; each problem as one plain line on stderr."""
    progress, problems = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems.setLevel(logging.WARNING)
    for named in map(logging.getLogger, ("demo", "detectron2", "fvcore")):
        named.handlers, named.propagate = [progress, problems], False
        named.setLevel(logging.INFO)


def expand_inputs(patterns):
    """(image paths, one-line problems) of files, folders (their images, sorted) and globs."""
    paths, problems = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(glob.escape(pattern), "*")))
            found = [p for p in found if p.lower().endswith(IMAGE_EXTENSIONS)]
            missing = f"{pattern}: folder contains no image files ({', '.join(IMAGE_EXTENSIONS)})"
        else:
            found = [pattern] if os.path.exists(pattern) else sorted(glob.glob(os.path.expanduser(pattern)))
            missing = f"{pattern}: no such file, folder or matching glob"
        found = [p for p in found if os.path.isfile(p)]
        problems += [] if found else [missing]
        paths += [p for p in found if p not in paths]
    return paths, problems


def read_image_bgr(path):
    """An H x W x 3 uint8 BGR image: detectron2's read_image (EXIF orientation; gray, palette, RGBA), except
    16-bit gray, scaled to 8 bits where PIL's RGB conversion would clip it to white."""
    try:
        with Image.open(path) as image:
            mode, wide = image.mode, np.asarray(image) if image.mode.startswith("I") else None
        if mode == "F":
            raise ValueError("floating-point pixels: convert it to an 8- or 16-bit image")
        if wide is None:
            return np.ascontiguousarray(read_image(path, format="BGR"))
        if wide.min() < 0 or wide.max() > 65535:
            raise ValueError(f"{mode} pixels outside 0..65535: not a 16-bit image")
        return np.repeat(np.round(wide / 257).astype(np.uint8)[:, :, None], 3, axis=2)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = getattr(e, "strerror", None) or one_line(e)  # a missing or truncated file is an OSError
        if isinstance(e, UnidentifiedImageError):
            reason = "not an image format PIL can decode"
        raise UnreadableImageError(
            f"{path}: cannot read as an image ({type(e).__name__}: {reason})"
        ) from None


def show(drawn_bgr, wait_ms):
    """Show a drawing in the window; False when the user pressed ESC."""
    cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
    cv2.imshow(WINDOW_NAME, drawn_bgr)
    return cv2.waitKey(wait_ms) != ESC


def write_image(drawn_bgr, target, source, written):
    """Write a drawing to `target`, or to `stem_N.ext` when another input of the same name was drawn there."""
    stem, extension = os.path.splitext(target)
    for n in itertools.count(1):
        if target not in written:
            break
        target = f"{stem}_{n}{extension}"
    # imencode raises for an extension it has no writer for, rather than return False
    encoded = cv2.haveImageWriter(target) and cv2.imencode(extension, drawn_bgr)
    if not (encoded and encoded[0]):
        raise UnreadableImageError(f"{target}: cannot write the drawing of {source} (unsupported extension?)")
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    with atomic_write(target) as f:
        f.write(encoded[1].tobytes())
    written.add(target)


def run_on_images(demo, paths, output, into_folder):
    """Draw each image's predictions into `output` (a folder when `into_folder`) or a window.
    Returns (the number of images done, one-line failures)."""
    done, failed, written = 0, [], set()
    for path in paths:
        try:
            predictions, drawn_rgb = demo.run_on_image(read_image_bgr(path))
            found = predictions.get("instances")
            logger.info("%s: %s", path, "a semantic map" if found is None else f"{len(found)} instances")
            if not output and not show(drawn_rgb[:, :, ::-1], 0):
                break
            if output:
                target = os.path.join(output, os.path.basename(path)) if into_folder else output
                write_image(drawn_rgb[:, :, ::-1], target, path, written)
            done += 1
        except UnreadableImageError as e:
            failed.append(str(e))
            logger.warning("skipped %s", e)
    return done, failed


def open_capture(video_file):
    """cv2.VideoCapture of `video_file`, or of camera 0 when it is None."""
    if video_file and not os.path.isfile(video_file):
        raise FileNotFoundError(f"video file not found: {video_file}")
    log, level = cv2.utils.logging, cv2.utils.logging.getLogLevel()
    log.setLogLevel(log.LOG_LEVEL_SILENT)  # OpenCV logs lines for each backend that fails to open the source
    try:
        capture = cv2.VideoCapture(video_file or 0)
    finally:
        log.setLogLevel(level)
    if not capture.isOpened() and video_file:
        raise OSError(f"{video_file}: OpenCV cannot read this video")
    if not capture.isOpened():
        raise OSError("no camera found: cv2.VideoCapture(0) did not open")
    return capture


def run_on_video(demo, frames, output=None, fps=30.0, display=False, max_frames=None):
    """Draw the predictions on `frames` (a capture or BGR frames) into the video file `output` (renamed into
    place when complete) and/or a window (ESC stops). Returns the number of frames."""
    writer, count = None, 0
    with atomic_output_path(output) if output else contextlib.nullcontext() as partial:
        try:
            for _, drawn in itertools.islice(demo.run_on_video(frames), max_frames):
                if output and writer is None:
                    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
                    fourcc = cv2.VideoWriter_fourcc(*VIDEO_CODECS[os.path.splitext(output)[1].lower()])
                    writer = cv2.VideoWriter(partial, fourcc, fps, drawn.shape[1::-1], True)
                    if not writer.isOpened():
                        raise OSError(f"{output}: OpenCV cannot write this video file")
                if writer is not None:
                    writer.write(drawn)
                count += 1
                if display and not show(drawn, 1):
                    break
        finally:
            if writer is not None:
                writer.release()
            if display:
                cv2.destroyAllWindows()
    return count


def is_folder(path):
    return os.path.isdir(path) or path.endswith(("/", os.sep))


def check_args(parser, args):
    """Usage errors (exit 2), found before any model or camera is opened. Returns where the drawings go."""
    output = args.output
    if output and not args.input and (is_folder(output) or not os.path.splitext(output)[1]):
        source = os.path.basename(args.video_input or "webcam")
        output = os.path.join(output, os.path.splitext(source)[0] + ".mp4")
    if output and not args.input and os.path.splitext(output)[1].lower() not in VIDEO_CODECS:
        parser.error(f"--output {output}: a video is written as {' or '.join(VIDEO_CODECS)}")
    if args.onnx and args.fold_ws:
        parser.error("--fold-ws is for the PyTorch model: an exported --onnx model has WS folded already")
    if not 0 <= args.confidence_threshold <= 1:
        parser.error(f"--confidence-threshold {args.confidence_threshold}: a score is between 0 and 1")
    display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if not output and sys.platform.startswith("linux") and not display:
        parser.error("no display to show the results: pass --output DIR (or FILE)")
    return output


@command_line("demo")
def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    output = check_args(parser, args)
    setup_logging()
    cfg = ws_d2.load_config(args.config_file, args.opts, freeze=False)
    # as detectron2's demo: one threshold for every kind of detector head
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    if args.input:
        paths, problems = expand_inputs(args.input)
        into_folder = bool(output) and (len(paths) > 1 or is_folder(output))
        refuse_output_onto_inputs(output, [*paths, args.config_file], into_folder)
        for problem in problems:
            logger.warning("skipped %s", problem)
    else:
        refuse_output_onto_inputs(output, [args.video_input, args.config_file])
    capture = None if args.input else open_capture(args.video_input)  # before the model: fail at once
    try:  # the exported ONNX model (the same detections) or the PyTorch model
        predictor = DeployedPredictor(cfg, args.onnx) if args.onnx else WSPredictor(cfg, fold=args.fold_ws)
        demo = VisualizationDemo(predictor)
        if capture is not None:
            fps = capture.get(cv2.CAP_PROP_FPS) or 30.0  # cameras may report 0
            count = run_on_video(demo, capture, output, fps, not output, args.max_frames)
            logger.info("%d frames processed%s", count, f", written to {output}" if output else "")
            return 0
    finally:
        if capture is not None:
            capture.release()
    done, failed = run_on_images(demo, paths, output, into_folder)
    logger.info("%d images processed, %d inputs failed", done, len(problems) + len(failed))
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
