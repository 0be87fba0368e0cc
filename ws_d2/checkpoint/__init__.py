"""Checkpoint reading and writing for ws_d2: safe loading, atomic saving, and importing published weights."""

from .checkpointer import WSCheckpointer, atomic_write
from .convert import (
    ConversionError,
    ConversionReport,
    convert_authors_checkpoint,
    convert_checkpoint,
    convert_mmdet_checkpoint,
    convert_torchvision_checkpoint,
)
from .safe_load import (
    CheckpointError,
    CheckpointLoadError,
    UnsafeCheckpointError,
    load_checkpoint_file,
    load_pickle_stream,
    load_torch_stream,
)

__all__ = [
    "CheckpointError",
    "ConversionError",
    "ConversionReport",
    "CheckpointLoadError",
    "UnsafeCheckpointError",
    "WSCheckpointer",
    "atomic_write",
    "convert_authors_checkpoint",
    "convert_checkpoint",
    "convert_mmdet_checkpoint",
    "convert_torchvision_checkpoint",
    "load_checkpoint_file",
    "load_pickle_stream",
    "load_torch_stream",
]
