"""The cost ladder: the step time of a Lightning training step with each CoMHE setting vs a plain Lightning step.

One timm ResNet-18 (100 classes) is trained through ``lightning.pytorch.Trainer.fit`` (SGD, momentum 0.9, a fixed
random dataset) without any callback ("plain") and with the :class:`lightning_comhe.CoMHE` callback of each rung
of :data:`LADDER`: the energy variants, RP-CoMHE with fewer or structured projections, the exact expectation
(``projection_kind="expected"``), and lazy regularization (``every_n_steps``). The configurations are run
round-robin, one fit each per round; every fit times each of its steps (from the first ``on_train_batch_start`` to
the last ``on_train_batch_end`` callback, so the callback's refresh, penalty and its backward are inside) and drops
its first step (it builds the regularizer). The timed steps cover whole periods of every ``every_n_steps`` (16
steps = 2 periods of 8). Lazy steps are bimodal, so a plain median would hide the penalized steps: the cost of a
setting is its average over a period, ``(median penalized step + (m - 1)·median other step) / m``
(:func:`period_cost`; the median step for ``m = 1``), which one-off stalls of a shared machine do not move. The ratio
is that cost over the plain step's median, per round; the median over rounds is reported.

The penalty depends on the weights only, so its cost is the same at 32×32 as at 224×224: at 224×224 (batch 16)
the plain step is long and every rung is cheaper relatively. That part runs fewer steps (one period of 8) and
rounds: it is slow on a small CPU.

Target: RP-CoMHE expected with ``every_n_steps=8`` ≤ 1.5× the plain step at 32×32.

    python -m benchmarks.ladder                       # 32×32 batch 64 at 1 and 2 threads; 224×224 batch 16, 1 thread
    python -m benchmarks.ladder --thread-counts 2     # one thread count only
    python -m benchmarks.ladder --quick               # tiny CNN, 8×8 and 16×16 images (smoke test)
"""

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import common

TARGET = 1.5
TARGET_RUNG = "expected, every 8"

#: (label, CoMHE keyword arguments; None = plain Lightning, no callback).
LADDER: tuple[tuple[str, dict[str, Any] | None], ...] = (
    ("plain", None),
    ("mhe", {"variant": "mhe"}),
    ("half_mhe", {"variant": "half_mhe"}),
    ("RP official (k=40, C=20)", {"variant": "random"}),
    ("RP C=4", {"variant": "random", "num_projections": 4}),
    ("RP sparse", {"variant": "random", "projection_kind": "sparse"}),
    ("RP expected", {"variant": "random", "projection_kind": "expected"}),
    ("angle", {"variant": "angle"}),
    ("adversarial", {"variant": "adversarial"}),
    ("RP official, every 4", {"variant": "random", "every_n_steps": 4}),
    ("RP official, every 8", {"variant": "random", "every_n_steps": 8}),
    ("expected, every 4", {"variant": "random", "projection_kind": "expected", "every_n_steps": 4}),
    ("expected, every 8", {"variant": "random", "projection_kind": "expected", "every_n_steps": 8}),
)


class _StepClock:
    """Two Lightning callbacks: one first in the list (batch start), one last (batch end); step times in seconds."""

    def __init__(self, pl: Any, device: torch.device, threads: int) -> None:
        clock = self
        self.times: list[float] = []
        self._t = 0.0

        class Start(pl.Callback):
            def on_train_start(self, *args: Any) -> None:
                common.set_threads(threads)  # whatever the Trainer did, this fit runs at `threads`

            def on_train_batch_start(self, *args: Any) -> None:
                common.sync(device)
                clock._t = time.perf_counter()

        class End(pl.Callback):
            def on_train_batch_end(self, *args: Any) -> None:
                common.sync(device)
                clock.times.append(time.perf_counter() - clock._t)

        self.start, self.end = Start(), End()


def period_cost(step_times: Sequence[float], first_step: int, every: int) -> float:
    """The average cost of a step over whole periods of ``every`` steps, robust to one-off stalls.

    The steps ``first_step, first_step + 1, …`` are penalized where ``step % every == 0``: the cost is
    ``(median(penalized) + (every - 1)·median(others)) / every`` (for ``every = 1`` the median step).

    Example::

        >>> period_cost([1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 5.0], first_step=1, every=4)
        2.0
    """
    if every <= 1:
        return statistics.median(step_times)
    steps = range(first_step, first_step + len(step_times))
    penalized = [t for s, t in zip(steps, step_times, strict=True) if s % every == 0]
    others = [t for s, t in zip(steps, step_times, strict=True) if s % every]
    if not penalized or not others:
        return statistics.fmean(step_times)
    return (statistics.median(penalized) + (every - 1) * statistics.median(others)) / every


