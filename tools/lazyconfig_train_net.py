#!/usr/bin/env python
"""Train or evaluate the model of a Python (LazyConfig) config, as detectron2's tools/lazyconfig_train_net.py
does (`--config-file x.py`, `key=value` overrides, --resume, --eval-only), on ws_d2's trainer pieces:

  train.iter_size=K                    K micro-batches per optimizer step (dataloader.train.total_batch_size
                                       images per step); train.amp.precision=bfloat16 with train.amp.enabled=True
  --coco-dataset NAME JSON IMAGE_DIR   register a COCO-format instances set (repeatable), then use it:
                                       dataloader.train.dataset.names=NAME dataloader.test.dataset.names=NAME
  --num-cpu-procs N                    N data-parallel processes on the CPU (Gloo) instead of GPUs

The data sets, the batch split and the output folder are checked before any worker starts; a finished run is
not overwritten without --resume. YAML configs: tools/train_net.py. Exit: 0 done, 1 refused or failed, 2 usage.
"""

import argparse
import logging
import os
import sys

import ws_d2  # noqa: F401  (first: it patches what an older detectron2 needs before detectron2 is imported)

# isort: split
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ws_d2.checkpoint import WSCheckpointer
from ws_d2.data import IMAGE_CHECKS, check_dataset_names, register_coco_dataset
from ws_d2.engine import MicroBatchTrainer, WorkerDied, launch, launched_by_torchrun, split_batch
from ws_d2.errors import ConfigError, command_line, one_line
from ws_d2.files import require_weights_file

logger = logging.getLogger("detectron2")
BATCH_KEYS = ("dataloader.train.total_batch_size", "train.iter_size")


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
    """The config: the file, then the key=value overrides."""
    for name, json_file, image_dir in args.coco_dataset:
        register_coco_dataset(name, json_file, image_dir, args.image_check)
    if not args.config_file.endswith(".py") or not os.path.isfile(args.config_file):
        raise ConfigError(f"not a Python config file: {args.config_file} (YAML configs: tools/train_net.py)")
    try:
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    except Exception as e:  # syntax, imports, a bad override: many types
        raise ConfigError(f"{args.config_file}: {one_line(e)}") from None
    if args.num_cpu_procs:
        cfg.train.device = "cpu"
    cfg.train.setdefault("iter_size", 1)
    return cfg


def check(args, cfg, world_size):
    """Everything that can be checked before starting workers, in this process."""
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device is {cfg.train.device} but CUDA is not available: pass train.device=cpu"
        )
    train, test = cfg.dataloader.train, cfg.dataloader.test
    if not args.eval_only:
        split_batch(train.total_batch_size, cfg.train.iter_size, world_size, BATCH_KEYS)
        if cfg.train.amp.enabled and cfg.train.amp.get("precision", "float16") not in ("float16", "bfloat16"):
            raise ConfigError(
                f"train.amp.precision must be float16 or bfloat16, got {cfg.train.amp.precision!r}"
            )
    loaders = (test,) if args.eval_only else (train, test)
    names = [n for loader in loaders for n in _as_list(loader.dataset.names)]
    num_classes = cfg.model.get("roi_heads", {}).get(
        "num_classes"
    )  # R-CNN; other models' classes go unchecked
    check_dataset_names(names, num_classes, "model.roi_heads.num_classes")
    output_dir = cfg.train.output_dir
    os.makedirs(output_dir, exist_ok=True)
    if not args.resume and not args.eval_only and os.path.isfile(os.path.join(output_dir, "model_final.pth")):
        raise ConfigError(
            f"train.output_dir {output_dir} holds a finished run: pass --resume, or use another"
        )
    if not (args.resume and os.path.isfile(os.path.join(output_dir, "last_checkpoint"))):
        require_weights_file(cfg.train.init_checkpoint, "train.init_checkpoint")


def _as_list(names):
    return [names] if isinstance(names, str) else list(names)


def do_test(cfg, model):
    if "evaluator" in cfg.dataloader:
        results = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(results)
        return results


def do_train(args, cfg):
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    world_size = comm.get_world_size()
    # the loader yields one micro-batch: total_batch_size images per step in train.iter_size passes
    per_pass = split_batch(cfg.dataloader.train.total_batch_size, cfg.train.iter_size, world_size, BATCH_KEYS)
    cfg.dataloader.train.total_batch_size = per_pass * world_size
    train_loader = instantiate(cfg.dataloader.train)
    device_ids = [comm.get_local_rank()] if next(model.parameters()).is_cuda else None  # none for CPU DDP
    model = create_ddp_model(model, device_ids=device_ids, **cfg.train.ddp)
    amp = cfg.train.amp
    precision = getattr(torch, amp.get("precision", "float16")) if amp.enabled else None
    scaler = torch.amp.GradScaler(torch.device(cfg.train.device).type) if precision == torch.float16 else None
    trainer = MicroBatchTrainer(
        model, train_loader, optimizer, cfg.train.iter_size, scaler, precision=precision
    )
    checkpointer = WSCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter), cfg.train.log_period
            )
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # a checkpoint holds the iteration that just finished
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = setup(args)
    default_setup(cfg, args)
    if not args.eval_only:
        return do_train(args, cfg)
    model = create_ddp_model(instantiate(cfg.model).to(cfg.train.device))
    WSCheckpointer(model).load(cfg.train.init_checkpoint)
    return do_test(cfg, model)


@command_line("lazyconfig_train_net")
def run(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.num_cpu_procs < 0 or args.num_gpus < 0:
        parser.error("--num-cpu-procs and --num-gpus must be >= 0")
    processes = args.num_cpu_procs or args.num_gpus
    world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else args.num_machines * processes
    check(args, setup(args), world_size)
    try:
        launch(main, processes, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,), use_cuda=not args.num_cpu_procs and torch.cuda.is_available())  # fmt: skip
    except WorkerDied as e:
        raise WorkerDied(
            f"{e}{'' if args.eval_only else ': --resume continues the run from its last checkpoint'}"
        ) from None
    return 0


if __name__ == "__main__":
    sys.exit(run())
