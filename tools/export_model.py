#!/usr/bin/env python
"""Export a GN+WS model as detectron2's stock GN model: WS folded into the weights, nothing from ws_d2 needed.

  python tools/export_model.py --config-file CFG --output export/model_stock.pth --opts MODEL.WEIGHTS model.pth

Writes export/model_stock.pth and export/model_stock.yaml. Deploy with detectron2 alone:
  cfg = get_cfg(); cfg.merge_from_file("export/model_stock.yaml")
  model = build_model(cfg); DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
"""

import argparse
import sys

import ws_d2  # noqa: F401  (compat fixes and registration before detectron2 is used)
from ws_d2.checkpoint import CheckpointError
from ws_d2.inference import export_stock_model, load_inference_cfg


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


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger()
    try:
        cfg = load_inference_cfg(args.config_file, args.opts)
        checkpoint, config = export_stock_model(cfg, args.output)
    except (FileNotFoundError, ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {checkpoint} and {config} (detectron2's stock GN model, WS folded into the weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
