"""ws_d2: Weight Standardization (GN+WS) for Detectron2; importing it patches detectron2 (ws_d2.compat) and
registers ws_d2's components."""

from . import compat

compat.apply_all()

# after the patches; `data` registers the synthetic data set's names and metadata
from . import data, modeling  # noqa: E402,F401  (registration)
from .config import add_ws_config, get_ws_cfg, load_config  # noqa: E402
from .layers import WSConv2d, standardize_weight  # noqa: E402

__version__ = "0.1.0"
__all__ = ["WSConv2d", "add_ws_config", "get_ws_cfg", "load_config", "standardize_weight"]
