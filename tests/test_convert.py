"""tools/convert_pretrained.py and ws_d2.checkpoint.convert on synthetic checkpoints in each published layout.

The synthetic files (checkpoint_files.py) are built from the documented key patterns (docs/CONVERSION.md):
torchvision's ResNet with GroupNorm(32) gives the authors' exact names (bn*, downsample.0/1, fc) and shapes;
MMDetection's neck and heads have their documented shapes. Values are random.
"""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from checkpoint_files import RunsShellCommand, gn_resnet, mmdet_neck_and_heads, random_
from detectron2.modeling import build_model
from torch import nn

from ws_d2 import get_ws_cfg, load_config
from ws_d2.checkpoint import WSCheckpointer, convert_state_dict, load_checkpoint_file, meta_model
from ws_d2.errors import CheckpointError, UnsafeCheckpointError
from ws_d2.model_zoo import get_config_file

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEED_FASTER_R50 = str(CONFIGS / "COCO-Detection/faster_rcnn_R_50_FPN_gn_ws_1x.yaml")


class ReferenceWSConv2d(nn.Conv2d):
    """WS as the authors' code does it: (W - mean) / (unbiased std + 1e-5) per output channel."""

    def forward(self, x):
        w = self.weight.flatten(1)
        w = (w - w.mean(1, keepdim=True)) / (w.std(1, keepdim=True) + 1e-5)
        return self._conv_forward(x, w.view_as(self.weight), self.bias)


def _reference_ws_features(resnet, x):
    for module in resnet.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = ReferenceWSConv2d
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    features = {}
    for stage, layer in enumerate([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4], start=2):
        x = features[f"res{stage}"] = layer(x)
    return features


def _convert(checkpoint, config_file, source):
    return convert_state_dict(checkpoint, meta_model(load_config(config_file)), source)


def _build(config_file, **overrides):
    cfg = get_ws_cfg()
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list([item for kv in overrides.items() for item in kv])
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def authors_r50():
    return {"module." + k: v for k, v in gn_resnet("resnet50").state_dict().items()}


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d"])
def test_authors_checkpoint_gives_reference_features(
    tmp_path, repo_root, arch, converted_backbone_features, convert_checkpoint
):
    resnet = gn_resnet(arch)
    src = tmp_path / f"{arch}-GN-WS.pth.tar"
    torch.save(
        {"module." + k: v for k, v in resnet.state_dict().items()}, src, _use_new_zipfile_serialization=False
    )

    report = convert_checkpoint(src, tmp_path / "backbone.pkl")
    expected_config = (
        "faster_rcnn_R_50_FPN_gn_ws_1x.yaml"
        if arch == "resnet50"
        else "faster_rcnn_X_50_32x4d_FPN_gn_ws_1x.yaml"
    )
    assert report.target == expected_config
    assert report.mapped == len(resnet.state_dict()) - 2 and set(report.dropped) == {
        "module.fc.weight",
        "module.fc.bias",
    }
    assert all(k.startswith("backbone.fpn_") for k in report.not_converted if k.startswith("backbone."))

    model = _build(get_config_file(f"COCO-Detection/{report.target}"))
    # float64: two implementations of the same math then agree to ~1e-13 on features of magnitude ~10 (eps 1e-3
    # instead of 1e-5, or the biased std, is off by > 1e-4)
    features = converted_backbone_features(model, tmp_path / "backbone.pkl", resnet, _reference_ws_features)
    for name, (ours, expected) in features.items():
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9, msg=name)


