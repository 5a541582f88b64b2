"""Run every benchmark and regenerate ``docs/benchmarks.md``.

python -m benchmarks.run_all                       # CPU, all benchmarks (about 45 minutes on 2 cores)
python -m benchmarks.run_all --threads 1 --skip kernel
python -m benchmarks.run_all --quick --out /tmp/b --doc /tmp/b/benchmarks.md   # the smoke test
"""

import argparse
import time
from collections.abc import Sequence

from benchmarks import common, compiled, floor, kernel, ladder, memory, overhead, report, scale, shard, shard_step

BENCHMARKS = (
    *("kernel", "floor", "overhead", "ladder", "scale", "scale_c20", "memory", "compiled"),
    *("shard", "shard_step"),
)


def run(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    parser.add_argument("--doc", default=None, help="where to write the report (default: docs/benchmarks.md)")
    parser.add_argument("--skip", nargs="*", default=[], choices=BENCHMARKS)
    args = parser.parse_args(argv)
    shared = (["--out", args.out] if args.out else []) + (["--quick"] if args.quick else [])
    shared += ["--device", args.device] if args.device != "cpu" else []
    shared += ["--threads", str(args.threads)] if args.threads else []
    jobs = {
        "kernel": (kernel.run, []),
        "floor": (floor.run, []),
        "overhead": (overhead.run, []),
        "ladder": (ladder.run, []),
        "scale": (scale.run, []),
        "scale_c20": (
            scale.run,
            ["--num-projections", "20", "--name", "scale_c20"]
            + ([] if args.quick else ["--sizes", "65536", "--autograd-max", "0"]),
        ),
        "memory": (memory.run, []),
        "compiled": (compiled.run, []),
        "shard": (shard.run, []),
        "shard_step": (shard_step.run, []),
    }
    durations = {}
    for name, (fn, extra) in jobs.items():
        if name in args.skip:
            continue
        common.log(f"[run_all] {name}")
        t0 = time.perf_counter()
        fn(shared + extra)
        durations[name] = time.perf_counter() - t0
        common.log(f"[run_all] {name} done in {durations[name]:.0f} s")
    doc = args.doc or (None if args.quick else str(report.DOC))
    if doc:
        report.run(["--results", args.out or str(common.RESULTS), "--doc", doc])
    return durations


def main(argv: Sequence[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
