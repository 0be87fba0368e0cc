"""GN+WS model wiring: where WS goes (every config's counts and state_dict parity: test_configs.py), the WS
convs are the ones run, registration leaves detectron2's own builders alone, and fold_ws."""

import copy

import pytest
import torch
from detectron2.layers import Conv2d
from detectron2.modeling import build_model

from ws_d2.config import get_ws_cfg
from ws_d2.data import synthetic_batch
from ws_d2.layers import WS_MODES, BatchChannelNorm, WSConv2d
from ws_d2.modeling import count_bcn, count_ws_convs, fold_ws

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


def test_ws_on_exactly_the_convs_a_norm_follows(mask_r50):
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
    assert called == ws_names(mask_r50) and called


def test_stock_model_built_after_ws_model_stays_ws_free(mask_r50, stock_gn):
    # stock_gn is built after mask_r50: registering and building WS models changes no detectron2 builder
    assert count_ws_convs(mask_r50) > 0
    assert normed_conv_names(stock_gn) == ws_names(mask_r50)
    assert all(type(m) is not WSConv2d for m in stock_gn.modules())


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


def fold_test_conv(mode, seed=0):
    """A float64 WSConv2d of `mode` with a random weight and, where the mode has them, gains away from 1."""
    generator = torch.Generator().manual_seed(seed)
    conv = WSConv2d(4, 6, kernel_size=3, padding=1, bias=False, mode=mode).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64) * 0.1 + 0.03)
        if mode in ("standardize_affine", "weight_norm"):
            conv.ws_gain.mul_(1.7)
    return conv.eval()


@pytest.mark.parametrize("mode", WS_MODES)
def test_fold_ws_keeps_outputs_for_every_mode(mode):
    conv = fold_test_conv(mode)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x)
        folded = fold_ws(torch.nn.Sequential(conv))
    assert not any(isinstance(m, WSConv2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-13)


def test_fold_ws_keeps_bcn(tiny_cfg):
    """A BCN+WS model folds its WS and keeps its Batch-Channel Normalization (detectron2 has none)."""
    cfg = tiny_cfg("MODEL.BCN.ENABLED", "True", "MODEL.WS.FORMULA", "sqrt_var_plus_eps")
    model = build(cfg)
    inputs = synthetic_batch(cfg, size=64, batch=1, seed=1)
    with torch.no_grad():
        features = model.backbone(model.preprocess_image(inputs).tensor)
        bcn_before = count_bcn(model)
        fold_ws(model)
        folded = model.backbone(model.preprocess_image(inputs).tensor)
    assert bcn_before > 0 and count_ws_convs(model) == 0 and count_bcn(model) == bcn_before
    assert {type(m.norm) for m in model.modules() if isinstance(m, Conv2d) and m.norm is not None} == {
        BatchChannelNorm
    }
    for name, value in features.items():
        torch.testing.assert_close(folded[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth, expected_ws", [(18, 20), (34, 36)])
def test_basic_block_depths(repo_root, depth, expected_ws):
    # stem 1 + 2 per BasicBlock + 3 shortcuts (the tiny R-18 model trains in many other tests)
    cfg = load_cfg(
        repo_root, opts=["MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    )
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    assert count_ws_convs(model.backbone.bottom_up) == expected_ws
    assert ws_names(model) == normed_conv_names(model)
