#!/usr/bin/env python
"""Export a GN+WS model as detectron2's stock GN model: WS folded into the weights, nothing from ws_d2 needed.

  python tools/export_model.py --config-file CFG --output export/model_stock.pth --opts MODEL.WEIGHTS model.pth

Writes export/model_stock.pth and export/model_stock.yaml. Deploy with detectron2 alone:
  cfg = get_cfg(); cfg.merge_from_file("export/model_stock.yaml")
  model = build_model(cfg); DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
Exit status: 0 done, 1 refused or failed (missing config or weights, a component with no stock twin), 2 usage error.
"""

import argparse
import os
import sys

import ws_d2  # first: it fixes detectron2 v0.6 for today's libraries before detectron2 is imported

# isort: split
from detectron2.utils.logger import setup_logger

from ws_d2.errors import command_line
from ws_d2.export import export_stock_model
from ws_d2.outputs import refuse_output_onto_inputs


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="GN+WS model config (yaml)")
    parser.add_argument("--output", required=True, metavar="FILE.pth", help="exported checkpoint (.pth)")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


@command_line("export_model")
def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger()
    for output in (args.output, os.path.splitext(args.output)[0] + ".yaml"):
        refuse_output_onto_inputs(output, [args.config_file])
    cfg = ws_d2.load_config(args.config_file, args.opts)
    checkpoint, config = export_stock_model(cfg, args.output)
    print(f"wrote {checkpoint} and {config} (detectron2's stock GN model, WS folded into the weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
