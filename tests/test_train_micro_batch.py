"""SOLVER.ITER_SIZE: k micro-batches per optimizer step give the one-big-batch update."""

import pytest
import torch
from training_support import EXACT_OPTS, make_tiny_dataset, tiny_cfg

from ws_d2.config import get_ws_cfg
from ws_d2.engine import ConfigError, WSTrainer, micro_batch_size


def exact_cfg(dataset_opts, output_dir, *opts):
    return tiny_cfg(*dataset_opts, *EXACT_OPTS, "OUTPUT_DIR", str(output_dir), *opts)


def train_and_get_update(cfg):
    torch.manual_seed(0)  # the same initial weights for every run
    trainer = WSTrainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    return trainer, {k: after[k] - before[k] for k in before if before[k].is_floating_point()}


@pytest.fixture(scope="module")
def one_object_dataset(tmp_path_factory):
    # 4 images = 1 optimizer step of IMS_PER_BATCH 4: every step sees the same images whatever the order
    return make_tiny_dataset(
        tmp_path_factory.mktemp("iter_size_data"), "iter_size", num_train=4, max_objects=1
    )


def test_micro_batch_size_divides_or_names_the_problem():
    cfg = get_ws_cfg()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ITER_SIZE = 16, 4
    assert micro_batch_size(cfg, world_size=2) == 2
    cfg.SOLVER.ITER_SIZE = 3
    with pytest.raises(ConfigError, match="IMS_PER_BATCH 16 does not divide .*ITER_SIZE 3"):
        micro_batch_size(cfg, world_size=1)


def test_iter_size_equals_one_big_batch(one_object_dataset, tmp_path):
    big_trainer, big_batch = train_and_get_update(exact_cfg(one_object_dataset, tmp_path / "big"))
    micro_trainer, micro_batches = train_and_get_update(
        exact_cfg(one_object_dataset, tmp_path / "micro", "SOLVER.ITER_SIZE", "2")
    )
    # the loaders really differ: 4 images per pass vs 2 per pass
    assert big_trainer.data_loader.batch_size == 4
    assert micro_trainer.data_loader.batch_size == 2
    # MAX_ITER and the LR schedule count optimizer steps, not micro-batches
    assert micro_trainer.scheduler.last_epoch == big_trainer.scheduler.last_epoch == 2
    largest = max(update.abs().max() for update in big_batch.values())
    assert largest > 1e-4  # the comparison is about real updates
    # Multi-threaded conv backward sums in a varying order: two runs of one config differ by up to ~0.7% (in
    # norm) in the first layers' updates. A wrong accumulation (no 1/ITER_SIZE, a lost micro-batch) is off by
    # 50-100%.
    for name, update in big_batch.items():
        difference = (micro_batches[name] - update).norm()
        assert difference <= 0.03 * update.norm() + 1e-7, f"{name}: {difference} vs {update.norm()}"
    total_difference = sum((micro_batches[k] - u).norm() ** 2 for k, u in big_batch.items()) ** 0.5
    total = sum(u.norm() ** 2 for u in big_batch.values()) ** 0.5
    assert total_difference <= 0.005 * total
