"""WS-free export: the GN+WS model, its folded twin and detectron2's stock GN model loaded from the export
(in a process that never imports ws_d2) give the same outputs."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor

from ws_d2.inference import WSPredictor, export_stock_model, load_inference_cfg, stock_config
from ws_d2.modeling import count_ws_convs

TINY_MODEL_YAML = """
_BASE_: "{base}"
MODEL:
  DEVICE: cpu
  WEIGHTS: ""
  MASK_ON: True
  RESNETS: {{DEPTH: {depth}, RES2_OUT_CHANNELS: {res2}}}
  FPN: {{OUT_CHANNELS: 64}}
  RPN: {{PRE_NMS_TOPK_TEST: 100, POST_NMS_TOPK_TEST: 50}}
  ROI_HEADS: {{NUM_CLASSES: 3, SCORE_THRESH_TEST: 0.0}}
  ROI_BOX_HEAD: {{CONV_DIM: 64, FC_DIM: 128}}
  ROI_MASK_HEAD: {{CONV_DIM: 64}}
INPUT: {{MIN_SIZE_TEST: 96, MAX_SIZE_TEST: 128}}
TEST: {{DETECTIONS_PER_IMAGE: 5}}
"""


def write_tiny_config(directory, repo_root, depth=18, with_weights=True):
    """A small GN+WS Mask R-CNN config on the seed models' base config (random weights, 96 px inputs).

    With `with_weights`, a random initialization is saved and named by MODEL.WEIGHTS, so every model
    built from the config holds the same weights."""
    config_file = directory / f"tiny_r{depth}.yaml"
    base = (repo_root / "configs" / "Base-GN-WS-RCNN-FPN.yaml").as_posix()
    config_file.write_text(TINY_MODEL_YAML.format(base=base, depth=depth, res2=64 if depth < 50 else 256))
    if with_weights:
        from detectron2.modeling import build_model

        torch.manual_seed(0)
        model = build_model(load_inference_cfg(str(config_file)))
        weights = directory / f"tiny_r{depth}_random.pth"
        torch.save({"model": model.state_dict()}, weights)
        text = config_file.read_text().replace('WEIGHTS: ""', f'WEIGHTS: "{weights.as_posix()}"')
        config_file.write_text(text)
    return config_file


def test_image(height=80, width=112, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    image[20:60, 30:80] = (40, 200, 90)  # some structure for the RPN to find
    return image


test_image.__test__ = False  # a helper, not a test


def outputs_of(instances):
    instances = instances.to("cpu")
    return {
        "boxes": instances.pred_boxes.tensor.numpy(),
        "scores": instances.scores.numpy(),
        "classes": instances.pred_classes.numpy(),
        "masks": instances.pred_masks.numpy().astype(np.float32),
    }


def assert_same_outputs(actual, expected, atol=1e-4):
    assert len(expected["scores"]) > 0
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        np.testing.assert_allclose(actual[key], value, atol=atol, err_msg=key)


@pytest.mark.parametrize("depth", [18, 50])
def test_folded_model_matches_ws_model(tmp_path, repo_root, depth):
    cfg = load_inference_cfg(str(write_tiny_config(tmp_path, repo_root, depth)))
    ws_predictor, folded_predictor = WSPredictor(cfg), WSPredictor(cfg, fold=True)
    assert count_ws_convs(ws_predictor.model) == {18: 20, 50: 53}[depth] + 8 + 4 + 4  # backbone, FPN, heads
    assert count_ws_convs(folded_predictor.model) == 0
    image = test_image()
    with torch.no_grad():
        expected = outputs_of(ws_predictor(image)["instances"])
        assert_same_outputs(outputs_of(folded_predictor(image)["instances"]), expected)


def test_stock_config_has_only_detectron2_names_and_keys(tmp_path, repo_root):
    cfg = load_inference_cfg(str(write_tiny_config(tmp_path, repo_root, with_weights=False)))
    stock = stock_config(cfg)
    assert stock.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert stock.MODEL.ROI_BOX_HEAD.NAME == "FastRCNNConvFCHead"
    assert stock.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead"
    assert "WS" not in stock.MODEL
    reference = get_cfg()
    reference.merge_from_other_cfg(stock)  # raises on any key detectron2 does not know
    assert stock.MODEL.RESNETS.DEPTH == 18 and stock.MODEL.FPN.NORM == "GN"  # the rest is kept


def test_stock_config_refuses_ws_component_without_stock_twin(tmp_path, repo_root):
    from detectron2.modeling import ROI_BOX_HEAD_REGISTRY

    from ws_d2.modeling.heads import WSFastRCNNConvFCHead

    class UnmappedWSHead(WSFastRCNNConvFCHead):
        pass

    if "UnmappedWSHead" not in ROI_BOX_HEAD_REGISTRY:
        ROI_BOX_HEAD_REGISTRY.register(UnmappedWSHead)
    cfg = load_inference_cfg(str(write_tiny_config(tmp_path, repo_root, with_weights=False)))
    cfg.defrost()
    cfg.MODEL.ROI_BOX_HEAD.NAME = "UnmappedWSHead"
    with pytest.raises(ValueError, match="UnmappedWSHead is a ws_d2 component"):
        stock_config(cfg)


# Runs with detectron2 alone: ws_d2's compat fixes are loaded from their file (detectron2 v0.6 does not
# import on today's numpy/Pillow without them) but the ws_d2 package is never imported.
STOCK_DEPLOYMENT_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import numpy as np
    spec = importlib.util.spec_from_file_location("detectron2_compat_fixes", sys.argv[1])
    fixes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixes)
    fixes.apply_all()

    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    cfg = get_cfg()
    cfg.merge_from_file(sys.argv[2])
    predictor = DefaultPredictor(cfg)  # builds the stock model, loads with DetectionCheckpointer
    instances = predictor(np.load(sys.argv[3]))["instances"]
    assert not [m for m in sys.modules if m == "ws_d2" or m.startswith("ws_d2.")]
    np.savez(
        sys.argv[4],
        boxes=instances.pred_boxes.tensor.numpy(),
        scores=instances.scores.numpy(),
        classes=instances.pred_classes.numpy(),
        masks=instances.pred_masks.numpy().astype(np.float32),
    )
    print(json.dumps(sorted({type(m).__name__ for m in predictor.model.modules()})))
    """
)


