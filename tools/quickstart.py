#!/usr/bin/env python
"""`make quickstart`: generate the synthetic shapes set, train a small GN+WS Mask R-CNN on the CPU (minutes),
evaluate it against its untrained init, and draw its predictions on a few val images.

    python tools/quickstart.py [--config-file CFG] [KEY VALUE ...]
"""

import argparse

import ws_d2  # noqa: F401  (compat fixes and registration before detectron2 is used)
from ws_d2.data import DatasetError
from ws_d2.engine.quickstart import QUICKSTART_CONFIG, run_quickstart


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default=str(QUICKSTART_CONFIG), metavar="FILE")
    parser.add_argument("--dataset-root", default=None, help="where to write the synthetic set")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args()
    try:
        run_quickstart(args.config_file, args.opts, args.dataset_root)
    except DatasetError as e:
        parser.exit(2, f"quickstart: error: {e}\n")


if __name__ == "__main__":
    main()