def test_authors_names_land_where_documented(authors_r50):
    converted, report = _convert(authors_r50, SEED_FASTER_R50, "authors")
    bottom_up = "backbone.bottom_up."
    for src, dst in [
        ("module.layer3.5.bn2.weight", "res4.5.conv2.norm.weight"),
        ("module.conv1.weight", "stem.conv1.weight"),
        ("module.bn1.bias", "stem.conv1.norm.bias"),
        ("module.layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
        ("module.layer4.0.downsample.1.weight", "res5.0.shortcut.norm.weight"),
        ("module.layer4.2.conv3.weight", "res5.2.conv3.weight"),
    ]:
        assert converted[bottom_up + dst] is authors_r50[src]
    assert report.mapped == 159 and len(converted) == 159


def test_mmdet_rehosted_backbone_with_gn_names(tmp_path, authors_r50, convert_checkpoint):
    # MMDetection's copy of the same weights: no module. prefix, norms named gn*, inside {'state_dict': ...}
    rehosted = {
        k[len("module.") :].replace(".bn", ".gn").replace("bn1.", "gn1.", 1): v
        for k, v in authors_r50.items()
    }
    assert "gn1.weight" in rehosted and "layer3.5.gn2.weight" in rehosted
    torch.save({"state_dict": rehosted}, tmp_path / "resnet50_gn_ws.pth")
    report = convert_checkpoint(
        tmp_path / "resnet50_gn_ws.pth", tmp_path / "out.pth", config_file=SEED_FASTER_R50
    )
    assert report.source == "authors" and report.mapped == 159
    converted = load_checkpoint_file(tmp_path / "out.pth")["model"]
    assert torch.equal(
        converted["backbone.bottom_up.res4.5.conv2.norm.weight"], rehosted["layer3.5.gn2.weight"]
    )


def test_wrong_architecture_is_refused(authors_r50, load_tool):
    with pytest.raises(CheckpointError, match=r"no source: backbone\.bottom_up\.res4\.6\.") as info:
        _convert(authors_r50, str(CONFIGS / "COCO-Detection/faster_rcnn_R_101_FPN_gn_ws_1x.yaml"), "authors")
    assert "\n" not in str(info.value)
    with pytest.raises(
        CheckpointError,
        match=r"module\.layer1\.0\.conv2\.weight \(64, 64, 3, 3\) -> backbone\.bottom_up\.res2\.0\.conv2\.weight \(128, 4",
    ):
        _convert(
            authors_r50, str(CONFIGS / "COCO-Detection/faster_rcnn_X_50_32x4d_FPN_gn_ws_1x.yaml"), "authors"
        )
    truncated = {k: v for k, v in authors_r50.items() if not k.startswith("module.layer4.2.")}  # depth 49?
    with pytest.raises(CheckpointError, match="match no ResNet depth"):
        load_tool("convert_pretrained").seed_config_file(truncated, "authors")


@pytest.fixture(scope="module")
def mmdet_mask_r50(authors_r50):
    backbone = {"backbone." + k[len("module.") :].replace("bn", "gn"): v for k, v in authors_r50.items()}
    backbone = {k: v for k, v in backbone.items() if ".fc." not in k}
    meta = {"mmdet_version": "2.18.0", "CLASSES": ("person",) * 80, "epoch": 24}
    return {"meta": meta, "state_dict": {**backbone, **mmdet_neck_and_heads(mask=True)}}


def test_mmdet_detector_becomes_full_model(tmp_path, repo_root, mmdet_mask_r50, convert_checkpoint):
    torch.save(mmdet_mask_r50, tmp_path / "mask_rcnn_r50_fpn_gn_ws-all_2x_coco.pth")
    report = convert_checkpoint(tmp_path / "mask_rcnn_r50_fpn_gn_ws-all_2x_coco.pth", tmp_path / "mask.pkl")
    assert report.source == "mmdet" and report.target == "mask_rcnn_R_50_FPN_gn_ws_2x.yaml"
    assert not report.dropped and not report.not_converted

    model = _build(str(CONFIGS / "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml"))
    WSCheckpointer(model).load(str(tmp_path / "mask.pkl"))
    model_state = model.state_dict()
    assert report.mapped == len(model_state) == len(mmdet_mask_r50["state_dict"])
    source = mmdet_mask_r50["state_dict"]
    for src, dst in [
        ("neck.lateral_convs.0.conv.weight", "backbone.fpn_lateral2.weight"),
        ("neck.lateral_convs.3.gn.bias", "backbone.fpn_lateral5.norm.bias"),
        ("neck.fpn_convs.1.conv.weight", "backbone.fpn_output3.weight"),
        ("rpn_head.rpn_conv.weight", "proposal_generator.rpn_head.conv.weight"),
        ("rpn_head.rpn_cls.bias", "proposal_generator.rpn_head.objectness_logits.bias"),
        ("rpn_head.rpn_reg.weight", "proposal_generator.rpn_head.anchor_deltas.weight"),
        ("roi_head.bbox_head.shared_convs.3.gn.weight", "roi_heads.box_head.conv4.norm.weight"),
        ("roi_head.bbox_head.shared_fcs.0.weight", "roi_heads.box_head.fc1.weight"),
        ("roi_head.bbox_head.fc_cls.weight", "roi_heads.box_predictor.cls_score.weight"),
        ("roi_head.bbox_head.fc_reg.bias", "roi_heads.box_predictor.bbox_pred.bias"),
        ("roi_head.mask_head.convs.0.conv.weight", "roi_heads.mask_head.mask_fcn1.weight"),
        ("roi_head.mask_head.upsample.weight", "roi_heads.mask_head.deconv.weight"),
        ("roi_head.mask_head.conv_logits.bias", "roi_heads.mask_head.predictor.bias"),
        ("backbone.layer3.5.gn2.weight", "backbone.bottom_up.res4.5.conv2.norm.weight"),
    ]:
        assert torch.equal(model_state[dst], source[src]), (src, dst)
    # every model tensor came from the file: no tensor kept its initialization
    loaded = load_checkpoint_file(tmp_path / "mask.pkl")["model"]
    assert set(loaded) == set(model_state)
    for name, value in model_state.items():
        np.testing.assert_array_equal(value.numpy(), loaded[name], err_msg=name)


def test_mmdet_faster_rcnn_and_refusals(mmdet_mask_r50, load_tool):
    faster = {k: v for k, v in mmdet_mask_r50["state_dict"].items() if ".mask_head." not in k}
    checkpoint = {"meta": {}, "state_dict": faster}
    assert load_tool("convert_pretrained").seed_config_file(checkpoint, "mmdet") == SEED_FASTER_R50
    converted, report = _convert(checkpoint, SEED_FASTER_R50, "mmdet")
    assert len(converted) == len(faster)
    # a Faster R-CNN file for a Mask R-CNN config: the mask head has no source
    with pytest.raises(CheckpointError, match=r"no source: roi_heads\.mask_head\.mask_fcn1\.weight"):
        _convert(
            {"state_dict": faster},
            str(CONFIGS / "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml"),
            "mmdet",
        )
    # a head layout the table does not know is named, not silently dropped
    odd = {**faster, "roi_head.bbox_head.shared_fcs.0.extra": torch.zeros(1)}
    with pytest.raises(
        CheckpointError, match=r"match no rename rule: roi_head\.bbox_head\.shared_fcs\.0\.extra"
    ):
        _convert({"state_dict": odd}, SEED_FASTER_R50, "mmdet")
    v1_layout = {k.replace("roi_head.", ""): v for k, v in faster.items()}  # MMDetection v1: no roi_head
    with pytest.raises(CheckpointError, match="MMDetection v1 layout"):
        _convert({"meta": {"mmdet_version": "1.0rc0"}, "state_dict": v1_layout}, SEED_FASTER_R50, "mmdet")


def _write_config(tmp_path, repo_root, name, **resnets):
    lines = [f'_BASE_: "{SEED_FASTER_R50}"', "MODEL:", "  RESNETS:"]
    lines += [f"    {k}: {v}" for k, v in {"DEPTH": 18, "RES2_OUT_CHANNELS": 64, **resnets}.items()]
    lines += ["  WS:", "    ENABLED: False"]
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return str(tmp_path / name)


def test_torchvision_batchnorm_resnet(tmp_path, repo_root, convert_checkpoint):
    resnet = random_(torchvision.models.resnet18())
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    gn_config = _write_config(tmp_path, repo_root, "r18_gn.yaml")
    with pytest.raises(CheckpointError, match="no GroupNorm counterpart"):
        convert_checkpoint(tmp_path / "resnet18.pth", tmp_path / "out.pkl", config_file=gn_config)
    assert not (tmp_path / "out.pkl").exists()

    bn_config = _write_config(tmp_path, repo_root, "r18_bn.yaml", NORM='"FrozenBN"')
    report = convert_checkpoint(tmp_path / "resnet18.pth", tmp_path / "out.pkl", config_file=bn_config)
    assert report.source == "torchvision"
    assert set(report.dropped.values()) == {
        "ImageNet classifier: no counterpart in a detector",
        "BatchNorm step counter: not a weight",
    }
    model = _build(bn_config)
    WSCheckpointer(model).load(str(tmp_path / "out.pkl"))
    state = model.state_dict()
    bottom_up = "backbone.bottom_up."
    assert torch.equal(state[bottom_up + "res3.1.conv2.norm.running_var"], resnet.layer2[1].bn2.running_var)
    assert torch.equal(
        state[bottom_up + "res5.0.shortcut.norm.running_mean"], resnet.layer4[0].downsample[1].running_mean
    )


def test_cli_exit_codes_and_messages(tmp_path, capsys, authors_r50, load_tool):
    convert_pretrained = load_tool("convert_pretrained")
    torch.save(authors_r50, tmp_path / "R-50-GN-WS.pth.tar")
    assert (
        convert_pretrained.main([str(tmp_path / "R-50-GN-WS.pth.tar"), str(tmp_path / "R-50-GN-WS.pkl")]) == 0
    )
    out = capsys.readouterr().out
    assert (
        "mapped 159 tensors" in out and "dropped 2 (ImageNet classifier" in out and "module.fc.weight" in out
    )

    # the written .pkl is what MODEL.WEIGHTS reads: exact names, no matching heuristics
    written = pickle.loads((tmp_path / "R-50-GN-WS.pkl").read_bytes())
    assert written["__author__"] == "ws_d2" and written["matching_heuristics"] is False

    # wrong architecture, unknown layout, bad destination: exit 1, one line naming the problem
    for args, expected in [
        (["--config-file", str(CONFIGS / "COCO-Detection/faster_rcnn_R_101_FPN_gn_ws_1x.yaml")], "res4.6"),
        (
            ["--source", "mmdet", "--config-file", SEED_FASTER_R50],
            "match no rename rule: module.conv1.weight",
        ),
    ]:
        assert (
            convert_pretrained.main([str(tmp_path / "R-50-GN-WS.pth.tar"), str(tmp_path / "x.pkl"), *args])
            == 1
        )
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err and "Traceback" not in err
    assert convert_pretrained.main([str(tmp_path / "R-50-GN-WS.pth.tar"), str(tmp_path / "x.npz")]) == 1
    assert ".pkl or .pth" in capsys.readouterr().err
    torch.save({"foo": torch.zeros(1)}, tmp_path / "odd.pth")
    assert convert_pretrained.main([str(tmp_path / "odd.pth"), str(tmp_path / "x.pkl")]) == 1
    assert "not a known layout" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        convert_pretrained.main([str(tmp_path / "odd.pth"), str(tmp_path / "x.pkl"), "--source", "caffe"])
    assert usage.value.code == 2
    assert not (tmp_path / "x.pkl").exists()


def test_cli_refuses_crafted_and_truncated_files(tmp_path, repo_root, capsys, load_tool):
    marker = tmp_path / "was_executed"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"conv1.weight": RunsShellCommand(marker)}, protocol=2))
    # the real command line: exit status 1 and a one-line message, nothing executed
    run = subprocess.run(
        [
            sys.executable,
            str(repo_root / "tools" / "convert_pretrained.py"),
            str(tmp_path / "evil.pkl"),
            str(tmp_path / "out.pkl"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stderr
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("convert_pretrained: error:")]
    assert len(error_lines) == 1 and "posix.system" in error_lines[0] and "Traceback" not in run.stderr
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()

    torch.save({"module.conv1.weight": torch.randn(64, 3, 7, 7)}, tmp_path / "cut.pth.tar")
    (tmp_path / "cut.pth.tar").write_bytes((tmp_path / "cut.pth.tar").read_bytes()[:5000])
    assert (
        load_tool("convert_pretrained").main([str(tmp_path / "cut.pth.tar"), str(tmp_path / "out.pkl")]) == 1
    )
    assert "cut.pth.tar: not a readable torch checkpoint (truncated or corrupt?)" in capsys.readouterr().err
    with pytest.raises(UnsafeCheckpointError):
        load_tool("convert_pretrained").convert(tmp_path / "evil.pkl", tmp_path / "out.pkl")
