"""The seed configs: the 12 GN+WS models and their 3 BCN+WS twins. Names, shared recipe, schedules; every
model's WS placement and state_dict against its GN twin and detectron2's stock model (built on the meta
device: shapes without memory or time); a training step of each distinct architecture."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import ws_d2
from ws_d2.data import synthetic_batch
from ws_d2.modeling import count_bcn, count_ws_convs

BACKBONES = {"R_50": (50, 1, "R-50"), "R_101": (101, 1, "R-101"), "X_50_32x4d": (50, 32, "X-50-32x4d")}
BACKBONES["X_101_32x4d"] = (101, 32, "X-101-32x4d")
# schedule -> (epochs, LR drops after these epochs)
SCHEDULES = {"1x": (12, (8, 11)), "2x": (24, (16, 22)), "20-23-24e": (24, (20, 23))}
CONFIGS = [f"COCO-Detection/faster_rcnn_{b}_FPN_gn_ws_1x.yaml" for b in BACKBONES] + [
    f"COCO-InstanceSegmentation/mask_rcnn_{b}_FPN_gn_ws_{s}.yaml"
    for b in BACKBONES
    for s in ("2x", "20-23-24e")
]
BCN_CONFIGS = [
    f"COCO-InstanceSegmentation/mask_rcnn_{b}_FPN_bcn_ws_2x.yaml" for b in ("R_50", "R_101", "X_50_32x4d")
]
COCO_TRAIN_IMAGES = 117266  # train2017 images with annotations
ITERS_PER_EPOCH = math.ceil(COCO_TRAIN_IMAGES / 16)
# detectron2's own components in place of ws_d2's: the stock GN model
STOCK_NAMES = ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.ROI_BOX_HEAD.NAME",
               "FastRCNNConvFCHead", "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"]  # fmt: skip


def load(repo_root, name, opts=()):
    return ws_d2.load_config(str(repo_root / "configs" / name), list(opts), freeze=False)


def test_exactly_these_configs_exist(repo_root):
    found = {
        p.relative_to(repo_root / "configs").as_posix() for p in (repo_root / "configs").glob("COCO-*/*.yaml")
    }
    assert len(CONFIGS) == 12 and found == set(CONFIGS) | set(BCN_CONFIGS)


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
    assert cfg.MODEL.WS.ENABLED and cfg.MODEL.WS.EPS == 1e-5 and cfg.MODEL.WS.FORMULA == "std_plus_eps"
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


@pytest.mark.parametrize("name", BCN_CONFIGS)
def test_bcn_config_is_its_gn_ws_twin_with_bcn(repo_root, name):
    bcn, gn = load(repo_root, name), load(repo_root, name.replace("_bcn_ws_", "_gn_ws_"))
    weights = BACKBONES[name.split("rcnn_")[1].split("_FPN")[0]][2]
    assert bcn.MODEL.WEIGHTS == f"pretrained/{weights}-BCN-WS.pkl"
    assert bcn.MODEL.BCN.ENABLED and bcn.MODEL.BCN.ESTIMATE and bcn.MODEL.BCN.GROUPS == 32
    assert bcn.MODEL.WS.FORMULA == "sqrt_var_plus_eps"
    for key in ("WEIGHTS", "BCN", "WS"):  # everything else (recipe, schedule, heads) is the GN+WS model's
        bcn.MODEL.pop(key), gn.MODEL.pop(key)
    assert bcn == gn


def test_loading_configs_leaves_detectron2_defaults_alone(repo_root):
    load(repo_root, CONFIGS[-1])
    assert "WS" not in get_cfg().MODEL


def meta_model(cfg):
    """The model of `cfg` with every tensor on the meta device: its modules and shapes, no memory."""
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        return build_model(cfg)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", CONFIGS + BCN_CONFIGS)
def test_every_normed_conv_is_ws_and_the_state_dict_is_the_gn_models(repo_root, name):
    """WS on the stem, every block and shortcut conv, the 8 FPN convs and the 4 + 4 head convs (ResNet-50:
    1 + 16 x 3 + 4 shortcuts = 53; ResNet-101: 104). The GN twin (MODEL.WS.ENABLED False) and detectron2's own
    GN model of the config have exactly the same state_dict keys and shapes: weights load either way."""
    cfg = load(repo_root, name)
    model = meta_model(cfg.clone())
    expected = (53 if cfg.MODEL.RESNETS.DEPTH == 50 else 104) + 8 + 4 + (4 if cfg.MODEL.MASK_ON else 0)
    assert count_ws_convs(model) == expected
    assert count_ws_convs(model.backbone.bottom_up) == expected - 8 - 4 - (4 if cfg.MODEL.MASK_ON else 0)
    if cfg.MODEL.RESNETS.NUM_GROUPS == 32:
        assert model.backbone.bottom_up.res2[0].conv2.groups == 32
    if cfg.MODEL.BCN.ENABLED:  # BCN replaces every GroupNorm
        assert count_bcn(model) == expected
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
        return
    twin = meta_model(load(repo_root, name, ["MODEL.WS.ENABLED", "False"]))
    stock = meta_model(load(repo_root, name, STOCK_NAMES))
    assert count_ws_convs(twin) == count_ws_convs(stock) == 0
    assert shapes(model) == shapes(twin) == shapes(stock)


# A training step of each distinct architecture, at 64 px with few anchors and RoIs. The 2x and 20-23-24e
# configs build the same model, and R-101 / X-101 only repeat R-50 / X-50's blocks (checked above):
# Faster R-CNN R-50 (no mask head) and Mask R-CNN X-50-32x4d (grouped convs, the mask head) cover the rest.
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "20", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8",
]  # fmt: skip


@pytest.mark.parametrize(
    "name", [CONFIGS[0], "COCO-InstanceSegmentation/mask_rcnn_X_50_32x4d_FPN_gn_ws_2x.yaml"]
)
def test_distinct_architecture_trains_one_tiny_step(repo_root, name):
    cfg = load(repo_root, name, TINY)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with EventStorage(0):
        losses = model(synthetic_batch(cfg, size=64, batch=1, seed=0))
    assert ("loss_mask" in losses) == cfg.MODEL.MASK_ON
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    # every trained parameter got a finite gradient; the frozen stem and res2 none
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trained), [
        n for n, p in trained if p.grad is None
    ]
    frozen = list(model.backbone.bottom_up.stem.parameters()) + list(
        model.backbone.bottom_up.res2.parameters()
    )
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
