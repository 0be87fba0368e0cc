"""tools/demo.py and ws_d2.predictor: inputs of every kind, bad inputs, drawing, video and webcam."""

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ws_d2.predictor import VisualizationDemo, WSPredictor


@pytest.fixture(scope="module")
def demo(load_tool):
    return load_tool("demo")


@pytest.fixture(scope="module")
def model_opts(tiny_cfg, tmp_path_factory):
    """Overrides for the tiny model: MODEL.WEIGHTS names random weights, saved once so that every model
    built here holds the same weights and loads them as a trained model does (WSCheckpointer); at most 5
    instances per image, as drawing is most of the demo's time."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_random.pth"
    torch.save({"model": build_model(tiny_cfg()).state_dict()}, path)
    return ["MODEL.WEIGHTS", str(path), "TEST.DETECTIONS_PER_IMAGE", "5"]


def exit_status(demo, argv):
    """Run the demo as its command line does: its exit status (argparse exits on a usage error)."""
    try:
        return demo.main(argv)
    except SystemExit as exit_info:
        return exit_info.code


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


def test_read_image_grayscale_rgba_exif(demo, tmp_path):
    rgb = synthetic_image()
    gray = demo.read_image_bgr(save(tmp_path / "gray.png", rgb, "L"))
    assert gray.shape == (72, 96, 3) and (gray[..., 0] == gray[..., 2]).all()

    rgba = np.dstack([np.full((8, 8, 3), (255, 0, 0), np.uint8), np.full((8, 8), 128, np.uint8)])
    bgr = demo.read_image_bgr(save(tmp_path / "rgba.png", rgba))
    assert bgr.shape == (8, 8, 3) and tuple(bgr[0, 0]) == (0, 0, 255)  # red, in BGR order

    marked = np.zeros((20, 40, 3), np.uint8)
    marked[:4, :4] = 255  # top-left of the stored pixels
    upright = demo.read_image_bgr(save(tmp_path / "rotated.jpg", marked, exif_orientation=6))  # 90 deg CW
    assert upright.shape == (40, 20, 3)
    # JPEG blurs the marker's edges by a few levels: 200 and 50 are far from both 255 and 0
    assert upright[:4, -4:].mean() > 200 and upright[:4, :4].mean() < 50  # marker now top-right


def test_read_image_names_truncated_file(demo, tmp_path):
    truncated = tmp_path / "cut.png"
    save(truncated, synthetic_image())
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(demo.UnreadableImageError, match=r"cut\.png"):
        demo.read_image_bgr(str(truncated))


def test_expand_inputs_files_folders_globs(demo, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    a, b = save(folder / "b.png", synthetic_image()), save(folder / "a.jpg", synthetic_image())
    (folder / "readme.txt").write_text("skipped: a folder is searched for images only")
    c = save(tmp_path / "c.png", synthetic_image())
    patterns = [str(folder), str(tmp_path / "*.png"), c, str(tmp_path / "nothing*.jpg")]
    paths, problems = demo.expand_inputs(patterns)
    assert paths == [b, a, c]  # folder sorted, duplicates once
    assert len(problems) == 1 and "nothing*.jpg: no such file" in problems[0]


@pytest.mark.parametrize("input_format, red_channel", [("RGB", 0), ("BGR", 2)])
def test_predictor_feeds_model_in_input_format(demo, tiny_cfg, tmp_path, input_format, red_channel):
    predictor = WSPredictor(tiny_cfg("INPUT.FORMAT", input_format))
    seen = []
    predictor.model = lambda batch: seen.append(batch[0]["image"]) or [{}]
    predictor(demo.read_image_bgr(save(tmp_path / "red.png", np.full((16, 16, 3), (255, 0, 0), np.uint8))))
    channel_means = seen[0].mean(dim=(1, 2))
    # a uniform image stays uniform through resizing: exact 255 and 0 values
    assert channel_means[red_channel] == 255 and channel_means.sum() == 255


def test_visualization_demo_draws_image_and_frames(tiny_cfg, model_opts):
    visualization = VisualizationDemo(
        WSPredictor(tiny_cfg(*model_opts, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"))
    )
    image_bgr = synthetic_image()[:, :, ::-1]
    predictions, drawn_rgb = visualization.run_on_image(image_bgr)
    assert len(predictions["instances"]) > 0
    assert drawn_rgb.shape == (72, 96, 3) and drawn_rgb.dtype == np.uint8
    # drawing blends boxes, masks and labels into the image: far more than 1 level on average
    assert np.abs(drawn_rgb.astype(int) - image_bgr[:, :, ::-1]).mean() > 1

    drawn_frames = list(visualization.run_on_video(iter([image_bgr, image_bgr])))
    assert len(drawn_frames) == 2 and all(len(p["instances"]) > 0 for p, _ in drawn_frames)
    assert drawn_frames[0][1].shape == (72, 96, 3)
    assert np.abs(drawn_frames[0][1].astype(int) - image_bgr).mean() > 1  # BGR, as the frames


PANOPTIC = "COCO-PanopticSegmentation/panoptic_fpn_R_50_gn_ws_3x.yaml"  # COCO's panoptic metadata names
# random weights, every instance and every stuff region kept, so that there are segments of both kinds
EVERY_SEGMENT = [
    "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH", "0.0", "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT", "0",
]  # fmt: skip


def drawn_image_and_frame(cfg):
    """(predictions, per-pixel change of the drawn image, of the drawn frame) of a random-weight model."""
    torch.manual_seed(0)
    visualization = VisualizationDemo(WSPredictor(cfg))
    image_bgr = synthetic_image()[:, :, ::-1]
    predictions, drawn_rgb = visualization.run_on_image(image_bgr)
    [(_, drawn_bgr)] = visualization.run_on_video([image_bgr])
    return predictions, [np.abs(drawn.astype(int) - image).sum(axis=2) for drawn, image in
                         ((drawn_rgb, image_bgr[:, :, ::-1]), (drawn_bgr, image_bgr))]  # fmt: skip


def test_visualization_demo_draws_panoptic_segments(tiny_family_cfg):
    predictions, changes = drawn_image_and_frame(tiny_family_cfg(PANOPTIC, *EVERY_SEGMENT))
    segments, segments_info = predictions["panoptic_seg"]
    for isthing in (True, False):
        covered = np.isin(segments.numpy(), [s["id"] for s in segments_info if s["isthing"] == isthing])
        assert covered.any()
        for change in changes:  # a segment is filled with its color (drawing the instances alone: 53-61%)
            assert (change[covered] > 20).mean() > 0.9, (isthing, (change[covered] > 20).mean())


def test_visualization_demo_draws_semantic_map(tiny_family_cfg):
    cfg = tiny_family_cfg(PANOPTIC, "MODEL.META_ARCHITECTURE", "SemanticSegmentor")
    predictions, changes = drawn_image_and_frame(cfg)
    assert set(predictions) == {"sem_seg"}
    for change in changes:  # every pixel has a class, drawn in its color
        assert (change > 20).mean() > 0.9, (change > 20).mean()


@pytest.mark.slow
def test_demo_cli_images_and_bad_inputs(tiny_config, model_opts, tmp_path, repo_root):
    """The real command line: bad inputs are named in one line each, the rest is processed, exit 1."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save(inputs / "street.png", synthetic_image())
    save(inputs / "gray.jpg", synthetic_image(), "L")
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    command = [sys.executable, str(repo_root / "tools" / "demo.py"), "--config-file", tiny_config]
    command += ["--input", str(inputs), str(tmp_path / "missing.jpg"), "--output", str(out)]
    run = subprocess.run([*command, "--opts", *model_opts], capture_output=True, text=True)

    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    failure_lines = [line for line in run.stderr.splitlines() if "skipped" in line]
    assert len(failure_lines) == 2
    assert any("broken.png: cannot read as an image" in line for line in failure_lines)
    assert any("missing.jpg: no such file" in line for line in failure_lines)
    assert sorted(p.name for p in out.iterdir()) == ["gray.jpg", "street.png"]
    assert cv2.imread(str(out / "street.png")).shape == (72, 96, 3)


