"""ws_d2's model configs, found inside the installed package (copied there at build time by setup.py)
or, in a source checkout, in its top-level `configs/` folder."""

from pathlib import Path

from ..errors import ConfigError

__all__ = ["get_config_file"]

_CONFIG_DIRS = (Path(__file__).parent / "configs", Path(__file__).resolve().parents[2] / "configs")


def get_config_file(config_path: str) -> str:
    """The absolute path of a ws_d2 config, e.g. "COCO-Detection/faster_rcnn_R_50_FPN_gn_ws_1x.yaml"."""
    for root in _CONFIG_DIRS:
        if (root / config_path).is_file():
            return str(root / config_path)
    raise ConfigError(f"{config_path} is not one of ws_d2's configs")
