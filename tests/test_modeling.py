"""GN+WS model wiring: where WS goes, parity with detectron2's own GN model, the GN twin, fold_ws."""

import copy

import pytest
import torch
from detectron2.layers import Conv2d
from detectron2.modeling import build_backbone, build_model

from ws_d2.config import get_ws_cfg
from ws_d2.data import synthetic_batch
from ws_d2.layers import WSConv2d
from ws_d2.modeling import count_ws_convs, fold_ws

MASK_R50 = "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml"
STOCK_NAMES = [
    "MODEL.BACKBONE.NAME",
    "build_resnet_fpn_backbone",
    "MODEL.ROI_BOX_HEAD.NAME",
    "FastRCNNConvFCHead",
    "MODEL.ROI_MASK_HEAD.NAME",
    "MaskRCNNConvUpsampleHead",
]
TINY = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "50",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "20",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "0.0",
    "TEST.DETECTIONS_PER_IMAGE",
    "5",
]


def load_cfg(repo_root, config=MASK_R50, opts=()):
    cfg = get_ws_cfg()
    cfg.merge_from_file(str(repo_root / config))
    cfg.merge_from_list(TINY + list(opts))
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def mask_r50(repo_root):
    return build(load_cfg(repo_root))


@pytest.fixture(scope="module")
def stock_gn(repo_root):
    return build(load_cfg(repo_root, opts=STOCK_NAMES))


def ws_names(model):
    return {name for name, m in model.named_modules() if isinstance(m, WSConv2d)}


def normed_conv_names(model):
    return {name for name, m in model.named_modules() if isinstance(m, Conv2d) and m.norm is not None}


def tiny_images(cfg, seed=0):
    return synthetic_batch(cfg, size=64, batch=1, seed=seed, training=False)


def test_mask_rcnn_r50_has_69_ws_convs_in_the_right_places(mask_r50):
    assert count_ws_convs(mask_r50) == 69
    assert count_ws_convs(mask_r50.backbone.bottom_up) == 53
    assert count_ws_convs(mask_r50.backbone) - 53 == 8
    assert count_ws_convs(mask_r50.roi_heads.box_head) == 4
    assert count_ws_convs(mask_r50.roi_heads.mask_head) == 4
    # WS on exactly the convs a norm follows ...
    assert ws_names(mask_r50) == normed_conv_names(mask_r50)
    bottom_up = mask_r50.backbone.bottom_up
    assert isinstance(bottom_up.stem.conv1, WSConv2d)
    assert isinstance(bottom_up.res2[0].shortcut, WSConv2d)
    assert isinstance(mask_r50.backbone.fpn_lateral2, WSConv2d)
    assert isinstance(mask_r50.backbone.fpn_output5, WSConv2d)
    # ... and nowhere else: RPN, fc, predictors, mask deconv and predictor stay plain.
    plain = [
        mask_r50.proposal_generator.rpn_head.conv,
        mask_r50.proposal_generator.rpn_head.objectness_logits,
        mask_r50.proposal_generator.rpn_head.anchor_deltas,
        mask_r50.roi_heads.box_head.fc1,
        mask_r50.roi_heads.box_predictor.cls_score,
        mask_r50.roi_heads.box_predictor.bbox_pred,
        mask_r50.roi_heads.mask_head.deconv,
        mask_r50.roi_heads.mask_head.predictor,
    ]
    assert not any(isinstance(m, WSConv2d) for m in plain)
    assert all(m.eps == 1e-5 for m in mask_r50.modules() if isinstance(m, WSConv2d))


def test_every_ws_conv_is_the_one_forward_calls(repo_root, mask_r50):
    """detectron2's FPN also iterates plain lists of its convs: the WS modules must be the ones run."""
    assert all(
        isinstance(m, WSConv2d) for m in mask_r50.backbone.lateral_convs + mask_r50.backbone.output_convs
    )
    called = set()
    handles = [
        m.register_forward_hook(lambda module, args, out, name=name: called.add(name))
        for name, m in mask_r50.named_modules()
        if isinstance(m, Conv2d) and m.norm is not None
    ]
    try:
        with torch.no_grad():
            mask_r50(tiny_images(load_cfg(repo_root)))
    finally:
        for handle in handles:
            handle.remove()
    assert called == ws_names(mask_r50) and len(called) == 69


