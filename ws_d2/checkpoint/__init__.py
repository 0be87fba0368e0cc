"""Checkpoints: safe reading (no code from a file ever runs), atomic saving, and importing published weights."""

from .checkpointer import WSCheckpointer
from .convert import convert_state_dict, meta_model
from .layouts import SOURCES
from .safe_load import load_checkpoint_file

__all__ = [k for k in globals() if not k.startswith("_")]  # as detectron2's packages
