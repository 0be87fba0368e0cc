"""Bad input loses nothing and fails in one line that names it (the tools' main() run in-process).

Kinds: an output onto an input (demo, convert, export), COCO records that cannot train, the demo's settings,
a 16-bit image, export weights that do not cover the model, the converter's GN-only note. Everything
tools/train_net.py refuses: test_train_cli.py.
"""

import gc
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from PIL import Image

import ws_d2
from ws_d2.checkpoint.convert import ConversionReport
from ws_d2.data import register_coco_dataset
from ws_d2.errors import DatasetError

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tools(load_tool):
    return {name: load_tool(name) for name in ("demo", "convert_pretrained", "export_model")}


def run(tool, argv, capsys):
    """(exit status, stderr) of a tool's main(argv), as its command line would exit."""
    try:
        status = tool.main(argv)
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


DEMO_SETTINGS = {  # demo options after --input/--output, exit status, what the line names
    "--confidence-threshold 2": (["--confidence-threshold", "2"], 2, "--confidence-threshold"),
    "MODEL.DEVICE cuda without a GPU": (["--opts", "MODEL.DEVICE", "cuda"], 1, "MODEL.DEVICE"),
}


@pytest.mark.parametrize(
    "case",
    [
        "--confidence-threshold 2",
        pytest.param(
            "MODEL.DEVICE cuda without a GPU", marks=pytest.mark.skipif(CUDA, reason="a GPU is present")
        ),
    ],
)
def test_demo_settings_it_cannot_run(case, tools, tmp_path, tiny_config, capsys):
    options, expected_status, named = DEMO_SETTINGS[case]
    image = write_png(tmp_path / "img.png")
    argv = ["--config-file", tiny_config, "--input", image, "--output", str(tmp_path / "out"), *options]
    status, err = run(tools["demo"], argv, capsys)
    assert_one_line_error(status, err, named)
    assert status == expected_status and not (tmp_path / "out").exists()


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
    assert gc.isenabled()  # the load pauses the cyclic collector: a refusal gives it back


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


# ---- the library: config keys (WS arguments that give NaN: test_ws_conv.py) ----------------------------------------------


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


def test_coco_jpeg_sizes_read_from_the_header_exif_rotation_applied(tmp_path):
    # the frame header gives the size; a file with EXIF is read by PIL, which applies its orientation
    (tmp_path / "images").mkdir()
    Image.new("RGB", (12, 8)).save(tmp_path / "images" / "plain.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 8 x 12
    Image.new("RGB", (12, 8)).save(tmp_path / "images" / "rotated.jpg", exif=exif.tobytes())
    for name, (width, height), problem in [
        ("plain.jpg", (12, 8), None), ("plain.jpg", (8, 12), "the file is 12x8 but the record says 8x12"),
        ("rotated.jpg", (8, 12), None), ("rotated.jpg", (12, 8), "the file is 8x12 but the record says 12x8"),
    ]:  # fmt: skip
        content = {"images": [{"id": 1, "file_name": name, "width": width, "height": height}],
                   "annotations": [], "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
        json_file = tmp_path / f"{name}_{width}.json"
        json_file.write_text(json.dumps(content))
        register_coco_dataset(f"jpeg_{name}_{width}", str(json_file), str(tmp_path / "images"))
        if problem is None:
            assert DatasetCatalog.get(f"jpeg_{name}_{width}")[0]["width"] == width
        else:
            with pytest.raises(DatasetError, match=problem):
                DatasetCatalog.get(f"jpeg_{name}_{width}")
