"""Ablation of RP-CoMHE: projection dimension k and number of projections C, error and step cost side by side.

Every cell trains the same architecture (default CNN-9) with RP-CoMHE at the official κ (hidden 1, classifier 10)
and ``projection_dim = k``, ``num_projections = C``, over the given seeds; a baseline row gives the reference. The
cost columns are the median wall time of a whole training step (Lightning, penalty included) and of the penalty
alone (``refresh`` + forward + backward on the final weights). A last table compares the Lightning callback with a
plain PyTorch loop calling :class:`~lightning_comhe.CoMHERegularizer` directly (same model, data and settings), to
measure the callback path's overhead.

Usage::

    python -m experiments.ablation               # k in {10, 20, 40, 80}, C in {1, 4, 20}, seeds 0-2
    python -m experiments.ablation --quick
"""

import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from experiments.cli import Setup, experiment_parser, resolve_setup
from experiments.data import load_splits
from experiments.models import ARCH_LABELS, ARCHS, build_model
from experiments.publishing import environment, fmt_mean_std, mean_std, publish, pyplot, save_figure
from experiments.runner import RunSpec, default_kappas, print_progress, run, run_many

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_KS = (10, 20, 40, 80)
DEFAULT_CS = (1, 4, 20)


def plain_loop_step_ms(setup: Setup, arch: str, k: int, c: int, steps: int) -> float:
    """Median step time (ms) of a plain PyTorch loop with RP-CoMHE through :class:`CoMHERegularizer`."""
    from lightning.pytorch import seed_everything

    from lightning_comhe import CoMHERegularizer

    torch.set_num_threads(setup.threads)
    splits = load_splits(setup.data)
    seed_everything(0, verbose=False)
    net, head = build_model(arch, splits.num_classes, setup.data.image_size, setup.train.width)
    reg = CoMHERegularizer(net, "random", head=head, projection_dim=k, num_projections=c, seed=0)
    opt = torch.optim.SGD(
        net.parameters(), lr=setup.train.lr, momentum=setup.train.momentum, weight_decay=setup.train.weight_decay
    )
    loader = DataLoader(splits.train, batch_size=setup.data.batch_size, shuffle=True)
    times: list[float] = []
    net.train()
    while len(times) < steps:
        for x, y in loader:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            reg.refresh(opt.param_groups[0]["lr"])
            loss = F.cross_entropy(net(x), y) + reg().penalty
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            if len(times) >= steps:
                break
    times = times[3:] if len(times) > 4 else times[1:]
    return 1000.0 * statistics.median(times)


def tables(results: dict[str, Any]) -> str:
    """Markdown: test error and costs per (k, C), the baseline, and the callback-overhead comparison."""
    runs = results["runs"]

    def pick(variant: str, k: int | None = None, c: int | None = None) -> list[dict[str, Any]]:
        out = []
        for r in runs:
            s = r["spec"]
            comhe = dict(s["comhe"])
            if s["variant"] != variant:
                continue
            if k is not None and (comhe.get("projection_dim") != k or comhe.get("num_projections") != c):
                continue
            out.append(r)
        return out

    lines = [
        "| k | C | test error (%) | step (ms) | penalty alone (ms) |",
        "|---|---|---|---|---|",
    ]
    base = pick("baseline")
    if base:
        lines.append(
            f"| – | – (baseline) | {fmt_mean_std(r['test_error'] for r in base)} | "
            f"{mean_std(r['step_ms'] for r in base)[0]:.1f} | 0 |"
        )
    for k in results["ks"]:
        for c in results["cs"]:
            cell = pick("random", k, c)
            if not cell:
                continue
            pen = [r["penalty_ms"] for r in cell if "penalty_ms" in r]
            lines.append(
                f"| {k} | {c} | {fmt_mean_std(r['test_error'] for r in cell)} | "
                f"{mean_std(r['step_ms'] for r in cell)[0]:.1f} | {mean_std(pen)[0]:.1f} |"
            )
    text = (
        f"**RP-CoMHE on {ARCH_LABELS[results['arch']]}**, mean ± std over seeds {results['seeds']} "
        f"(costs: medians, averaged over seeds):\n\n" + "\n".join(lines) + "\n"
    )
    ov = results.get("overhead")
    if ov:
        text += (
            f"\n**Callback overhead** (RP-CoMHE k={ov['k']}, C={ov['c']}, seed 0, median step): Lightning + `CoMHE` "
            f"callback {ov['lightning_ms']:.1f} ms, plain PyTorch loop + `CoMHERegularizer` {ov['plain_ms']:.1f} ms "
            f"(ratio {ov['lightning_ms'] / ov['plain_ms']:.2f}; the Lightning step also includes its own hooks and "
            "logging).\n"
        )
    return text


