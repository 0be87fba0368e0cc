"""Micro-batches: a step of SOLVER.IMS_PER_BATCH images in SOLVER.ITER_SIZE passes (docs/TRAINING.md)."""

import contextlib
import time

import torch
from detectron2.engine import SimpleTrainer
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from ..layers import moving_speed, set_moving_speed


def micro_batch_size(cfg, world_size):
    """Images per process per forward/backward pass: IMS_PER_BATCH / (world size x ITER_SIZE), exactly."""
    return split_batch(cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ITER_SIZE, world_size)


def split_batch(total, iter_size, world_size, keys=("SOLVER.IMS_PER_BATCH", "SOLVER.ITER_SIZE")):
    """Images per pass of `total` images per step as `iter_size` passes on `world_size` processes, exactly."""
    total_key, iter_key = keys
    if iter_size < 1:
        raise ConfigError(f"{iter_key} must be >= 1, got {iter_size}")
    if total < 1:
        raise ConfigError(f"{total_key} must be >= 1, got {total}")
    if total % (world_size * iter_size):
        raise ConfigError(
            f"{total_key} {total} does not divide into {world_size} process(es) x {iter_key} "
            f"{iter_size} micro-batches"
        )
    return total // (world_size * iter_size)


class MicroBatchTrainer(SimpleTrainer):
    """SimpleTrainer whose step runs `iter_size` micro-batches (each loss / iter_size, one DDP all-reduce),
    under autocast for a `precision` (like AMPTrainer), setting EstBN's r before each (`min_moving_speed`)."""

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        iter_size=1,
        grad_scaler=None,
        min_moving_speed=None,
        precision=None,
    ):
        super().__init__(model, data_loader, optimizer)
        self.iter_size = iter_size
        self.grad_scaler = grad_scaler
        self.precision = precision
        self.device_type = next(model.parameters()).device.type
        self.min_moving_speed = min_moving_speed

    def _forward_backward(self, data):
        enabled = self.precision is not None
        with torch.autocast(self.device_type, dtype=self.precision, enabled=enabled):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values()) / self.iter_size
        if self.grad_scaler is not None:
            losses = self.grad_scaler.scale(losses)
        losses.backward()
        return {name: loss.detach() for name, loss in loss_dict.items()}

    def run_step(self):
        assert self.model.training, "[MicroBatchTrainer] model was changed to eval mode!"
        self.optimizer.zero_grad()
        data_time, loss_dicts = 0.0, []
        for index in range(self.iter_size):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            last = index == self.iter_size - 1
            skip_sync = isinstance(self.model, DistributedDataParallel) and not last
            if self.min_moving_speed is not None:
                t = self.iter * self.iter_size + index
                set_moving_speed(self.model, moving_speed(t, self.min_moving_speed))
            with self.model.no_sync() if skip_sync else contextlib.nullcontext():
                loss_dicts.append(self._forward_backward(data))
        # logged losses are the step's mean over micro-batches, comparable across ITER_SIZE settings
        mean_losses = {name: sum(d[name] for d in loss_dicts) / self.iter_size for name in loss_dicts[0]}
        self._write_metrics(mean_losses, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()  # the key detectron2's AMPTrainer uses
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
