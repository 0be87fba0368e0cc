"""Checkpoints: safe reading (no code from a file ever runs), atomic saving, and importing published weights."""

from .checkpointer import WSCheckpointer, atomic_write
from .convert import convert_checkpoint
from .safe_load import load_checkpoint_file

__all__ = ["WSCheckpointer", "atomic_write", "convert_checkpoint", "load_checkpoint_file"]
