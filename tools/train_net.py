#!/usr/bin/env python
"""Train or evaluate a GN+WS detector with detectron2's train_net command line, plus:

  --coco-dataset NAME JSON IMAGE_DIR   register a COCO-format instances set (repeatable; before KEY VALUE opts),
                                       then use it: DATASETS.TRAIN "('NAME',)" DATASETS.TEST "('NAME',)"
  --image-check once|always|never      the image-file check of those sets (default: once per data set version)
  --num-cpu-procs N                    N data-parallel processes on the CPU (Gloo) instead of GPUs
  SOLVER.ITER_SIZE K                   K micro-batches per optimizer step (IMS_PER_BATCH images per step)

Under torchrun (env:// variables set) the process counts come from torchrun. Bad input (unknown config key,
missing data set, a batch that does not divide, missing weights) is refused in one line before any worker
starts; a data set's bad records or wrong NUM_CLASSES when it is loaded, before any training step.
Exit status: 0 done, 1 refused or failed, 2 usage error.
"""

import argparse
import os
import sys

import ws_d2  # first: it patches what an older detectron2 needs before detectron2 is imported

# isort: split
import torch
from detectron2.engine import default_argument_parser, default_setup

from ws_d2.checkpoint import WSCheckpointer, load_checkpoint_file
from ws_d2.config import check_device
from ws_d2.data import IMAGE_CHECKS, check_datasets, register_coco_dataset
from ws_d2.engine import WorkerDied, WSTrainer, check_trainable, launch, launched_by_torchrun
from ws_d2.errors import ConfigError, command_line


def get_parser():
    parser = default_argument_parser(epilog=__doc__.split("\n\n", 1)[1])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--coco-dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO-format instances data set under NAME (repeatable)")  # fmt: skip
    parser.add_argument("--image-check", choices=IMAGE_CHECKS, default="once",
                        help="check the --coco-dataset image files once per data set version, always, or never")  # fmt: skip
    parser.add_argument("--num-cpu-procs", type=int, default=0, metavar="N",
                        help="train with N processes per machine on the CPU (Gloo backend); overrides --num-gpus")  # fmt: skip
    return parser


def setup(args):
    """The frozen config: ws_d2's defaults, the config file, the KEY VALUE overrides."""
    for name, json_file, image_dir in args.coco_dataset:
        register_coco_dataset(name, json_file, image_dir, args.image_check)
    cfg = ws_d2.load_config(args.config_file, args.opts, freeze=False)
    if args.num_cpu_procs:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def check(args):
    """Everything that can be checked before starting workers, in this process."""
    if not args.num_cpu_procs and args.num_gpus > 1 and not torch.cuda.is_available():
        raise ConfigError(f"--num-gpus {args.num_gpus} but CUDA is not available; use --num-cpu-procs N")
    cfg = setup(args)
    check_device(cfg)  # never train on another device than the one asked for
    world_size = (
        int(os.environ["WORLD_SIZE"])
        if launched_by_torchrun()
        else args.num_machines * (args.num_cpu_procs or args.num_gpus)
    )
    if not args.eval_only:
        check_trainable(cfg, world_size)
    check_datasets(cfg, train=not args.eval_only)
    check_output_dir(cfg.OUTPUT_DIR, args)
    weights = cfg.MODEL.WEIGHTS
    if args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        weights = last_checkpoint(cfg.OUTPUT_DIR)
    elif weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(
            f"MODEL.WEIGHTS file not found: {weights} (convert the ImageNet weights first, see MODEL_ZOO.md, or set "
            "MODEL.WEIGHTS '' to start from random weights)"
        )
    if weights and "://" not in weights:
        load_checkpoint_file(weights)  # a corrupt or unsafe file is named here, not in a worker's traceback


def check_output_dir(output_dir, args):
    """OUTPUT_DIR must be writable, and a finished run in it is never overwritten without --resume."""
    os.makedirs(output_dir, exist_ok=True)  # an OSError names the folder
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"OUTPUT_DIR {output_dir} is not writable")
    if not args.resume and not args.eval_only and os.path.isfile(os.path.join(output_dir, "model_final.pth")):
        raise ConfigError(
            f"OUTPUT_DIR {output_dir} holds a finished run (model_final.pth): pass --resume to continue it, or "
            "set another OUTPUT_DIR (or remove that folder) to start over"
        )


def last_checkpoint(output_dir):
    """The checkpoint that `--resume` loads: the file named by OUTPUT_DIR/last_checkpoint."""
    tag = os.path.join(output_dir, "last_checkpoint")
    try:
        with open(tag, encoding="utf-8") as f:
            name = f.read().strip()
    except UnicodeDecodeError:
        name = ""
    path = os.path.join(output_dir, name)
    if not name or not os.path.isfile(path):
        raise ConfigError(f"{tag} does not name a checkpoint file in {output_dir}; remove it to start over")
    return path


def main(args):
    """One worker: set up, then evaluate (--eval-only) or train. Returns the evaluation results, if any."""
    cfg = setup(args)
    default_setup(cfg, args)
    if args.eval_only:
        model = WSTrainer.build_model(cfg)
        checkpointer = WSCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return WSTrainer.test(cfg, model)
    trainer = WSTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


@command_line("train_net")
def run(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.num_cpu_procs < 0 or args.num_gpus < 0:
        parser.error("--num-cpu-procs and --num-gpus must be >= 0")
    check(args)
    try:
        launch(
            main,
            args.num_cpu_procs or args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            use_cuda=not args.num_cpu_procs and torch.cuda.is_available(),
        )
    except WorkerDied as e:
        hint = "" if args.eval_only else ": --resume continues the run from its last checkpoint"
        raise WorkerDied(f"{e}{hint}") from None
    return 0


if __name__ == "__main__":
    sys.exit(run())
