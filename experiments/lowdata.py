"""The low-data table: test error of every regularizer with 10, 30 and 100 training images per class.

Protocol (:mod:`experiments.scarce` has the recipe):

1. **κ tuning on the validation split only**: for every row and size, the default κ (hidden layers and classifier
   together) × each of ``--kappa-grid`` (default ¼, 1, 4), trained with the 5 tuning seeds (100-104). The multiplier
   with the lowest mean validation error wins; ties go to the one closest to 1 on a log scale, then the smaller.
   ``--tune-sizes`` limits the tuning to some sizes; the others take the choice of the nearest tuned size.
2. **Reported runs**: every row with the 20 seeds 0-19, paired across rows by training subset, initialization and
   batch order. Each row is compared with the baseline on the same seeds: the paired differences of the test error
   and a two-sided Wilcoxon signed-rank test, Holm-corrected over every row × size.

Usage::

    python -m experiments.lowdata --jobs 2                  # the full table (refreshes docs/results.md)
    python -m experiments.lowdata --quick                   # pipeline check (3 steps, 1 seed, never the docs)
"""

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from experiments import scarce
from experiments.cli import experiment_parser
from experiments.publishing import environment, mean_std, publish, pyplot, save_figure
from experiments.runner import RunSpec, default_kappas, print_progress, run_cached
from experiments.stats import holm, paired

#: Rows of the table, in order.
TABLE_ROWS: tuple[str, ...] = (
    "baseline",
    "orthogonal",
    "srip",
    "mhe",
    "half_mhe",
    "random",
    "angle",
    "adversarial",
    "expected",
    "random_every8",
)
ALPHA = 0.05


def choose_multiplier(val_errors: dict[float, list[float]]) -> float:
    """The κ multiplier with the lowest mean validation error (ties: closest to 1 on a log scale, then smaller)."""
    return min(val_errors, key=lambda m: (round(mean_std(val_errors[m])[0], 9), abs(math.log(m)), m))


