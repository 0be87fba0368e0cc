"""The 12 seed configs: names, shared recipe, schedules, and each builds and trains a step on a tiny input."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from ws_d2.config import get_ws_cfg
from ws_d2.data import synthetic_batch
from ws_d2.modeling import count_ws_convs

BACKBONES = {"R_50": (50, 1, "R-50"), "R_101": (101, 1, "R-101"), "X_50_32x4d": (50, 32, "X-50-32x4d")}
BACKBONES["X_101_32x4d"] = (101, 32, "X-101-32x4d")
# schedule -> (epochs, LR drops after these epochs)
SCHEDULES = {"1x": (12, (8, 11)), "2x": (24, (16, 22)), "20-23-24e": (24, (20, 23))}
CONFIGS = [f"COCO-Detection/faster_rcnn_{b}_FPN_gn_ws_1x.yaml" for b in BACKBONES] + [
    f"COCO-InstanceSegmentation/mask_rcnn_{b}_FPN_gn_ws_{s}.yaml"
    for b in BACKBONES
    for s in ("2x", "20-23-24e")
]
COCO_TRAIN_IMAGES = 117266  # train2017 images with annotations
ITERS_PER_EPOCH = math.ceil(COCO_TRAIN_IMAGES / 16)


def load(repo_root, name, opts=()):
    cfg = get_ws_cfg()
    cfg.merge_from_file(str(repo_root / "configs" / name))
    cfg.merge_from_list(list(opts))
    return cfg


# their BCN+WS twins (tests/test_bcn.py)
BCN_CONFIGS = [
    f"COCO-InstanceSegmentation/mask_rcnn_{b}_FPN_bcn_ws_2x.yaml" for b in ("R_50", "R_101", "X_50_32x4d")
]


def test_exactly_the_twelve_configs_exist(repo_root):
    found = {
        p.relative_to(repo_root / "configs").as_posix() for p in (repo_root / "configs").glob("COCO-*/*.yaml")
    }
    assert found == set(CONFIGS) | set(BCN_CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_follows_the_seed_recipe(repo_root, name):
    text = (repo_root / "configs" / name).read_text()
    assert '_BASE_: "../Base-GN-WS-RCNN-FPN.yaml"' in text
    cfg = load(repo_root, name)
    backbone = next(b for b in BACKBONES if f"_{b}_FPN" in name)
    depth, groups, weights = BACKBONES[backbone]
    schedule = next(s for s in SCHEDULES if name.endswith(f"_{s}.yaml"))
    assert cfg.MODEL.RESNETS.DEPTH == depth and cfg.MODEL.RESNETS.NUM_GROUPS == groups
    assert cfg.MODEL.RESNETS.WIDTH_PER_GROUP == (4 if groups == 32 else 64)
    assert cfg.MODEL.WEIGHTS == f"pretrained/{weights}-GN-WS.pkl"
    assert cfg.MODEL.MASK_ON == name.startswith("COCO-InstanceSegmentation/")
    assert cfg.MODEL.WS.ENABLED and cfg.MODEL.WS.EPS == 1e-5
    assert cfg.MODEL.BACKBONE.NAME == "build_ws_resnet_fpn_backbone" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert cfg.MODEL.RESNETS.NORM == cfg.MODEL.FPN.NORM == "GN" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.MODEL.ROI_BOX_HEAD.NAME == "WSFastRCNNConvFCHead" and cfg.MODEL.ROI_BOX_HEAD.NORM == "GN"
    assert (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1)
    assert (
        cfg.MODEL.ROI_MASK_HEAD.NAME == "WSMaskRCNNConvUpsampleHead" and cfg.MODEL.ROI_MASK_HEAD.NORM == "GN"
    )
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE == "ROIAlignV2"
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert cfg.INPUT.RANDOM_FLIP == "horizontal"
    solver = cfg.SOLVER
    assert (solver.IMS_PER_BATCH, solver.BASE_LR, solver.WARMUP_METHOD) == (16, 0.02, "linear")
    assert (solver.WARMUP_ITERS, solver.WARMUP_FACTOR) == (500, 0.001)
    assert solver.WEIGHT_DECAY == solver.WEIGHT_DECAY_NORM == 1e-4
    epochs, drops = SCHEDULES[schedule]
    assert solver.MAX_ITER == epochs * ITERS_PER_EPOCH
    assert tuple(solver.STEPS) == tuple(e * ITERS_PER_EPOCH for e in drops)


def test_loading_configs_leaves_detectron2_defaults_alone(repo_root):
    load(repo_root, CONFIGS[-1])
    assert "WS" not in get_cfg().MODEL


# Tiny runs: one 64 x 85 image, few anchors and RoIs: each config builds and takes a training step.
TINY = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "20",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "8",
]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_trains_one_tiny_step(repo_root, name):
    cfg = load(repo_root, name, TINY)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    expected = (53 if cfg.MODEL.RESNETS.DEPTH == 50 else 104) + 8 + 4 + (4 if cfg.MODEL.MASK_ON else 0)
    assert count_ws_convs(model) == expected
    with EventStorage(0):
        losses = model(synthetic_batch(cfg, size=64, batch=1, seed=0))
    assert ("loss_mask" in losses) == cfg.MODEL.MASK_ON
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    res5_conv = model.backbone.bottom_up.res5[0].conv2
    assert res5_conv.weight.grad is not None and torch.isfinite(res5_conv.weight.grad).all()
