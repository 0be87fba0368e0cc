#!/usr/bin/env python
"""Export a ws_d2 model for deployment: WS folded into the weights, nothing from ws_d2 needed to run it.

  python tools/export_model.py --config-file CFG --format weights --output export/ --opts MODEL.WEIGHTS model.pth
  python tools/export_model.py --config-file CFG --format onnx --output export/ [--sample-image IMG] --opts ...
  python tools/export_model.py --config-file CFG --format torchscript --output export/ --opts ...

weights: export/model_stock.pth and export/model_stock.yaml, detectron2's stock GN model (GN+WS models only):
  cfg = get_cfg(); cfg.merge_from_file("export/model_stock.yaml")
  model = build_model(cfg); DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
onnx: export/model.onnx, runs in onnxruntime alone; torchscript: export/model.ts, runs with torch + torchvision.
Both take a uint8 H x W x 3 BGR image of any size (resized to the config's test size) and give boxes, scores,
classes and, for mask models, 28 x 28 mask probabilities: docs/DEMO_AND_EXPORT.md. They are traced on
--sample-image (default: a synthetic image); the graph does not depend on that image or its size.
Exit status: 0 done, 1 refused or failed (missing config or weights, a model the format cannot hold), 2 usage error.
"""

import argparse
import os
import sys

import ws_d2  # first: it patches what an older detectron2 needs before detectron2 is imported

# isort: split
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger

from ws_d2.errors import ConfigError, command_line
from ws_d2.export import DEPLOY_FILES, EXPORT_FORMATS, export_deployable, export_stock_model
from ws_d2.files import refuse_output_onto_inputs


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="ws_d2 model config (yaml)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="weights", help="default: weights")
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="output folder (weights: or a FILE.pth)"
    )
    parser.add_argument("--sample-image", metavar="IMG", help="image to trace with (torchscript, onnx)")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


@command_line("export_model")
def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.sample_image and args.format == "weights":
        parser.error("--sample-image is for --format torchscript or onnx")
    setup_logger(name="fvcore")
    setup_logger()
    for output in (args.output, os.path.splitext(args.output)[0] + ".yaml"):
        refuse_output_onto_inputs(output, [args.config_file])
    cfg = ws_d2.load_config(args.config_file, args.opts)
    image = read_image(args.sample_image, format="BGR") if args.sample_image else None
    # weights: an --output with an extension names the .pth itself; the graphs go into a folder
    named_file = os.path.splitext(args.output.rstrip("/" + os.sep))[1]
    if args.format == "weights":
        written = export_stock_model(
            cfg, args.output if named_file else os.path.join(args.output, "model_stock.pth")
        )
    elif named_file:
        raise ConfigError(f"{args.output}: --output is the folder to write {DEPLOY_FILES[args.format]} into")
    else:
        written = [export_deployable(cfg, args.output, args.format, image)]
    print(f"wrote {' and '.join(written)} ({args.format}, WS folded into the weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
