"""tools/demo.py and ws_d2.inference: inputs of every kind, bad inputs, drawing, video and webcam."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image
from tool_loading import load_tool

from ws_d2.inference import (
    CameraUnavailableError,
    WSPredictor,
    expand_inputs,
    load_inference_cfg,
    open_camera,
    read_image_bgr,
    run_on_stream,
)
from ws_d2.inference.image_io import UnreadableImageError


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, repo_root):
    from test_export import write_tiny_config

    return write_tiny_config(tmp_path_factory.mktemp("tiny_model"), repo_root)


@pytest.fixture(scope="module")
def demo(repo_root):
    return load_tool(repo_root, "demo")


def synthetic_image(height=72, width=96):
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :, 1] = np.linspace(0, 255, width, dtype=np.uint8)
    image[15:55, 20:70] = (220, 40, 40)
    return image


def save(path, array, mode=None, exif_orientation=None):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    if exif_orientation:
        exif = image.getexif()
        exif[0x0112] = exif_orientation  # the EXIF Orientation tag
        image.save(path, exif=exif)
    else:
        image.save(path)
    return str(path)


def test_read_image_grayscale_rgba_exif(tmp_path):
    rgb = synthetic_image()
    gray = read_image_bgr(save(tmp_path / "gray.png", rgb, "L"))
    assert gray.shape == (72, 96, 3) and (gray[..., 0] == gray[..., 2]).all()

    rgba = np.dstack([np.full((8, 8, 3), (255, 0, 0), np.uint8), np.full((8, 8), 128, np.uint8)])
    bgr = read_image_bgr(save(tmp_path / "rgba.png", rgba))
    assert bgr.shape == (8, 8, 3) and tuple(bgr[0, 0]) == (0, 0, 255)  # red, in BGR order

    marked = np.zeros((20, 40, 3), np.uint8)
    marked[:4, :4] = 255  # top-left of the stored pixels
    upright = read_image_bgr(save(tmp_path / "rotated.jpg", marked, exif_orientation=6))  # 6: rotate 90 CW
    assert upright.shape == (40, 20, 3)
    assert upright[:4, -4:].mean() > 200 and upright[:4, :4].mean() < 50  # marker now top-right


def test_read_image_names_bad_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(UnreadableImageError, match=r"notes\.jpg: cannot read as an image"):
        read_image_bgr(str(tmp_path / "notes.jpg"))
    truncated = tmp_path / "cut.png"
    save(truncated, synthetic_image())
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UnreadableImageError, match=r"cut\.png"):
        read_image_bgr(str(truncated))


def test_expand_inputs_files_folders_globs(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    a, b = save(folder / "b.png", synthetic_image()), save(folder / "a.jpg", synthetic_image())
    (folder / "readme.txt").write_text("skipped: a folder is searched for images only")
    c = save(tmp_path / "c.png", synthetic_image())
    paths, problems = expand_inputs([str(folder), str(tmp_path / "*.png"), c, str(tmp_path / "nothing*.jpg")])
    assert paths == [b, a, c]  # folder sorted, duplicates once
    assert len(problems) == 1 and "nothing*.jpg: no such file" in problems[0]


@pytest.mark.parametrize("input_format, red_channel", [("RGB", 0), ("BGR", 2)])
def test_predictor_feeds_model_in_input_format(tiny_config, tmp_path, input_format, red_channel):
    cfg = load_inference_cfg(str(tiny_config), ["INPUT.FORMAT", input_format])
    predictor = WSPredictor(cfg)
    seen = []
    predictor.model = lambda batch: seen.append(batch[0]["image"]) or [{}]
    predictor(read_image_bgr(save(tmp_path / "red.png", np.full((16, 16, 3), (255, 0, 0), np.uint8))))
    channel_means = seen[0].mean(dim=(1, 2))
    assert channel_means[red_channel] == 255 and channel_means.sum() == 255


def test_demo_cli_images_bad_inputs_and_json(tiny_config, tmp_path, repo_root):
    """The real command line: bad inputs are named in one line each, the rest is processed, exit 1."""
    from pycocotools.coco import COCO

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save(inputs / "street.png", synthetic_image())
    save(inputs / "gray.jpg", synthetic_image(), "L")
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    annotations = {
        "images": [
            {"id": 7, "file_name": "street.png", "height": 72, "width": 96},
            {"id": 9, "file_name": "gray.jpg", "height": 72, "width": 96},
            {"id": 11, "file_name": "broken.png", "height": 72, "width": 96},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [20, 15, 50, 40], "area": 2000, "iscrowd": 0}
        ],
        "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)],
    }
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    out, results = tmp_path / "out", tmp_path / "results.json"
    command = [sys.executable, str(repo_root / "tools" / "demo.py"), "--config-file", str(tiny_config)]
    command += ["--input", str(inputs), str(tmp_path / "missing.jpg"), "--output", str(out)]
    command += [
        "--confidence-threshold",
        "0",
        "--json",
        str(results),
        "--coco-json",
        str(tmp_path / "ann.json"),
    ]
    run = subprocess.run([*command, "--opts", "MODEL.DEVICE", "cpu"], capture_output=True, text=True)

    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    failure_lines = [line for line in run.stderr.splitlines() if "skipped" in line]
    assert len(failure_lines) == 2
    assert any("broken.png: cannot read as an image" in line for line in failure_lines)
    assert any("missing.jpg: no such file" in line for line in failure_lines)
    assert sorted(p.name for p in out.iterdir()) == ["gray.jpg", "street.png"]
    assert cv2.imread(str(out / "street.png")).shape == (72, 96, 3)

    predictions = COCO(str(tmp_path / "ann.json")).loadRes(str(results))  # scorable by pycocotools
    assert {a["image_id"] for a in predictions.anns.values()} == {7, 9}
    assert {a["category_id"] for a in predictions.anns.values()} <= {1, 2, 3}
    assert all("counts" in a["segmentation"] for a in predictions.anns.values())


def test_demo_names_missing_config_and_weights(demo, tiny_config, tmp_path, capsys):
    image = save(tmp_path / "a.png", synthetic_image())
    argv = ["--input", image, "--output", str(tmp_path / "out")]
    assert demo.main(["--config-file", "nowhere/model.yaml", *argv]) == 2
    assert capsys.readouterr().err.strip() == "error: config file not found: nowhere/model.yaml"
    assert demo.main(["--config-file", str(tiny_config), *argv, "--opts", "MODEL.WEIGHTS", "gone.pth"]) == 2
    assert capsys.readouterr().err.strip() == "error: MODEL.WEIGHTS file not found: gone.pth"


def write_video(path, fourcc, frames=5, size=(96, 72)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5.0, size, True)
    assert writer.isOpened(), f"this OpenCV build cannot write {fourcc}"
    for i in range(frames):
        frame = cv2.cvtColor(synthetic_image(size[1], size[0]), cv2.COLOR_RGB2BGR)
        writer.write(np.roll(frame, 4 * i, axis=1))
    writer.release()
    return path


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


@pytest.mark.parametrize(
    "input_name, fourcc, output_name", [("clip.mp4", "mp4v", "drawn.avi"), ("c.avi", "MJPG", "d/")]
)
def test_demo_video(demo, tiny_config, tmp_path, input_name, fourcc, output_name):
    video = write_video(tmp_path / input_name, fourcc)
    output = tmp_path / output_name
    argv = [
        "--config-file",
        str(tiny_config),
        "--video-input",
        str(video),
        "--output",
        str(tmp_path) + "/" + output_name,
    ]
    assert demo.main([*argv, "--confidence-threshold", "0"]) == 0
    written = output if output.suffix else output / (video.stem + ".mp4")
    frames = read_video(written)
    assert len(frames) == 5 and frames[0].shape == (72, 96, 3)
    assert np.abs(frames[0].astype(int) - read_video(video)[0]).mean() > 1  # something was drawn


class FakeCamera:
    """cv2.VideoCapture's interface over a list of frames; `frames=None` is a camera that did not open."""

    def __init__(self, frames):
        self.frames = None if frames is None else list(frames)

    def isOpened(self):
        return self.frames is not None

    def read(self):
        return (True, self.frames.pop(0)) if self.frames else (False, None)

    def get(self, prop):
        return 0.0  # cameras often report no fps

    def release(self):
        self.frames = []


