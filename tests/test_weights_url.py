"""MODEL.WEIGHTS as a URL, in any layout the converter knows: downloaded once through detectron2's file cache
($FVCORE_CACHE), converted in memory, and refused (cached copy deleted) when truncated or unsafe.

A local HTTP server (127.0.0.1, a free port, stopped after each test) serves synthetic files made by the
converter tests' makers and counts the requests per path.
"""

import http.server
import os
import pickle
import socket
import threading
from collections import Counter

import pytest
import torch
from checkpoint_files import (
    RunsShellCommand,
    bcn_ws_resnet,
    gn_resnet,
    mmdet_neck_and_heads,
    save_authors_file,
)
from detectron2.modeling import build_model

import ws_d2
from ws_d2 import model_zoo
from ws_d2.checkpoint import WSCheckpointer
from ws_d2.errors import CheckpointError, UnsafeCheckpointError, one_line
from ws_d2.predictor import WSPredictor

MASK_R50 = "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml"
FASTER_R50 = "configs/COCO-Detection/faster_rcnn_R_50_FPN_gn_ws_1x.yaml"
BCN_R50 = "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_bcn_ws_2x.yaml"


class _Server:
    """Serves `root` on 127.0.0.1; GET /cut/<name> announces the whole file but sends half of it."""

    def __init__(self, root):
        hits = self.hits = Counter()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                hits[self.path] += 1
                if not self.path.startswith("/cut/"):
                    return super().do_GET()
                data = (root / self.path[len("/cut/") :]).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 10
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(server, served directory, cache directory); the cache is detectron2's, moved by its env var."""
    served, cache = tmp_path / "served", tmp_path / "cache"
    served.mkdir()
    monkeypatch.setenv("FVCORE_CACHE", str(cache))
    running = _Server(served)
    yield running, served, cache
    running.stop()


def _cfg(repo_root, config):
    return ws_d2.load_config(str(repo_root / config), ["MODEL.DEVICE", "cpu"])


def test_mmdet_detector_by_url_matches_the_converted_file_and_is_cached(
    tmp_path, repo_root, server, monkeypatch, convert_checkpoint
):
    running, served, cache = server
    backbone = {f"backbone.{k.replace('bn', 'gn')}": v for k, v in gn_resnet("resnet50").state_dict().items()}
    state_dict = {
        **{k: v for k, v in backbone.items() if ".fc." not in k},
        **mmdet_neck_and_heads(mask=True),
    }
    torch.save({"meta": {"epoch": 24}, "state_dict": state_dict}, served / "mask_r50.pth")
    cfg = _cfg(repo_root, MASK_R50)
    convert_checkpoint(
        served / "mask_r50.pth", tmp_path / "converted.pkl", config_file=str(repo_root / MASK_R50)
    )
    from_file = build_model(cfg)
    WSCheckpointer(from_file).load(str(tmp_path / "converted.pkl"))

    url = f"{running.url}/mask_r50.pth"
    from_url = build_model(cfg)
    WSCheckpointer(from_url).load(url)
    assert running.hits["/mask_r50.pth"] == 1 and (cache / "mask_r50.pth").is_file()
    # the model zoo's published weights, here served locally: the second load reads the cached copy
    monkeypatch.setitem(model_zoo.published.TRAINED, MASK_R50[len("configs/") :], url)
    from_zoo = model_zoo.get(MASK_R50[len("configs/") :], trained=True, device="cpu")
    assert running.hits["/mask_r50.pth"] == 1
    expected = from_file.state_dict()
    for model in (from_url, from_zoo):  # built with other random values: every tensor came from the file
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features, zoo_features = from_file.eval().backbone(image), from_zoo.eval().backbone(image)
    assert len(features) == 5 and all(torch.equal(features[k], zoo_features[k]) for k in features)


@pytest.mark.parametrize(
    "layout, config",
    [
        ("authors", FASTER_R50),
        ("authors_bcn", BCN_R50),
        ("ws_d2", "tests/configs/tiny_mask_rcnn_R_18_FPN.yaml"),
    ],
)
def test_imagenet_and_detectron2_files_by_url(
    tmp_path, repo_root, server, layout, config, convert_checkpoint
):
    running, served, _ = server
    name = f"{layout}.pth"
    if layout == "authors":
        save_authors_file(gn_resnet("resnet50"), served / name)
    elif layout == "authors_bcn":
        save_authors_file(bcn_ws_resnet("resnet50"), served / name)
    else:  # a detectron2 checkpoint, as WSCheckpointer saves it
        WSCheckpointer(build_model(_cfg(repo_root, config)), str(served)).save(layout)
    cfg = _cfg(repo_root, config)
    if layout == "ws_d2":
        expected = torch.load(served / name, weights_only=True)["model"]
    else:
        convert_checkpoint(served / name, tmp_path / "converted.pkl", config_file=str(repo_root / config))
        expected = {k: torch.as_tensor(v) for k, v in pickle.loads((tmp_path / "converted.pkl").read_bytes())["model"].items()}  # fmt: skip
    model = build_model(cfg)
    WSCheckpointer(model).load(f"{running.url}/{name}")
    state = model.state_dict()
    assert len(expected) >= 120 and all(torch.equal(state[k], v) for k, v in expected.items())


def test_truncated_and_malicious_downloads_are_refused_and_evicted(tmp_path, repo_root, server):
    running, served, cache = server
    model = build_model(_cfg(repo_root, MASK_R50))
    full = save_authors_file(gn_resnet("resnet50"), tmp_path / "full.pth")
    (served / "truncated.pth").write_bytes(full.read_bytes()[:50_000])
    marker = tmp_path / "was_executed"
    (served / "evil.pth").write_bytes(pickle.dumps({"conv1.weight": RunsShellCommand(marker)}))

    for name, error_type, words in [
        ("truncated.pth", CheckpointError, "truncated or corrupt"),
        ("evil.pth", UnsafeCheckpointError, "refused to load"),
    ]:
        url = f"{running.url}/{name}"
        with pytest.raises(error_type) as refused:
            WSCheckpointer(model).load(url)
        message = str(refused.value)
        assert message == one_line(refused.value) and message.startswith(url) and words in message
        assert "deleted from the cache" in message and not (cache / name).exists()
    assert not marker.exists()

    # announced in full but cut short in transit: refused by the download itself, nothing left in the cache
    (served / "full.pth").write_bytes(full.read_bytes())
    url = f"{running.url}/cut/full.pth"
    with pytest.raises(CheckpointError, match="cannot download") as refused:
        WSCheckpointer(model).load(url)
    assert str(refused.value).startswith(url)
    assert not [p.name for p in (cache / "cut").glob("*") if not p.name.endswith(".lock")]  # iopath's lock


def test_unreachable_url_is_named_in_one_line(repo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model_final.pth"
    cfg = _cfg(repo_root, MASK_R50)
    cfg.merge_from_list(["MODEL.WEIGHTS", url])
    with pytest.raises(CheckpointError) as refused:
        WSPredictor(cfg)
    message = str(refused.value)
    assert message == one_line(refused.value) and message.startswith(f"{url}: cannot download")
    assert not os.path.exists(tmp_path / "cache" / "model_final.pth")
