"""The study's arms and its plan: which runs (cells) it makes.

Every arm is the study config plus the overrides below: only the normalization and the WS mode differ.
A cell is one training run: an arm, a seed, the images per optimizer step, the learning rate and the images
it sees (None: the study's base budget, 500 images).
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
    # the paper's BN+WS (23.76 ImageNet error at 64 images per GPU): WS before every BatchNorm
    "BN+WS": _norm_everywhere("BN"),
    # the BCN+WS release's WS formula, as configs/quickstart/mask_rcnn_R_18_FPN_bcn_ws_synthetic.yaml
    "BCN+WS": ["MODEL.BCN.ENABLED", "True", "MODEL.WS.FORMULA", "sqrt_var_plus_eps"],
    "GN+WS-MO": ["MODEL.WS.MODE", "center"],
    "GN+WS-DO": ["MODEL.WS.MODE", "scale"],
    "GN+WS-AF": ["MODEL.WS.MODE", "standardize_affine"],
    "GN+WN": ["MODEL.WS.MODE", "weight_norm"],
}
MAIN_ARMS = ("GN", "GN+WS", "BN", "none", "BCN+WS")
ABLATION_ARMS = ("GN+WS-MO", "GN+WS-DO", "GN+WS-AF", "GN+WN")
BATCH_NORM_ARMS = ("BN", "BN+WS")  # evaluated again with batch statistics (their train/eval gap)
# Arms run again at 2 images per step: BN, whose statistics the images per step change, and GN+WS, for which
# they change only the gradient noise (as for every arm without batch statistics).
TWO_IMAGE_ARMS = ("GN+WS", "BN")
# Arms whose LR grid is extended past an edge where their best LR sits (full_study, phase 2).
EXTENDED_ARMS = ("GN", "GN+WS")

LR_GRID = (0.005, 0.01, 0.02)
SEEDS = (0, 1, 2)
# Part 2. BN at large batches, over the 1-image LRs below times the images per step (the linear scaling rule),
# extended past an edge where its best LR sits; then the longer budget at 1 image per step (and BN at its best
# large batch), each arm at its best LR and twice that.
LARGE_BATCHES = (8, 16)
LARGE_BATCH_LR_GRID = (0.0025, 0.005, 0.01)
LONG_BUDGET = 2000  # images seen: 4x the base budget
LONG_BUDGET_ARMS = ("GN", "GN+WS", "BCN+WS")
MAX_EXTENSIONS = 3  # of the large-batch LR grid, each a factor 2


@dataclasses.dataclass(frozen=True)
class Cell:
    arm: str
    seed: int
    ims_per_step: int
    lr: float
    images: int = None

    @classmethod
    def of(cls, entry):
        """The cell of a results.json entry."""
        return cls(entry["arm"], entry["seed"], entry["ims_per_step"], entry["lr"], entry.get("images"))

    def __lt__(self, other):  # sorted(): in the fields' order, the base budget (None) first
        return self._order() < other._order()

    def _order(self):
        return (self.arm, self.seed, self.ims_per_step, self.lr, self.images or 0)

    @property
    def name(self):
        slug = re.sub(r"[^a-z0-9]+", "_", self.arm.lower()).strip("_")
        budget = f"-images{self.images}" if self.images else ""
        return f"{slug}-ims{self.ims_per_step}-lr{self.lr:g}-seed{self.seed}{budget}"


def check_arms(arms):
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ConfigError(f"unknown arm(s) {', '.join(unknown)}; the arms are {', '.join(ARMS)}")
    return list(arms)


def grid(arms, seeds, ims_per_step, lrs, images=None):
    """Every combination: what an explicit --arms/--seeds/--ims-per-step/--lrs/--images selection runs."""
    arms = check_arms(arms)
    return [Cell(a, s, i, lr, images) for a in arms for i in ims_per_step for lr in lrs for s in seeds]


def best_lr(results, arm, ims_per_step=1, images=None):
    """The learning rate with the highest mean box AP over seeds for `arm`, or None before it has results."""
    by_lr = {}
    for r in _tried(results, arm, ims_per_step, images):
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
    4. BN at each of LARGE_BATCHES over LARGE_BATCH_LR_GRID x the images per step, one LR further (a factor 2)
       while its best sits at an edge.
    5. BN+WS at BN's best large batch and LR (base budget); the LONG_BUDGET: the LONG_BUDGET_ARMS at 1 image per
       step and BN at its best large batch, each at its best LR of the base budget, then at twice that.
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
    for k in LARGE_BATCHES:
        cells += grid(("BN",), seeds, (k,), [k * lr for lr in LARGE_BATCH_LR_GRID])
    for extension in range(MAX_EXTENSIONS + 1):
        done = _finished(results, cells)
        if done is None:
            return cells, False
        beyond = [(k, _beyond_edge(done, "BN", k)) for k in LARGE_BATCHES if extension < MAX_EXTENSIONS]
        if not any(lr for _, lr in beyond):
            break
        cells += [cell for k, lr in beyond if lr for cell in grid(("BN",), seeds, (k,), (lr,))]
    large = large_batch(done)
    long_arms = [(arm, 1, best_lr(done, arm)) for arm in LONG_BUDGET_ARMS] + [
        ("BN", large, best_lr(done, "BN", large))
    ]
    cells += grid(("BN+WS",), seeds, (large,), (long_arms[-1][2],))  # a few minutes: first
    for factor in (1, 2):  # every arm at its best LR first: the runs the two questions need most
        for arm, ims, best in long_arms:
            cells += grid((arm,), seeds, (ims,), (factor * best,), LONG_BUDGET)
    return cells, True


def large_batch(results):
    """BN's images per step among LARGE_BATCHES with the best mean box AP at its best LR (base budget)."""
    return max(LARGE_BATCHES, key=lambda k: _best_mean(results, "BN", k))


def _tried(results, arm, ims_per_step, images=None):
    return [
        r for r in results if (r["arm"], r["ims_per_step"], r.get("images")) == (arm, ims_per_step, images)
    ]


def _beyond_edge(results, arm, ims_per_step):
    """The LR a factor 2 past the edge of the LRs tried where the best one sits, or None if it is inside."""
    lrs = sorted({r["lr"] for r in _tried(results, arm, ims_per_step)})
    best = best_lr(results, arm, ims_per_step)
    return best / 2 if best == lrs[0] else best * 2 if best == lrs[-1] else None


def _best_mean(results, arm, ims_per_step):
    """The mean box AP of `arm` at its best LR (base budget)."""
    best = best_lr(results, arm, ims_per_step)
    values = [r["bbox_AP"] for r in _tried(results, arm, ims_per_step) if r["lr"] == best]
    return sum(values) / len(values) if values else float("-inf")


def _finished(results, cells):
    """The results of `cells`, or None while any of them has none."""
    done = {Cell.of(r): r for r in results}
    return [done[c] for c in sorted(set(cells))] if set(cells) <= done.keys() else None
