"""The accuracy table: test error of every regularizer on CNN-6, CNN-9 and a timm ResNet, mean ± std over seeds.

Protocol (identical for every row):

1. **κ tuning on the validation split only.** For every architecture and regularizer, the variant's default κ
   (hidden layers and classifier together) is multiplied by each value of ``--kappa-grid`` (default 0.1, 1, 10) and
   trained with the tuning seeds (default 100, 101, disjoint from the reported seeds). The multiplier with the lowest
   mean validation error wins (ties: the one closest to 1).
2. **Reported runs.** Every row (the baseline without regularizer included) is trained with the reported seeds
   (default 0-9) and the same budget; the test error of the final weights is reported as mean ± sample std, with the
   paired difference to the baseline (same seeds) and a paired t-test p-value.

Usage::

    python -m experiments.accuracy                          # digits, full protocol
    python -m experiments.accuracy --quick                  # pipeline check (1 epoch, 1 seed, no tuning)
    python -m experiments.accuracy --cifar-root ~/data/cifar-100-python --cifar cifar100 --accelerator auto
"""

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from experiments.cli import Setup, experiment_parser, resolve_setup
from experiments.models import ARCH_LABELS, ARCHS
from experiments.publishing import environment, fmt_mean_std, mean_std, publish, pyplot, save_figure
from experiments.runner import ROW_LABELS, ROWS, RunSpec, default_kappas, print_progress, run_many

DEFAULT_SEEDS = tuple(range(10))
DEFAULT_TUNE_SEEDS = (100, 101)
DEFAULT_GRID = (0.1, 1.0, 10.0)


def _spec(setup: Setup, arch: str, variant: str, seed: int, mult: float) -> RunSpec:
    return RunSpec(
        arch=arch,
        variant=variant,
        seed=seed,
        kappa_mult=mult,
        data=setup.data,
        train=setup.train,
        threads=setup.threads,
        accelerator=setup.accelerator,
    )


def choose_multiplier(val_errors: dict[float, list[float]]) -> float:
    """The κ multiplier with the lowest mean validation error; ties go to the one closest to 1 (then the smaller)."""
    return min(val_errors, key=lambda m: (round(mean_std(val_errors[m])[0], 9), abs(m - 1.0), m))


def _paired(test: list[float], base: list[float]) -> tuple[float, float, float]:
    """Mean and std of the paired differences and the two-sided paired t-test p-value (NaN when undefined)."""
    diffs = [a - b for a, b in zip(test, base, strict=True)]
    mean, std = mean_std(diffs)
    if len(diffs) < 2 or std == 0.0:
        return mean, std, float("nan")
    from scipy import stats

    return mean, std, float(stats.ttest_rel(test, base).pvalue)


