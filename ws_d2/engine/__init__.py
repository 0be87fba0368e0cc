"""Training: detectron2's DefaultTrainer with micro-batches, and CPU/Gloo and torchrun launching."""

from .launch import WorkerDied, launch, launched_by_torchrun
from .micro_batch import MicroBatchTrainer, micro_batch_size, split_batch
from .trainer import WSTrainer, check_trainable

__all__ = [k for k in globals() if not k.startswith("_")]  # as detectron2's packages