def test_webcam_loop_with_fake_camera(demo, tiny_config, tmp_path, monkeypatch, capsys):
    frames = [cv2.cvtColor(synthetic_image(), cv2.COLOR_RGB2BGR)] * 3
    camera = open_camera(0, capture_factory=lambda index: FakeCamera(frames))
    predictor = WSPredictor(load_inference_cfg(str(tiny_config), confidence_threshold=0.0))

    count = run_on_stream(predictor, camera, predictor.metadata, str(tmp_path / "cam.avi"), fps=10)
    assert count == 3 and len(read_video(tmp_path / "cam.avi")) == 3
    assert run_on_stream(predictor, iter(frames * 2), predictor.metadata, max_frames=4) == 4

    with pytest.raises(CameraUnavailableError, match=r"no camera found: cv2.VideoCapture\(0\)"):
        open_camera(0, capture_factory=lambda index: FakeCamera(None))

    # The command line's --webcam path, with cv2's camera replaced.
    argv = ["--config-file", str(tiny_config), "--webcam", "--output", str(tmp_path / "web")]
    with monkeypatch.context() as patch:
        patch.setattr(cv2, "VideoCapture", lambda index: FakeCamera(frames))
        assert demo.main([*argv, "--max-frames", "2"]) == 0
    assert len(read_video(tmp_path / "web" / "webcam.mp4")) == 2
    with monkeypatch.context() as patch:
        patch.setattr(cv2, "VideoCapture", lambda index: FakeCamera(None))
        assert demo.main(argv) == 2
    assert "error: no camera found" in capsys.readouterr().err


def test_without_output_or_display_asks_for_output(demo, tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    image = save(tmp_path / "a.png", synthetic_image())
    assert demo.main(["--config-file", str(tiny_config), "--input", image]) == 2
    assert "pass --output" in capsys.readouterr().err
