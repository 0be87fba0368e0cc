#!/usr/bin/env python
"""Train or evaluate a GN+WS detector: detectron2's train_net command line, plus --coco-dataset and
--num-cpu-procs (see `--help`). The logic lives in ws_d2.engine.cli."""

import ws_d2  # noqa: F401  (compat fixes and registration before detectron2 is used)
from ws_d2.engine.cli import run_cli

if __name__ == "__main__":
    run_cli()
