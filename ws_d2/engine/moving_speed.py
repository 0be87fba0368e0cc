"""EstBN's moving speed r during training: ws_d2's schedule for Batch-Channel Normalization's estimates.

The authors' EstBN keeps r in a buffer initialised to 0 and no code of theirs sets it (at r = 0 the
estimates never move). ws_d2 sets r before every forward pass of training (every micro-batch) to

    r_t = max(1 / (t + 1), MODEL.BCN.MIN_MOVING_SPEED),   t = optimizer step x SOLVER.ITER_SIZE + micro-batch

With 1 / (t + 1) the mean estimate is exactly the average of the batch means seen so far (r_0 = 1 replaces
the initial or ImageNet estimates by the first batch's); past t = 1 / r_min it becomes an exponential moving
average over ~1 / r_min passes, which follows the weights as they train. t counts forward passes, not
optimizer steps, so one step of ITER_SIZE k updates the estimates k times, each with its own micro-batch,
exactly as k steps of that micro-batch would: r depends on the number of batches averaged, not on how they are
grouped into optimizer steps. It is a function of the iteration, so resuming needs nothing saved. docs/BCN.md
"""

from ..layers import EstBN

__all__ = ["MovingSpeedSchedule"]


class MovingSpeedSchedule:
    """r_t = max(1 / (t + 1), min_speed) for the t-th training forward pass; `apply` sets it on a model."""

    def __init__(self, min_speed: float):
        self.min_speed = min_speed
        self._estimators = None

    @classmethod
    def from_config(cls, cfg):
        """The schedule of a config, or None when it has no EstBN (MODEL.BCN off, or ESTIMATE False)."""
        bcn = cfg.MODEL.BCN
        return cls(bcn.MIN_MOVING_SPEED) if bcn.ENABLED and bcn.ESTIMATE else None

    def __call__(self, t: int) -> float:
        return max(1.0 / (t + 1), self.min_speed)

    def apply(self, model, t: int) -> float:
        """Set r_t on every EstBN of `model` (found once: the model's modules do not change in training)."""
        if self._estimators is None:
            self._estimators = [m for m in model.modules() if isinstance(m, EstBN)]
        speed = self(t)
        for m in self._estimators:
            m.estbn_moving_speed.fill_(speed)
        return speed
