"""A non-editable install works from any directory: the configs ship inside the package."""

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
    code = (
        "import ws_d2; from ws_d2.checkpoint.convert import seed_config_file; "
        "print(ws_d2.__file__); print(seed_config_file('X_101_32x4d', mask_on=True)); "
        "print(ws_d2.load_config(seed_config_file('R_50')).MODEL.RESNETS.DEPTH)"
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
    module, config, depth = done.stdout.split()
    assert module.startswith(str(target)) and config.startswith(
        str(target / "ws_d2" / "model_zoo" / "configs")
    )
    assert config.endswith("mask_rcnn_X_101_32x4d_FPN_gn_ws_2x.yaml") and depth == "50"
