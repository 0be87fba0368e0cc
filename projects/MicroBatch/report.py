"""The study's report from results.json: a markdown table and four PNG plots (matplotlib).

Spreads are over seeds: mean, standard deviation (n-1) and min-max; every seed is also drawn as a point.
"""

import math
import statistics
from collections import defaultdict
from pathlib import Path

from arms import ARMS, LONG_BUDGET, LONG_BUDGET_ARMS, MAIN_ARMS, best_lr, large_batch

BASE_BUDGET = 500  # images seen by a run whose entry has no "images"
PLOTS = {
    "loss_curves.png": "training loss per arm at 1 image per step (its best LR): seed mean, band = min-max",
    "ap_bars.png": "box and mask AP per arm at 1 image per step (its best LR): mean, bar = min-max, dots = seeds",
    "lr_sensitivity.png": "box AP against the learning rate at 1 image per step, main arms",
    "ap_vs_ims.png": "box AP against images per step (500 images seen, LR scaled linearly; each at its best LR)",
    "ap_vs_images_seen.png": "box AP against the images seen (each arm at its best LR per budget; dots = seeds)",
    "loss_curves_long.png": f"training loss of the {LONG_BUDGET}-image runs (best LR): seed mean, band = min-max",
}


def images(entry):
    return entry.get("images") or BASE_BUDGET


def _seen(entry):
    """The images a run saw: its iterations x images per step (500 // 16 iterations of 16 make 496)."""
    return entry["iterations"] * entry["ims_per_step"] if entry.get("iterations") else "-"


def groups(results):
    """{(arm, ims_per_step, lr, images seen): [entries]} in the arms' order."""
    grouped = defaultdict(list)
    for r in results:
        grouped[(r["arm"], r["ims_per_step"], r["lr"], images(r))].append(r)
    order = list(ARMS)
    return dict(sorted(grouped.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][3], kv[0][1], kv[0][2])))


def select(results, arm, ims_per_step, lr, budget=BASE_BUDGET):
    return [
        r
        for r in results
        if (r["arm"], r["ims_per_step"], r["lr"], images(r)) == (arm, ims_per_step, lr, budget)
    ]


def best_cell(results, arm, ims_per_step, budget=BASE_BUDGET):
    """The entries of `arm` at its best LR for `ims_per_step` and `budget` ([] before it has any)."""
    budget_key = None if budget == BASE_BUDGET else budget
    return select(results, arm, ims_per_step, best_lr(results, arm, ims_per_step, budget_key), budget)


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
    """{(ims_per_step, lr): [arm - baseline box AP of the same seed]} where both have the seed (500 images)."""
    pairs = {}
    for (a, ims, lr, seen), entries in groups(results).items():
        if (
            a == arm
            and seen == BASE_BUDGET
            and (matched := paired_by_seed(entries, select(results, baseline, ims, lr)))
        ):
            pairs[(ims, lr)] = matched
    return pairs


def paired_by_seed(entries, baseline_entries):
    """[(seed, box AP difference, mask AP difference)] of two cells' entries with the same seed."""
    other = {r["seed"]: r for r in baseline_entries}
    return [(r["seed"], r["bbox_AP"] - other[r["seed"]]["bbox_AP"], r["segm_AP"] - other[r["seed"]]["segm_AP"])
            for r in sorted(entries, key=lambda r: r["seed"]) if r["seed"] in other]  # fmt: skip


def headline(results):
    """The two questions of part 2, as rows (question, budget, arm (LR), baseline (LR), per-seed pairs)."""
    if not any(r["ims_per_step"] in (8, 16) and r["arm"] == "BN" for r in results):
        return []
    k = large_batch(results)
    rows, gaps = [], []
    for budget in (BASE_BUDGET, LONG_BUDGET):
        gn_ws, gn, bn = (
            best_cell(results, a, ims, budget) for a, ims in (("GN+WS", 1), ("GN", 1), ("BN", k))
        )
        if gn_ws and bn:
            rows.append(
                (
                    f"GN+WS at 1 image - BN at {k}",
                    budget,
                    _label(gn_ws),
                    _label(bn),
                    paired_by_seed(gn_ws, bn),
                )
            )
        if gn_ws and gn:
            gaps.append((budget, _label(gn_ws), _label(gn), paired_by_seed(gn_ws, gn)))
            rows.append(("GN+WS - GN, 1 image", *gaps[-1]))
    if len(gaps) == 2:  # how the gap moved with 4x the images, seed by seed
        (_, *short, before), (_, *long, after) = gaps
        change = [(s, box - b0, mask - m0) for (s, b0, m0), (s1, box, mask) in zip(before, after) if s == s1]
        rows.append(
            (
                "change of GN+WS - GN",
                f"{BASE_BUDGET} to {LONG_BUDGET}",
                " - ".join(long),
                " - ".join(short),
                change,
            )
        )
    return rows


def _label(entries):
    return f"{entries[0]['arm']} ({entries[0]['lr']:g})"