@pytest.mark.parametrize("depth, groups", [(101, 1), (101, 32)])
def test_r101_and_x101_backbones_have_104_ws_convs(repo_root, depth, groups):
    opts = ["MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.NUM_GROUPS", str(groups)]
    if groups > 1:
        opts += ["MODEL.RESNETS.WIDTH_PER_GROUP", "4"]
    cfg = load_cfg(repo_root, opts=opts)
    backbone = build_backbone(cfg)
    assert count_ws_convs(backbone.bottom_up) == 104
    assert count_ws_convs(backbone) == 112
    if groups > 1:
        assert backbone.bottom_up.res2[0].conv2.groups == 32


def test_state_dict_parity_with_detectron2_gn_model(mask_r50, stock_gn):
    ours = {k: v.shape for k, v in mask_r50.state_dict().items()}
    stock = {k: v.shape for k, v in stock_gn.state_dict().items()}
    assert ours == stock


def test_stock_model_built_after_ws_model_stays_ws_free(mask_r50, repo_root):
    assert count_ws_convs(mask_r50) == 69  # a WS model exists in this process
    stock = build(load_cfg(repo_root, opts=STOCK_NAMES))
    assert count_ws_convs(stock) == 0
    assert all(type(m) is not WSConv2d for m in stock.modules())


def test_ws_disabled_is_the_gn_twin(repo_root, mask_r50):
    twin = build(load_cfg(repo_root, opts=["MODEL.WS.ENABLED", "False"]))
    assert count_ws_convs(twin) == 0
    assert {k: v.shape for k, v in twin.state_dict().items()} == {
        k: v.shape for k, v in mask_r50.state_dict().items()
    }


def test_ws_is_really_on_outputs_differ_from_gn_twin(repo_root, mask_r50, stock_gn):
    stock_gn.load_state_dict(mask_r50.state_dict())
    cfg = load_cfg(repo_root)
    images = mask_r50.preprocess_image(tiny_images(cfg)).tensor
    with torch.no_grad():
        ours, theirs = mask_r50.backbone(images), stock_gn.backbone(images)
    for name in ours:
        assert not torch.allclose(ours[name], theirs[name], atol=1e-3), name


def assert_same_outputs(a, b):
    for out_a, out_b in zip(a, b):
        inst_a, inst_b = out_a["instances"], out_b["instances"]
        assert len(inst_a) == len(inst_b) > 0
        for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
            va, vb = inst_a.get(field), inst_b.get(field)
            va, vb = getattr(va, "tensor", va), getattr(vb, "tensor", vb)
            torch.testing.assert_close(va, vb, rtol=0, atol=0)


def test_fold_ws_identical_outputs_and_loads_into_stock_gn_model(repo_root, mask_r50, stock_gn):
    cfg = load_cfg(repo_root)
    inputs = tiny_images(cfg, seed=1)
    with torch.no_grad():
        expected = mask_r50(inputs)
    folded = fold_ws(copy.deepcopy(mask_r50))
    assert count_ws_convs(folded) == 0
    assert {k: v.shape for k, v in folded.state_dict().items()} == {
        k: v.shape for k, v in mask_r50.state_dict().items()
    }
    with torch.no_grad():
        assert_same_outputs(folded(inputs), expected)
    stock_gn.load_state_dict(folded.state_dict())
    with torch.no_grad():
        assert_same_outputs(stock_gn(inputs), expected)


@pytest.mark.parametrize("depth, expected_ws", [(18, 20), (34, 36)])
def test_basic_block_depths_build_and_train(repo_root, depth, expected_ws):
    opts = ["MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    opts += ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50"]
    cfg = load_cfg(repo_root, opts=opts)
    model = build(cfg).train()
    # stem 1 + 2 per BasicBlock + 3 shortcuts; FPN 8, box head 4, mask head 4.
    assert count_ws_convs(model.backbone.bottom_up) == expected_ws
    assert count_ws_convs(model) == expected_ws + 16
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        losses = model(synthetic_batch(cfg, size=64, batch=1, seed=0))
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.backbone.bottom_up.stem.parameters())  # frozen stem
