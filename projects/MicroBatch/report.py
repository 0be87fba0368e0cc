"""The study's report from results.json: a markdown table and four PNG plots (matplotlib).

Spreads are over seeds: mean, standard deviation (n-1) and min-max; every seed is also drawn as a point.
"""

import math
import statistics
from collections import defaultdict
from pathlib import Path

from arms import ARMS, MAIN_ARMS, best_lr

PLOTS = {
    "loss_curves.png": "training loss per arm at 1 image per step (its best LR): seed mean, band = min-max",
    "ap_bars.png": "box and mask AP per arm at 1 image per step (its best LR): mean, bar = min-max, dots = seeds",
    "lr_sensitivity.png": "box AP against the learning rate at 1 image per step, main arms",
    "ap_vs_ims.png": "box AP against images per step (same images seen, LR scaled linearly)",
}


def groups(results):
    """{(arm, ims_per_step, lr): [entries]} in the arms' order."""
    grouped = defaultdict(list)
    for r in results:
        grouped[(r["arm"], r["ims_per_step"], r["lr"])].append(r)
    order = list(ARMS)
    return dict(sorted(grouped.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1], kv[0][2])))


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return {
        "mean": statistics.fmean(values),
        "std": std,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _cell(values, digits=1):
    s = spread(values)
    if not s["n"]:
        return "-"
    std = "" if math.isnan(s["std"]) else f" ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{std} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def paired_differences(results, arm="GN+WS", baseline="GN"):
    """{(ims_per_step, lr): [arm - baseline box AP of the same seed]} where both have the seed."""
    by_key = {(r["arm"], r["ims_per_step"], r["lr"], r["seed"]): r for r in results}
    pairs = defaultdict(list)
    for (a, ims, lr, seed), r in sorted(by_key.items()):
        other = by_key.get((baseline, ims, lr, seed))
        if a == arm and other:
            pairs[(ims, lr)].append((seed, r["bbox_AP"] - other["bbox_AP"], r["segm_AP"] - other["segm_AP"]))
    return dict(pairs)


def markdown_table(results):
    lines = [
        "| arm | images/step | LR | seeds | box AP | mask AP | mean loss | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (arm, ims, lr), entries in groups(results).items():
        diverged = sum(e["diverged"] for e in entries)
        lines.append(
            f"| {arm} | {ims} | {lr:g} | {len(entries)} | {_cell([e['bbox_AP'] for e in entries])} | "
            f"{_cell([e['segm_AP'] for e in entries])} | {_cell([e['loss_auc'] for e in entries], 3)} | {diverged} |"
        )
    lines += ["", "Paired per-seed difference GN+WS - GN (box AP; mask AP):", ""]
    lines += ["| images/step | LR | per seed | mean box | mean mask |", "|---|---|---|---|---|"]
    for (ims, lr), pairs in paired_differences(results).items():
        per_seed = ", ".join(f"s{seed}: {box:+.1f}; {mask:+.1f}" for seed, box, mask in pairs)
        box, mask = (statistics.fmean(p[i] for p in pairs) for i in (1, 2))
        lines.append(f"| {ims} | {lr:g} | {per_seed} | {box:+.1f} | {mask:+.1f} |")
    gap_rows = [r for r in results if "bbox_AP_batch_statistics" in r]
    if gap_rows:
        lines += [
            "",
            "BN evaluated with running statistics (eval mode) and with the test image's own statistics:",
            "",
        ]
        lines += [
            "| images/step | LR | box AP, running | box AP, batch | mask AP, running | mask AP, batch |"
        ]
        lines += ["|---|---|---|---|---|---|"]
        for (_arm, ims, lr), entries in groups(gap_rows).items():
            lines.append(
                f"| {ims} | {lr:g} | {_cell([e['bbox_AP'] for e in entries])} | "
                f"{_cell([e['bbox_AP_batch_statistics'] for e in entries])} | "
                f"{_cell([e['segm_AP'] for e in entries])} | {_cell([e['segm_AP_batch_statistics'] for e in entries])} |"
            )
    return "\n".join(lines) + "\n"


def write_report(results, directory):
    """Write table.md and the PNG plots into `directory`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "table.md").write_text(markdown_table(results))
    written = [directory / "table.md"]
    arms = [a for a in ARMS if any(r["arm"] == a and r["ims_per_step"] == 1 for r in results)]
    best = {arm: best_lr(results, arm) for arm in arms}
    colors = {arm: plt.cm.tab10(i) for i, arm in enumerate(ARMS)}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        written.append(directory / name)

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in arms:
        curves = [
            r["loss_curve"] for r in results if (r["arm"], r["ims_per_step"], r["lr"]) == (arm, 1, best[arm])
        ]
        iterations = sorted({i for c in curves for i, _ in c})
        rows = [[dict(c).get(i) for c in curves] for i in iterations]
        rows = [
            (i, [v for v in row if v is not None and math.isfinite(v)]) for i, row in zip(iterations, rows)
        ]
        rows = [(i, row) for i, row in rows if row]
        if not rows:
            continue
        xs = [i for i, _ in rows]
        ax.plot(
            xs, [statistics.fmean(r) for _, r in rows], color=colors[arm], label=f"{arm} (LR {best[arm]:g})"
        )
        ax.fill_between(
            xs, [min(r) for _, r in rows], [max(r) for _, r in rows], color=colors[arm], alpha=0.15
        )
    ax.set(xlabel="iteration", ylabel="total training loss", title=PLOTS["loss_curves.png"])
    ax.title.set_fontsize(9)
    ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
    ax.legend(fontsize=8)
    save(fig, "loss_curves.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, key, label in zip(axes, ("bbox_AP", "segm_AP"), ("box AP", "mask AP")):
        for x, arm in enumerate(arms):
            values = [
                r[key] for r in results if (r["arm"], r["ims_per_step"], r["lr"]) == (arm, 1, best[arm])
            ]
            s = spread(values)
            ax.bar(x, s["mean"], color=colors[arm], alpha=0.7)
            ax.errorbar(
                x, s["mean"], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]], color="k", capsize=4
            )
            ax.scatter([x] * len(values), values, color="k", s=10, zorder=3)
        labels = [f"{a} (LR {best[a]:g})" for a in arms]
        ax.set_xticks(range(len(arms)), labels, fontsize=8, rotation=35, ha="right", rotation_mode="anchor")
        ax.set(ylabel=label)
    fig.suptitle(PLOTS["ap_bars.png"], fontsize=9)
    save(fig, "ap_bars.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in MAIN_ARMS:
        by_lr = groups([r for r in results if r["arm"] == arm and r["ims_per_step"] == 1])
        if len(by_lr) < 2:
            continue
        lrs = [lr for (_, _, lr) in by_lr]
        stats = [spread([e["bbox_AP"] for e in entries]) for entries in by_lr.values()]
        ax.errorbar(lrs, [s["mean"] for s in stats], capsize=3, color=colors[arm], marker="o", label=arm,
                    yerr=[[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]])  # fmt: skip
    ax.set(
        xscale="log",
        xlabel="learning rate (SOLVER.BASE_LR)",
        ylabel="box AP",
        title=PLOTS["lr_sensitivity.png"],
    )
    lrs = sorted({r["lr"] for r in results if r["arm"] in MAIN_ARMS and r["ims_per_step"] == 1})
    ax.minorticks_off()  # the log axis's own minor labels (3x10^-3 ...) overlap; the grid's LRs are the ticks
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    save(fig, "lr_sensitivity.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in ARMS:
        points = []
        for ims in sorted({r["ims_per_step"] for r in results if r["arm"] == arm}):
            lr = best_lr(results, arm, ims)
            values = [
                r["bbox_AP"] for r in results if (r["arm"], r["ims_per_step"], r["lr"]) == (arm, ims, lr)
            ]
            points.append((ims, spread(values)))
        if len(points) < 2:
            continue
        ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], marker="o", capsize=3, color=colors[arm],
                    yerr=[[p[1]["mean"] - p[1]["min"] for p in points], [p[1]["max"] - p[1]["mean"] for p in points]],
                    label=arm)  # fmt: skip
    ax.set(xlabel="images per step", ylabel="box AP", title=PLOTS["ap_vs_ims.png"])
    ax.title.set_fontsize(9)
    ax.set_xticks(sorted({r["ims_per_step"] for r in results}))
    ax.legend(fontsize=8)
    save(fig, "ap_vs_ims.png")
    return written