def test_demo_names_missing_config_and_weights(demo, tiny_config, tmp_path, capsys):
    image = save(tmp_path / "a.png", synthetic_image())
    argv = ["--input", image, "--output", str(tmp_path / "out")]
    assert exit_status(demo, ["--config-file", "nowhere/model.yaml", *argv]) == 1
    assert capsys.readouterr().err.strip() == "demo: error: config file not found: nowhere/model.yaml"
    assert (
        exit_status(demo, ["--config-file", tiny_config, *argv, "--opts", "MODEL.WEIGHTS", "gone.pth"]) == 1
    )
    assert capsys.readouterr().err.strip() == "demo: error: MODEL.WEIGHTS file not found: gone.pth"
    video_argv = ["--video-input", str(tmp_path / "gone.mp4"), "--output", str(tmp_path / "drawn.mp4")]
    assert exit_status(demo, ["--config-file", tiny_config, *video_argv]) == 1
    assert capsys.readouterr().err.strip() == f"demo: error: video file not found: {tmp_path / 'gone.mp4'}"


def test_demo_names_drawing_it_cannot_write(demo, tiny_config, tmp_path, capsys):
    image = save(tmp_path / "a.png", synthetic_image())
    argv = ["--config-file", tiny_config, "--input", image, "--output", str(tmp_path / "drawn.xyz")]
    assert demo.main(argv) == 1
    assert "drawn.xyz: cannot write the drawing of" in capsys.readouterr().err


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
def test_demo_video(demo, tiny_config, model_opts, tmp_path, input_name, fourcc, output_name):
    video = write_video(tmp_path / input_name, fourcc)
    output = tmp_path / output_name
    argv = [
        "--config-file",
        tiny_config,
        "--video-input",
        str(video),
        "--output",
        f"{tmp_path}/{output_name}",
    ]
    assert demo.main([*argv, "--confidence-threshold", "0", "--opts", *model_opts]) == 0
    written = output if output.suffix else output / (video.stem + ".mp4")
    frames = read_video(written)
    assert len(frames) == 5 and frames[0].shape == (72, 96, 3)
    # compression changes pixels by a level or two; drawn instances (all kept at threshold 0) by far more
    assert np.abs(frames[0].astype(int) - read_video(video)[0]).mean() > 1  # something was drawn


