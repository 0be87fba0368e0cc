"""Bad input loses nothing and fails in one line that names it (the tools' main() run in-process).

Kinds: an output onto an input (every tool), a finished run overwritten, config files that are not YAML
mappings, unreadable or unsafe weights, COCO records that cannot train, devices and numbers, WS arguments
that give NaN, a 16-bit image, export weights that do not cover the model, the converter's GN-only note.
"""

import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from PIL import Image

import ws_d2
from ws_d2.checkpoint.convert import ConversionReport
from ws_d2.data import register_coco_dataset
from ws_d2.errors import ConfigError, DatasetError

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def fresh_tool_logging():
    """Each in-process tool run sets up its loggers on that test's captured streams: undo it afterwards, as
    a new process would start without them (a stale handler would write to a closed capture)."""
    from detectron2.utils.logger import setup_logger

    names = ("detectron2", "fvcore", "demo", "ws_d2")
    before = {name: list(logging.getLogger(name).handlers) for name in names}
    yield
    for name in names:
        logging.getLogger(name).handlers = before[name]
    setup_logger.cache_clear()


@pytest.fixture(scope="module")
def tools(load_tool):
    return {name: load_tool(name) for name in ("train_net", "demo", "convert_pretrained", "export_model")}


def run(tool, argv, capsys):
    """(exit status, stderr) of a tool's main(argv), as its command line would exit."""
    main = getattr(tool, "run", None) or tool.main
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's usage error
        status = exit_info.code
    return status, capsys.readouterr().err


