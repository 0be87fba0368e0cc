"""WSCheckpointer: detectron2's DetectionCheckpointer that reads files safely (detectron2 unpickles .pkl files
with plain pickle.load) and saves atomically (fvcore writes in place: a kill mid-save truncates the file)."""

import contextlib
import os

from detectron2.checkpoint import DetectionCheckpointer

from ..errors import CheckpointError, one_line
from ..files import atomic_write, is_url, require_weights_file
from .convert import convert_state_dict
from .layouts import detect_layout, unwrap_state_dict
from .safe_load import load_checkpoint_file


class _AtomicWritesPathManager:
    """Local writes via ``atomic_write``: fvcore's ``save`` and ``tag_last_checkpoint`` write through it."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def open(self, path, mode="r", **kwargs):
        if any(c in mode for c in "wx") and not is_url(path) and not kwargs:
            return atomic_write(path, mode)
        return self._path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._path_manager, name)


class WSCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that downloads a URL once and converts a published layout in memory."""

    def __init__(self, model, save_dir="", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWritesPathManager(self.path_manager)
        self._downloaded = {}  # local cached path -> URL

    def load(self, path, *args, **kwargs):
        require_weights_file(path, "checkpoint")
        if path and is_url(path):
            try:
                local = self.path_manager.get_local_path(path)
            except (OSError, ValueError) as e:  # URLError, HTTPError, a refused connection...
                raise CheckpointError(f"{path}: cannot download the checkpoint: {one_line(e)}") from None
            self._downloaded[local] = path
            path = local
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        try:
            data = load_checkpoint_file(filename)
        except CheckpointError as e:
            if filename not in self._downloaded:
                raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(filename)
            url = self._downloaded[filename]
            raise type(e)(f"{url}: {one_line(e)} (the downloaded copy was deleted from the cache)") from None
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
        state_dict, report = convert_state_dict(data, self.model, source)
        self.logger.info(f"Converted {filename} in memory: {report.summary()}")
        return {"model": state_dict, "__author__": "ws_d2", "matching_heuristics": False}

    def load_covering(self, path):
        """``load(path)``, refusing (CheckpointError) a file that leaves any model tensor at its initial
        value: missing from the file or of another shape (weights of another architecture)."""
        self._incompatible = None
        checkpoint = self.load(path, checkpointables=[])
        missing = self._incompatible.missing_keys if self._incompatible is not None else []
        if missing:
            raise CheckpointError(
                f"{path} does not cover the model: {len(missing)} of {len(self.model.state_dict())} tensors "
                f"missing or of another shape (e.g. {', '.join(missing[:3])}); wrong architecture or config?"
            )
        return checkpoint

    def _load_model(self, checkpoint):
        # kept for load_covering; fvcore only logs what did not load
        self._incompatible = super()._load_model(checkpoint)
        return self._incompatible
