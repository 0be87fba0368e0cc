"""TorchScript and ONNX export (tools/export_model.py's export_deployable): the exported graphs against the eager GN+WS
model at two image sizes and aspect ratios, on an image without detections, and loaded in processes that
import neither ws_d2 nor detectron2 (onnxruntime alone; torch + torchvision for TorchScript)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import ws_d2
from ws_d2.errors import ConfigError
from ws_d2.predictor import DeployedPredictor, WSPredictor, deployable_inference, resize_for_model

# Random weights, every detection kept (threshold 0) up to 10 per image, so that there is much to compare.
KEEP_ALL = [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "0.0",
    "MODEL.RETINANET.SCORE_THRESH_TEST",
    "0.0",
    "TEST.DETECTIONS_PER_IMAGE",
    "10",
    "MODEL.DEVICE",
    "cpu",
]
MODELS = {
    # the quickstart Mask R-CNN R-18-FPN at its own test size (128 px), both formats
    "quickstart": ("configs/quickstart/mask_rcnn_R_18_FPN_gn_ws_synthetic.yaml", [], ("torchscript", "onnx")),
    # the rest of the family that detectron2's tracing supports, at the quickstart's size, both formats
    "cascade": ("configs/quickstart/cascade_mask_rcnn_R_18_FPN_gn_ws_synthetic.yaml", [], ("torchscript", "onnx")),
    "retinanet": ("configs/quickstart/retinanet_R_18_FPN_gn_ws_synthetic.yaml", [], ("torchscript", "onnx")),
    # a seed config (Faster R-CNN R-50-FPN: no masks) at 96-128 px with fewer proposals, once: ONNX, the
    # format whose kernels differ from PyTorch's (TorchScript runs PyTorch's own)
    "seed_faster_R_50": (
        "configs/COCO-Detection/faster_rcnn_R_50_FPN_gn_ws_1x.yaml",
        ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
         "MODEL.RPN.POST_NMS_TOPK_TEST", "50"],
        ("onnx",),
    ),
}  # fmt: skip
# A landscape and a portrait image: resized to 128 x 171 and 213 x 128 (quickstart), 96 x 128 and 128 x 77.
IMAGE_SIZES = [(120, 160), (150, 90)]


def config_with_random_weights(config_file, opts, weights_file, seed=0):
    cfg = ws_d2.load_config(config_file, [*KEEP_ALL, *opts], freeze=False)
    torch.manual_seed(seed)
    torch.save({"model": build_model(cfg).state_dict()}, weights_file)
    cfg.MODEL.WEIGHTS = str(weights_file)
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def exported(repo_root, tmp_path_factory, export_tool):
    """`exported(name)`: (cfg, {format: file}) of a model of MODELS, exported once per module."""
    done = {}

    def export(name):
        if name not in done:
            config_file, opts, formats = MODELS[name]
            directory = tmp_path_factory.mktemp(name)
            cfg = config_with_random_weights(str(repo_root / config_file), opts, directory / "weights.pth")
            done[name] = (
                cfg,
                {fmt: export_tool.export_deployable(cfg, str(directory), fmt) for fmt in formats},
            )
        return done[name]

    return export


def image_of_size(height, width, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[height // 4 : height // 2, width // 3 : width // 2] = (40, 200, 90)  # some structure for the RPN
    return image


def assert_same_detections(actual, expected):
    """Instances in the original image's coordinates, in the same order (best first).

    The exported graph runs the eager model's ops on folded weights: TorchScript executes the same kernels,
    onnxruntime its own, whose sums differ in order (measured: boxes within 2e-5 px, scores within 2e-6).
    Bounds: boxes 0.05 px and scores 1e-3, far below a different detection; the same classes exactly; the
    pasted masks (threshold 0.5 on 28 x 28 probabilities) with IoU > 0.99 over all instances together: a
    random-weight mask head gives probabilities near 0.5, where float noise flips a pixel now and then, which
    in a 15-pixel mask alone is already IoU 0.93 (the raw probabilities are compared in
    test_exported_model_runs_without_ws_d2)."""
    assert len(expected) > 0 and len(actual) == len(expected)
    np.testing.assert_allclose(
        actual.pred_boxes.tensor.numpy(), expected.pred_boxes.tensor.numpy(), atol=0.05
    )
    np.testing.assert_allclose(actual.scores.numpy(), expected.scores.numpy(), atol=1e-3)
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    assert actual.has("pred_masks") == expected.has("pred_masks")
    if expected.has("pred_masks"):
        assert actual.pred_masks.shape == expected.pred_masks.shape
        intersection = (actual.pred_masks & expected.pred_masks).sum().item()
        union = (actual.pred_masks | expected.pred_masks).sum().item()
        assert union > 0 and intersection / union > 0.99, intersection / union


@pytest.mark.parametrize(
    "name, fmt", [(name, fmt) for name, (_, _, formats) in MODELS.items() for fmt in formats]
)
def test_exported_model_matches_ws_model_at_any_size(exported, name, fmt):
    cfg, files = exported(name)
    ws_predictor, deployed = WSPredictor(cfg), DeployedPredictor(cfg, files[fmt])
    resized_shapes = set()
    for height, width in IMAGE_SIZES:
        image = image_of_size(height, width)
        resized_shapes.add(resize_for_model(image, cfg).shape)
        actual = deployed(image)["instances"]
        assert actual.image_size == (height, width)
        assert_same_detections(actual, ws_predictor(image)["instances"])
    assert len(resized_shapes) == 2  # the graph ran at two sizes, neither necessarily the traced one


def test_image_without_detections(tiny_cfg, tmp_path, export_tool):
    """Nothing scores above the threshold: every output is empty, of the right shape, in eager, TorchScript
    and onnxruntime (whose mask head then gets an empty batch)."""
    cfg = tiny_cfg(*KEEP_ALL, freeze=False)
    model = build_model(cfg)
    # background logit 1e4 above every class: the class scores underflow to exactly 0, and 0 > 0 is false
    torch.nn.init.zeros_(model.roi_heads.box_predictor.cls_score.weight)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[:] = torch.tensor(
            [0.0] * cfg.MODEL.ROI_HEADS.NUM_CLASSES + [1e4]
        )
    torch.save({"model": model.state_dict()}, tmp_path / "no_detections.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "no_detections.pth")
    cfg.freeze()
    image = image_of_size(64, 80)
    assert len(WSPredictor(cfg)(image)["instances"]) == 0
    for fmt in ("torchscript", "onnx"):
        instances = DeployedPredictor(cfg, export_tool.export_deployable(cfg, str(tmp_path), fmt))(image)[
            "instances"
        ]
        assert len(instances) == 0 and instances.image_size == (64, 80)
        assert instances.pred_boxes.tensor.shape == (0, 4) and instances.pred_masks.shape == (0, 64, 80)


# Run in a fresh process with sys.argv = [script, model file, image.npy, outputs.npz]: only the runtime's
# own imports, then a check that nothing of ws_d2, detectron2 (or, for ONNX, torch) was imported.
ONNXRUNTIME_ALONE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = session.run(None, {"image": np.load(sys.argv[2])})
    np.savez(sys.argv[3], **dict(zip(names, outputs)))
    info = json.loads(session.get_modelmeta().custom_metadata_map["ws_d2"])
    imported = sorted({m.split(".")[0] for m in sys.modules} & {"ws_d2", "detectron2", "torch", "torchvision"})
    print(json.dumps({"imported": imported, "input": [session.get_inputs()[0].name,
                      session.get_inputs()[0].type], "info": info}))
    """
)
TORCHSCRIPT_ALONE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    import torchvision  # registers torchvision::nms and roi_align, which the graph calls

    extra = {"ws_d2.json": ""}
    module = torch.jit.load(sys.argv[1], _extra_files=extra)
    names = json.loads(extra["ws_d2.json"])["outputs"]
    with torch.no_grad():
        outputs = module(torch.from_numpy(np.load(sys.argv[2])))
    np.savez(sys.argv[3], **{name: value.numpy() for name, value in zip(names, outputs)})
    imported = sorted({m.split(".")[0] for m in sys.modules} & {"ws_d2", "detectron2"})
    print(json.dumps({"imported": imported}))
    """
)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_runs_without_ws_d2(exported, fmt, tmp_path):
    cfg, files = exported("quickstart")  # a model with masks
    image = np.ascontiguousarray(resize_for_model(image_of_size(120, 160), cfg))
    np.save(tmp_path / "image.npy", image)
    script = tmp_path / "run.py"
    script.write_text(ONNXRUNTIME_ALONE if fmt == "onnx" else TORCHSCRIPT_ALONE)
    args = [sys.executable, str(script), files[fmt], str(tmp_path / "image.npy"), str(tmp_path / "out.npz")]
    run = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["imported"] == []
    if fmt == "onnx":
        assert report["input"] == ["image", "tensor(uint8)"]
        assert report["info"]["outputs"] == ["boxes", "scores", "classes", "masks"]
        assert report["info"]["min_size_test"] == cfg.INPUT.MIN_SIZE_TEST

    with torch.no_grad():
        expected = deployable_inference(WSPredictor(cfg).model, torch.from_numpy(image))
    outputs = np.load(tmp_path / "out.npz")
    assert len(expected[0]) > 0
    # raw graph outputs: boxes in the resized image's pixels, masks as 28 x 28 probabilities (see above)
    for name, value, atol in zip(("boxes", "scores", "classes", "masks"), expected, (0.05, 1e-3, 0, 1e-3)):
        assert outputs[name].shape == tuple(value.shape), name
        np.testing.assert_allclose(outputs[name], value.numpy(), atol=atol, err_msg=name)


def test_bcn_model_exports_and_demo_runs_it(load_tool, tiny_config, repo_root, tmp_path, capsys):
    """tools/export_model.py --format onnx on a BCN+WS model, then tools/demo.py --onnx on its output."""
    cfg = config_with_random_weights(tiny_config, ["MODEL.BCN.ENABLED", "True"], tmp_path / "bcn.pth")
    argv = ["--config-file", tiny_config, "--format", "onnx", "--output", str(tmp_path / "export")]
    opts = ["--opts", *KEEP_ALL, "MODEL.BCN.ENABLED", "True", "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS]
    assert load_tool("export_model").main([*argv, *opts]) == 0
    onnx_file = str(tmp_path / "export" / "model.onnx")
    assert f"wrote {onnx_file}" in capsys.readouterr().out

    image = image_of_size(64, 96)
    assert_same_detections(
        DeployedPredictor(cfg, onnx_file)(image)["instances"], WSPredictor(cfg)(image)["instances"]
    )

    import cv2

    cv2.imwrite(str(tmp_path / "shapes.png"), image)
    demo = [
        "--config-file",
        tiny_config,
        "--onnx",
        onnx_file,
        "--input",
        str(tmp_path / "shapes.png"),
        "--confidence-threshold",
        "0.0",
    ]
    assert load_tool("demo").main([*demo, "--output", str(tmp_path / "drawn.png"), *opts]) == 0
    drawn = cv2.imread(str(tmp_path / "drawn.png"))
    assert drawn.shape == image.shape and not np.array_equal(drawn, image)  # detections were drawn


def test_export_refuses_panoptic_fpn(repo_root, tiny_family_opts, tmp_path, export_tool):
    """The deployed graph's outputs are detections (module docstring): Panoptic FPN's semantic and panoptic
    outputs are not, so it is refused by name, before anything is written."""
    config_file = str(repo_root / "configs/COCO-PanopticSegmentation/panoptic_fpn_R_50_gn_ws_3x.yaml")
    cfg = config_with_random_weights(config_file, tiny_family_opts, tmp_path / "w.pth")
    with pytest.raises(ConfigError, match="^MODEL.META_ARCHITECTURE=PanopticFPN: only detectors"):
        export_tool.export_deployable(cfg, str(tmp_path), "onnx")
    assert not (tmp_path / "model.onnx").exists()
