"""projects/DeepLabWS: WS (and BCN) on every normalized conv of DeepLabV3+, its synthetic sem-seg labels,
fold_ws, training through its train_net, and the export tool's refusal."""

import importlib
import json
import os
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_backbone, build_model

from ws_d2.errors import ConfigError
from ws_d2.layers import BatchChannelNorm, WSConv2d
from ws_d2.modeling import count_bcn, count_ws_convs, fold_ws

PROJECT_CONFIGS = ("projects", "DeepLabWS", "configs")
CITYSCAPES = "Cityscapes-SemanticSegmentation/deeplab_v3_plus_R_101_os16_mg124_{}_poly_90k.yaml"
SYNTHETIC = "synthetic/deeplab_v3_plus_R_50_half_{}_synthetic.yaml"
# detectron2 gives these no norm: the classifier, and the ASPP's conv on the 1 x 1 pooled image feature
PLAIN_CONVS = {"sem_seg_head.predictor", "sem_seg_head.decoder.res5.project_conv.convs.4.1"}


@pytest.fixture(scope="module")
def deeplab_ws(repo_root):
    folder = str(repo_root / "projects" / "DeepLabWS")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module("deeplab_ws")
    finally:
        sys.path.remove(folder)


@pytest.fixture(scope="module")
def project_cfg(deeplab_ws, repo_root):
    def make(name, *opts):
        return deeplab_ws.load_config(
            str(repo_root.joinpath(*PROJECT_CONFIGS, name)), ["MODEL.DEVICE", "cpu", *opts], freeze=False
        )

    return make


def tiny_synthetic(project_cfg, norm="gn_ws", *opts):
    return project_cfg(
        SYNTHETIC.format(norm), "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", *opts
    )


def conv_names(model, normalized):
    convs = ((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    return {n for n, m in convs if (getattr(m, "norm", None) is not None) == normalized}


@pytest.mark.parametrize("norm", ["gn_ws", "bcn_ws"])
def test_ws_on_every_normalized_conv_of_the_cityscapes_model(project_cfg, norm):
    model = build_model(project_cfg(CITYSCAPES.format(norm)))
    twin = build_model(
        project_cfg(CITYSCAPES.format(norm), "MODEL.WS.ENABLED", "False", "MODEL.BCN.ENABLED", "False")
    )
    normalized = conv_names(twin, normalized=True)
    ws = {n for n, m in model.named_modules() if isinstance(m, WSConv2d)}
    assert ws == normalized and len(ws) == count_ws_convs(model)
    assert conv_names(model, normalized=False) == PLAIN_CONVS
    group_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in twin.modules())
    assert count_bcn(model) == (group_norms if norm == "bcn_ws" else 0)


def test_deeplab_backbone_loads_what_the_seed_backbone_does(project_cfg):
    """The basic stem gives detectron2's ResNet keys: the authors' ImageNet weights, converted for the seed
    configs, load here too (only the dilation differs, which has no parameters)."""
    cfg = project_cfg(CITYSCAPES.format("gn_ws"), "MODEL.RESNETS.DEPTH", "50")
    seed_cfg = cfg.clone()
    seed_cfg.defrost()
    seed_cfg.MODEL.BACKBONE.NAME = "build_ws_resnet_backbone"
    shapes = [{k: v.shape for k, v in build_backbone(c).state_dict().items()} for c in (cfg, seed_cfg)]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("norm", ["gn_ws", "bcn_ws"])
def test_tiny_forward_backward(project_cfg, norm):
    torch.manual_seed(0)
    model = build_model(tiny_synthetic(project_cfg, norm)).train()
    labels = torch.randint(0, 4, (2, 64, 64), dtype=torch.uint8)
    batch = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "sem_seg": label.long()}
             for label in labels]  # fmt: skip
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    losses["loss_sem_seg"].backward()
    no_gradient = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not no_gradient
    if norm == "bcn_ws":
        assert any(isinstance(m, BatchChannelNorm) for m in model.sem_seg_head.modules())