def plot(results: dict[str, Any], path: Path) -> None:
    """Test error and step cost against k, one line per C (baseline as a horizontal band)."""
    plt = pyplot()

    runs = results["runs"]
    fig, (ax_err, ax_cost) = plt.subplots(1, 2, figsize=(10, 3.8))
    base = [r for r in runs if r["spec"]["variant"] == "baseline"]
    if base:
        m, s = mean_std(r["test_error"] for r in base)
        ax_err.axhspan(m - s, m + s, color="0.85", label="baseline ± std")
        ax_err.axhline(m, color="k", lw=1)
        ax_cost.axhline(mean_std(r["step_ms"] for r in base)[0], color="k", lw=1, label="baseline step")
    for i, c in enumerate(results["cs"]):
        ks, errs, stds, costs = [], [], [], []
        for k in results["ks"]:
            cell = [
                r
                for r in runs
                if r["spec"]["variant"] == "random"
                and dict(r["spec"]["comhe"]).get("projection_dim") == k
                and dict(r["spec"]["comhe"]).get("num_projections") == c
            ]
            if not cell:
                continue
            m, s = mean_std(r["test_error"] for r in cell)
            ks.append(k)
            errs.append(m)
            stds.append(s)
            costs.append(mean_std(r["step_ms"] for r in cell)[0])
        offset = [k * (1 + 0.03 * (i - 1)) for k in ks]
        ax_err.errorbar(offset, errs, yerr=stds, marker="o", capsize=3, label=f"C = {c}")
        ax_cost.plot(ks, costs, marker="o", label=f"C = {c}")
    for ax in (ax_err, ax_cost):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["ks"], [str(k) for k in results["ks"]])
        ax.set_xlabel("projection dimension k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_err.set_ylabel("test error (%)")
    ax_cost.set_ylabel("training step (ms, median)")
    fig.suptitle(f"{results['data']}, {ARCH_LABELS[results['arch']]}: RP-CoMHE ablation over k and C")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the grid, write ``ablation_<data>.{json,md,png}`` (and the doc block)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = experiment_parser("ablation", __doc__)
    parser.add_argument("--arch", choices=ARCHS, default="cnn9")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="projection dimensions k")
    parser.add_argument("--cs", type=int, nargs="+", default=list(DEFAULT_CS), help="numbers of projections C")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline row")
    args = parser.parse_args(argv)
    setup = resolve_setup(args, "experiments.ablation", argv, DEFAULT_SEEDS)
    start = time.perf_counter()

    def spec(variant: str, seed: int, k: int | None = None, c: int | None = None) -> RunSpec:
        comhe = () if k is None else (("projection_dim", k), ("num_projections", c))
        return RunSpec(
            arch=args.arch,
            variant=variant,
            seed=seed,
            data=setup.data,
            train=setup.train,
            comhe=comhe,
            time_penalty=variant != "baseline",
            threads=setup.threads,
            accelerator=setup.accelerator,
        )

    specs = [] if args.no_baseline else [spec("baseline", s) for s in setup.seeds]
    specs += [spec("random", s, k, c) for k in args.ks for c in args.cs for s in setup.seeds]
    print(f"ablation runs: {len(specs)}", flush=True)
    runs = run_many(specs, setup.jobs, print_progress)

    # Callback overhead: the official k = 40, C = 20 (or the largest cell), seed 0, in this process.
    k_ov = 40 if 40 in args.ks else max(args.ks)
    c_ov = 20 if 20 in args.cs else max(args.cs)
    steps = max(8, min(60, math.ceil(len(load_splits(setup.data).train) / setup.data.batch_size) * setup.train.epochs))
    lightning_ms = run(spec("random", 0, k_ov, c_ov))["step_ms"]
    plain_ms = plain_loop_step_ms(setup, args.arch, k_ov, c_ov, steps)
    seconds = time.perf_counter() - start
    results: dict[str, Any] = {
        "experiment": "ablation",
        "data": setup.data.label,
        "arch": args.arch,
        "ks": list(args.ks),
        "cs": list(args.cs),
        "seeds": setup.seeds,
        "overhead": {"k": k_ov, "c": c_ov, "lightning_ms": lightning_ms, "plain_ms": plain_ms, "steps": steps},
        "setup": {"data": asdict(setup.data), "train": asdict(setup.train), "jobs": setup.jobs},
        "command": setup.command,
        "seconds": seconds,
        "environment": environment(),
        "runs": runs,
    }
    stem = f"ablation_{setup.data.kind}"
    hidden, head = default_kappas("random")
    intro = f"Default κ (hidden {hidden:g}, classifier {head:g}); layers with d ≤ k run unprojected half-space MHE."
    publish(setup, stem, results, plot, intro, tables(results), seconds, "ablation")
    return results


if __name__ == "__main__":
    main()