def test_demo_refuses_video_output_it_cannot_write(demo, tiny_config, tmp_path, capsys):
    argv = ["--config-file", tiny_config, "--webcam", "--output", str(tmp_path / "cam.mkv")]
    assert exit_status(demo, argv) == 2  # a usage error, found before any camera or model is opened
    assert "a video is written as .mp4 or .avi" in capsys.readouterr().err


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


def test_webcam_with_fake_camera(demo, tiny_config, model_opts, tmp_path, monkeypatch, capsys):
    frames = [cv2.cvtColor(synthetic_image(), cv2.COLOR_RGB2BGR)] * 3
    argv = ["--config-file", tiny_config, "--webcam", "--output", str(tmp_path / "web")]
    with monkeypatch.context() as patch:
        patch.setattr(cv2, "VideoCapture", lambda index: FakeCamera(frames))
        assert demo.main([*argv, "--max-frames", "2", "--opts", *model_opts]) == 0
    assert len(read_video(tmp_path / "web" / "webcam.mp4")) == 2
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(cv2, "VideoCapture", lambda index: FakeCamera(None))
        assert exit_status(demo, argv) == 1
    assert capsys.readouterr().err.strip() == "demo: error: no camera found: cv2.VideoCapture(0) did not open"


def test_without_output_or_display_asks_for_output(demo, tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    image = save(tmp_path / "a.png", synthetic_image())
    assert exit_status(demo, ["--config-file", tiny_config, "--input", image]) == 2
    assert "pass --output" in capsys.readouterr().err
