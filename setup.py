from setuptools import find_packages, setup

setup(
    name="ws_d2",
    version="0.1.0",
    description="Weight Standardization (GN+WS) for Detectron2",
    packages=find_packages(include=["ws_d2", "ws_d2.*"]),
    package_data={"ws_d2": ["model_zoo/configs/**/*.yaml"]},
    python_requires=">=3.9",
    # torch, torchvision and detectron2 need care to install on CPU-only machines: see
    # requirements.txt and tools/setup_env.py (`make env`).
    install_requires=["numpy", "opencv-python", "pycocotools", "fvcore"],
)
