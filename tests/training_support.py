"""Shared by the training tests (no tests here): a tiny GN+WS R-CNN on a tiny synthetic set."""

import os
import subprocess
import sys

import torch
from detectron2.modeling import build_model

from ws_d2.config import get_ws_cfg
from ws_d2.data import generate_synthetic_dataset, register_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_CONFIG = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_R_18_FPN_gn_ws_synthetic.yaml")

# The quickstart config shrunk to seconds: 64 px images, narrow heads, no augmentation, no loader workers.
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64", "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.DEVICE", "cpu", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.STEPS", "()", "SOLVER.BASE_LR", "0.01", "TEST.EVAL_PERIOD", "0", "SEED", "0",
]  # fmt: skip


# Where detectron2's loss normalizers are proportional to the number of images, averaging over micro-batches
# or processes is exact: RPN losses divide by RPN.BATCH_SIZE_PER_IMAGE x images, box losses by the sampled
# RoIs. Fix the RoI count per image (1 object per image, 8 proposals + the GT box, all kept) and sample every
# labelled anchor (no random subset, so the order of random draws does not matter). Masks (normalized by the
# foreground RoIs of the whole batch) are off: that loss is only approximately batch-size invariant.
# With 4 images and 4 images per step, every step sees the whole set in any order.
EXACT_OPTS = [
    "MODEL.MASK_ON", "False", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "4096", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "8",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2",
    "SOLVER.CHECKPOINT_PERIOD", "100000", "DATASETS.TEST", "()",
]  # fmt: skip


def tiny_cfg(*opts):
    cfg = get_ws_cfg()
    cfg.merge_from_file(QUICKSTART_CONFIG)
    cfg.merge_from_list(TINY_OPTS + list(opts))
    return cfg


def save_initial_weights(cfg, path):
    """Random initial weights as a checkpoint file, so separate runs start from the same model."""
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return str(path)


def make_tiny_dataset(root, prefix, num_train=4, num_val=2, max_objects=2):
    """A tiny synthetic set under `root`, registered as `{prefix}_train` / `{prefix}_val`."""
    generate_synthetic_dataset(
        root, {"train": num_train, "val": num_val}, image_size=64, max_objects=max_objects
    )
    register_synthetic_dataset(root, prefix, splits=("train", "val"))
    return ["DATASETS.TRAIN", f"('{prefix}_train',)", "DATASETS.TEST", f"('{prefix}_val',)"]


def synthetic_dataset_args(root):
    """train_net arguments registering the tiny set in `root` (for subprocesses)."""
    return [
        "--coco-dataset", "tiny_train", os.path.join(root, "annotations", "instances_train.json"),
        os.path.join(root, "train"),
        "--coco-dataset", "tiny_val", os.path.join(root, "annotations", "instances_val.json"),
        os.path.join(root, "val"),
    ]  # fmt: skip


def train_net(flags, opts, **popen_kwargs):
    """Start tools/train_net.py on the quickstart config with the tiny settings, `flags` and then `opts`."""
    command = [
        sys.executable,
        os.path.join(REPO, "tools", "train_net.py"),
        "--config-file",
        QUICKSTART_CONFIG,
    ]
    command += (
        flags + TINY_OPTS + ["DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)"] + opts
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(command, cwd=REPO, env=env, **popen_kwargs)
