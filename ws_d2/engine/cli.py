"""What tools/train_net.py does: detectron2's command line, plus COCO-format data sets and CPU processes.

Bad input (unknown config key, missing or malformed data set, wrong NUM_CLASSES, a batch that does not divide,
unreadable weights) is checked in the launching process before any worker starts and reported in one line.
"""

import argparse
import logging
import os
import sys

import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm

from ..checkpoint import CheckpointError, WSCheckpointer
from ..config import get_ws_cfg
from ..data import DatasetError, check_datasets, register_coco_dataset
from .launch import launch, launched_by_torchrun
from .micro_batch import ConfigError, micro_batch_size
from .trainer import WSTrainer, check_amp

__all__ = ["build_argument_parser", "main", "run_cli", "setup_cfg"]

logger = logging.getLogger(__name__)

EPILOG = """
ws_d2 additions:
  --coco-dataset NAME JSON IMAGE_DIR   register a COCO-format instances set (repeatable; before KEY VALUE opts),
                                       then use it: DATASETS.TRAIN "('NAME',)" DATASETS.TEST "('NAME',)"
  --num-cpu-procs N                    N data-parallel processes on the CPU (Gloo) instead of GPUs
  SOLVER.ITER_SIZE K                   K micro-batches per optimizer step (IMS_PER_BATCH images per step)
Under torchrun (env:// variables set) the process counts come from torchrun.
"""


def build_argument_parser():
    parser = default_argument_parser(epilog=EPILOG)
    parser.add_argument(
        "--coco-dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_DIR"),
        help="register a COCO-format instances data set under NAME (repeatable)",
    )
    parser.add_argument(
        "--num-cpu-procs",
        type=int,
        default=0,
        metavar="N",
        help="train with N processes per machine on the CPU (Gloo backend); overrides --num-gpus",
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def world_size_of(args):
    if launched_by_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return args.num_machines * (args.num_cpu_procs or args.num_gpus)


def _merge_error(error):
    message = error.args[0] if error.args else str(error)
    return ConfigError(str(message).splitlines()[0])


def setup_cfg(args, world_size=None):
    """The frozen config: ws_d2 defaults, the config file, the KEY VALUE overrides, then checks."""
    cfg = get_ws_cfg()
    try:
        if args.config_file:
            if not os.path.isfile(args.config_file):
                raise ConfigError(f"config file not found: {args.config_file}")
            cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts or [])
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise _merge_error(e) from None
    if args.num_cpu_procs or (cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()):
        cfg.MODEL.DEVICE = "cpu"  # detectron2 defaults to "cuda"; a CPU-only machine trains on the CPU
    micro_batch_size(cfg, world_size or world_size_of(args))
    check_amp(cfg)
    cfg.freeze()
    return cfg


def register_datasets(args):
    for name, json_file, image_dir in args.coco_dataset:
        register_coco_dataset(name, json_file, image_dir)


def check_args(args):
    """Everything that can be checked before starting workers; raises ConfigError/DatasetError."""
    if not args.num_cpu_procs and args.num_gpus > 1 and not torch.cuda.is_available():
        raise ConfigError(f"--num-gpus {args.num_gpus} but CUDA is not available; use --num-cpu-procs N")
    register_datasets(args)
    cfg = setup_cfg(args)
    check_datasets(cfg, train=not args.eval_only)
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    weights = cfg.MODEL.WEIGHTS
    if weights and not resuming and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(
            f"MODEL.WEIGHTS file not found: {weights} (convert the ImageNet weights first, see README, or set "
            "MODEL.WEIGHTS '' to start from random weights)"
        )
    return cfg


def main(args):
    """One worker: set up, then evaluate (--eval-only) or train. Returns the evaluation results, if any."""
    register_datasets(args)
    cfg = setup_cfg(args, comm.get_world_size())
    default_setup(cfg, args)
    if args.eval_only:
        model = WSTrainer.build_model(cfg)
        WSCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return WSTrainer.test(cfg, model)
    trainer = WSTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run_cli(argv=None):
    args = build_argument_parser().parse_args(argv)
    try:
        check_args(args)
    except (ConfigError, DatasetError, CheckpointError) as e:
        sys.exit(f"train_net: error: {e}")
    procs = args.num_cpu_procs or args.num_gpus
    return launch(
        main,
        procs,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        use_cuda=not args.num_cpu_procs and torch.cuda.is_available(),
    )