def assert_one_line_error(status, err, *named):
    """Exit 1 (refused) or 2 (usage), no traceback, exactly one `error:` line, naming each of `named`."""
    assert status in (1, 2), (status, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for name in named:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def write_png(path, size=(8, 8), value=90):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return str(path)


# ---- data loss: the input's bytes unchanged and a non-zero exit ----------------------------------------


def data_loss_cases(tmp_path, tiny_config):
    """(tool name, argv, the inputs that must keep their bytes) for each way an output could hit an input."""
    images = tmp_path / "images"
    images.mkdir()
    image = write_png(images / "a.png")
    os.symlink(image, tmp_path / "link.png")
    video = tmp_path / "v.mp4"
    video.write_bytes(b"not really a video, but the user's file")
    weights = tmp_path / "m.pth"
    weights.write_bytes(b"a trained checkpoint")
    (tmp_path / "model.onnx").write_bytes(b"a trained checkpoint, named as the ONNX export is")
    config = tmp_path / "cfg.yaml"
    config.write_text(open(tiny_config).read())
    demo = ["--config-file", tiny_config]
    return {
        "demo image onto itself": ("demo", [*demo, "--input", image, "--output", image], [image]),
        "demo image onto a symlink to it": ("demo", [*demo, "--input", image, "--output", str(tmp_path / "link.png")], [image]),
        "demo folder into itself, dir/": ("demo", [*demo, "--input", str(images), "--output", f"{images}/"], [image]),
        "demo folder into itself, dir/../dir": ("demo", [*demo, "--input", str(images), "--output", f"{images}/../images"], [image]),
        "demo json onto an input": ("demo", [*demo, "--input", image, "--output", str(tmp_path / "out"), "--json", image], [image]),
        "demo video onto itself": ("demo", [*demo, "--video-input", str(video), "--output", str(video)], [str(video)]),
        "convert onto its source": ("convert_pretrained", [str(weights), str(weights)], [str(weights)]),
        "export onto its weights": ("export_model", ["--config-file", tiny_config, "--output", str(weights), "--opts", "MODEL.WEIGHTS", str(weights)], [str(weights)]),
        "onnx export onto its weights": ("export_model", ["--config-file", tiny_config, "--format", "onnx", "--output", str(tmp_path), "--opts", "MODEL.WEIGHTS", str(tmp_path / "model.onnx")], [str(tmp_path / "model.onnx")]),
        "export's yaml onto its config": ("export_model", ["--config-file", str(config), "--output", str(tmp_path / "cfg.pth"), "--opts", "MODEL.WEIGHTS", str(weights)], [str(config)]),
    }  # fmt: skip


DATA_LOSS = [
    "demo image onto itself",
    "demo image onto a symlink to it",
    "demo folder into itself, dir/",
    "demo folder into itself, dir/../dir",
    "demo json onto an input",
    "demo video onto itself",
    "convert onto its source",
    "export onto its weights",
    "onnx export onto its weights",
    "export's yaml onto its config",
]


@pytest.mark.parametrize("case", DATA_LOSS)
def test_no_output_onto_an_input(case, tools, tmp_path, tiny_config, capsys):
    name, argv, inputs = data_loss_cases(tmp_path, tiny_config)[case]
    before = {path: open(path, "rb").read() for path in inputs}
    status, err = run(tools[name], argv, capsys)
    assert_one_line_error(status, err, "refusing to overwrite")
    assert {path: open(path, "rb").read() for path in inputs} == before


@pytest.fixture(scope="module")
def train_data(tmp_path_factory, tiny_dataset):
    opts, _ = tiny_dataset(tmp_path_factory.mktemp("bad_input_data"), "bad_input")
    return opts


def train_args(tiny_config, train_data, output_dir, *opts, flags=()):
    return ["--config-file", tiny_config, *flags, *train_data, "OUTPUT_DIR", str(output_dir), *opts]


def test_finished_run_is_not_overwritten(tools, tmp_path, tiny_config, train_data, capsys):
    final = tmp_path / "model_final.pth"
    final.write_bytes(b"the finished run's weights")
    status, err = run(tools["train_net"], train_args(tiny_config, train_data, tmp_path), capsys)
    assert "--resume" in assert_one_line_error(status, err, tmp_path, "model_final.pth")
    assert final.read_bytes() == b"the finished run's weights"


# ---- one-line errors naming the file, key or record ----------------------------------------------------


CONFIG_FILES = {
    "yaml syntax": (b"MODEL:\n  WS: [\n", "YAML syntax error at line 3"),
    "top level a list": (b"- MODEL\n", "not a mapping"),
    "empty": (b"", "empty config file"),
    "binary": (b"\xff\xfe\x00\x01\x89PNG", "not a UTF-8 text"),
}


@pytest.mark.parametrize("kind", CONFIG_FILES)
def test_config_file_that_is_not_a_yaml_mapping(kind, tools, tmp_path, capsys):
    content, expected = CONFIG_FILES[kind]
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    status, err = run(tools["train_net"], ["--config-file", str(config)], capsys)
    assert expected in assert_one_line_error(status, err, config)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def weights_cases(tmp_path):
    text = tmp_path / "text.pth"
    text.write_text("these are not weights\n")
    crafted = tmp_path / "crafted.pkl"
    crafted.write_bytes(pickle.dumps({"model": _RunsCode()}))
    resumed = tmp_path / "run"
    resumed.mkdir()
    torch.save({"model": {"w": torch.zeros(1000)}, "iteration": 3}, resumed / "model_0000003.pth")
    whole = (resumed / "model_0000003.pth").read_bytes()
    (resumed / "model_0000003.pth").write_bytes(whole[: len(whole) // 2])
    (resumed / "last_checkpoint").write_text("model_0000003.pth")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "last_checkpoint").write_bytes(b"\x00\xff\xfe garbage")
    return {  # (OUTPUT_DIR, opts, flags, what the line names)
        "text file named .pth": (tmp_path / "out", ["MODEL.WEIGHTS", str(text)], [], text),
        "crafted pickle": (tmp_path / "out", ["MODEL.WEIGHTS", str(crafted)], [], crafted),
        "truncated checkpoint on --resume": (resumed, [], ["--resume"], "model_0000003.pth"),
        "garbage last_checkpoint on --resume": (garbage, [], ["--resume"], garbage / "last_checkpoint"),
    }


@pytest.mark.parametrize(
    "case", ["text file named .pth", "crafted pickle", "truncated checkpoint on --resume", "garbage last_checkpoint on --resume"]
)  # fmt: skip
def test_unreadable_or_unsafe_weights(case, tools, tmp_path, tiny_config, train_data, capsys):
    output_dir, opts, flags, named = weights_cases(tmp_path)[case]
    argv = train_args(tiny_config, train_data, output_dir, *opts, flags=flags)
    status, err = run(tools["train_net"], argv, capsys)
    assert_one_line_error(status, err, named)
    assert status == 1


def settings_cases(tmp_path, tiny_config, train_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    image = write_png(tmp_path / "img.png")
    demo = ["--config-file", tiny_config, "--input", image, "--output", str(tmp_path / "out")]
    train = train_args(tiny_config, train_data, tmp_path / "out")
    cases = {  # tool, argv, exit status, what the line names
        "IMS_PER_BATCH 0": ("train_net", [*train, "SOLVER.IMS_PER_BATCH", "0"], 1, "SOLVER.IMS_PER_BATCH"),
        "unwritable OUTPUT_DIR": (
            "train_net",
            train_args(tiny_config, train_data, blocker / "sub"),
            1,
            blocker,
        ),
        "--num-cpu-procs -1": ("train_net", ["--num-cpu-procs", "-1", *train], 2, "--num-cpu-procs"),
        "MODEL.WS.EPS -1.0": ("train_net", [*train, "MODEL.WS.EPS", "-1.0"], 1, "MODEL.WS.EPS"),
        "--confidence-threshold 2": (
            "demo",
            [*demo, "--confidence-threshold", "2"],
            2,
            "--confidence-threshold",
        ),
    }
    if not CUDA:
        cases["train on cuda without a GPU"] = (
            "train_net",
            [*train, "MODEL.DEVICE", "cuda"],
            1,
            "MODEL.DEVICE",
        )
        cases["demo on cuda without a GPU"] = (
            "demo",
            [*demo, "--opts", "MODEL.DEVICE", "cuda"],
            1,
            "MODEL.DEVICE",
        )
    return cases


SETTINGS = [
    "IMS_PER_BATCH 0",
    "unwritable OUTPUT_DIR",
    "--num-cpu-procs -1",
    "MODEL.WS.EPS -1.0",
    "--confidence-threshold 2",
    pytest.param("train on cuda without a GPU", marks=pytest.mark.skipif(CUDA, reason="a GPU is present")),
    pytest.param("demo on cuda without a GPU", marks=pytest.mark.skipif(CUDA, reason="a GPU is present")),
]


@pytest.mark.parametrize("case", SETTINGS)
def test_devices_and_numbers(case, tools, tmp_path, tiny_config, train_data, capsys):
    name, argv, expected_status, named = settings_cases(tmp_path, tiny_config, train_data)[case]
    status, err = run(tools[name], argv, capsys)
    assert_one_line_error(status, err, named)
    assert status == expected_status
    assert not (tmp_path / "out" / "last_checkpoint").exists()  # refused before any training


# ---- COCO records: checked when the set is loaded, before any training step --------------------------------


def coco_set(root, **change):
    """A valid 2-image COCO set in `root` with one record changed by `change` (see COCO_RECORDS)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in (1, 2)]
    for image in images:
        write_png(root / "images" / image["file_name"])
    annotations = [
        {"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}
        for i in (1, 2)
    ]
    for record, key, value in change.values():
        (images if record == "image" else annotations)[1][key] = value
    if "empty_file" in change:
        (root / "images" / "2.png").write_bytes(b"")
    categories = [{"id": 1, "name": "thing"}]
    json_file = root / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(json_file), str(root / "images")


COCO_RECORDS = {  # change to the 2nd record, what the line says
    "missing image file": ({"c": ("image", "file_name", "gone.png")}, "image id 2", "file not found"),
    "0-byte image": ({"empty_file": ("image", "id", 2)}, "image id 2", "empty file"),
    "size does not match the file": ({"c": ("image", "width", 9)}, "image id 2", "the file is 8x8 but the record says 9x8"),
    "category not in categories": ({"c": ("annotation", "category_id", 7)}, "annotation id 12", "category_id 7"),
    "box of negative width": ({"c": ("annotation", "bbox", [1, 1, -3, 4])}, "annotation id 12", "width, height >= 0"),
}  # fmt: skip


@pytest.mark.parametrize("kind", COCO_RECORDS)
def test_coco_record_refused_when_loaded(kind, tmp_path):
    change, record, reason = COCO_RECORDS[kind]
    json_file, image_root = coco_set(tmp_path, **change)
    register_coco_dataset(f"bad_coco_{kind}", json_file, image_root)
    with pytest.raises(DatasetError) as refused:
        DatasetCatalog.get(f"bad_coco_{kind}")
    message = str(refused.value)
    assert "\n" not in message and json_file in message and record in message and reason in message


def test_coco_image_check_is_remembered_per_version(tmp_path):
    json_file, image_root = coco_set(tmp_path)
    register_coco_dataset("remembered_coco", json_file, image_root)
    DatasetCatalog.get("remembered_coco")
    version = os.stat(image_root).st_mtime_ns
    os.unlink(os.path.join(image_root, "2.png"))
    os.utime(image_root, ns=(version, version))  # the same folder version: its passed check is remembered
    DatasetCatalog.get("remembered_coco")
    register_coco_dataset("checked_always", json_file, image_root, image_check="always")
    with pytest.raises(DatasetError, match=r"image id 2 \(.*\): file not found"):
        DatasetCatalog.get("checked_always")
    os.utime(
        image_root, ns=(version + 1, version + 1)
    )  # a new version (files added or removed): checked again
    with pytest.raises(DatasetError, match=r"image id 2 \(.*\): file not found"):
        DatasetCatalog.get("remembered_coco")


def test_coco_error_before_training(tools, tmp_path, tiny_config, capsys):
    json_file, image_root = coco_set(tmp_path / "bad", c=("annotation", "category_id", 7))
    argv = ["--config-file", tiny_config, "--coco-dataset", "bad_coco_cli", json_file, image_root]
    opts = ["DATASETS.TRAIN", "('bad_coco_cli',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")]
    status, err = run(tools["train_net"], [*argv, *opts], capsys)
    assert_one_line_error(status, err, json_file, "annotation id 12")
    assert not list((tmp_path / "out").glob("*.pth"))  # no training step ran


# ---- the library: WS arguments that give NaN, config keys ----------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ws_d2.WSConv2d(1, 4, kernel_size=1),  # 1 element per filter: the unbiased std divides by 0
        lambda: ws_d2.standardize_weight(torch.randn(5)),
        lambda: ws_d2.standardize_weight(torch.ones(4, 3, 3, 3, dtype=torch.int64)),
    ],
    ids=["one-element filters", "1-D weight", "integer weight"],
)
def test_weight_that_cannot_be_standardized(make):
    with pytest.raises(ConfigError, match="cannot weight-standardize a weight of (shape|dtype)"):
        make()


def test_standardizable_edges_still_work():
    # the smallest valid filter (2 elements) and a 2-D weight stay accepted and finite
    assert torch.isfinite(ws_d2.WSConv2d(2, 4, kernel_size=1)(torch.randn(1, 2, 4, 4))).all()
    assert torch.isfinite(ws_d2.standardize_weight(torch.randn(3, 4, dtype=torch.float64))).all()


def test_add_ws_config_twice_keeps_values():
    cfg = ws_d2.get_ws_cfg()
    cfg.MODEL.WS.EPS, cfg.MODEL.BCN.ENABLED, cfg.SOLVER.ITER_SIZE = 0.5, True, 4
    ws_d2.add_ws_config(cfg)
    assert (cfg.MODEL.WS.EPS, cfg.MODEL.BCN.ENABLED, cfg.SOLVER.ITER_SIZE) == (0.5, True, 4)


# ---- misleading results ----------------------------------------------------------------------------


def test_demo_reads_16_bit_png_scaled_to_8_bit(tools, tmp_path):
    # a 16-bit gray ramp: PIL's own RGB conversion clips it to white; 257 maps 0..65535 onto 0..255 exactly
    ramp = np.array([[0, 257 * 64, 257 * 128, 65535]], np.uint16).repeat(3, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    bgr = tools["demo"].read_image_bgr(str(path))
    assert bgr.dtype == np.uint8 and bgr.shape == (3, 4, 3)
    assert bgr[0, :, 0].tolist() == [0, 64, 128, 255] and (bgr == bgr[:, :, :1]).all()


@pytest.mark.parametrize("fmt, output", [("weights", "m.pth"), ("torchscript", ""), ("onnx", "")])
def test_export_refuses_weights_that_do_not_cover_the_model(fmt, output, tools, tmp_path, tiny_config, tiny_cfg, capsys):  # fmt: skip
    from detectron2.modeling import build_model

    state = build_model(tiny_cfg()).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("roi_heads.mask_head.")}
    weights = tmp_path / "other_architecture.pth"
    torch.save({"model": partial}, weights)
    argv = ["--config-file", tiny_config, "--format", fmt, "--output", str(tmp_path / "export" / output)]
    status, err = run(tools["export_model"], [*argv, "--opts", "MODEL.WEIGHTS", str(weights)], capsys)
    line = assert_one_line_error(status, err, weights, "does not cover the model")
    assert f"{len(state) - len(partial)} of {len(state)} tensors" in line
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())


def test_converter_says_ws_needs_ws_pretrained_weights():
    for source in ("authors", "mmdet"):
        assert "WS-pretrained weights" in ConversionReport(source, "cfg.yaml", mapped=1).summary()
    assert "WS-pretrained" not in ConversionReport("torchvision", "cfg.yaml", mapped=1).summary()
