#!/usr/bin/env python
"""Run a ws_d2 (or any detectron2) model on images, a video or a webcam and draw its predictions.

  python tools/demo.py --config-file CFG --input a.jpg photos/ 'shots/*.png' --output out/ \\
      [--json results.json [--coco-json instances_val.json]] --opts MODEL.WEIGHTS model.pth
  python tools/demo.py --config-file CFG --video-input clip.mp4 --output clip_drawn.mp4 --opts ...
  python tools/demo.py --config-file CFG --webcam [--output cam.avi] [--max-frames N] --opts ...
  python tools/demo.py --config-file CFG --onnx export/model.onnx --input a.jpg --output out/

Without --output the drawings are shown in a window (ESC quits), which needs a display. An unreadable
input is reported in one line and skipped. Exit status: 0 done, 1 an input failed or was refused
(missing config, weights or camera), 2 usage error.
"""

import argparse
import contextlib
import glob
import itertools
import json
import logging
import os
import sys

import ws_d2  # first: it fixes detectron2 v0.6 for today's libraries before detectron2 is imported

# isort: split
import cv2
import numpy as np
from detectron2.data.detection_utils import read_image
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from PIL import Image, UnidentifiedImageError

from ws_d2.errors import DatasetError, WSD2Error, command_line, one_line
from ws_d2.files import atomic_output_path, atomic_write, refuse_output_onto_inputs
from ws_d2.predictor import DeployedPredictor, VisualizationDemo, WSPredictor

# What a folder given as input is searched for; files named explicitly or by a glob are tried whatever
# their extension, so an odd name is reported rather than silently ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
# What this OpenCV build writes without extra codecs (H.264 needs a hardware or GPL encoder).
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
# 16-bit (and 32-bit integer) grayscale, as PIL opens a 16-bit PNG or TIFF
WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
WINDOW_NAME, ESC = "ws_d2 demo", 27
logger = logging.getLogger("demo")


