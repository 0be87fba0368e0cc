import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tools/ and tests/ helpers
os.environ.setdefault("OMP_NUM_THREADS", "2")

import ws_d2  # noqa: E402,F401  (compat fixes and registration before any detectron2 import)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
