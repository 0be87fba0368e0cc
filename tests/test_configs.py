"""The seed configs: the 12 GN+WS models and their 3 BCN+WS twins, and the rest of detectron2's family on the
same recipe (Cascade Mask R-CNN, RetinaNet, Panoptic FPN). Names, shared recipe, schedules; every model's WS
placement and state_dict against its GN twin and detectron2's stock model (built on the meta device: shapes
without memory or time); a training step of each distinct seed architecture (the family's:
test_model_family.py)."""

import math
import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import ws_d2
from ws_d2.data import synthetic_batch
from ws_d2.layers import WSConv2d
from ws_d2.modeling import count_bcn, count_ws_convs

BACKBONES = {"R_50": (50, 1, "R-50"), "R_101": (101, 1, "R-101"), "X_50_32x4d": (50, 32, "X-50-32x4d")}
BACKBONES["X_101_32x4d"] = (101, 32, "X-101-32x4d")
# schedule -> (epochs, LR drops after these epochs)
SCHEDULES = {"1x": (12, (8, 11)), "2x": (24, (16, 22)), "20-23-24e": (24, (20, 23)), "3x": (36, (27, 33))}
CONFIGS = [f"COCO-Detection/faster_rcnn_{b}_FPN_gn_ws_1x.yaml" for b in BACKBONES] + [
    f"COCO-InstanceSegmentation/mask_rcnn_{b}_FPN_gn_ws_{s}.yaml"
    for b in BACKBONES
    for s in ("2x", "20-23-24e")
]
BCN_CONFIGS = [
    f"COCO-InstanceSegmentation/mask_rcnn_{b}_FPN_bcn_ws_2x.yaml" for b in ("R_50", "R_101", "X_50_32x4d")
]
# The convs that carry no norm stay plain, as in detectron2's GN models and the published GN+WS ones: the
# RPN's shared 3x3 conv (ReLU only) and its two 1x1 predictors, the mask predictor (the mask deconv is a
# ConvTranspose2d, no norm either), the semantic head's 1x1 predictor, RetinaNet's P6/P7 convs (LastLevelP6P7)
# and its two predictor convs. The box predictors are Linear layers.
RPN = {f"proposal_generator.rpn_head.{n}" for n in ("conv", "objectness_logits", "anchor_deltas")}
MASK_PREDICTOR = {"roi_heads.mask_head.predictor"}
# config -> (WS convs, the plain convs). ResNet-50: 53 WS convs, ResNet-101: 104 (see below); FPN: 8 (4 + 4)
# or, on RetinaNet's res3-res5, 6; 4 per box head, three of them in Cascade; 4 in the mask head; Panoptic
# FPN's semantic head 1 + 1 + 2 + 3 (p2-p5: one conv per 2x upsampling); RetinaNet's head 4 + 4.
FAMILY = {
    "COCO-InstanceSegmentation/cascade_mask_rcnn_R_50_FPN_gn_ws_3x.yaml": (
        53 + 8 + 12 + 4,
        RPN | MASK_PREDICTOR,
    ),
    "COCO-InstanceSegmentation/cascade_mask_rcnn_R_101_FPN_gn_ws_3x.yaml": (
        104 + 8 + 12 + 4,
        RPN | MASK_PREDICTOR,
    ),
    "COCO-Detection/retinanet_R_50_FPN_gn_ws_1x.yaml": (
        53 + 6 + 8,
        {"backbone.top_block.p6", "backbone.top_block.p7", "head.cls_score", "head.bbox_pred"},
    ),
    "COCO-PanopticSegmentation/panoptic_fpn_R_50_gn_ws_3x.yaml": (
        53 + 8 + 4 + 4 + 7,
        RPN | MASK_PREDICTOR | {"sem_seg_head.predictor"},
    ),
}
# BCN+WS wherever the GN+WS model has GroupNorm; none for RetinaNet, whose head shares its norms across the
# five FPN levels (batch statistics there would mix the levels' scales: detectron2 itself keeps per-level BN).
FAMILY_BCN = {name.replace("_gn_ws_", "_bcn_ws_"): v for name, v in FAMILY.items() if "retinanet" not in name}
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
    assert len(CONFIGS) == 12 and found == set(CONFIGS) | set(BCN_CONFIGS) | set(FAMILY) | set(FAMILY_BCN)


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


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_config_is_the_seed_recipe_with_its_architecture(repo_root, name):
    """Cascade Mask R-CNN, RetinaNet and Panoptic FPN: the seed recipe (base file, ImageNet GN+WS weights,
    schedule in epochs) with only what the architecture needs (detectron2's Misc/cascade_mask_rcnn,
    Base-RetinaNet and Base-Panoptic-FPN settings)."""
    assert '_BASE_: "../Base-GN-WS-RCNN-FPN.yaml"' in (repo_root / "configs" / name).read_text()
    cfg, seed = load(repo_root, name), load(repo_root, CONFIGS[0])
    depth = int(re.search(r"_R_(\d+)_", name).group(1))
    assert cfg.MODEL.RESNETS.DEPTH == depth and cfg.MODEL.WEIGHTS == f"pretrained/R-{depth}-GN-WS.pkl"
    assert (
        cfg.MODEL.PIXEL_MEAN == seed.MODEL.PIXEL_MEAN
        and cfg.INPUT == seed.INPUT
        and cfg.MODEL.WS == seed.MODEL.WS
    )
    assert cfg.MODEL.RESNETS.NORM == cfg.MODEL.FPN.NORM == "GN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    arch = cfg.MODEL.META_ARCHITECTURE
    if "cascade" in name:
        assert (
            arch == "GeneralizedRCNN" and cfg.MODEL.ROI_HEADS.NAME == "CascadeROIHeads" and cfg.MODEL.MASK_ON
        )
        assert cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG and cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN == 2000
    elif "retinanet" in name:
        assert arch == "WSRetinaNet" and cfg.MODEL.RETINANET.NORM == "GN" and not cfg.MODEL.MASK_ON
        assert cfg.MODEL.BACKBONE.NAME == "build_ws_retinanet_resnet_fpn_backbone"
        assert cfg.MODEL.FPN.IN_FEATURES == ["res3", "res4", "res5"] and cfg.SOLVER.BASE_LR == 0.01
        sizes = [size for level in cfg.MODEL.ANCHOR_GENERATOR.SIZES for size in level]  # 3 per octave
        assert sizes == pytest.approx([x * 2 ** (k / 3) for x in (32, 64, 128, 256, 512) for k in range(3)])
    else:
        assert (
            arch == "PanopticFPN" and cfg.MODEL.MASK_ON and cfg.MODEL.SEM_SEG_HEAD.NAME == "WSSemSegFPNHead"
        )
        assert cfg.MODEL.SEM_SEG_HEAD.NORM == "GN" and cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT == 0.5
        assert cfg.DATASETS.TRAIN == ("coco_2017_train_panoptic_separated",)
        assert not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    if arch != "WSRetinaNet":  # the seed's 4conv1fc box head and 4conv mask head, in each cascade stage too
        assert cfg.MODEL.ROI_BOX_HEAD.NAME == "WSFastRCNNConvFCHead" and cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 4
        assert cfg.MODEL.ROI_MASK_HEAD == seed.MODEL.ROI_MASK_HEAD
    epochs, drops = SCHEDULES[name[: -len(".yaml")].rsplit("_", 1)[1]]
    # Panoptic FPN keeps the images without annotations: 118,287 (configs/Schedules.md)
    per_epoch = math.ceil((118287 if arch == "PanopticFPN" else COCO_TRAIN_IMAGES) / 16)
    assert cfg.SOLVER.MAX_ITER == epochs * per_epoch
    assert tuple(cfg.SOLVER.STEPS) == tuple(e * per_epoch for e in drops)


