"""The energy figure: full-space hyperspherical energy of every regularized layer over training.

It tests the poster's claim that CoMHE minimizes the *full-space* hyperspherical energy (the energy of the neurons
in their own d-dimensional space, not of their projections) better than MHE and half-space MHE do. Every run uses
the variant's default κ (the official 1 on hidden layers and 10 on the classifier), the same budget as the accuracy
table, and records the energy (s = 2, chordal, not half-space, eps 1e-4: ``hyperspherical_energy(W, power=2)``) of
each layer every ``--every`` optimizer steps.

Usage::

    python -m experiments.energy_figure            # CNN-9 on digits, seeds 0-2
    python -m experiments.energy_figure --quick
"""

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from experiments.cli import experiment_parser, resolve_setup
from experiments.models import ARCH_LABELS, ARCHS
from experiments.publishing import environment, mean_std, publish, pyplot, save_figure
from experiments.runner import ROW_LABELS, RunSpec, default_kappas, print_progress, run_many

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_VARIANTS = ("baseline", "mhe", "half_mhe", "random", "angle", "adversarial")
COLORS = {
    "baseline": "k",
    "mhe": "C0",
    "half_mhe": "C1",
    "random": "C2",
    "angle": "C3",
    "adversarial": "C4",
}


def _curves(
    runs: list[dict[str, Any]], variant: str, key: str = "energy"
) -> dict[str, tuple[list[int], list[list[float]]]]:
    """``{layer: (steps, [values of each seed])}`` of one variant (seeds aligned on the shared steps)."""
    out: dict[str, tuple[list[int], list[list[float]]]] = {}
    chosen = [r for r in runs if r["spec"]["variant"] == variant]
    if not chosen or key not in chosen[0]:
        return out
    for layer in chosen[0][key]:
        steps = [int(s) for s, _ in chosen[0][key][layer]]
        values = [[v for _, v in r[key][layer]] for r in chosen]
        n = min(len(v) for v in values)
        out[layer] = (steps[:n], [v[:n] for v in values])
    return out


def summary(results: dict[str, Any]) -> str:
    """Markdown: final full-space energy per layer and variant, and the change from initialization."""
    runs, variants = results["runs"], results["variants"]
    curves = {v: _curves(runs, v) for v in variants}
    layers = list(next(iter(curves.values())).keys())
    head = "| Layer | " + " | ".join(ROW_LABELS[v] for v in variants) + " |\n|---|" + "---|" * len(variants) + "\n"
    final = head
    for layer in layers:
        cells = []
        for v in variants:
            finals = [vals[-1] for vals in curves[v][layer][1]]
            cells.append(f"{mean_std(finals)[0]:.4f}")
        final += f"| `{layer}` | " + " | ".join(cells) + " |\n"
    # mean over layers of (final - initial) / initial, per seed
    rel_cells, wins = [], []
    for v in variants:
        per_seed = []
        for i in range(len(curves[v][layers[0]][1])):
            rel = [(curves[v][la][1][i][-1] - curves[v][la][1][i][0]) / curves[v][la][1][i][0] for la in layers]
            per_seed.append(100.0 * sum(rel) / len(rel))
        m, s = mean_std(per_seed)
        rel_cells.append(f"{m:+.2f} ± {s:.2f}")
    final += "| **mean change from init (%)** | " + " | ".join(rel_cells) + " |\n"
    if "mhe" in variants:
        for v in variants:
            if v in ("baseline", "mhe"):
                continue
            lower = sum(
                mean_std([vals[-1] for vals in curves[v][la][1]])[0]
                < mean_std([vals[-1] for vals in curves["mhe"][la][1]])[0]
                for la in layers
            )
            wins.append(f"{ROW_LABELS[v]}: {lower}/{len(layers)}")
    text = f"**Final full-space energy** (s = 2; mean over seeds {results['seeds']}):\n\n{final}\n"
    if wins:
        text += "Layers whose final full-space energy is below MHE's: " + "; ".join(wins) + ".\n"
    text += "\n" + _split_changes(results)
    return text


