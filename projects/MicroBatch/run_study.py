#!/usr/bin/env python
"""The micro-batch study: GN, GN+WS, BN, no normalization, BCN+WS and the paper's WS ablations, trained from
scratch with 1-2 images per step on the synthetic shapes set. See projects/MicroBatch/README.md.

    python projects/MicroBatch/run_study.py                       # the whole study, resuming what is done
    python projects/MicroBatch/run_study.py --quick --output DIR  # a tiny version (minutes): the machinery only
    python projects/MicroBatch/run_study.py --arms GN GN+WS --seeds 0 1 2 --ims-per-step 1 --lrs 0.005 0.01
    python projects/MicroBatch/run_study.py --print-commands      # one train_net command per run (cluster arrays)
    python projects/MicroBatch/run_study.py --rerun GN+WS 0 1 0.01 --output DIR  # one cell again, alone
    python projects/MicroBatch/run_study.py --rerun BN 0 8 0.04 --images 2000 --output DIR  # one long-budget cell

Each run is `tools/train_net.py --resume` into OUTPUT/runs/<cell>/: a killed study resumes where it stopped
and never redoes a finished run. After the runs, results.json, table.md and the plots are (re)written into
--results (default projects/MicroBatch/results; OUTPUT/results for --quick).
Exit status: 0 done, 1 refused or failed, 2 usage error.
"""

import argparse
import dataclasses
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import arms
import runs
from report import write_report

from ws_d2.errors import ConfigError, command_line

HERE = Path(__file__).resolve().parent
STUDY_CONFIG = HERE / "configs" / "microbatch_synthetic.yaml"
ITERATIONS = 500  # at 1 image per step; a run with k images per step makes ITERATIONS / k
QUICK = {"arms": ["GN", "GN+WS", "BN"], "seeds": [0], "lrs": [0.01], "iterations": 6, "images": (8, 4)}


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", nargs="+", metavar="ARM", help=f"subset of: {' '.join(arms.ARMS)}")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="S", help=f"default {arms.SEEDS}")
    parser.add_argument(
        "--ims-per-step", nargs="+", type=int, metavar="K", help="images per step (default 1)"
    )
    parser.add_argument("--lrs", nargs="+", type=float, metavar="LR", help=f"SOLVER.BASE_LR values (default {arms.LR_GRID})")  # fmt: skip
    parser.add_argument("--images", type=int, default=None, help="images each selected run sees (default: --iterations at 1 image per step)")  # fmt: skip
    parser.add_argument("--iterations", type=int, default=None, help=f"iterations at 1 image per step (default {ITERATIONS}; the base config's schedule with --base-config)")  # fmt: skip
    parser.add_argument(
        "--output", default="output/microbatch", help="where the runs go (default: %(default)s)"
    )
    parser.add_argument("--results", default=None, help="where results.json, table.md and the plots go")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="threads per run (default: cores / jobs)")
    parser.add_argument("--base-config", default=None, help="run the arms on this config instead (e.g. a seed config on COCO)")  # fmt: skip
    parser.add_argument("--print-commands", action="store_true", help="print one train_net command per run and exit")  # fmt: skip
    parser.add_argument("--rerun", nargs=4, metavar=("ARM", "SEED", "IMS", "LR"), help="re-run one cell into --output and compare it with its recorded result")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a tiny study (3 arms, 1 seed, 6 iterations, 8 images)")  # fmt: skip
    return parser


def merge(previous, entries):
    """One entry per cell (the newer one), in the arms' order."""
    merged = {arms.Cell.of(r): r for r in [*previous, *entries]}
    return sorted(merged.values(), key=lambda r: (list(arms.ARMS).index(r["arm"]), r.get("images") or 0, r["ims_per_step"], r["lr"], r["seed"]))  # fmt: skip