@pytest.mark.parametrize("name", BCN_CONFIGS + list(FAMILY_BCN))
def test_bcn_config_is_its_gn_ws_twin_with_bcn(repo_root, name):
    bcn, gn = load(repo_root, name), load(repo_root, name.replace("_bcn_ws_", "_gn_ws_"))
    weights = BACKBONES[re.search(r"_(R_50|R_101|X_50_32x4d)_", name).group(1)][2]
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


@pytest.mark.parametrize("name", list(FAMILY) + list(FAMILY_BCN))
def test_family_ws_on_exactly_the_normed_convs_and_the_state_dict_is_the_gn_models(
    repo_root, name, export_tool
):
    """WS on every conv that a norm follows (as many as the GN twin has GroupNorms) and on no other: the plain
    ones are those of FAMILY (see there why). The GN twin and detectron2's stock model (stock_config: its own
    component names) have the same state_dict keys and shapes; a BCN+WS model has BCN wherever GN was."""
    expected, plain = (FAMILY | FAMILY_BCN)[name]
    model = meta_model(load(repo_root, name))
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert count_ws_convs(model) == expected
    assert {n for n, m in convs.items() if not isinstance(m, WSConv2d)} == plain
    if name in FAMILY_BCN:
        assert count_bcn(model) == expected and not any(
            isinstance(m, torch.nn.GroupNorm) for m in model.modules()
        )
        return
    twin = meta_model(load(repo_root, name, ["MODEL.WS.ENABLED", "False"]))
    assert (
        count_ws_convs(twin) == 0
        and sum(isinstance(m, torch.nn.GroupNorm) for m in twin.modules()) == expected
    )
    assert shapes(model) == shapes(twin)
    stock_cfg = export_tool.stock_config(load(repo_root, name))
    try:
        stock = meta_model(stock_cfg)
    except ValueError as e:  # v0.6's RetinaNetHead probes get_norm("GN", 1); detectron2 main builds it
        assert stock_cfg.MODEL.META_ARCHITECTURE == "RetinaNet" and "num_groups (32)" in str(e)
        return
    assert count_ws_convs(stock) == 0 and shapes(stock) == shapes(model)


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
