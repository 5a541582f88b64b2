"""Noise or expectation? RP-CoMHE with C = 1, 4, 20 projections against its exact mean (C → ∞) and half-space MHE.

RP-CoMHE's penalty is a Monte Carlo estimate over ``C`` Gaussian projections. For ``s = 2`` its mean is exactly
``k / (k - 3)`` times the half-space MHE energy minus a constant (``docs/math.md``): the kernel
:math:`g_k(c) (1 - c^2) = (k - 2 + 2 c^2) / (k - 3)` (:meth:`~lightning_comhe.functional.ExpectedKernel.correction`)
tends to 1 as ``k`` grows. So if RP-CoMHE helps beyond half-space MHE, it is either the sampling noise of a finite
``C`` or the small ``k``-dependent reweighting of the pairs. This experiment trains, with the same seeds and the
default κ for every row (so only the estimator differs): RP with C ∈ {1, 4, 20} (k = 40), the expected RP and
half-space MHE, plus the baseline as the unregularized reference. It records the mean over layers of the full-space
energy ``E(W)`` and of the half-space energy ``E([W; -W])`` (s = 2, chordal, unprojected) after every step.

Usage::

    python -m experiments.noise --jobs 2            # 30 images per class, 20 seeds (refreshes docs/results.md)
    python -m experiments.noise --quick
"""

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from experiments import scarce
from experiments.cli import experiment_parser
from experiments.publishing import environment, mean_std, pyplot, save_figure
from experiments.runner import RunSpec, print_progress, run_cached
from experiments.stats import holm, paired

NOISE_ROWS: tuple[str, ...] = ("baseline", "random_c1", "random_c4", "random", "expected", "half_mhe")
#: The rows' names in this experiment (``random`` is the official C = 20).
LABELS = {
    "baseline": "Baseline",
    "random_c1": "RP, C = 1",
    "random_c4": "RP, C = 4",
    "random": "RP, C = 20",
    "expected": "Expected RP (C → ∞)",
    "half_mhe": "Half-space MHE",
}
KERNEL_DIMS: tuple[int, ...] = (5, 10, 20, 40, 80)
#: The reference row of the paired tests.
REFERENCE = "expected"