def load_results(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else []


class Study:
    """What one invocation runs: the config, the schedule, the data root, the threads."""

    def __init__(self, args):
        self.config_file = Path(args.base_config or STUDY_CONFIG)
        if not self.config_file.is_file():
            raise ConfigError(f"config file not found: {self.config_file}")
        default_iterations = None if args.base_config else (QUICK["iterations"] if args.quick else ITERATIONS)
        self.iterations = args.iterations or default_iterations
        self.output = Path(args.output)
        self.threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        self.env = {}
        if args.quick:  # a small synthetic set of its own, not the full set others may use
            self.env["WS_D2_DATASETS"] = str(Path(runs._display_path(self.output / "datasets")))
        elif "WS_D2_DATASETS" in os.environ:
            self.env["WS_D2_DATASETS"] = os.environ["WS_D2_DATASETS"]

    def command(self, cell):
        return runs.train_command(cell, arms.ARMS[cell.arm], self.config_file, self.output, self.iterations)

    def prepare_data(self, quick):
        """The synthetic set (a few seconds to generate; kept once made)."""
        if self.config_file != STUDY_CONFIG:
            return
        from ws_d2.data import generate_synthetic_dataset

        root = os.path.join(runs.REPO, self.env.get("WS_D2_DATASETS", "datasets"), "ws_d2_synthetic")
        splits = dict(zip(("train", "val"), QUICK["images"])) if quick else None
        generate_synthetic_dataset(root, splits)

    def run(self, cell):
        directory = runs.run_dir(self.output, cell)
        args = self.command(cell)
        wall = None
        if not runs.is_finished(directory):
            wall = runs.execute(cell, args, directory, self.threads, self.env)
        if cell.arm in arms.BATCH_NORM_ARMS:
            runs.evaluate_with_batch_statistics(args, directory, self.threads, self.env)
        return runs.collect(cell, directory, self.iterations), wall


def plan(args, results):
    """The cells to run, and whether that is all of them: an explicit selection (the product of --arms,
    --seeds, --ims-per-step, --lrs and --images), --quick, or the default phased study (arms.full_study)."""
    if args.quick:
        return arms.grid(QUICK["arms"], QUICK["seeds"], [1], QUICK["lrs"]), True
    if args.arms or args.lrs or args.ims_per_step or args.images:
        selection = (args.arms or arms.MAIN_ARMS, args.seeds or arms.SEEDS, args.ims_per_step or [1])
        return arms.grid(*selection, args.lrs or arms.LR_GRID, args.images), True
    return arms.full_study(results, args.seeds or arms.SEEDS)


def run_cells(study, cells, jobs, recorded=(), results_file=None):
    """Run `cells`, `jobs` at once, and return their entries. A cell in `recorded` (results.json) or finished
    on disk is not run again. Each new entry is added to `results_file` at once, so a killed study loses
    nothing it finished, and another machine or session can continue from the committed results.json."""
    recorded = {arms.Cell.of(r): r for r in recorded}
    todo = [c for c in cells if c not in recorded and not runs.is_finished(runs.run_dir(study.output, c))]
    print(f"[study] {len(cells)} runs: {len(cells) - len(todo)} finished, {len(todo)} to run, {jobs} at once, "
          f"{study.threads} thread(s) each", flush=True)  # fmt: skip
    entries = {c: recorded[c] for c in cells if c in recorded}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(study.run, cell): cell for cell in cells if cell not in entries}
        for future in as_completed(futures):
            cell = futures[future]
            entry, wall = future.result()
            entries[cell] = entry
            if results_file:
                save_results(results_file, merge(load_results(results_file), [entry]))
            if wall is not None:
                state = "DIVERGED" if entry["diverged"] else f"box AP {entry['bbox_AP']:.1f}, mask AP {entry['segm_AP']:.1f}"  # fmt: skip
                print(f"[study] {len(entries)}/{len(cells)} {cell.name}: {state} ({wall:.0f} s)", flush=True)
    return [entries[c] for c in sorted(entries)]


def save_results(path, results):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def rerun(args, study, results_file):
    """Make one cell again, alone, with the recorded run's thread count (float sums depend on it), and print
    its AP beside the recorded one and the spread of its seeds."""
    arm, seed, ims, lr = args.rerun
    cell = arms.Cell(arms.check_arms([arm])[0], int(seed), int(ims), float(lr), args.images)
    if runs.is_finished(runs.run_dir(study.output, cell)):
        raise ConfigError(
            f"{runs.run_dir(study.output, cell)} already holds this run; choose an empty --output"
        )
    results = load_results(results_file)
    recorded = next((r for r in results if arms.Cell.of(r) == cell), None)
    if recorded and not args.threads and (recorded.get("machine") or {}).get("threads"):
        study.threads = recorded["machine"]["threads"]
    study.prepare_data(args.quick)
    (entry,) = run_cells(study, [cell], 1)
    print(f"[study] rerun {cell.name}: box AP {entry['bbox_AP']:.2f}, mask AP {entry['segm_AP']:.2f}")
    if recorded:
        same = dataclasses.replace(cell, seed=None)
        box = [r["bbox_AP"] for r in results if dataclasses.replace(arms.Cell.of(r), seed=None) == same]
        print(f"[study] recorded in {results_file}: box AP {recorded['bbox_AP']:.2f}, mask AP "
              f"{recorded['segm_AP']:.2f}; its seeds span box AP {min(box):.2f}-{max(box):.2f}")  # fmt: skip
    return entry


@command_line("run_study")
def main(argv=None):
    args = get_parser().parse_args(argv)
    arms.check_arms(args.arms or [])
    study = Study(args)
    results_dir = Path(args.results or (study.output / "results" if args.quick else HERE / "results"))
    results_file = results_dir / "results.json"
    if args.rerun:
        rerun(args, study, results_file)
        return 0
    previous = load_results(results_file)
    cells, complete = plan(args, previous)
    if args.print_commands:
        for cell in cells:
            print(runs.shell_command(study.command(cell), study.threads, study.env))
        if not complete:
            print("# the next phases (see arms.full_study) are planned from these runs' results: collect them "
                  "(run_study.py with the same --output) and print again", file=sys.stderr)  # fmt: skip
        return 0
    study.prepare_data(args.quick)
    entries = run_cells(study, cells, args.jobs, previous, results_file)
    while not complete:  # the next phase is planned from the results so far
        cells, complete = plan(args, merge(previous, entries))
        entries = run_cells(study, cells, args.jobs, previous, results_file)
    results = merge(previous, entries)
    save_results(results_file, results)
    for path in [results_file, *write_report(results, results_dir)]:
        print(f"[study] wrote {runs._display_path(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
