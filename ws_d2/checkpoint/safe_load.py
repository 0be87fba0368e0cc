"""Read checkpoint files without running code from them (docs/CONVERSION.md#checkpoints-are-untrusted)."""

import _codecs
import collections
import os
import pickle
import re

import numpy as np
import torch

from ..errors import CheckpointError, UnsafeCheckpointError, one_line


def _refused(name, what):
    return UnsafeCheckpointError(f"{name}: refused to load: it references {what}, which is not plain data")


try:  # numpy >= 2 moved numpy.core to numpy._core; pickles from either name the path they were made with
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray
    from numpy.core import numeric as _np_numeric


def _latin1_encode(text, encoding="latin1", errors="strict"):
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, "latin1"); nothing else needs it.
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return _codecs.encode(text, encoding, errors)


_PLAIN_TYPES = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool)
_ADMITTED_GLOBALS = {
    ("__builtin__", "unicode"): str,
    ("__builtin__", "long"): int,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
# Python 2 pickles name the builtins module __builtin__ (our find_class replaces pickle's renaming)
_ADMITTED_GLOBALS |= {(module, t.__name__): t for module in ("builtins", "__builtin__") for t in _PLAIN_TYPES}
for _core in ("numpy.core", "numpy._core"):  # _frombuffer: pickle protocol 5's out-of-band arrays
    _ADMITTED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _np_multiarray._reconstruct
    _ADMITTED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _np_multiarray.scalar
    _ADMITTED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _np_numeric._frombuffer


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ADMITTED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


class _RefusedGlobal(pickle.UnpicklingError):
    pass


# what a truncated, corrupt or non-checkpoint file raises inside an unpickler
_CORRUPT = (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError)


def _unreadable(name, kind, error):
    return CheckpointError(f"{name}: not a readable {kind} (truncated or corrupt?): {one_line(error)}")


def _load_pickle(f, name):
    # latin1 reads Python 2 pickles (Detectron's .pkl files) into numpy arrays correctly
    try:
        return _PlainDataUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise _refused(name, str(e)) from None
    except (*_CORRUPT, pickle.UnpicklingError) as e:
        raise _unreadable(name, "pickle", e) from None


# The numpy objects torch.load may also rebuild (numpy arrays or scalars saved in a .pth). numpy >= 1.20
# gives each builtin dtype its own class (numpy.dtypes.Float32DType, ...), which torch checks on BUILD.
_TORCH_SAFE_NUMPY = [np.ndarray, np.dtype, _np_multiarray._reconstruct, _np_multiarray.scalar]
_TORCH_SAFE_NUMPY += {type(np.dtype(code)) for code in np.typecodes["All"]}
# How torch's weights-only unpickler names what it refused, most specific first.
_TORCH_REFUSAL_PATTERNS = [r"GLOBAL ([\w.]+)", r"got <class '([\w.]+)'>", r"WeightsUnpickler error: ([^\n]+)"]


def _load_torch(f, name):
    try:
        with torch.serialization.safe_globals(_TORCH_SAFE_NUMPY):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _unreadable(name, "torch checkpoint", e) from None
        matches = (re.search(pattern, str(e)) for pattern in _TORCH_REFUSAL_PATTERNS)
        refused = next((m.group(1) for m in matches if m), "a global outside torch's weights-only allowlist")
        raise _refused(name, refused[:200]) from None
    except (*_CORRUPT, RuntimeError, OSError) as e:
        raise _unreadable(name, "torch checkpoint", e) from None


def load_checkpoint_file(path):
    """A local checkpoint file as a dict, read without running code from it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        data = _load_pickle(f, path) if path.endswith(".pkl") else _load_torch(f, path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(data).__name__}")
    return data
