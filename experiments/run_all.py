"""Regenerate every table and figure: projection guarantee, accuracy, energy figure, ablation.

Usage::

    python -m experiments.run_all --jobs 2            # the full digits sweep (refreshes docs/results.md)
    python -m experiments.run_all --quick             # pipeline check, about a minute; never touches the docs
    python -m experiments.run_all --cifar-root ~/data/cifar-10-batches-py --accelerator auto

Every option except ``--archs`` (accuracy table only) is passed to each script; see their ``--help``.
"""

import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments import ablation, accuracy, energy_figure, projection_guarantee
from experiments.cli import experiment_parser, resolve_setup
from experiments.models import ARCHS
from experiments.publishing import publish_sweep


def _without(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its values."""
    out: list[str] = []
    skipping = False
    for token in argv:
        if token == option:
            skipping = True
            continue
        if skipping and not token.startswith("--"):
            continue
        skipping = False
        out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the four experiments in order; returns their results by name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = experiment_parser("run_all", __doc__)
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=None, help="architectures of the accuracy table")
    args = parser.parse_args(argv)
    setup = resolve_setup(args, "experiments.run_all", argv, ())
    common = _without(argv, "--archs")
    start = time.perf_counter()
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    steps = [
        ("projection_guarantee", projection_guarantee.main, common),
        ("accuracy", accuracy.main, common + (["--archs", *args.archs] if args.archs else [])),
        ("energy_figure", energy_figure.main, common),
        ("ablation", ablation.main, common),
    ]
    for name, fn, script_argv in steps:
        t0 = time.perf_counter()
        print(f"==== {name} ====", flush=True)
        results[name] = fn(script_argv)
        timings[name] = time.perf_counter() - t0
    total = time.perf_counter() - start
    rows = [(f"`experiments.{name}`", f"{sec / 60:.1f}") for name, sec in timings.items()]
    publish_sweep(setup, "run_all", total, ("script", "minutes"), rows)
    return results


if __name__ == "__main__":
    main()
