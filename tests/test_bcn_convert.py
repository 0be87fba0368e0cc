"""The authors' BCN+WS ImageNet layout (rn50_bcn_ws.pth, ...) through tools/convert_pretrained.py.

The synthetic files come from a reference BCN+WS ResNet written from the equations (checkpoint_files.py),
in the authors' key layout: torchvision's ResNet whose norms are BCNorm modules (a per-group affine
`weight`/`bias` of shape (1, 32, 1) and a BatchNorm2d child `pbn`) and whose convs standardize as the BCN+WS
release does, (W - mean) / sqrt(unbiased var + 1e-5). Values are random, so a tensor landing in the wrong place
shows.
"""

import pytest
import torch
from checkpoint_files import ReferenceBCNorm, bcn_ws_resnet, gn_resnet, save_authors_file
from detectron2.modeling import build_model

import ws_d2
from ws_d2.checkpoint.layouts import detect_layout
from ws_d2.errors import CheckpointError

BCN_CONFIG = "configs/COCO-InstanceSegmentation/mask_rcnn_{}_FPN_bcn_ws_2x.yaml"
ARCHS = {"resnet50": "R_50", "resnext50_32x4d": "X_50_32x4d", "resnet101": "R_101"}


def _reference_features(resnet, x):
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    features = {}
    for stage, layer in enumerate([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4], start=2):
        x = features[f"res{stage}"] = layer(x)
    return features


@pytest.fixture(scope="module")
def authors_r50(tmp_path_factory):
    resnet = bcn_ws_resnet("resnet50")
    return resnet, save_authors_file(resnet, tmp_path_factory.mktemp("bcn") / "rn50_bcn_ws.pth")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_authors_bcn_model_gives_reference_features(
    tmp_path, repo_root, arch, converted_backbone_features, convert_checkpoint
):
    resnet = bcn_ws_resnet(arch)
    src = save_authors_file(resnet, tmp_path / f"{arch}_bcn_ws.pth")
    state = torch.load(src)
    assert detect_layout(state) == "authors_bcn"
    norms = sum(isinstance(m, ReferenceBCNorm) for m in resnet.modules())
    if arch == "resnet50":
        assert len(state) == 426 and norms == 53

    report = convert_checkpoint(src, tmp_path / "backbone.pkl")  # the seed config is inferred from the file
    assert report.target == f"mask_rcnn_{ARCHS[arch]}_FPN_bcn_ws_2x.yaml"
    assert report.mapped == len(state) - 2 - norms
    assert sorted(set(report.dropped.values())) == [
        "BatchNorm step counter: not a weight",
        "ImageNet classifier: no counterpart in a detector",
    ]

    cfg = ws_d2.load_config(str(repo_root / BCN_CONFIG.format(ARCHS[arch])), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    # float64: two implementations of the same math agree to ~1e-12 here on any CPU; eps on the std instead of
    # inside the root, or a wrong BCN step, is off by far more than the 1e-4
    features = converted_backbone_features(model, tmp_path / "backbone.pkl", resnet, _reference_features)
    for name, (ours, expected) in features.items():
        assert expected.abs().mean() > 1e-2, name
        torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-9, msg=name)


def test_names_land_where_documented(tmp_path, authors_r50, convert_checkpoint):
    resnet, src = authors_r50
    convert_checkpoint(src, tmp_path / "out.pth")
    converted = torch.load(tmp_path / "out.pth")["model"]
    prefix = "backbone.bottom_up."
    for source, target in [
        (resnet.bn1.weight, "stem.conv1.norm.weight"),
        (resnet.bn1.pbn.running_var, "stem.conv1.norm.batch_norm.running_var"),
        (resnet.layer3[5].bn2.bias, "res4.5.conv2.norm.bias"),
        (resnet.layer3[5].bn2.pbn.weight, "res4.5.conv2.norm.batch_norm.weight"),
        (resnet.layer4[0].downsample[1].pbn.running_mean, "res5.0.shortcut.norm.batch_norm.running_mean"),
        (resnet.layer4[0].downsample[1].weight, "res5.0.shortcut.norm.weight"),
        (resnet.layer2[0].downsample[0].weight, "res3.0.shortcut.weight"),
    ]:
        assert torch.equal(converted[prefix + target], source), target


def test_refusals_name_the_problem(tmp_path, repo_root, authors_r50, convert_checkpoint):
    _, src = authors_r50
    gn_config = str(repo_root / "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml")
    with pytest.raises(CheckpointError, match="BCN norms .* MODEL.BCN.ENABLED False"):
        convert_checkpoint(src, tmp_path / "x.pkl", config_file=gn_config)
    std_config = tmp_path / "std.yaml"
    std_config.write_text(
        f'_BASE_: "{repo_root / BCN_CONFIG.format("R_50")}"\nMODEL:\n  WS:\n    FORMULA: std_plus_eps\n'
    )
    with pytest.raises(CheckpointError, match="sqrt_var_plus_eps"):
        convert_checkpoint(src, tmp_path / "x.pkl", config_file=str(std_config))
    # a GN+WS file for a BCN config
    gn_file = save_authors_file(gn_resnet("resnet50"), tmp_path / "gn.pth")
    with pytest.raises(CheckpointError, match="GN\\+WS norms .*MODEL.BCN.ENABLED True"):
        convert_checkpoint(
            gn_file,
            tmp_path / "x.pkl",
            source="authors",
            config_file=str(repo_root / BCN_CONFIG.format("R_50")),
        )
    # a missing and an unknown tensor are named
    state = torch.load(src)
    del state["module.layer2.1.bn3.pbn.running_mean"]
    state["module.layer2.1.bn3.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as refused:
        convert_checkpoint(tmp_path / "broken.pth", tmp_path / "x.pkl")
    message = str(refused.value)
    assert "res3.1.conv3.norm.batch_norm.running_mean" in message and "module.layer2.1.bn3.extra" in message
    assert not (tmp_path / "x.pkl").exists()


def test_cli(tmp_path, capsys, authors_r50, load_tool):
    _, src = authors_r50
    convert_pretrained = load_tool("convert_pretrained")
    assert convert_pretrained.main([str(src), str(tmp_path / "R-50-BCN-WS.pkl")]) == 0
    out = capsys.readouterr().out
    assert "authors_bcn layout" in out and "mapped 371 tensors" in out and "module.fc.weight" in out