def fit_once(
    pl: Any, net: torch.nn.Module, kwargs: dict[str, Any] | None, loader: Any, steps: int, device, threads: int
) -> list[float]:
    """One ``Trainer.fit`` of ``steps`` steps; the step times (the first, which builds the regularizer, included)."""
    from lightning_comhe.callback import CoMHE

    clock = _StepClock(pl, device, threads)
    middle = [] if kwargs is None else [CoMHE(**kwargs, log_every=10**9)]
    from benchmarks.lightning_parts import Classifier, quiet_trainer

    trainer = quiet_trainer(device, steps, [clock.start, *middle, clock.end], precision="32-true")
    trainer.fit(Classifier(net), loader)
    return clock.times


def measure(
    pl: Any,
    model_name: str,
    size: int,
    batch: int,
    steps: int,
    rounds: int,
    device: torch.device,
    thread_counts: Sequence[int],
    rungs: Sequence[tuple[str, dict[str, Any] | None]],
) -> list[dict[str, Any]]:
    """Round-robin fits of every rung at every thread count; one record per (rung, thread count)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    total = steps + 1
    data = TensorDataset(
        torch.randn(batch * total, 3, size, size, generator=g), torch.randint(0, 100, (batch * total,))
    )
    loader = DataLoader(data, batch_size=batch)
    torch.manual_seed(0)
    net = common.create_model(model_name)
    keys = [(label, kw, t) for t in thread_counts for label, kw in rungs]
    means: dict[tuple[str, int], list[float]] = {(label, t): [] for label, _, t in keys}
    times: dict[tuple[str, int], list[float]] = {(label, t): [] for label, _, t in keys}
    warm = [kw for _, kw in rungs[:2]]
    for t in thread_counts:  # untimed: thread pools, allocator, first-call paths of every thread count
        common.set_threads(t)
        for kw in warm:
            fit_once(pl, net, kw, loader, 2, device, t)
    for r in range(rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for label, kw, t in order:
            common.set_threads(t)
            step_times = fit_once(pl, net, kw, loader, total, device, t)[1:]  # drop the building step
            means[(label, t)].append(period_cost(step_times, 1, (kw or {}).get("every_n_steps", 1)))
            times[(label, t)] += step_times
        common.log(f"[ladder] {model_name} {size}x{size}: round {r + 1}/{rounds} done")
    records = []
    for t in thread_counts:
        plain = means[("plain", t)]
        for label, kw in rungs:
            ratios = [m / p for m, p in zip(means[(label, t)], plain, strict=True)]
            rec = {
                "model": model_name,
                "image_size": size,
                "batch_size": batch,
                "threads": t,
                "rung": label,
                "comhe": kw,
                "step_s": statistics.median(means[(label, t)]),
                "round_costs_s": [round(m, 6) for m in means[(label, t)]],
                "step_times_s": [round(x, 6) for x in times[(label, t)]],
                "ratio": statistics.median(ratios),
                "round_ratios": [round(x, 4) for x in ratios],
            }
            if label == TARGET_RUNG and size <= 32:
                rec["target_met"] = rec["ratio"] <= TARGET
            records.append(rec)
            common.log(f"[ladder] {size}x{size} @{t} {label}: {rec['step_s']:.3f}s = {rec['ratio']:.2f}x plain")
    return records


def markdown(records: list[dict[str, Any]]) -> str:
    parts = []
    cells = list(dict.fromkeys((r["image_size"], r["batch_size"]) for r in records))
    for size, batch in cells:
        recs = [r for r in records if r["image_size"] == size]
        counts = list(dict.fromkeys(r["threads"] for r in recs))
        rungs = list(dict.fromkeys(r["rung"] for r in recs))
        header = ["setting"]
        for t in counts:
            label = f"{t} thread" + ("s" if t > 1 else "")
            header += [f"step ({label})", f"ratio ({label})"]
        rows = []
        for rung in rungs:
            row = [rung]
            for t in counts:
                rec = next(r for r in recs if r["rung"] == rung and r["threads"] == t)
                bold = "**" if rung == TARGET_RUNG and size <= 32 else ""
                row += [common.fmt_s(rec["step_s"]), f"{bold}{rec['ratio']:.2f}×{bold}"]
            rows.append(row)
        model = common.MODEL_LABELS.get(recs[0]["model"], recs[0]["model"])
        parts.append(f"{model}, {size}×{size}, batch {batch}:\n\n" + common.md_table(header, rows))
    return "\n\n".join(parts)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: resnet18 (tiny with --quick)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default: 32 224)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch of the first size (default 64)")
    parser.add_argument("--large-batch-size", type=int, default=None, help="batch of the other sizes (default 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per fit at 32×32 (default 16)")
    parser.add_argument("--large-steps", type=int, default=None, help="timed steps per fit at 224×224 (default 8)")
    parser.add_argument("--large-rounds", type=int, default=None, help="rounds at 224×224 (default 1)")
    parser.add_argument("--large-thread-counts", type=int, nargs="+", default=None, help="default: the first count")
    parser.add_argument("--rungs", nargs="+", default=None, help="labels of LADDER to run (plain is always run)")
    common.add_thread_counts(parser, (1, 2))
    args = parser.parse_args(argv)
    device = common.setup(args)
    try:
        import lightning.pytorch as pl

        for name in ("lightning.pytorch", "lightning.fabric", "lightning_comhe"):
            logging.getLogger(name).setLevel(logging.ERROR)
    except ImportError as err:  # pragma: no cover - lightning is a dependency of the package
        raise SystemExit(f"benchmarks.ladder needs lightning: {err}") from err
    import warnings

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    counts = list(dict.fromkeys(args.thread_counts))
    large_counts = list(dict.fromkeys(args.large_thread_counts or counts[:1]))
    model_name = args.model or ("tiny" if args.quick else "resnet18")
    sizes = args.sizes or ([8, 16] if args.quick else [32, 224])
    rungs = [(label, kw) for label, kw in LADDER if args.rungs is None or label == "plain" or label in args.rungs]
    rounds = args.repeats or (1 if args.quick else 2)
    records: list[dict[str, Any]] = []
    for i, size in enumerate(sizes):
        small = i == 0
        if small:
            batch = args.batch_size or (4 if args.quick else 64)
            steps = args.steps or (8 if args.quick else 16)
        else:
            batch = args.large_batch_size or (4 if args.quick else 16)
            steps = args.large_steps or 8
        n_rounds = rounds if small else (args.large_rounds or 1)
        common.log(f"[ladder] {model_name} {size}x{size} batch {batch}: {len(rungs)} settings x {n_rounds} rounds")
        records += measure(
            pl, model_name, size, batch, steps, n_rounds, device, counts if small else large_counts, rungs
        )
    common.set_threads(args.threads)
    target = next((r for r in records if "target_met" in r), None)
    payload = common.payload(
        "ladder",
        device,
        argv,
        target=TARGET,
        target_rung=TARGET_RUNG,
        target_record=None if target is None else {k: target[k] for k in ("threads", "ratio", "target_met")},
        records=records,
    )
    common.save("ladder", args.out, payload, markdown(records))
    plot(records, args.out)
    return payload


def plot(records: list[dict[str, Any]], out) -> None:
    plt = common.pyplot()
    cells = list(dict.fromkeys((r["image_size"], r["threads"]) for r in records))
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.2), squeeze=False)
    for ax, (size, t) in zip(axes[0], cells, strict=True):
        recs = [r for r in records if r["image_size"] == size and r["threads"] == t]
        colors = ["tab:gray" if r["rung"] == "plain" else "tab:blue" for r in recs]
        ax.bar(range(len(recs)), [r["ratio"] for r in recs], color=colors)
        ax.axhline(TARGET, color="tab:red", linestyle="--", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xticks(range(len(recs)), [r["rung"] for r in recs], rotation=70, fontsize=6)
        ax.set_title(f"{size}×{size}, batch {recs[0]['batch_size']}, {t} thread(s)", fontsize=8)
        ax.set_ylabel("step time / plain Lightning step")
    fig.suptitle("The cost ladder (red: 1.5×)", fontsize=9)
    common.savefig(fig, "ladder", out)


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
