#!/usr/bin/env python
"""Train or evaluate a DeepLabV3+ GN+WS (or BCN+WS) model: detectron2's train_net command line, ws_d2's trainer.

  python projects/DeepLabWS/train_net.py --config-file projects/DeepLabWS/configs/synthetic/deeplab_v3_plus_R_50_half_gn_ws_synthetic.yaml
  ... --eval-only MODEL.WEIGHTS output/.../model_final.pth

The synthetic sets are generated first when the config uses them. Exit status: 0 done, 1 refused or failed,
2 usage error.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # deeplab_ws lives beside this script

import deeplab_ws  # noqa: E402  (first: ws_d2's fixes and the registrations)

# isort: split
import torch  # noqa: E402
from detectron2.data import DatasetMapper, build_detection_train_loader  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup  # noqa: E402
from detectron2.evaluation import SemSegEvaluator  # noqa: E402
from detectron2.projects.deeplab import build_lr_scheduler  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from ws_d2.checkpoint import WSCheckpointer  # noqa: E402
from ws_d2.engine import WSTrainer, launch  # noqa: E402
from ws_d2.engine.micro_batch import micro_batch_size  # noqa: E402
from ws_d2.errors import command_line  # noqa: E402
from ws_d2.model_zoo import imagenet_weights  # noqa: E402

SYNTHETIC_PREFIX = "ws_d2_synthetic_sem_seg_"


def sem_seg_train_augmentations(cfg):
    """DeepLab's: resize, a crop in which no class covers more than SINGLE_CATEGORY_MAX_AREA, flip."""
    crop = cfg.INPUT.CROP
    return [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        ),
        T.RandomCrop_CategoryAreaConstraint(
            crop.TYPE, crop.SIZE, crop.SINGLE_CATEGORY_MAX_AREA, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        ),
        T.RandomFlip(),
    ]


class Trainer(WSTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        if not cfg.INPUT.CROP.ENABLED:
            return super().build_train_loader(cfg)
        # batched per micro-batch, as WSTrainer's own loader
        micro_cfg = cfg.clone()
        micro_cfg.defrost()
        micro_cfg.SOLVER.IMS_PER_BATCH = micro_batch_size(cfg, comm.get_world_size()) * comm.get_world_size()
        return build_detection_train_loader(
            micro_cfg, mapper=DatasetMapper(cfg, True, augmentations=sem_seg_train_augmentations(cfg))
        )

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)  # detectron2's DeepLab: WarmupPolyLR, or detectron2's own

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        """mIoU, fwIoU, mACC, pACC and per-class IoU (detectron2's SemSegEvaluator)."""
        return SemSegEvaluator(
            dataset_name, output_dir=os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        )


def setup(args):
    cfg = deeplab_ws.load_config(args.config_file, args.opts, freeze=False)
    cfg.MODEL.WEIGHTS = imagenet_weights(cfg.MODEL.WEIGHTS)  # not converted yet: the authors' file by URL
    cfg.freeze()
    return cfg


def main(args):
    cfg = setup(args)
    default_setup(cfg, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        WSCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


@command_line("train_net")
def run(argv=None):
    args = default_argument_parser(epilog=__doc__).parse_args(argv)
    cfg = setup(args)  # a bad config is refused here, before any worker starts
    if any(name.startswith(SYNTHETIC_PREFIX) for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST)):
        deeplab_ws.generate_synthetic_sem_seg()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,), use_cuda=torch.cuda.is_available())  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run())
