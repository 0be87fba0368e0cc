#!/usr/bin/env python
"""Run a ws_d2 (or any detectron2) model on images, a video or a webcam and draw its predictions.

  python tools/demo.py --config-file CFG --input a.jpg photos/ 'shots/*.png' --output out/ \
      [--json results.json [--coco-json instances_val.json]] --opts MODEL.WEIGHTS model.pth MODEL.DEVICE cpu
  python tools/demo.py --config-file CFG --video-input clip.mp4 --output clip_drawn.mp4 --opts ...
  python tools/demo.py --config-file CFG --webcam [--output cam.avi] --opts ...

Without --output the drawings are shown in a window (ESC quits), which needs a display. An unreadable
input is reported in one line and skipped; the exit status is 1 if any input failed, 2 on a usage error.
"""

import argparse
import logging
import sys

import cv2

import ws_d2  # noqa: F401  (compat fixes and registration before detectron2 is used)
from ws_d2.checkpoint import CheckpointError
from ws_d2.inference import (
    CameraUnavailableError,
    WSPredictor,
    assign_image_ids,
    category_ids_for,
    expand_inputs,
    has_display,
    load_inference_cfg,
    open_camera,
    open_video_file,
    run_on_images,
    run_on_stream,
    video_output_path,
    write_coco_results,
)


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config (yaml)")
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--input", nargs="+", metavar="PATH", help="image files, folders or globs")
    sources.add_argument("--video-input", metavar="FILE", help="a video file")
    sources.add_argument("--webcam", action="store_true", help="camera 0")
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="images: a folder (or a file for one input); video/webcam: a .mp4 or .avi file, or a folder",
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score to keep")
    parser.add_argument("--json", metavar="FILE", help="also write the predictions in COCO results format")
    parser.add_argument(
        "--coco-json", metavar="FILE", help="COCO annotation file giving the image ids for --json"
    )
    parser.add_argument("--max-frames", type=int, metavar="N", help="stop a video or webcam after N frames")
    parser.add_argument("--fold-ws", action="store_true", help="fold WS into the conv weights (same outputs)")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    logger = setup_logger()
    _log_problems_to_stderr(logging.getLogger("ws_d2"))
    try:
        return run(args, logger)
    except (FileNotFoundError, ValueError, CheckpointError, CameraUnavailableError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _log_problems_to_stderr(logger):
    """Progress to stdout; each skipped input as one plain line on stderr."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    problems.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.handlers = [progress, problems]


def run(args, logger):
    if args.json and not args.input:
        raise ValueError("--json works with --input images only")
    cfg = load_inference_cfg(args.config_file, args.opts, args.confidence_threshold)
    show = not args.output
    if show and not has_display():
        raise ValueError("no display to show the results: pass --output DIR (or FILE)")

    if args.input:
        paths, problems = expand_inputs(args.input)
        for problem in problems:
            logging.getLogger("ws_d2").warning("skipped %s", problem)
        image_ids = assign_image_ids(paths, args.coco_json) if args.json else None
        predictor = WSPredictor(cfg, fold=args.fold_ws)
        category_ids = category_ids_for(predictor.metadata, args.coco_json) if args.json else None
        if args.json and category_ids is None:
            logger.warning(
                "%s: category_id = the model's class index (no id mapping in the metadata)", args.json
            )
        result = run_on_images(
            predictor, paths, predictor.metadata, args.output, show, image_ids, category_ids
        )
        if args.json:
            write_coco_results(result.coco_results, args.json)
        failed = problems + result.failed
        logger.info("%d images processed, %d inputs failed", len(result.done), len(failed))
        return 1 if failed else 0

    if args.video_input:
        capture = open_video_file(args.video_input)
        output = video_output_path(args.output, args.video_input)
    else:
        capture = open_camera(0)
        output = video_output_path(args.output, "webcam")
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0  # cameras may report 0
    predictor = WSPredictor(cfg, fold=args.fold_ws)
    try:
        count = run_on_stream(predictor, capture, predictor.metadata, output, fps, show, args.max_frames)
    finally:
        capture.release()
    logger.info("%d frames processed%s", count, f", written to {output}" if output else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