class UnreadableImageError(WSD2Error):
    """An input that is missing or not a decodable image; the message starts with its name."""


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--config-file", required=True, metavar="FILE", help="model config (yaml)")
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--input", nargs="+", metavar="PATH", help="image files, folders or globs")
    sources.add_argument("--video-input", metavar="FILE", help="a video file")
    sources.add_argument("--webcam", action="store_true", help="camera 0")
    add("--output", metavar="PATH", help="images: a folder (or a file for one input); video/webcam: a .mp4 "
        "or .avi file, or a folder (default: show in a window)")  # fmt: skip
    add("--confidence-threshold", type=float, default=0.5, help="minimum score to keep")
    add("--json", metavar="FILE", help="also write the predictions in COCO results format")
    add("--coco-json", metavar="FILE", help="COCO annotation file giving the image ids for --json")
    add("--max-frames", type=int, metavar="N", help="stop a video or webcam after N frames")
    add("--fold-ws", action="store_true", help="fold WS into the conv weights (same outputs)")
    add("--onnx", metavar="FILE", help="run this model.onnx (tools/export_model.py) in onnxruntime instead")
    add("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def make_predictor(cfg, args):
    """The exported ONNX model (--onnx; same detections, see DeployedPredictor) or the PyTorch model."""
    return DeployedPredictor(cfg, args.onnx) if args.onnx else WSPredictor(cfg, fold=args.fold_ws)


def setup_logging():
    """Progress (the demo's, detectron2's, fvcore's) on stdout; each problem as one plain line on stderr."""
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    problems.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    for name in ("demo", "detectron2", "fvcore"):
        named = logging.getLogger(name)
        named.handlers, named.propagate = [progress, problems], False
        named.setLevel(logging.INFO)


def has_display():
    """Whether an OpenCV window can be shown (on Linux: an X11 or Wayland display is set)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def show(drawn_bgr, wait_ms):
    """Show a drawing; False when the user pressed ESC."""
    cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
    cv2.imshow(WINDOW_NAME, drawn_bgr)
    return cv2.waitKey(wait_ms) != ESC


def expand_inputs(patterns):
    """Files, folders (their images, sorted) and globs as (paths, problems): `problems` are one-line
    messages for the patterns that named nothing, reported as failed inputs rather than dropped."""
    paths, problems = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(entry.path for entry in os.scandir(pattern)
                           if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))  # fmt: skip
            if not found:
                problems.append(f"{pattern}: folder contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.exists(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
            if not found:
                problems.append(f"{pattern}: no such file, folder or matching glob")
        paths.extend(p for p in found if p not in paths)
    return paths, problems


def read_image_bgr(path):
    """An HxWx3 uint8 BGR image from any file PIL reads: grayscale, palette and RGBA become 3 channels
    and the EXIF orientation is applied (detectron2's read_image). Raises UnreadableImageError."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            gray = np.asarray(image) if mode in WIDE_GRAY_MODES else None
        if gray is not None:  # PIL's RGB conversion clips these to white: scale 16 bits to 8
            if gray.min() < 0 or gray.max() > 65535:
                raise ValueError(f"{mode} pixels outside 0..65535: not a 16-bit image")
            gray = np.round(gray.astype(np.float64) / 257).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
        if mode == "F":
            raise ValueError("floating-point pixels: convert it to an 8- or 16-bit image")
        return np.ascontiguousarray(read_image(path, format="BGR"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # a missing, truncated or unidentified file is an OSError
        reason = getattr(e, "strerror", None) or one_line(e)
        if isinstance(e, UnidentifiedImageError):
            reason = "not an image format PIL can decode"
        raise UnreadableImageError(
            f"{path}: cannot read as an image ({type(e).__name__}: {reason})"
        ) from None


def image_output_path(output, input_path, several_inputs, taken):
    """Where the drawing of `input_path` goes: `output` itself when it names a file and there is one input;
    inside `output` (created) when it is a folder, ends with a separator or there are several inputs. Two
    inputs with the same name (from different folders) get different files: `taken` holds those used."""
    if several_inputs or os.path.isdir(output) or output.endswith(("/", os.sep)):
        os.makedirs(output, exist_ok=True)
        path = os.path.join(output, os.path.basename(input_path))
    else:
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        path = output
    stem, extension = os.path.splitext(path)
    for n in itertools.count(1):
        if path not in taken:
            return path
        path = f"{stem}_{n}{extension}"


def run_on_images(demo, paths, output=None, display=False, image_ids=None, category_ids=None):
    """Predict, draw and save (to `output`) or show each image; with `image_ids` ({path: COCO id}) also
    collect COCO results. Returns (paths done, one-line failures, COCO results)."""
    done, failed, coco_results, written = [], [], [], set()
    for path in paths:
        try:
            predictions, drawn_rgb = demo.run_on_image(read_image_bgr(path))
        except UnreadableImageError as e:
            logger.warning("skipped %s", e)
            failed.append(str(e))
            continue
        logger.info("%s: %d instances", path, len(predictions["instances"]))
        if image_ids is not None:
            coco_results += instances_to_coco_results(predictions["instances"], image_ids[path], category_ids)
        if output:
            target = image_output_path(output, path, len(paths) > 1, written)
            # imencode raises for an extension it has no writer for, rather than return False
            encoded = cv2.haveImageWriter(target) and cv2.imencode(
                os.path.splitext(target)[1], drawn_rgb[:, :, ::-1]
            )
            if not (encoded and encoded[0]):
                failed.append(f"{target}: cannot write the drawing of {path} (unsupported image extension?)")
                logger.warning("skipped %s", failed[-1])
                continue
            with atomic_write(target) as f:
                f.write(encoded[1].tobytes())
            written.add(target)
        if display and not show(drawn_rgb[:, :, ::-1], 0):
            break
        done.append(path)
    return done, failed, coco_results


def read_coco_annotations(annotation_file):
    """(images, categories) of a COCO annotation file."""
    try:
        with open(annotation_file) as f:
            dataset = json.load(f)
        return dataset["images"], dataset["categories"]
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{annotation_file}: not a COCO annotation file ({one_line(e)})") from None


def assign_image_ids(paths, annotation_file=None):
    """{path: COCO image id}: the annotation file's ids (matched by file base name; an input it does not
    list is an error); without one, the file names when all are integers (COCO's 000000000139.jpg), else
    1..N in order."""
    name = os.path.basename
    if annotation_file:
        ids = {name(image["file_name"]): image["id"] for image in read_coco_annotations(annotation_file)[0]}
        for path in paths:
            if name(path) not in ids:
                raise DatasetError(f"{annotation_file} lists no image named {name(path)} ({path})")
        return {path: ids[name(path)] for path in paths}
    stems = [os.path.splitext(name(path))[0] for path in paths]
    if all(stem.isdigit() for stem in stems) and len({int(stem) for stem in stems}) == len(stems):
        return {path: int(stem) for path, stem in zip(paths, stems)}
    return {path: i for i, path in enumerate(paths, start=1)}


def category_ids_for(metadata, annotation_file=None):
    """{data set category id: the model's class index}: the metadata's own mapping (set when detectron2
    loads a COCO-format set), else the annotation file's categories in detectron2's order (sorted ids, as
    load_coco_json numbers them), else None."""
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    if mapping:
        return dict(mapping)
    if annotation_file:
        ids = sorted(category["id"] for category in read_coco_annotations(annotation_file)[1])
        return {dataset_id: index for index, dataset_id in enumerate(ids)}
    return None


def instances_to_coco_results(instances, image_id, category_ids=None):
    """COCO result dicts (bbox XYWH, score, RLE segmentation with str counts when the model predicts
    masks); `category_ids` (see category_ids_for) maps class indices back to the data set's ids, as
    COCOEvaluator does, and None keeps the indices."""
    results = instances_to_coco_json(instances.to("cpu"), image_id)
    if category_ids:
        dataset_id_of = {index: dataset_id for dataset_id, index in category_ids.items()}
        for result in results:
            if result["category_id"] not in dataset_id_of:
                raise DatasetError(f"the model's class {result['category_id']} has no COCO category id")
            result["category_id"] = dataset_id_of[result["category_id"]]
    return results


def write_coco_results(results, json_file):
    os.makedirs(os.path.dirname(json_file) or ".", exist_ok=True)
    with atomic_write(json_file, "w") as f:
        json.dump(results, f)
    if not results:  # pycocotools' loadRes cannot read an empty list: say so rather than fail later
        logger.warning("%s: no predictions above the threshold (pycocotools cannot load [])", json_file)


def video_output_path(output, source_name):
    """`output` itself when it names a file; `<output>/<source stem>.mp4` when it is a folder (existing,
    ending with a separator, or without extension); None without output."""
    if not output:
        return None
    if os.path.isdir(output) or output.endswith(("/", os.sep)) or not os.path.splitext(output)[1]:
        return os.path.join(output, os.path.splitext(os.path.basename(source_name))[0] + ".mp4")
    return output


def open_capture(video_file):
    """cv2.VideoCapture of `video_file`, or of camera 0 when it is None."""
    if video_file and not os.path.isfile(video_file):
        raise FileNotFoundError(f"video file not found: {video_file}")
    log = cv2.utils.logging  # OpenCV logs several lines for each backend that fails to open the source
    level = log.getLogLevel()
    log.setLogLevel(log.LOG_LEVEL_SILENT)
    try:
        capture = cv2.VideoCapture(video_file or 0)
    finally:
        log.setLogLevel(level)
    if not capture.isOpened():
        camera_error = "no camera found: cv2.VideoCapture(0) did not open"
        raise OSError(f"{video_file}: OpenCV cannot read this video" if video_file else camera_error)
    return capture


def run_on_video(demo, frames, output=None, fps=30.0, display=False, max_frames=None):
    """Draw the predictions on the frames of `frames` (a capture object or an iterable of BGR frames),
    write them to the video file `output` (.mp4/.avi) and/or show them (ESC stops). Returns the count."""
    writer, count = None, 0
    if output:
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    # frames go to a temporary file, renamed to `output` once the video is complete
    with atomic_output_path(output) if output else contextlib.nullcontext() as partial:
        try:
            for _, drawn in itertools.islice(demo.run_on_video(frames), max_frames):
                if output and writer is None:
                    height, width = drawn.shape[:2]
                    fourcc = cv2.VideoWriter_fourcc(*VIDEO_CODECS[os.path.splitext(output)[1].lower()])
                    writer = cv2.VideoWriter(partial, fourcc, fps, (width, height), True)
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


@command_line("demo")
def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    output = args.output if args.input else video_output_path(args.output, args.video_input or "webcam")
    if args.json and not args.input:
        parser.error("--json works with --input images only")
    if output and not args.input and os.path.splitext(output)[1].lower() not in VIDEO_CODECS:
        parser.error(f"--output {output}: a video is written as {' or '.join(VIDEO_CODECS)}")
    if args.onnx and args.fold_ws:
        parser.error("--fold-ws is for the PyTorch model: an exported --onnx model has WS folded already")
    if not 0 <= args.confidence_threshold <= 1:
        parser.error(
            f"--confidence-threshold {args.confidence_threshold}: a score threshold is between 0 and 1"
        )
    if not output and not has_display():
        parser.error("no display to show the results: pass --output DIR (or FILE)")
    setup_logging()
    cfg = ws_d2.load_config(args.config_file, args.opts, freeze=False)
    # as detectron2's demo: one threshold for every kind of detector head
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()

    if args.input:
        paths, problems = expand_inputs(args.input)
        into_folder = len(paths) > 1 or os.path.isdir(output or "") or (output or "").endswith(("/", os.sep))
        refuse_output_onto_inputs(output, [*paths, args.config_file], into_folder)
        refuse_output_onto_inputs(args.json, [*paths, args.config_file, args.coco_json], option="--json")
        for problem in problems:
            logger.warning("skipped %s", problem)
        image_ids = assign_image_ids(paths, args.coco_json) if args.json else None
        predictor = make_predictor(cfg, args)
        category_ids = category_ids_for(predictor.metadata, args.coco_json) if args.json else None
        if args.json and category_ids is None:
            logger.warning("%s: category_id is the model's class index (no id mapping found)", args.json)
        demo = VisualizationDemo(predictor)
        done, failed, coco_results = run_on_images(demo, paths, output, not output, image_ids, category_ids)
        if args.json:
            write_coco_results(coco_results, args.json)
        logger.info("%d images processed, %d inputs failed", len(done), len(problems) + len(failed))
        return 1 if problems or failed else 0

    refuse_output_onto_inputs(output, [args.video_input, args.config_file])
    capture = open_capture(args.video_input)  # before the model is built: a missing camera is found at once
    try:
        demo = VisualizationDemo(make_predictor(cfg, args))
        fps = capture.get(cv2.CAP_PROP_FPS) or 30.0  # cameras may report 0
        count = run_on_video(demo, capture, output, fps, not output, args.max_frames)
    finally:
        capture.release()
    logger.info("%d frames processed%s", count, f", written to {output}" if output else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
