"""WSCheckpointer: detectron2's DetectionCheckpointer that reads files safely and saves atomically.

- Reading: detectron2 v0.6 unpickles ``.pkl`` files with plain ``pickle.load`` (a crafted file runs code) and
  fvcore reads everything else with ``torch.load``. Here both go through ``ws_d2.checkpoint.safe_load``, while
  detectron2's own logic (Detectron ``.pkl`` name-matching heuristics, ``{"model": ...}`` wrapping, pycls
  ``.pyth``) still runs unchanged.
- Saving: fvcore writes the checkpoint and then ``last_checkpoint`` in place, so a process killed mid-save
  leaves a truncated file that ``last_checkpoint`` may name. Here each file is written to a temporary file in
  the same directory, flushed, fsynced and renamed over the target (``os.replace`` is atomic on POSIX and
  Windows), so a reader sees either the old file or the complete new one.
"""

import contextlib
import os
import tempfile
import threading
import types

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint import detection_checkpoint as _d2_checkpoint_module
from fvcore.common.checkpoint import Checkpointer

from .safe_load import load_checkpoint_file, load_pickle_stream, load_torch_stream

__all__ = ["WSCheckpointer", "atomic_write"]

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to ``path``; on a clean exit, fsync it and rename it over ``path``.

    On an exception (or a kill) ``path`` keeps its previous content; the temporary file is removed
    on an exception (a kill leaves a ``.<name>.*.tmp`` file that no reader looks at).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    # Makes the rename itself durable across a power loss; not possible on every OS / filesystem.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _AtomicWritesPathManager:
    """Delegates to a path manager, except that writing a local file goes through ``atomic_write``.

    fvcore's ``Checkpointer.save`` and ``tag_last_checkpoint`` write through ``self.path_manager.open``,
    so wrapping the path manager makes both atomic without re-implementing them.
    """

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def open(self, path, mode="r", **kwargs):
        if any(c in mode for c in "wx") and "://" not in str(path) and not kwargs:
            return atomic_write(path, mode)
        return self._path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._path_manager, name)


class _SafeFileReading(Checkpointer):
    """Replaces fvcore's plain ``torch.load`` (the last step of DetectionCheckpointer._load_file)."""

    def _load_file(self, filename):
        return load_checkpoint_file(filename)


_D2_READERS_LOCK = threading.Lock()


@contextlib.contextmanager
def _detectron2_reads_safely():
    """detectron2 v0.6 reads ``.pkl`` with ``pickle.load`` and ``.pyth`` with ``torch.load``, both looked up in
    its module's globals: point those two names at the safe readers while its ``_load_file`` runs."""
    safe_pickle = types.SimpleNamespace(load=load_pickle_stream)
    safe_torch = types.SimpleNamespace(load=lambda f, **_: load_torch_stream(f))
    with _D2_READERS_LOCK:
        saved = _d2_checkpoint_module.pickle, _d2_checkpoint_module.torch
        _d2_checkpoint_module.pickle, _d2_checkpoint_module.torch = safe_pickle, safe_torch
        try:
            yield
        finally:
            _d2_checkpoint_module.pickle, _d2_checkpoint_module.torch = saved


class WSCheckpointer(DetectionCheckpointer, _SafeFileReading):
    """A DetectionCheckpointer (same constructor, same loading rules) that never runs code from a file and
    whose ``save()`` never leaves a truncated checkpoint or ``last_checkpoint`` behind.

    Errors reading a file are ``ws_d2.checkpoint.CheckpointError`` subclasses with a one-line message.
    """

    def __init__(self, model, save_dir="", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWritesPathManager(self.path_manager)

    def _load_file(self, filename):
        with _detectron2_reads_safely():
            return super()._load_file(filename)
