"""The study's arms and its plan: which runs (cells) it makes.

Every arm is the study config plus the overrides below: only the normalization and the WS mode differ.
A cell is one training run: an arm, a seed, the images per optimizer step and the learning rate.
"""

import dataclasses
import re

from ws_d2.errors import ConfigError

# Every place the quickstart model has a normalization layer after a conv.
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")


def _norm_everywhere(norm):
    return [item for key in NORM_KEYS for item in (key, norm)]


ARMS = {
    "GN": ["MODEL.WS.ENABLED", "False"],
    "GN+WS": [],
    # torch's BatchNorm2d: statistics of the micro-batch in training, running statistics in eval
    "BN": ["MODEL.WS.ENABLED", "False", *_norm_everywhere("BN")],
    # no normalization at all: what FrozenBN amounts to when training from scratch
    "none": ["MODEL.WS.ENABLED", "False", *_norm_everywhere("")],
    # the BCN+WS release's WS formula, as configs/quickstart/mask_rcnn_R_18_FPN_bcn_ws_synthetic.yaml
    "BCN+WS": ["MODEL.BCN.ENABLED", "True", "MODEL.WS.FORMULA", "sqrt_var_plus_eps"],
    "GN+WS-MO": ["MODEL.WS.MODE", "center"],
    "GN+WS-DO": ["MODEL.WS.MODE", "scale"],
    "GN+WS-AF": ["MODEL.WS.MODE", "standardize_affine"],
    "GN+WN": ["MODEL.WS.MODE", "weight_norm"],
}
MAIN_ARMS = ("GN", "GN+WS", "BN", "none", "BCN+WS")
ABLATION_ARMS = ("GN+WS-MO", "GN+WS-DO", "GN+WS-AF", "GN+WN")
# Arms run again at 2 images per step: BN, whose statistics the images per step change, and GN+WS, for which
# they change only the gradient noise (as for every arm without batch statistics).
TWO_IMAGE_ARMS = ("GN+WS", "BN")
# Arms whose LR grid is extended past an edge where their best LR sits (full_study, phase 2).
EXTENDED_ARMS = ("GN", "GN+WS")

LR_GRID = (0.005, 0.01, 0.02)
SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    arm: str
    seed: int
    ims_per_step: int
    lr: float

    @classmethod
    def of(cls, entry):
        """The cell of a results.json entry."""
        return cls(entry["arm"], entry["seed"], entry["ims_per_step"], entry["lr"])

    @property
    def name(self):
        slug = re.sub(r"[^a-z0-9]+", "_", self.arm.lower()).strip("_")
        return f"{slug}-ims{self.ims_per_step}-lr{self.lr:g}-seed{self.seed}"


def check_arms(arms):
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ConfigError(f"unknown arm(s) {', '.join(unknown)}; the arms are {', '.join(ARMS)}")
    return list(arms)


def grid(arms, seeds, ims_per_step, lrs):
    """Every combination: what an explicit --arms/--seeds/--ims-per-step/--lrs selection runs."""
    return [Cell(a, s, i, lr) for a in check_arms(arms) for i in ims_per_step for lr in lrs for s in seeds]


def best_lr(results, arm, ims_per_step=1):
    """The learning rate with the highest mean box AP over seeds for `arm`, or None before it has results."""
    by_lr = {}
    for r in results:
        if r["arm"] == arm and r["ims_per_step"] == ims_per_step:
            by_lr.setdefault(r["lr"], []).append(r["bbox_AP"])
    if not by_lr:
        return None
    return max(by_lr, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), -lr))


def full_study(results, seeds=SEEDS, lrs=LR_GRID):
    """The default study, in phases; returns (cells, whether the plan is complete).

    1. The main arms over the LR grid at 1 image per step.
    2. GN and GN+WS, whose paired difference is the study's main figure: one more LR (a factor 2) beyond the
       grid's edge where the best mean box AP of phase 1 sits, if it sits at an edge.
    3. The ablation arms at the best GN+WS learning rate, and the arms of TWO_IMAGE_ARMS at 2 images per step
       with twice their best learning rate (the linear scaling rule, the same images seen).
    Each phase is planned from the results of the ones before it.
    """
    cells = grid(MAIN_ARMS, seeds, (1,), lrs)
    done = _finished(results, cells)
    if done is None:
        return cells, False
    for arm in EXTENDED_ARMS:
        best = best_lr(done, arm)
        if best in (min(lrs), max(lrs)):
            cells += grid((arm,), seeds, (1,), (best / 2 if best == min(lrs) else best * 2,))
    done = _finished(results, cells)
    if done is None:
        return cells, False
    cells += grid(ABLATION_ARMS, seeds, (1,), (best_lr(done, "GN+WS"),))
    for arm in TWO_IMAGE_ARMS:
        cells += grid((arm,), seeds, (2,), (2 * best_lr(done, arm),))
    return cells, True


def _finished(results, cells):
    """The results of `cells`, or None while any of them has none."""
    done = {Cell.of(r): r for r in results}
    return [done[c] for c in sorted(set(cells))] if set(cells) <= done.keys() else None
