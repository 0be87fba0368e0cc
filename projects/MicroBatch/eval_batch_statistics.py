#!/usr/bin/env python
"""Evaluate a trained BN model with every BatchNorm normalizing by the statistics of the test image itself
(its training behaviour) instead of its running statistics: the other half of BN's train/eval gap.

    python projects/MicroBatch/eval_batch_statistics.py CONFIG KEY VALUE ... MODEL.WEIGHTS model_final.pth

Writes OUTPUT_DIR/eval_results.json like `tools/train_net.py --eval-only`.
"""

import sys

import ws_d2  # first: it patches what an older detectron2 needs before detectron2 is imported

# isort: split
import torch

from ws_d2.checkpoint import WSCheckpointer
from ws_d2.engine import WSTrainer
from ws_d2.errors import command_line


def use_batch_statistics(model):
    """Make every BatchNorm of `model` normalize by the statistics of its input, in eval mode too."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            # without running statistics BatchNorm uses the batch's own even in eval mode (the evaluation loop
            # puts the whole model in eval mode, so train() here would be undone)
            module.running_mean = module.running_var = None
            module.track_running_stats = False
    return model


@command_line("eval_batch_statistics")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = ws_d2.load_config(argv[0], argv[1:])
    model = WSTrainer.build_model(cfg)
    WSCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    use_batch_statistics(model)
    with torch.no_grad():
        WSTrainer.test(cfg, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
