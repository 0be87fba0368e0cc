#!/usr/bin/env python
"""Convert published GN+WS weights into a detectron2 checkpoint that ws_d2's configs load by exact name.

  python tools/convert_pretrained.py R-50-GN-WS.pth.tar pretrained/R-50-GN-WS.pkl
  python tools/convert_pretrained.py mask_rcnn_r50_fpn_gn_ws-all_2x_coco.pth mask_rcnn_R_50_FPN_gn_ws_2x.pkl
  python tools/convert_pretrained.py SRC DST --source torchvision --config-file my_frozen_bn_config.yaml

Sources (detected unless --source is given): the authors' ImageNet GN+WS ResNet/ResNeXt files and
MMDetection's re-hosted copies (-> backbone weights), MMDetection's trained GN+WS Faster/Mask R-CNN
(-> full models), torchvision BatchNorm ResNets (-> backbone of a BatchNorm config only). The file is read
without running code from it. Names and shapes are checked against the model built from --config-file, or
from the seed config of the architecture found in the file. DST ends in .pkl (numpy) or .pth (torch).
Exit status: 0 converted, 1 refused (the message names the keys), 2 usage error.
"""

import argparse
import sys

import ws_d2  # noqa: F401  (first: it fixes detectron2 v0.6 for today's libraries)

# isort: split
from ws_d2.checkpoint import convert_checkpoint
from ws_d2.checkpoint.convert import SOURCES
from ws_d2.errors import command_line


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint to convert (.pth, .pth.tar, .pt, .pkl)")
    parser.add_argument("dst", metavar="DST", help="output checkpoint (.pkl or .pth)")
    parser.add_argument("--source", default="auto", choices=("auto", *SOURCES), help="layout of SRC")
    parser.add_argument("--config-file", metavar="FILE", help="ws_d2 config whose model the result must fit")
    return parser


@command_line("convert_pretrained")
def main(argv=None):
    args = get_parser().parse_args(argv)
    report = convert_checkpoint(args.src, args.dst, source=args.source, config_file=args.config_file)
    print(report.summary())
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
