import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    """Ship the top-level configs/ inside the package as ws_d2/model_zoo/configs, as detectron2 does, so
    that an installed ws_d2 finds its configs from any directory."""

    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "configs"
        target = Path(self.build_lib) / "ws_d2" / "model_zoo" / "configs"
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.md"), dirs_exist_ok=True)


setup(
    name="ws_d2",
    version="0.1.0",
    description="Weight Standardization (GN+WS) for Detectron2",
    packages=find_packages(include=["ws_d2", "ws_d2.*"]),
    cmdclass={"build_py": BuildPyWithConfigs},
    python_requires=">=3.9",
    # torch, torchvision and detectron2 need care to install on CPU-only machines: see
    # requirements.txt and tools/setup_env.py (`make env`).
    install_requires=["numpy", "opencv-python", "pycocotools", "fvcore"],
)