def tables(results: dict[str, Any]) -> str:
    """The Markdown of the accuracy results (main table, paired differences, chosen κ, cost)."""
    archs, rows, runs = results["archs"], results["rows"], results["runs"]

    def errors(arch: str, row: str) -> list[float]:
        return [r["test_error"] for r in runs if r["spec"]["arch"] == arch and r["spec"]["variant"] == row]

    def cell(arch: str, row: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["spec"]["arch"] == arch and r["spec"]["variant"] == row]

    head = "| Method | " + " | ".join(ARCH_LABELS[a] for a in archs) + " |\n|---|" + "---|" * len(archs) + "\n"
    main = head + "".join(
        f"| {ROW_LABELS[row]} | " + " | ".join(fmt_mean_std(errors(a, row)) for a in archs) + " |\n" for row in rows
    )
    paired = head
    for row in rows:
        if row == "baseline":
            continue
        cells = []
        for a in archs:
            if "baseline" not in rows:
                cells.append("–")
                continue
            m, s, p = _paired(errors(a, row), errors(a, "baseline"))
            cells.append(f"{m:+.2f} ± {s:.2f} (p={p:.2f})" if p == p else f"{m:+.2f} ± {s:.2f}")
        paired += f"| {ROW_LABELS[row]} | " + " | ".join(cells) + " |\n"
    chosen = results.get("chosen", {})
    kappa = head
    for row in rows:
        if row == "baseline":
            continue
        cells = []
        for a in archs:
            mult = chosen.get(a, {}).get(row, 1.0)
            done = [r for r in runs if r["spec"]["arch"] == a and r["spec"]["variant"] == row]
            hid, hd = default_kappas(row, done[0]["spec"]["comhe"] if done else ())
            cells.append(f"×{mult:g} ({hid * mult:g} / {hd * mult:g})")
        kappa += f"| {ROW_LABELS[row]} | " + " | ".join(cells) + " |\n"
    cost = head + "".join(
        f"| {ROW_LABELS[row]} | " + " | ".join(f"{mean_std(cell(a, row, 'step_ms'))[0]:.1f}" for a in archs) + " |\n"
        for row in rows
    )
    n = len(results["seeds"])
    return (
        f"**Test error (%)**, mean ± std over {n} seed(s) {results['seeds']}:\n\n{main}\n"
        f"**Paired difference to the baseline** (percentage points, same seeds; two-sided paired t-test):\n\n{paired}\n"
        f"**κ multiplier chosen on the validation split** (× default; hidden / classifier κ):\n\n{kappa}\n"
        f"**Median wall time of a training step (ms)**, penalty included:\n\n{cost}"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Per-seed test errors (dots) and mean ± std (bars) for every row and architecture."""
    plt = pyplot()

    archs, rows, runs = results["archs"], results["rows"], results["runs"]
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 4.0), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for i, row in enumerate(rows):
            errs = [r["test_error"] for r in runs if r["spec"]["arch"] == arch and r["spec"]["variant"] == row]
            if not errs:
                continue
            m, s = mean_std(errs)
            ax.errorbar([m], [i], xerr=[s], fmt="o", color="C0" if row != "baseline" else "k", capsize=3)
            ax.scatter(errs, [i + 0.18] * len(errs), s=8, color="0.6")
        ax.set_yticks(range(len(rows)), [ROW_LABELS[r] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("test error (%)")
        ax.set_title(ARCH_LABELS[arch])
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{results['data']}: test error, mean ± std over seeds {results['seeds']} (dots: single seeds)")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the protocol and write ``accuracy_<data>.{json,md,png}`` (and the doc block)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = experiment_parser("accuracy", __doc__)
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--variants", nargs="+", choices=ROWS, default=list(ROWS), help="table rows")
    parser.add_argument("--tune-seeds", type=int, nargs="*", default=None, help="seeds of the κ tuning runs")
    parser.add_argument("--kappa-grid", type=float, nargs="+", default=None, help="κ multipliers tried")
    args = parser.parse_args(argv)
    setup = resolve_setup(args, "experiments.accuracy", argv, DEFAULT_SEEDS)
    grid = args.kappa_grid or ([1.0] if setup.quick else list(DEFAULT_GRID))
    tune_seeds = (
        list(args.tune_seeds) if args.tune_seeds is not None else ([] if setup.quick else list(DEFAULT_TUNE_SEEDS))
    )
    start = time.perf_counter()

    chosen: dict[str, dict[str, float]] = {a: {} for a in args.archs}
    tuning_runs: list[dict[str, Any]] = []
    regularized = [v for v in args.variants if v != "baseline"]
    if len(grid) > 1 and tune_seeds and regularized:
        specs = [_spec(setup, a, v, s, m) for a in args.archs for v in regularized for m in grid for s in tune_seeds]
        print(f"κ tuning: {len(specs)} runs", flush=True)
        tuning_runs = run_many(specs, setup.jobs, print_progress)
        for a in args.archs:
            for v in regularized:
                val = {
                    m: [
                        r["val_error"]
                        for r in tuning_runs
                        if r["spec"]["arch"] == a and r["spec"]["variant"] == v and r["spec"]["kappa_mult"] == m
                    ]
                    for m in grid
                }
                chosen[a][v] = choose_multiplier(val)
    else:
        for a in args.archs:
            for v in regularized:
                chosen[a][v] = grid[0] if len(grid) == 1 else 1.0

    specs = [
        _spec(setup, a, v, s, chosen[a].get(v, 1.0)) for a in args.archs for v in args.variants for s in setup.seeds
    ]
    print(f"reported runs: {len(specs)}", flush=True)
    runs = run_many(specs, setup.jobs, print_progress)
    seconds = time.perf_counter() - start

    results: dict[str, Any] = {
        "experiment": "accuracy",
        "data": setup.data.label,
        "archs": list(args.archs),
        "rows": list(args.variants),
        "seeds": setup.seeds,
        "tune_seeds": tune_seeds,
        "kappa_grid": grid,
        "chosen": chosen,
        "command": setup.command,
        "seconds": seconds,
        "environment": environment(),
        "runs": runs,
        "tuning_runs": tuning_runs,
    }
    results["setup"] = {"data": asdict(setup.data), "train": asdict(setup.train), "jobs": setup.jobs}
    stem = f"accuracy_{setup.data.kind}"
    tuning = (
        f"κ tuned on the validation split over multipliers {grid} with seeds {tune_seeds}."
        if len(grid) > 1 and tune_seeds
        else f"No κ tuning (multiplier {grid[0] if len(grid) == 1 else 1.0})."
    )
    publish(setup, stem, results, plot, tuning, tables(results), seconds, "accuracy")
    return results


if __name__ == "__main__":
    main()
