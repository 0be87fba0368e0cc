"""ws_d2: Weight Standardization (GN+WS) for Detectron2.

Importing ws_d2 applies the compatibility fixes for the installed detectron2 (ws_d2.compat) and
registers every ws_d2 component in detectron2's registries.
"""

from . import compat

compat.apply_all()

# registration needs the fixes above; `data` registers the synthetic data set's names and metadata
from . import data, modeling  # noqa: E402
from .config import add_ws_config, get_ws_cfg  # noqa: E402
from .layers import WSConv2d, standardize_weight  # noqa: E402

__version__ = "0.1.0"
__all__ = ["WSConv2d", "add_ws_config", "data", "get_ws_cfg", "modeling", "standardize_weight"]