def _split_changes(results: dict[str, Any]) -> str:
    """Markdown: mean relative change from init, hidden layers vs classifier, full-space vs half-space energy."""
    runs, variants = results["runs"], results["variants"]
    head_name = "net.score" if results["arch"] in ("cnn6", "cnn9") else "fc"
    rows = []
    for key, label in (("energy", "full-space"), ("energy_half", "half-space")):
        for part in ("hidden layers", "classifier"):
            cells = []
            for v in variants:
                curves = _curves(runs, v, key)
                if not curves:
                    cells.append("–")
                    continue
                layers = [la for la in curves if (la == head_name) == (part == "classifier")]
                per_seed = []
                for i in range(len(curves[layers[0]][1])):
                    rel = [(curves[la][1][i][-1] / curves[la][1][i][0] - 1.0) for la in layers]
                    per_seed.append(100.0 * sum(rel) / len(rel))
                m, s = mean_std(per_seed)
                cells.append(f"{m:+.2f} ± {s:.2f}")
            rows.append(f"| {label}, {part} | " + " | ".join(cells) + " |")
    head = "| energy | " + " | ".join(ROW_LABELS[v] for v in variants) + " |\n|---|" + "---|" * len(variants)
    return (
        "**Change from initialization (%)**, mean over layers then over seeds: the full-space energy of `W` and the "
        "half-space energy of `[W; -W]`, hidden layers and classifier apart:\n\n" + head + "\n" + "\n".join(rows) + "\n"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per layer (energy vs step; mean over seeds, band = min..max) plus a mean relative-change panel."""
    plt = pyplot()

    runs, variants = results["runs"], results["variants"]
    curves = {v: _curves(runs, v) for v in variants}
    layers = list(next(iter(curves.values())).keys())
    cols = 4
    rows = (len(layers) + 1 + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.8 * rows), squeeze=False)
    flat = axes.ravel()
    ax0 = flat[0]
    for v in variants:
        steps = curves[v][layers[0]][0]
        seeds = len(curves[v][layers[0]][1])
        rel = []
        for t in range(len(steps)):
            vals = [
                sum(curves[v][la][1][i][t] / curves[v][la][1][i][0] - 1.0 for la in layers) / len(layers)
                for i in range(seeds)
            ]
            rel.append(100.0 * sum(vals) / len(vals))
        ax0.plot(steps, rel, color=COLORS.get(v), label=ROW_LABELS[v])
    ax0.set_title("mean over layers: change from init (%)", fontsize=9)
    ax0.legend(fontsize=7)
    for ax, layer in zip(flat[1:], layers, strict=False):
        for v in variants:
            steps, vals = curves[v][layer]
            mean = [sum(col) / len(col) for col in zip(*vals, strict=True)]
            lo = [min(col) for col in zip(*vals, strict=True)]
            hi = [max(col) for col in zip(*vals, strict=True)]
            ax.plot(steps, mean, color=COLORS.get(v), lw=1.2)
            ax.fill_between(steps, lo, hi, color=COLORS.get(v), alpha=0.15, lw=0)
        ax.set_title(layer, fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    for ax in flat[len(layers) + 1 :]:
        ax.axis("off")
    for ax in flat:
        ax.tick_params(labelsize=7)
    fig.suptitle(
        f"{results['data']}, {ARCH_LABELS[results['arch']]}: full-space hyperspherical energy (s=2) during training",
        fontsize=11,
    )
    fig.supxlabel("optimizer step", fontsize=9)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, record the energies, write ``energy_<data>.{json,md,png}`` (and the doc block)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = experiment_parser("energy_figure", __doc__)
    parser.add_argument("--arch", choices=ARCHS, default="cnn9")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(DEFAULT_VARIANTS))
    parser.add_argument("--every", type=int, default=None, help="record every this many steps (default 5; quick 1)")
    parser.add_argument("--tag", default="", help="suffix of the output names and of the doc block (e.g. 'long')")
    args = parser.parse_args(argv)
    setup = resolve_setup(args, "experiments.energy_figure", argv, DEFAULT_SEEDS)
    every = args.every or (1 if setup.quick else 5)
    start = time.perf_counter()
    specs = [
        RunSpec(
            arch=args.arch,
            variant=v,
            seed=s,
            data=setup.data,
            train=setup.train,
            energy_every=every,
            threads=setup.threads,
            accelerator=setup.accelerator,
        )
        for v in args.variants
        for s in setup.seeds
    ]
    print(f"energy runs: {len(specs)}", flush=True)
    runs = run_many(specs, setup.jobs, print_progress)
    seconds = time.perf_counter() - start
    results: dict[str, Any] = {
        "experiment": "energy_figure",
        "data": setup.data.label,
        "arch": args.arch,
        "variants": list(args.variants),
        "seeds": setup.seeds,
        "every": every,
        "setup": {"data": asdict(setup.data), "train": asdict(setup.train), "jobs": setup.jobs},
        "command": setup.command,
        "seconds": seconds,
        "environment": environment(),
        "runs": runs,
    }
    stem = f"energy_{setup.data.kind}" + (f"_{args.tag}" if args.tag else "")
    hidden, head = default_kappas("mhe")  # every energy variant (MHE, half-space MHE, CoMHE) has the same defaults
    intro = (
        f"Architecture: {ARCH_LABELS[args.arch]}; default κ (hidden {hidden:g}, classifier {head:g}); "
        f"energy recorded every {every} steps."
    )
    publish(setup, stem, results, plot, intro, summary(results), seconds, "energy")
    return results


if __name__ == "__main__":
    main()