def test_stock_gn_model_from_export_matches_without_ws_d2(tmp_path, repo_root):
    cfg = load_inference_cfg(str(write_tiny_config(tmp_path, repo_root)))
    checkpoint, config_file = export_stock_model(cfg, str(tmp_path / "export" / "model_stock.pth"))
    assert config_file == str(tmp_path / "export" / "model_stock.yaml")
    text = open(config_file).read()
    assert not [name for name in ("WS:", "build_ws", "WSFast", "WSMask") if name in text]

    image = test_image()
    np.save(tmp_path / "image.npy", image)
    with torch.no_grad():
        expected = outputs_of(WSPredictor(cfg)(image)["instances"])

    # In this process: detectron2's stock model from the exported config and checkpoint.
    stock_cfg = get_cfg()
    stock_cfg.merge_from_file(config_file)
    assert_same_outputs(outputs_of(DefaultPredictor(stock_cfg)(image)["instances"]), expected)

    # In a process without ws_d2.
    script = tmp_path / "deploy.py"
    script.write_text(STOCK_DEPLOYMENT_SCRIPT)
    compat_file = repo_root / "ws_d2" / "compat.py"
    args = [sys.executable, str(script), str(compat_file), config_file, str(tmp_path / "image.npy")]
    run = subprocess.run([*args, str(tmp_path / "stock.npz")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    module_types = json.loads(run.stdout.strip().splitlines()[-1])
    assert "Conv2d" in module_types and not [t for t in module_types if t.startswith("WS")]
    assert_same_outputs(dict(np.load(tmp_path / "stock.npz")), expected)


def test_export_cli(tmp_path, repo_root, capsys):
    from tool_loading import load_tool

    export_tool = load_tool(repo_root, "export_model")
    config_file = write_tiny_config(tmp_path, repo_root, with_weights=False)
    argv = ["--config-file", str(config_file), "--output", str(tmp_path / "m.pth")]
    assert export_tool.main([*argv, "--opts", "MODEL.WEIGHTS", "nowhere/model.pkl"]) == 2
    assert "MODEL.WEIGHTS file not found: nowhere/model.pkl" in capsys.readouterr().err
    assert export_tool.main([*argv[:-1], str(tmp_path / "m.pkl")]) == 2
    assert "must be a .pth file" in capsys.readouterr().err
    assert export_tool.main(argv) == 2  # the tiny config names no weights
    assert "MODEL.WEIGHTS is empty" in capsys.readouterr().err
    assert not (tmp_path / "m.pth").exists()

    trained = write_tiny_config(tmp_path, repo_root)
    assert export_tool.main(["--config-file", str(trained), "--output", str(tmp_path / "out" / "m.pth")]) == 0
    assert (tmp_path / "out" / "m.pth").is_file() and (tmp_path / "out" / "m.yaml").is_file()
