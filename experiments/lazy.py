"""Lazy regularization ablation: RP-CoMHE with ``every_n_steps`` ∈ {1, 2, 4, 8, 16}.

With ``every_n_steps = m`` the penalty (and the refresh of the projections) runs on one optimizer step in ``m``,
weighted by ``m`` (StyleGAN2's lazy R1). Every row uses the default κ and the same seeds; the full-space and
half-space energies (mean over layers, s = 2, chordal) are recorded after every step. A row *tracks* the every-step
run when its energy curve stays close to it; the baseline (no penalty at all) gives the scale of "not close":

- ``max dev``: the largest gap between the row's curve and the every-step run's curve of the same seed, over the
  whole run, as a fraction of how far the every-step run moves the energy away from the baseline's curve (the
  largest gap between those two); the baseline's own value is 1 by construction;
- ``final dev``: the same, at the last step.

Usage::

    python -m experiments.lazy --jobs 2             # 30 images per class, 20 seeds (refreshes docs/results.md)
    python -m experiments.lazy --quick
"""

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from experiments import scarce
from experiments.cli import experiment_parser
from experiments.noise import curve_stats, run_rows
from experiments.publishing import environment, mean_std, pyplot, save_figure
from experiments.runner import RunSpec
from experiments.stats import holm, paired

INTERVALS: tuple[int, ...] = (1, 2, 4, 8, 16)


def row_name(m: int) -> str:
    """The scarce-data row of ``every_n_steps = m`` (``"random"``: the every-step run)."""
    return "random" if m == 1 else f"random_every{m}"


def _values(record: dict[str, Any], key: str) -> list[float]:
    return [v for _, v in record[key]]


def deviations(runs: dict[str, list[dict[str, Any]]], row: str, key: str) -> tuple[list[float], list[float]]:
    """Per seed: the ``max dev`` and ``final dev`` of ``row`` (module docstring) on the curve ``key``."""
    max_dev, final_dev = [], []
    for rec, ref, base in zip(runs[row], runs["random"], runs["baseline"], strict=True):
        a, r, b = _values(rec, key), _values(ref, key), _values(base, key)
        scale = max(abs(x - y) for x, y in zip(r, b, strict=True)) or float("nan")
        max_dev.append(max(abs(x - y) for x, y in zip(a, r, strict=True)) / scale)
        final_dev.append(abs(a[-1] - r[-1]) / scale)
    return max_dev, final_dev


def tables(results: dict[str, Any]) -> str:
    """Markdown: error, its paired difference to every step, and the tracking of both energies."""
    runs, intervals = results["runs"], results["intervals"]
    rows = [("baseline", "Baseline (no penalty)")] + [(row_name(m), f"every_n_steps = {m}") for m in intervals]
    ref = scarce.errors(runs["random"])
    tested = [name for name, _ in rows if name != "random"]
    comps = {name: paired(scarce.errors(runs[name]), ref) for name in tested}
    adjusted = dict(zip(tested, holm([comps[n].wilcoxon_p for n in tested]), strict=True))
    lines = []
    for name, label in rows:
        if name == "random":
            versus, dev = "–", "0 | 0 | 0 | 0"
        else:
            c = comps[name]
            p = f"p {scarce.fmt_p(c.wilcoxon_p)}, Holm {scarce.fmt_p(adjusted[name])}"
            versus = f"{c.mean:+.2f} ± {c.std:.2f} ({p})"
            cells = []
            for key in ("energy_mean", "energy_half_mean"):
                mx, fin = deviations(runs, name, key)
                cells += [scarce.fmt(mx), scarce.fmt(fin)]
            dev = " | ".join(cells)
        step_ms = mean_std(r["step_ms"] for r in runs[name])[0]
        lines.append(f"| {label} | {scarce.fmt(scarce.errors(runs[name]))} | {versus} | {dev} | {step_ms:.0f} |")
    return (
        f"**{results['size']} images per class, {len(results['seeds'])} seeds, RP-CoMHE (k 40, C 20) at the default "
        "κ.** Test error, its paired difference to the every-step run (two-sided Wilcoxon p, Holm over the rows), "
        "and how far each energy curve strays from the every-step run's, as a fraction of the baseline's distance "
        "(mean ± std over seeds; 0: tracks exactly, 1: as far as no penalty at all):\n\n"
        "| Row | test error (%) | − every step (pp) | E(W) max dev | E(W) final dev | E([W; −W]) max dev | "
        "E([W; −W]) final dev | ms / step |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Full-space and half-space energy curves per interval (mean over seeds), and a zoom on the first steps."""
    plt = pyplot()
    runs, intervals = results["runs"], results["intervals"]
    fig, axes = plt.subplots(1, 3, figsize=(14.5, 4.0))
    names = [("baseline", "baseline", "k")] + [(row_name(m), f"every {m}", f"C{i}") for i, m in enumerate(intervals)]
    for ax, key, title, limit in (
        (axes[0], "energy_mean", "full-space energy E(W)", None),
        (axes[1], "energy_half_mean", "half-space energy E([W; −W])", None),
        (axes[2], "energy_mean", "E(W), first 40 steps", 40),
    ):
        for name, label, color in names:
            steps, mean, _ = curve_stats(runs[name], key)
            n = len(steps) if limit is None else min(len(steps), limit + 1)
            ax.plot(steps[:n], mean[:n], color=color, label=label, lw=1.1, drawstyle="steps-post" if limit else None)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{title}, mean over layers and seeds", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None, cache: dict[RunSpec, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the ablation and write ``lazy_digits.{json,md,png}`` (and the doc block)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = experiment_parser("lazy", __doc__)
    scarce.add_scarce_args(parser, (30,))
    parser.add_argument("--intervals", type=int, nargs="+", default=list(INTERVALS), help="every_n_steps values")
    args = parser.parse_args(argv)
    setup = scarce.setup_from(args, "experiments.lazy", argv)
    intervals = sorted(set(args.intervals) | {1})
    unknown = [m for m in intervals if row_name(m) not in scarce.ROWS]
    if unknown:
        parser.error(f"--intervals must be among {list(INTERVALS)}, got {unknown}.")
    size = args.sizes[0]
    steps = scarce.steps_for(setup, size, args.steps)
    start = time.perf_counter()
    rows = ["baseline", *(row_name(m) for m in intervals)]
    runs = run_rows(setup, rows, size, steps, {} if cache is None else cache)
    seconds = time.perf_counter() - start
    results: dict[str, Any] = {
        "experiment": "lazy",
        "size": size,
        "steps": steps,
        "intervals": intervals,
        "seeds": setup.seeds,
        "command": setup.command,
        "seconds": seconds,
        "environment": environment(),
        "runs": runs,
        "setup": {"data": asdict(setup.data), "train": asdict(setup.train), "jobs": setup.jobs},
    }
    intro = "Default κ (hidden 1, classifier 10); energies recorded after every step."
    alt = "lazy regularization energy curves"
    scarce.publish_study(setup, "lazy_digits", results, plot, intro, tables(results), alt)
    return results


if __name__ == "__main__":
    main()
