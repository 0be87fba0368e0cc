"""Cascade Mask R-CNN, RetinaNet and Panoptic FPN on the GN+WS recipe, and their BCN+WS variants, as tiny
R-18 models at 64 px: a training step through every WS conv, fold_ws, what WSRetinaNet refuses, and the
panoptic quickstart config's training and scores. Their configs, WS placement and state_dicts: test_configs.py;
their export: test_deploy.py."""

import copy
import json

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from ws_d2.data import synthetic_batch
from ws_d2.engine import WSTrainer
from ws_d2.errors import ConfigError
from ws_d2.layers import WSConv2d
from ws_d2.modeling import count_ws_convs, fold_ws

CASCADE = "COCO-InstanceSegmentation/cascade_mask_rcnn_R_50_FPN_gn_ws_3x.yaml"
RETINANET = "COCO-Detection/retinanet_R_50_FPN_gn_ws_1x.yaml"
PANOPTIC = "COCO-PanopticSegmentation/panoptic_fpn_R_50_gn_ws_3x.yaml"
MODELS = [CASCADE, RETINANET, PANOPTIC, *(n.replace("_gn_ws_", "_bcn_ws_") for n in (CASCADE, PANOPTIC))]


RPN_MASK = {"loss_rpn_cls", "loss_rpn_loc", "loss_mask"}
LOSSES = {
    "cascade": RPN_MASK | {f"{loss}_stage{s}" for loss in ("loss_cls", "loss_box_reg") for s in range(3)},
    "retinanet": {"loss_cls", "loss_box_reg"},
    "panoptic": RPN_MASK | {"loss_cls", "loss_box_reg", "loss_sem_seg"},
}


@pytest.fixture
def tiny_model(tiny_family_cfg):
    def build(name, opts=()):
        cfg = tiny_family_cfg(name, *opts)
        torch.manual_seed(0)
        return cfg, build_model(cfg)

    return build


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_trains_a_step_through_every_ws_conv(tiny_model, name):
    cfg, model = tiny_model(name)
    ran = set()
    for conv in model.modules():
        if isinstance(conv, WSConv2d):
            conv.register_forward_hook(lambda module, *_: ran.add(module))
    with EventStorage(0):
        losses = model.train()(synthetic_batch(cfg, size=64, batch=2, seed=0))
    assert set(losses) == LOSSES[next(kind for kind in LOSSES if kind in name)]
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    # the WS convs are the ones the forward runs (not a replaced conv that shares their weight), and every
    # parameter got a finite gradient
    assert len(ran) == count_ws_convs(model) > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def outputs(result):
    """The tensors of one image's inference result: detections, and the semantic logits if any."""
    instances = result["instances"]
    tensors = [instances.pred_boxes.tensor, instances.scores, instances.pred_classes]
    tensors += [instances.pred_masks.float()] if instances.has("pred_masks") else []
    return tensors + ([result["sem_seg"]] if "sem_seg" in result else [])


@pytest.mark.parametrize("name", MODELS)
def test_fold_ws_keeps_outputs(tiny_model, name):
    """The model with WS folded into plain convs (BCN kept) gives the same outputs: WS is a function of the
    weights. The standardized weights are the same values, so only a kernel's summation order could differ."""
    cfg, model = tiny_model(name)
    if cfg.MODEL.BCN.ENABLED:  # a training step first, so that BCN's estimates are not their initial values
        with EventStorage(0):
            sum(model.train()(synthetic_batch(cfg, size=64, batch=2, seed=0)).values()).backward()
    # 160 px: GroupNorm refuses one value per group, which RetinaNet's P7 (stride 128) is below 129 px
    inputs = synthetic_batch(cfg, size=160, batch=1, seed=1, training=False)
    folded = fold_ws(copy.deepcopy(model)).eval()
    assert count_ws_convs(folded) == 0 and count_ws_convs(model) > 0
    with torch.no_grad():
        expected, actual = outputs(model.eval()(inputs)[0]), outputs(folded(inputs)[0])
    assert len(expected[1]) > 0 and len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-4)


def test_retinanet_refuses_bcn_and_batch_norm_heads(tiny_model):
    with pytest.raises(ConfigError, match="^MODEL.BCN.ENABLED: RetinaNet's head shares its norms"):
        tiny_model(RETINANET, ["MODEL.BCN.ENABLED", "True"])
    with pytest.raises(ConfigError, match="^MODEL.RETINANET.NORM BN: use META_ARCHITECTURE RetinaNet"):
        tiny_model(RETINANET, ["MODEL.RETINANET.NORM", "BN"])


def test_panoptic_quickstart_config_trains_and_is_scored_by_ap_and_miou(
    tiny_family_cfg, tiny_dataset, tmp_path
):
    """On the synthetic set's panoptic-separated variant, scored by COCO box and mask AP and the semantic
    head's mIoU over its two classes (things, background)."""
    tiny_dataset(tmp_path / "data", "panoptic_quick")
    sets = ("DATASETS.TRAIN", "('panoptic_quick_train_panoptic_separated',)",
            "DATASETS.TEST", "('panoptic_quick_val_panoptic_separated',)")  # fmt: skip
    cfg = tiny_family_cfg(
        "quickstart/panoptic_fpn_R_18_FPN_gn_ws_synthetic.yaml", *sets, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(tmp_path / "out"),
    )  # fmt: skip
    WSTrainer(cfg).train()  # evaluates after the last step
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert {"bbox", "segm", "sem_seg"} <= set(results)
    scores = results["sem_seg"]
    assert {"IoU-things", "IoU-background"} <= set(scores) and 0 <= scores["mIoU"] <= 100