def test_fold_ws_round_trip(project_cfg):
    """Folded, the model gives the same logits, and its weights give them again in the GN twin."""
    torch.manual_seed(0)
    model = build_model(tiny_synthetic(project_cfg)).eval()
    torch.nn.init.normal_(model.sem_seg_head.predictor.weight, std=0.1)  # logits far from 0
    batch = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)}]
    with torch.no_grad():
        before = model(batch)[0]["sem_seg"]
        after = fold_ws(model)(batch)[0]["sem_seg"]
        twin = build_model(tiny_synthetic(project_cfg, "gn_ws", "MODEL.WS.ENABLED", "False")).eval()
        twin.load_state_dict(model.state_dict())
        in_twin = twin(batch)[0]["sem_seg"]
    assert count_ws_convs(model) == 0 and before.abs().mean() > 0.1
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(in_twin, before, rtol=1e-4, atol=1e-4)


def test_synthetic_labels_are_the_shapes_classes(deeplab_ws, tmp_path):
    """Each shape's pixels carry its class's index in SEM_SEG_CLASSES (found by name), and only those do."""
    ((_, label_dir),) = deeplab_ws.generate_synthetic_sem_seg(
        str(tmp_path), {"train": 3}, max_objects=4
    ).values()
    with open(tmp_path / "annotations" / "instances_train.json") as f:
        content = json.load(f)
    names = {c["id"]: c["name"] for c in content["categories"]}
    for image in content["images"]:
        label = cv2.imread(os.path.join(label_dir, image["file_name"]), cv2.IMREAD_UNCHANGED)
        assert label.shape == (image["height"], image["width"])
        expected_area = np.zeros(len(deeplab_ws.SEM_SEG_CLASSES))
        for annotation in (a for a in content["annotations"] if a["image_id"] == image["id"]):
            value = deeplab_ws.SEM_SEG_CLASSES.index(names[annotation["category_id"]])
            x, y = np.asarray(annotation["segmentation"][0]).reshape(-1, 2).mean(axis=0)  # inside: convex
            assert label[int(y), int(x)] == value
            expected_area[value] += annotation["area"]
        expected_area[0] = label.size - expected_area[1:].sum()
        area = np.bincount(label.ravel(), minlength=len(expected_area))
        assert len(area) == len(expected_area)  # no other value, 255 included
        np.testing.assert_allclose(area, expected_area, rtol=0.05, atol=40)


def test_synthetic_sets_train_and_evaluate(deeplab_ws, repo_root, tmp_path):
    """train_net trains a few steps on the registered sem-seg set and SemSegEvaluator scores it."""
    deeplab_ws.generate_synthetic_sem_seg(str(tmp_path), {"train": 4, "val": 2}, image_size=64, max_objects=2)
    deeplab_ws.register_synthetic_sem_seg(str(tmp_path), prefix="tiny_sem_seg")
    spec = importlib.util.spec_from_file_location(
        "deeplab_train_net", repo_root / "projects" / "DeepLabWS" / "train_net.py"
    )
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    config = str(repo_root.joinpath(*PROJECT_CONFIGS, SYNTHETIC.format("gn_ws")))
    opts = ["DATASETS.TRAIN", "('tiny_sem_seg_train',)", "DATASETS.TEST", "('tiny_sem_seg_val',)",
            "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    assert train_net.run(["--config-file", config, *opts]) == 0
    with open(tmp_path / "out" / "eval_results.json") as f:
        results = json.load(f)["sem_seg"]
    assert 0 <= results["mIoU"] <= 100 and {f"IoU-{c}" for c in deeplab_ws.SEM_SEG_CLASSES} <= set(results)


def test_export_refuses_semantic_segmentation(project_cfg, tmp_path, export_tool):
    cfg = tiny_synthetic(project_cfg)
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "model.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    with pytest.raises(ConfigError, match="META_ARCHITECTURE=SemanticSegmentor"):
        export_tool.export_deployable(cfg, str(tmp_path / "export"), "torchscript")
