"""WSCheckpointer: detectron2's DetectionCheckpointer that reads files safely and saves atomically.

- Reading: detectron2 unpickles ``.pkl`` files with plain ``pickle.load`` (a crafted file runs code) and
  ``.pyth`` with ``torch.load``. Here every file is read by ``load_checkpoint_file`` (plain data only), and
  DetectionCheckpointer's rules for what it read (Detectron ``.pkl`` blobs, pycls ``.pyth``, a bare
  state_dict) are applied to the result.
- Weights by URL or in a published layout: a URL is downloaded once into detectron2's file cache
  (``download.py``); a file in a layout the converter knows (MMDetection detector, the authors' GN+WS or
  BCN+WS ImageNet model, torchvision) is converted in memory by the converter's rules and checks, for the
  config given as ``config`` (else the seed config of the file's architecture), and its report is logged.
- Saving: fvcore writes the checkpoint and then ``last_checkpoint`` in place, so a process killed mid-save
  leaves a truncated file that ``last_checkpoint`` may name. Here each file is written to a temporary file in
  the same directory and renamed over the target, so a reader sees either the old file or the new one.
"""

import contextlib
import os
import secrets

from detectron2.checkpoint import DetectionCheckpointer

from ..errors import CheckpointError
from .download import discard_download, fetch_checkpoint, is_url
from .layouts import detect_layout, unwrap_state_dict
from .safe_load import load_checkpoint_file

__all__ = ["WSCheckpointer", "atomic_write"]


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to ``path``; on a clean exit, fsync it and rename it over ``path``.

    On an exception (or a kill) ``path`` keeps its previous content; the temporary file is removed on an
    exception (a kill leaves a ``.<name>.*.tmp`` file that no reader looks at).
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    # created like any new file (mode 0666 less the umask), never over an existing one
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    # makes the rename itself durable across a power loss; not possible on every OS / filesystem
    with contextlib.suppress(OSError, AttributeError):
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


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


class WSCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer (same constructor, same loading rules) that never runs code from a file and
    whose ``save()`` never leaves a truncated checkpoint or ``last_checkpoint`` behind.

    A file that cannot be read safely raises ``ws_d2.errors.CheckpointError`` with a one-line message.
    ``config`` is the config the model was built from: a file in a published layout is converted for it.
    """

    def __init__(self, model, save_dir="", *, config=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWritesPathManager(self.path_manager)
        self.config = config  # the model's config: the target of an in-memory conversion
        self._downloaded = {}  # local cached path -> URL

    def load(self, path, *args, **kwargs):
        if path and is_url(path):
            local = fetch_checkpoint(path, self.path_manager)
            self._downloaded[local] = path
            path = local
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        try:
            data = load_checkpoint_file(filename)
        except CheckpointError as e:
            if filename not in self._downloaded:
                raise
            raise discard_download(self._downloaded[filename], filename, e) from None
        if filename.endswith(".pkl"):
            if "model" in data and "__author__" in data:  # detectron2's own .pkl format
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            # Detectron / Caffe2 model zoo: detection models keep their weights under "blobs"
            blobs = data.get("blobs", data)
            weights = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
            return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls
            if "model_state" not in data:
                raise CheckpointError(f"{filename}: a pycls .pyth checkpoint must contain 'model_state'")
            weights = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": weights, "__author__": "pycls", "matching_heuristics": True}
        if "model" in data:
            return data
        source = detect_layout(unwrap_state_dict(data))
        if source is None:  # a bare detectron2 state_dict
            return {"model": data}
        from .convert import convert_in_memory  # convert.py imports this module

        state_dict, report = convert_in_memory(data, source, self.config)
        self.logger.info(f"Converted {filename} in memory: {report.summary()}")
        return {"model": state_dict, "__author__": "ws_d2", "matching_heuristics": False}

    def load_covering(self, path):
        """``load(path)``, refusing (CheckpointError) a file that leaves any model tensor at its initial
        value: missing from the file or of another shape (weights of another architecture)."""
        if "://" not in path and not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such checkpoint file")
        self._incompatible = None
        checkpoint = self.load(path, checkpointables=[])
        incompatible = self._incompatible
        if incompatible is not None and incompatible.missing_keys:
            missing = incompatible.missing_keys
            raise CheckpointError(
                f"{path} does not cover the model: {len(missing)} of {len(self.model.state_dict())} tensors "
                f"missing or of another shape (e.g. {', '.join(missing[:3])}); wrong architecture or config?"
            )
        return checkpoint

    def _load_model(self, checkpoint):
        # kept for load_covering; fvcore only logs what did not load
        self._incompatible = super()._load_model(checkpoint)
        return self._incompatible