def nearest(size: int, tuned: Sequence[int]) -> int:
    """The tuned size nearest to ``size`` on a log scale (ties: the smaller)."""
    return min(tuned, key=lambda t: (abs(math.log(t / size)), t))


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row × size against the baseline: paired test-error differences, Wilcoxon and Holm-corrected p."""
    runs, rows = results["runs"], results["rows"]
    out: list[dict[str, Any]] = []
    for size in results["sizes"]:
        base = [r["test_error"] for r in runs[str(size)]["baseline"]]
        for row in rows:
            if row != "baseline":
                test = paired([r["test_error"] for r in runs[str(size)][row]], base)
                out.append({"size": size, "row": row, **asdict(test)})
    for entry, p in zip(out, holm([c["wilcoxon_p"] for c in out]), strict=True):
        entry["holm_p"] = p
        entry["significant"] = bool(p == p and p < ALPHA)
    return out


def tables(results: dict[str, Any]) -> str:
    """The Markdown of the table: errors, paired differences with tests, chosen κ."""
    sizes, rows, runs = results["sizes"], results["rows"], results["runs"]
    head = "| Method | " + " | ".join(f"{s} / class" for s in sizes) + " |\n|---|" + "---|" * len(sizes) + "\n"
    label = {name: scarce.ROWS[name].label for name in rows}
    main = head + "".join(
        f"| {label[row]} | " + " | ".join(scarce.fmt(scarce.errors(runs[str(s)][row])) for s in sizes) + " |\n"
        for row in rows
    )
    comp = {(c["size"], c["row"]): c for c in results["comparisons"]}
    diff = head
    for row in rows[1:] if rows and rows[0] == "baseline" else rows:
        cells = []
        for s in sizes:
            c = comp[(s, row)]
            mark = " **✓**" if c["significant"] else ""
            cells.append(
                f"{c['mean']:+.2f} ± {c['std']:.2f} (p {scarce.fmt_p(c['wilcoxon_p'])}, "
                f"Holm {scarce.fmt_p(c['holm_p'])}){mark}"
            )
        diff += f"| {label[row]} | " + " | ".join(cells) + " |\n"
    kappa = head
    for row in rows:
        if row == "baseline":
            continue
        hid, hd = default_kappas(scarce.ROWS[row].variant, scarce.ROWS[row].comhe)
        cells = [f"×{results['chosen'][str(s)][row]:g} ({hid * results['chosen'][str(s)][row]:g})" for s in sizes]
        kappa += f"| {label[row]} | " + " | ".join(cells) + " |\n"
    significant = [f"{label[c['row']]} at {c['size']} / class" for c in results["comparisons"] if c["significant"]]
    verdict = ", ".join(significant) if significant else "none"
    n = len(results["seeds"])
    return (
        f"**Test error (%)**, mean ± std over {n} seeds {results['seeds'][0]}–{results['seeds'][-1]}:\n\n{main}\n"
        "**Paired difference to the baseline** (test-error percentage points, same seeds; two-sided Wilcoxon "
        f"signed-rank p, and Holm-corrected over the {len(results['comparisons'])} row × size comparisons; "
        f"**✓**: significant at α = {ALPHA} after Holm):\n\n{diff}\n"
        f"Significant after Holm: **{verdict}**.\n\n"
        f"**κ multiplier chosen on the validation split** (× default; hidden-layer κ in brackets; tuned at sizes "
        f"{results['tune_sizes']} with seeds {results['tune_seeds']} over {results['kappa_grid']}):\n\n{kappa}"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Per size: the paired difference to the baseline of every row (dots: seeds; bars: mean ± std)."""
    plt = pyplot()
    sizes, rows, runs = results["sizes"], [r for r in results["rows"] if r != "baseline"], results["runs"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.3 * len(sizes), 0.45 * len(rows) + 1.6), squeeze=False)
    comp = {(c["size"], c["row"]): c for c in results["comparisons"]}
    for ax, size in zip(axes[0], sizes, strict=True):
        base = scarce.errors(runs[str(size)]["baseline"])
        for i, row in enumerate(rows):
            diffs = [a - b for a, b in zip(scarce.errors(runs[str(size)][row]), base, strict=True)]
            m, s = mean_std(diffs)
            color = "C3" if comp[(size, row)]["significant"] else "C0"
            ax.errorbar([m], [i], xerr=[s], fmt="o", color=color, capsize=3)
            ax.scatter(diffs, [i + 0.22] * len(diffs), s=6, color="0.6")
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_yticks(range(len(rows)), [scarce.ROWS[r].label for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("test error − baseline (pp)")
        ax.set_title(f"{size} images / class")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("digits, CNN-9 ×2 widths: paired difference to the baseline (red: significant after Holm)")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None, cache: dict[RunSpec, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the protocol and write ``lowdata_digits.{json,md,png}`` (and the doc block).

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
        cache: Runs shared with the other scarce-data experiments (:func:`experiments.runner.run_cached`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = experiment_parser("lowdata", __doc__)
    scarce.add_scarce_args(parser, scarce.SIZES)
    parser.add_argument("--rows", nargs="+", choices=TABLE_ROWS, default=list(TABLE_ROWS), help="table rows")
    parser.add_argument("--tune-seeds", type=int, nargs="*", default=None, help="seeds of the κ tuning runs")
    parser.add_argument("--tune-sizes", type=int, nargs="*", default=None, help="sizes with a κ tuning (default all)")
    parser.add_argument("--kappa-grid", type=float, nargs="+", default=None, help="κ multipliers tried")
    args = parser.parse_args(argv)
    setup = scarce.setup_from(args, "experiments.lowdata", argv)
    cache = {} if cache is None else cache
    rows = ["baseline", *[r for r in args.rows if r != "baseline"]]
    grid = list(args.kappa_grid or scarce.DEFAULT_GRID)
    tune_seeds = list(scarce.DEFAULT_TUNE_SEEDS if args.tune_seeds is None else args.tune_seeds)
    tune_sizes = [s for s in (args.sizes if args.tune_sizes is None else args.tune_sizes) if s in args.sizes]
    if len(grid) < 2 or not tune_seeds:
        tune_sizes = []
    start = time.perf_counter()

    def steps(size: int) -> int:
        return scarce.steps_for(setup, size, args.steps)

    regularized = rows[1:]
    tuning_keys = [(size, r, m, seed) for size in tune_sizes for r in regularized for m in grid for seed in tune_seeds]
    tuning_specs = [scarce.spec(setup, scarce.ROWS[r], size, seed, steps(size), m) for size, r, m, seed in tuning_keys]
    print(f"κ tuning: {len(tuning_specs)} runs", flush=True)
    tuning = run_cached(tuning_specs, cache, setup.jobs, print_progress)
    val_errors: dict[tuple[int, str], dict[float, list[float]]] = {}
    for (size, r, m, _), rec in zip(tuning_keys, tuning, strict=True):
        val_errors.setdefault((size, r), {}).setdefault(m, []).append(rec["val_error"])
    chosen = {str(size): {r: choose_multiplier(val_errors[(size, r)]) for r in regularized} for size in tune_sizes}
    for size in args.sizes:
        if str(size) not in chosen:
            fallback = chosen[str(nearest(size, tune_sizes))] if tune_sizes else {}
            chosen[str(size)] = {r: fallback.get(r, grid[0] if len(grid) == 1 else 1.0) for r in regularized}

    keys = [(size, r, seed) for size in args.sizes for r in rows for seed in setup.seeds]
    specs = [
        scarce.spec(setup, scarce.ROWS[r], size, seed, steps(size), chosen[str(size)].get(r, 1.0))
        for size, r, seed in keys
    ]
    print(f"reported runs: {len(specs)}", flush=True)
    records = run_cached(specs, cache, setup.jobs, print_progress)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {str(s): {r: [] for r in rows} for s in args.sizes}
    for (size, r, _), rec in zip(keys, records, strict=True):
        runs[str(size)][r].append(scarce.compact(rec))
    seconds = time.perf_counter() - start
    results: dict[str, Any] = {
        "experiment": "lowdata",
        "data": setup.data.label,
        "arch": scarce.ARCH,
        "sizes": list(args.sizes),
        "steps": {str(s): steps(s) for s in args.sizes},
        "rows": rows,
        "seeds": setup.seeds,
        "tune_seeds": tune_seeds,
        "tune_sizes": tune_sizes,
        "kappa_grid": grid,
        "chosen": chosen,
        "command": setup.command,
        "seconds": seconds,
        "environment": environment(),
        "runs": runs,
        "tuning_runs": [scarce.compact(r) for r in tuning],
        "setup": {"data": asdict(setup.data), "train": asdict(setup.train), "jobs": setup.jobs},
    }
    results["comparisons"] = comparisons(results)
    intro = (
        f"κ tuned on the validation split at sizes {tune_sizes} over multipliers {grid} with seeds {tune_seeds}."
        if tune_sizes
        else "No κ tuning (default κ)."
    )
    publish(
        setup,
        "lowdata_digits",
        results,
        plot,
        intro,
        tables(results),
        seconds,
        "low-data paired differences",
        describe=scarce.describe(setup, results["steps"]),
    )
    return results


if __name__ == "__main__":
    main()
