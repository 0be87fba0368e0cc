"""SOLVER.ITER_SIZE: k micro-batches per optimizer step give the one-big-batch update."""

import pytest
import torch

from ws_d2.engine import WSTrainer, micro_batch_size
from ws_d2.errors import ConfigError


def train_and_get_update(cfg):
    torch.manual_seed(0)  # the same initial weights for every run
    trainer = WSTrainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    return trainer, {k: (after[k] - before[k]).double() for k in before if before[k].is_floating_point()}


def test_micro_batch_size_divides_or_names_the_problem(tiny_cfg):
    cfg = tiny_cfg("SOLVER.IMS_PER_BATCH", "16", "SOLVER.ITER_SIZE", "4")
    assert micro_batch_size(cfg, world_size=2) == 2
    cfg.SOLVER.ITER_SIZE = 3
    with pytest.raises(ConfigError, match="IMS_PER_BATCH 16 does not divide .*ITER_SIZE 3"):
        micro_batch_size(cfg, world_size=1)


def test_iter_size_equals_one_big_batch(tmp_path, tiny_cfg, tiny_dataset, exact_step_opts):
    data_opts, _ = tiny_dataset(tmp_path / "data", "iter_size", num_train=4, max_objects=1)
    opts = [*exact_step_opts, *data_opts]
    big_trainer, big_batch = train_and_get_update(tiny_cfg(*opts, "OUTPUT_DIR", str(tmp_path / "big")))
    micro_trainer, micro_batches = train_and_get_update(
        tiny_cfg(*opts, "OUTPUT_DIR", str(tmp_path / "micro"), "SOLVER.ITER_SIZE", "2")
    )
    # the loaders really differ: 4 images per pass vs 2 per pass
    assert big_trainer.data_loader.batch_size == 4
    assert micro_trainer.data_loader.batch_size == 2
    # MAX_ITER and the LR schedule count optimizer steps, not micro-batches
    assert micro_trainer.scheduler.last_epoch == big_trainer.scheduler.last_epoch == 1
    total = sum(u.norm() ** 2 for u in big_batch.values()) ** 0.5
    assert total > 1e-3  # the comparison is about real updates
    # The same step computed on 1 batch of 4 or 2 of 2 images differs only by float summation order: measured
    # 5e-6 of the update in total and at most 3e-4 per tensor, with PyTorch's default and AVX2 kernels.
    # A wrong accumulation (no 1/ITER_SIZE, a lost micro-batch) is off by 50-100 %, in total and per tensor.
    for name, update in big_batch.items():
        difference = (micro_batches[name] - update).norm()
        assert difference <= 1e-2 * update.norm() + 1e-9, f"{name}: {difference} vs {update.norm()}"
    total_difference = sum((micro_batches[k] - u).norm() ** 2 for k, u in big_batch.items()) ** 0.5
    assert total_difference <= 1e-3 * total, (total_difference, total)
