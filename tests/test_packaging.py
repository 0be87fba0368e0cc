"""A non-editable install works from any directory: the configs ship inside the package, and the model zoo
(detectron2's API) finds them and their published weights."""

import shutil
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_installed_package_finds_its_configs(tmp_path, repo_root):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(repo_root / name, source / name)
    for name in ("ws_d2", "configs"):
        shutil.copytree(repo_root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)]  # fmt: skip
    subprocess.run(install, check=True, capture_output=True)
    zoo_config = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.yaml"
    code = (
        "import ws_d2; from ws_d2 import model_zoo; print(ws_d2.__file__); "
        f"print(model_zoo.get_config_file({zoo_config!r})); "
        f"print(model_zoo.get_config({zoo_config!r}, trained=True).MODEL.WEIGHTS); "
        f"print(model_zoo.get_config({zoo_config!r}).MODEL.WEIGHTS); "
        "model = model_zoo.get('quickstart/mask_rcnn_R_18_FPN_gn_ws_synthetic.yaml', device='cpu'); "
        "print(type(model).__name__, model.backbone.bottom_up.stem.conv1.weight.device)"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env={"PYTHONPATH": str(target), "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    module, zoo_file, trained, imagenet, model, device = done.stdout.split()
    assert module.startswith(str(target))
    assert zoo_file == str(target / "ws_d2" / "model_zoo" / "configs" / zoo_config)
    assert (
        trained.startswith("https://download.openmmlab.com/") and "mask_rcnn_r50_fpn_gn_ws-all_2x" in trained
    )
    # no pretrained/R-50-GN-WS.pkl in that directory: MMDetection's copy of the authors' ImageNet model
    assert imagenet.endswith("/resnet50_gn_ws-15beedd8.pth")
    assert (model, device) == ("GeneralizedRCNN", "cpu")