def markdown_table(results):
    lines = [
        "| arm | images seen | images/step | LR | seeds | box AP | mask AP | mean loss | diverged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (arm, ims, lr, _), entries in groups(results).items():
        diverged = sum(e["diverged"] for e in entries)
        lines.append(
            f"| {arm} | {_seen(entries[0])} | {ims} | {lr:g} | {len(entries)} | {_cell([e['bbox_AP'] for e in entries])} | "
            f"{_cell([e['segm_AP'] for e in entries])} | {_cell([e['loss_auc'] for e in entries], 3)} | {diverged} |"
        )
    lines += ["", "Paired per-seed difference GN+WS - GN (box AP; mask AP):", ""]
    lines += ["| images/step | LR | per seed | mean box | mean mask |", "|---|---|---|---|---|"]
    for (ims, lr), pairs in paired_differences(results).items():
        per_seed = ", ".join(f"s{seed}: {box:+.1f}; {mask:+.1f}" for seed, box, mask in pairs)
        box, mask = (statistics.fmean(p[i] for p in pairs) for i in (1, 2))
        lines.append(f"| {ims} | {lr:g} | {per_seed} | {box:+.1f} | {mask:+.1f} |")
    rows = headline(results)
    if rows:
        lines += ["", "Each arm at its best LR for the budget, paired by seed (box AP; mask AP):", ""]
        lines += [
            "| question | images seen | arm (LR) | baseline (LR) | per seed | mean box ± std | mean mask |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for question, budget, arm, baseline, pairs in rows:
            per_seed = ", ".join(f"s{seed}: {box:+.1f}; {mask:+.1f}" for seed, box, mask in pairs)
            box, mask = spread([p[1] for p in pairs]), spread([p[2] for p in pairs])
            std = "" if math.isnan(box["std"]) else f" ± {box['std']:.1f}"
            lines.append(f"| {question} | {budget} | {arm} | {baseline} | {per_seed} | {box['mean']:+.1f}{std} | "
                         f"{mask['mean']:+.1f} |")  # fmt: skip
    gap_rows = [r for r in results if "bbox_AP_batch_statistics" in r]
    if gap_rows:
        lines += [
            "",
            "BN evaluated with running statistics (eval mode) and with the test image's own statistics:",
            "",
        ]
        lines += [
            "| arm | images seen | images/step | LR | box AP, running | box AP, batch | mask AP, running | "
            "mask AP, batch |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for (arm, ims, lr, _), entries in groups(gap_rows).items():
            lines.append(
                f"| {arm} | {_seen(entries[0])} | {ims} | {lr:g} | {_cell([e['bbox_AP'] for e in entries])} | "
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
    everything, results = results, [r for r in results if images(r) == BASE_BUDGET]
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
        lrs = [lr for (_, _, lr, _) in by_lr]
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
    band = best_cell(results, "GN+WS", 1)
    if band:
        s = spread([r["bbox_AP"] for r in band])
        ax.axhspan(s["min"], s["max"], color=colors["GN+WS"], alpha=0.15)
        ax.axhline(
            s["mean"], color=colors["GN+WS"], ls="--", label=f"GN+WS at 1 image (LR {band[0]['lr']:g})"
        )
    for arm in ARMS:
        points = [(ims, spread([r["bbox_AP"] for r in best_cell(results, arm, ims)]))
                  for ims in sorted({r["ims_per_step"] for r in results if r["arm"] == arm})]  # fmt: skip
        if len(points) < 2 and not (arm.startswith("BN") and points):
            continue
        ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], marker="o", capsize=3, color=colors[arm],
                    yerr=[[p[1]["mean"] - p[1]["min"] for p in points], [p[1]["max"] - p[1]["mean"] for p in points]],
                    label=arm)  # fmt: skip
    ax.set(xlabel="images per step", ylabel="box AP", title=PLOTS["ap_vs_ims.png"], xscale="log")
    ax.title.set_fontsize(9)
    ax.minorticks_off()
    ticks = sorted({r["ims_per_step"] for r in results})
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.legend(fontsize=8)
    save(fig, "ap_vs_ims.png")

    long_runs = [r for r in everything if images(r) == LONG_BUDGET]
    if not long_runs:
        return written
    k = large_batch(results)
    long_arms = [(arm, 1) for arm in LONG_BUDGET_ARMS] + [("BN", k)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for offset, (arm, ims) in enumerate(long_arms):
        points = [(budget, best_cell(everything, arm, ims, budget)) for budget in (BASE_BUDGET, LONG_BUDGET)]
        points = [(budget, entries) for budget, entries in points if entries]
        xs = [budget * (1 + 0.03 * (offset - 1.5)) for budget, _ in points]  # side by side, not on top
        stats = [spread([r["bbox_AP"] for r in entries]) for _, entries in points]
        ax.errorbar(xs, [s["mean"] for s in stats], marker="o", capsize=3, color=colors[arm],
                    yerr=[[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]],
                    label=f"{arm}, {ims} image(s)/step")  # fmt: skip
        for x, (_, entries) in zip(xs, points):
            ax.scatter([x] * len(entries), [r["bbox_AP"] for r in entries], color=colors[arm], s=10, zorder=3)
    ax.set(xlabel="images seen", ylabel="box AP", title=PLOTS["ap_vs_images_seen.png"], xscale="log")
    ax.title.set_fontsize(9)
    ax.minorticks_off()
    ax.set_xticks([BASE_BUDGET, LONG_BUDGET], [str(BASE_BUDGET), str(LONG_BUDGET)])
    ax.legend(fontsize=8)
    save(fig, "ap_vs_images_seen.png")

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, ims in long_arms:
        entries = best_cell(everything, arm, ims, LONG_BUDGET)
        if not entries:
            continue
        curves = [{i * ims: loss for i, loss in r["loss_curve"] if math.isfinite(loss)} for r in entries]
        seen = sorted(set.intersection(*(set(c) for c in curves)))
        rows = [[c[x] for c in curves] for x in seen]
        ax.plot(seen, [statistics.fmean(r) for r in rows], color=colors[arm],
                label=f"{arm}, {ims} image(s)/step (LR {entries[0]['lr']:g})")  # fmt: skip
        ax.fill_between(seen, [min(r) for r in rows], [max(r) for r in rows], color=colors[arm], alpha=0.15)
    ax.set(xlabel="images seen", ylabel="total training loss", title=PLOTS["loss_curves_long.png"])
    ax.title.set_fontsize(9)
    ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
    ax.legend(fontsize=8)
    save(fig, "loss_curves_long.png")
    return written
