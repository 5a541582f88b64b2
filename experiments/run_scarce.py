"""Regenerate the three scarce-data blocks of ``docs/results.md`` in one sweep: low-data table, noise, lazy.

The experiments share their identical runs (:func:`experiments.runner.run_cached`): the lazy ablation's every-step
run and baseline are the noise experiment's. Budget: about 75 minutes on 2 cores with ``--jobs 2``.

Usage::

    python -m experiments.run_scarce --jobs 2       # the whole sweep (refreshes docs/results.md)
    python -m experiments.run_scarce --quick        # pipeline check, a few minutes; never touches the docs

The common options (``--quick``, ``--out``, ``--doc``, ``--no-doc``, ``--seeds``, ``--jobs``, ``--threads``,
``--steps`` ...) are passed to each experiment; ``--sizes`` only to the low-data table, ``--study-size`` (default 30)
is the size of the noise and lazy experiments.
"""

import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments import lazy, lowdata, noise, scarce
from experiments.cli import experiment_parser
from experiments.publishing import publish_sweep
from experiments.runner import RunSpec

#: Options of one experiment only (the others never see them).
OWN_OPTIONS: dict[str, tuple[str, ...]] = {
    "lowdata": ("--sizes", "--rows", "--tune-seeds", "--tune-sizes", "--kappa-grid"),
    "lazy": ("--intervals",),
}


def _split(argv: Sequence[str], options: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` without ``options`` and their values, and those options with their values."""
    rest: list[str] = []
    taken: list[str] = []
    taking = False
    for token in argv:
        if token.startswith("--"):
            taking = token in options
        (taken if taking else rest).append(token)
    return rest, taken


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the three experiments with one run cache; returns their results by name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = experiment_parser("run_scarce", __doc__)
    scarce.add_scarce_args(parser, scarce.SIZES)
    parser.add_argument("--study-size", type=int, default=30, help="images per class of the noise / lazy studies")
    parser.add_argument("--rows", nargs="+", choices=lowdata.TABLE_ROWS, help="rows of the low-data table")
    parser.add_argument("--tune-seeds", type=int, nargs="*", help="seeds of the κ tuning runs (low-data table)")
    parser.add_argument("--tune-sizes", type=int, nargs="*", help="sizes with a κ tuning (low-data table)")
    parser.add_argument("--kappa-grid", type=float, nargs="+", help="κ multipliers tried (low-data table)")
    parser.add_argument("--intervals", type=int, nargs="+", help="every_n_steps values (lazy ablation)")
    args = parser.parse_args(argv)
    setup = scarce.setup_from(args, "experiments.run_scarce", argv)
    common, _ = _split(argv, ("--study-size", *OWN_OPTIONS["lowdata"], *OWN_OPTIONS["lazy"]))
    own = {name: _split(argv, options)[1] for name, options in OWN_OPTIONS.items()}
    study = ["--sizes", str(args.study_size)]
    cache: dict[RunSpec, dict[str, Any]] = {}
    steps = [
        ("lowdata", lowdata.main, common + own["lowdata"]),
        ("noise", noise.main, common + study),
        ("lazy", lazy.main, common + study + own["lazy"]),
    ]
    start = time.perf_counter()
    results: dict[str, Any] = {}
    timings: dict[str, tuple[float, int]] = {}
    for name, fn, script_argv in steps:
        t0, before = time.perf_counter(), len(cache)
        print(f"==== {name} ====", flush=True)
        results[name] = fn(script_argv, cache=cache)
        timings[name] = (time.perf_counter() - t0, len(cache) - before)
    total = time.perf_counter() - start
    rows = [(f"`experiments.{name}`", f"{sec / 60:.1f}", str(runs)) for name, (sec, runs) in timings.items()]
    publish_sweep(setup, "run_scarce", total, ("script", "minutes", "new runs"), rows)
    return results


if __name__ == "__main__":
    main()
