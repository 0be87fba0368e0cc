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

from ws_d2.errors import CheckpointError, ConfigError
from ws_d2.modeling import count_ws_convs
from ws_d2.predictor import WSPredictor

# The tiny model at 96-128 px (room for the RPN) keeping every detection (threshold 0) up to 5 per image.
EXPORT_OPTS = [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
    "TEST.DETECTIONS_PER_IMAGE", "5",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained_cfg(tiny_cfg, tmp_path_factory):
    """`trained_cfg()`: the tiny model's config whose MODEL.WEIGHTS names random weights, saved once, so that
    every model built from it holds the same weights."""
    from detectron2.modeling import build_model

    weights = []

    def make():
        if not weights:
            torch.manual_seed(0)
            weights.append(str(tmp_path_factory.mktemp("weights") / "tiny_random.pth"))
            torch.save({"model": build_model(tiny_cfg(*EXPORT_OPTS)).state_dict()}, weights[0])
        return tiny_cfg(*EXPORT_OPTS, "MODEL.WEIGHTS", weights[0], freeze=True)

    return make


def random_image(height=80, width=112, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    image[20:60, 30:80] = (40, 200, 90)  # some structure for the RPN to find
    return image


def outputs_of(instances):
    instances = instances.to("cpu")
    return {
        "boxes": instances.pred_boxes.tensor.numpy(),
        "scores": instances.scores.numpy(),
        "classes": instances.pred_classes.numpy(),
        "masks": instances.pred_masks.numpy().astype(np.float32),
    }


def assert_same_outputs(actual, expected, atol=1e-4):
    """The same instances in the same order. The three models convolve with the same W_hat values (the WS
    model computes W_hat as fold_ws stores it), so on one machine their outputs are bitwise equal (measured
    with ATEN_CPU_CAPABILITY default and avx2). atol 1e-4 (px, score, mask 0/1) only absorbs a kernel
    that sums in another order (~1e-5 px on <= 128 px boxes); another instance or mask pixel is far more."""
    assert len(expected["scores"]) > 0
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        np.testing.assert_allclose(actual[key], value, atol=atol, err_msg=key)


def test_predictor_fold_runs_the_folded_model(trained_cfg):
    """WSPredictor(fold=True): the same detections from a model without WS convs (fold_ws: test_modeling.py)."""
    cfg = trained_cfg()
    ws_predictor, folded_predictor = WSPredictor(cfg), WSPredictor(cfg, fold=True)
    assert count_ws_convs(ws_predictor.model) > 0 and count_ws_convs(folded_predictor.model) == 0
    image = random_image()
    expected = outputs_of(ws_predictor(image)["instances"])
    assert_same_outputs(outputs_of(folded_predictor(image)["instances"]), expected)


def test_predictor_names_missing_weights_file(tiny_cfg):
    with pytest.raises(CheckpointError, match="^MODEL.WEIGHTS file not found: nowhere/model.pth$"):
        WSPredictor(tiny_cfg("MODEL.WEIGHTS", "nowhere/model.pth"))


def test_stock_config_has_only_detectron2_names_and_keys(tiny_cfg, export_tool):
    stock = export_tool.stock_config(tiny_cfg())
    assert stock.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert stock.MODEL.ROI_BOX_HEAD.NAME == "FastRCNNConvFCHead"
    assert stock.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead"
    assert "WS" not in stock.MODEL
    reference = get_cfg()
    reference.merge_from_other_cfg(stock)  # raises on any key detectron2 does not know
    assert stock.MODEL.RESNETS.DEPTH == 18 and stock.MODEL.FPN.NORM == "GN"  # the rest is kept


def test_stock_config_refuses_ws_component_without_stock_twin(tiny_cfg, export_tool):
    from detectron2.modeling import ROI_BOX_HEAD_REGISTRY

    from ws_d2.modeling.heads import WSFastRCNNConvFCHead

    class UnmappedWSHead(WSFastRCNNConvFCHead):
        pass

    if "UnmappedWSHead" not in ROI_BOX_HEAD_REGISTRY:
        ROI_BOX_HEAD_REGISTRY.register(UnmappedWSHead)
    with pytest.raises(ConfigError, match="UnmappedWSHead is a ws_d2 component"):
        export_tool.stock_config(tiny_cfg("MODEL.ROI_BOX_HEAD.NAME", "UnmappedWSHead"))
    # nor has Batch-Channel Normalization
    with pytest.raises(ConfigError, match="no Batch-Channel Normalization layer"):
        export_tool.stock_config(
            tiny_cfg("MODEL.BCN.ENABLED", "True", "MODEL.WS.FORMULA", "sqrt_var_plus_eps")
        )


# Runs with detectron2 alone. detectron2 v0.6 does not import on today's numpy/Pillow without ws_d2's
# fixes, so ws_d2/compat.py (and the errors module it imports) is loaded from its file as a module of
# another package: the ws_d2 package itself is never imported.
STOCK_DEPLOYMENT_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys, types
    import numpy as np
    fixes_package = types.ModuleType("detectron2_fixes")
    fixes_package.__path__ = [sys.argv[1]]
    sys.modules["detectron2_fixes"] = fixes_package
    importlib.import_module("detectron2_fixes.compat").apply_all()

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


def test_stock_gn_model_from_export_matches_without_ws_d2(trained_cfg, tmp_path, repo_root, export_tool):
    cfg = trained_cfg()
    checkpoint, config_file = export_tool.export_stock_model(
        cfg, str(tmp_path / "export" / "model_stock.pth")
    )
    assert config_file == str(tmp_path / "export" / "model_stock.yaml")
    text = open(config_file).read()
    assert not [name for name in ("WS:", "build_ws", "WSFast", "WSMask") if name in text]
    assert torch.load(checkpoint, weights_only=True)["model"]  # plain tensors: loads without unpickling code

    image = random_image()
    np.save(tmp_path / "image.npy", image)
    expected = outputs_of(WSPredictor(cfg)(image)["instances"])

    # In this process: detectron2's stock model from the exported config and checkpoint.
    stock_cfg = get_cfg()
    stock_cfg.merge_from_file(config_file)
    assert_same_outputs(outputs_of(DefaultPredictor(stock_cfg)(image)["instances"]), expected)

    # In a process without ws_d2.
    script = tmp_path / "deploy.py"
    script.write_text(STOCK_DEPLOYMENT_SCRIPT)
    args = [sys.executable, str(script), str(repo_root / "ws_d2"), config_file, str(tmp_path / "image.npy")]
    run = subprocess.run([*args, str(tmp_path / "stock.npz")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    module_types = json.loads(run.stdout.strip().splitlines()[-1])
    assert "Conv2d" in module_types and not [t for t in module_types if t.startswith("WS")]
    assert_same_outputs(dict(np.load(tmp_path / "stock.npz")), expected)


def export_status(export_tool, argv):
    """Run tools/export_model.py as its command line does: its exit status."""
    try:
        return export_tool.main(argv)
    except SystemExit as exit_info:  # argparse's usage error
        return exit_info.code


def test_export_cli(load_tool, tiny_config, trained_cfg, tmp_path, capsys):
    export_tool = load_tool("export_model")
    argv = ["--config-file", tiny_config, "--output", str(tmp_path / "m.pth")]
    assert export_status(export_tool, [*argv, "--opts", "MODEL.WEIGHTS", "nowhere/model.pkl"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "export_model: error: MODEL.WEIGHTS file not found: nowhere/model.pkl"
    )
    assert export_status(export_tool, [*argv[:-1], str(tmp_path / "m.pkl")]) == 1
    assert "must be a .pth file" in capsys.readouterr().err
    assert export_status(export_tool, argv) == 1  # the tiny config names no weights
    assert "MODEL.WEIGHTS is empty" in capsys.readouterr().err
    assert export_status(export_tool, ["--config-file", "nowhere.yaml", "--output", "m.pth"]) == 1
    assert capsys.readouterr().err.strip() == "export_model: error: config file not found: nowhere.yaml"
    assert not (tmp_path / "m.pth").exists()

    weights = trained_cfg().MODEL.WEIGHTS
    output = tmp_path / "out" / "m.pth"
    assert export_tool.main([*argv[:-1], str(output), "--opts", "MODEL.WEIGHTS", weights]) == 0
    assert output.is_file() and (tmp_path / "out" / "m.yaml").is_file()
    folder = tmp_path / "folder"  # --output names a folder unless it ends with .pth
    assert export_tool.main([*argv[:-1], str(folder), "--opts", "MODEL.WEIGHTS", weights]) == 0
    assert (folder / "model_stock.pth").is_file() and (folder / "model_stock.yaml").is_file()
    assert export_status(export_tool, [*argv, "--sample-image", "photo.jpg"]) == 2  # graph formats only
    assert export_status(export_tool, [*argv, "--format", "tflite"]) == 2
    assert export_status(export_tool, [*argv[:-1], str(tmp_path / "m.onnx"), "--format", "onnx"]) == 1
    assert "m.onnx: --output is the folder to write model.onnx into" in capsys.readouterr().err