def run_rows(
    setup: Any, rows: Sequence[str], size: int, steps: int, cache: dict[RunSpec, dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Train ``rows`` at the default κ with every seed, energies recorded each step; ``{row: [record per seed]}``."""
    keys = [(r, seed) for r in rows for seed in setup.seeds]
    specs = [scarce.spec(setup, scarce.ROWS[r], size, seed, steps, 1.0, energy_every=1) for r, seed in keys]
    records = run_cached(specs, cache, setup.jobs, print_progress)
    out: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    for (r, _), rec in zip(keys, records, strict=True):
        out[r].append(scarce.compact(rec))
    return out


def curve_stats(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std over seeds of the layer-mean curve ``key`` (``energy_mean`` or ``energy_half_mean``)."""
    steps = [int(s) for s, _ in records[0][key]]
    columns = list(zip(*[[v for _, v in r[key]] for r in records], strict=True))
    stats = [mean_std(col) for col in columns]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def kernel_curves(dims: Sequence[int] = KERNEL_DIMS, points: int = 201) -> dict[str, Any]:
    """``h_k(c) = g_k(c) / (f(c) + f(-c))`` on ``c ∈ [-0.99, 0.99]`` for s = 2 (``= g_k(c)(1 - c²)``) and s = 1."""
    from lightning_comhe.functional import expected_kernel

    c = torch.linspace(-0.99, 0.99, points, dtype=torch.float64)
    out: dict[str, Any] = {"c": c.tolist()}
    for power in (2, 1):
        out[str(power)] = {str(k): expected_kernel(k, power).correction(c).tolist() for k in dims if k > power + 1}
    return out


def tables(results: dict[str, Any]) -> str:
    """Markdown: error and final energies per row, paired tests against the expected RP."""
    rows, runs = results["rows"], results["runs"]
    ref = scarce.errors(runs[REFERENCE]) if REFERENCE in runs else None
    comps = [paired(scarce.errors(runs[r]), ref) for r in rows if ref is not None and r != REFERENCE]
    adjusted = iter(holm([c.wilcoxon_p for c in comps]))
    comp_iter = iter(comps)
    lines = []
    for r in rows:
        _, full, _ = curve_stats(runs[r], "energy_mean")
        _, half, _ = curve_stats(runs[r], "energy_half_mean")
        finals_full = [rec["energy_mean"][-1][1] for rec in runs[r]]
        finals_half = [rec["energy_half_mean"][-1][1] for rec in runs[r]]
        if ref is None or r == REFERENCE:
            versus = "–"
        else:
            c, p = next(comp_iter), next(adjusted)
            versus = f"{c.mean:+.2f} ± {c.std:.2f} (p {scarce.fmt_p(c.wilcoxon_p)}, Holm {scarce.fmt_p(p)})"
        lines.append(
            f"| {LABELS[r]} | {scarce.fmt(scarce.errors(runs[r]))} | {versus} | {scarce.fmt(finals_full, 4)} | "
            f"{scarce.fmt(finals_half, 4)} | {mean_std(r2['step_ms'] for r2 in runs[r])[0]:.0f} |"
        )
    kern = results["kernel"]
    c = kern["c"]
    i0, i9 = c.index(min(c, key=abs)), len(c) - 1
    krow = " | ".join(f"k = {k}: {v[i0]:.3f} → {v[i9]:.3f}" for k, v in kern["2"].items())
    return (
        f"**{results['size']} images per class, {len(results['seeds'])} seeds, default κ for every row.** Test "
        f"error, its paired difference to the expected RP (two-sided Wilcoxon p, Holm over the "
        f"{len(comps)} rows), and the final mean-over-layers energies (full space E(W), half space E([W; −W])):\n\n"
        "| Row | test error (%) | − expected RP (pp) | final E(W) | final E([W; −W]) | ms / step |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"**The s = 2 kernel, normalized:** g_k(c)·(1 − c²) from c = 0 to c = ±0.99: {krow}.\n"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Full-space and half-space energy curves (mean ± std over seeds), and the normalized kernels."""
    plt = pyplot()
    rows, runs = results["rows"], results["runs"]
    fig, axes = plt.subplots(1, 4, figsize=(17.5, 4.0))
    for ax, key, title in (
        (axes[0], "energy_mean", "full-space energy E(W)"),
        (axes[1], "energy_half_mean", "half-space energy E([W; −W])"),
    ):
        for i, r in enumerate(rows):
            steps, mean, std = curve_stats(runs[r], key)
            ax.plot(steps, mean, color="k" if r == "baseline" else f"C{i}", label=LABELS[r], lw=1.2)
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
                color=f"C{i}",
                alpha=0.12,
                lw=0,
            )
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{title}, mean over layers")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    kern = results["kernel"]
    for ax, power, ylabel in ((axes[2], "2", "g_k(c)·(1 − c²)"), (axes[3], "1", "g_k(c) / (f(c) + f(−c))")):
        for i, (k, values) in enumerate(kern[power].items()):
            ax.plot(kern["c"], values, color=f"C{i}", label=f"k = {k}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("cosine c")
        ax.set_title(f"expected RP kernel, s = {power}: {ylabel}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None, cache: dict[RunSpec, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the comparison and write ``noise_digits.{json,md,png}`` (and the doc block)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = experiment_parser("noise", __doc__)
    scarce.add_scarce_args(parser, (30,))
    parser.add_argument("--rows", nargs="+", choices=NOISE_ROWS, default=list(NOISE_ROWS), help="rows")
    args = parser.parse_args(argv)
    setup = scarce.setup_from(args, "experiments.noise", argv)
    size = args.sizes[0]
    steps = scarce.steps_for(setup, size, args.steps)
    start = time.perf_counter()
    runs = run_rows(setup, list(args.rows), size, steps, {} if cache is None else cache)
    seconds = time.perf_counter() - start
    results: dict[str, Any] = {
        "experiment": "noise",
        "size": size,
        "steps": steps,
        "rows": list(args.rows),
        "seeds": setup.seeds,
        "kernel": kernel_curves(),
        "command": setup.command,
        "seconds": seconds,
        "environment": environment(),
        "runs": runs,
        "setup": {"data": asdict(setup.data), "train": asdict(setup.train), "jobs": setup.jobs},
    }
    intro = "Default κ for every row (hidden 1, classifier 10), k = 40; energies recorded after every step."
    alt = "energy curves and normalized kernels"
    scarce.publish_study(setup, "noise_digits", results, plot, intro, tables(results), alt)
    return results


if __name__ == "__main__":
    main()
