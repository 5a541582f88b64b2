"""Write ``benchmarks/results/xla_compilation.md``: torch_xla's compilation and transfer figures of the XLA suite.

Not a test module (pytest does not collect it). Run it in the XLA environment of ``.ci/run`` (step 3), from the
repository root::

    PJRT_DEVICE=CPU TPU_SKIP_MDS_QUERY=1 TPU_ACCELERATOR_TYPE=v4-8 python tests/xla/report_compilation.py \\
        > benchmarks/results/xla_compilation.md

It runs the same configurations as the tests (``xla_helpers.CONFIGS``, ``test_xla_callback.CASES``) and prints,
per configuration, the XLA graphs compiled at each step, the host transfers of the penalty path, and the largest
XLA-vs-CPU differences the tolerances of ``xla_helpers`` are set from.
"""

import datetime
import importlib.metadata
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import conftest  # noqa: F401 - the environment checks, the metadata guard and the runtime start, as under pytest
import torch
from test_xla_callback import CASES
from xla_helpers import CONFIGS, VARIANT_KWARGS, max_abs_diff, rel_err, runs
from xla_lightning import STEPS_PER_EPOCH, WARM_UP, fit

STEPS = 3 * STEPS_PER_EPOCH


def _steps(start: int, counts: list[int]) -> str:
    """Per-step growth of a cumulative count, e.g. ``4 1 0 0 0``."""
    values = [start, *counts]
    return " ".join(str(b - a) for a, b in zip(values, values[1:], strict=False))


def _state_err(a: object, b: object) -> float:
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor)
        return (a.cpu().double() - b.double()).abs().max().item() if b.is_floating_point() and b.numel() else 0.0
    if isinstance(b, dict):
        assert isinstance(a, dict)
        return max([_state_err(a[k], b[k]) for k in b] + [0.0])
    if isinstance(b, (list, tuple)):
        assert isinstance(a, (list, tuple))
        return max([_state_err(x, y) for x, y in zip(a, b, strict=True)] + [0.0])
    return 0.0


def _regularizer_table() -> list[str]:
    rows = [
        "| configuration | steps | graphs compiled per step (1) | after warm-up | host transfers per penalized step "
        "(CPU fallbacks) | XLA + CPU runs (s) | max rel. diff. penalty / energy / gradient | max abs. diff. "
        "weights / state |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg in CONFIGS.items():
        start = time.perf_counter()
        xla, cpu = runs(name)
        seconds = time.perf_counter() - start
        compiles = [c["compiles"] for c in xla.counts]
        after = compiles[-1] - ([xla.start["compiles"], *compiles][cfg.warm_up])
        transfers = sorted({d["from_device"] for d in xla.penalty_path})
        fallbacks = sum(d["fallbacks"] for d in xla.penalty_path)
        pen = max(rel_err(p, q) for p, q in zip(xla.penalties, cpu.penalties, strict=True) if q is not None)
        energy = max(
            rel_err(e[k], f[k]) for e, f in zip(xla.energies, cpu.energies, strict=True) if f is not None for k in f
        )
        grad = max(rel_err(xla.first_grads[n], cpu.first_grads[n]) for n in cpu.first_grads)
        rows.append(
            f"| `{name}` | {cfg.steps} | {_steps(xla.start['compiles'], compiles)} | {after} | "
            f"{'/'.join(map(str, transfers))} ({fallbacks}) | {seconds:.1f} | "
            f"{pen:.1e} / {energy:.1e} / {grad:.1e} | {max_abs_diff(xla.weights, cpu.weights):.1e} / "
            f"{_state_err(xla.state, cpu.state):.1e} |"
        )
    return rows


def _callback_table(root: Path) -> list[str]:
    rows = [
        f"| case | `every_n_steps` | graphs compiled per step ({STEPS} steps, {STEPS_PER_EPOCH} per epoch) | after "
        f"warm-up ({WARM_UP} steps) | host transfers per penalized step | weights vs CPU | resumed vs "
        "uninterrupted |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (variant, every, resume) in CASES.items():
        kwargs = dict(VARIANT_KWARGS[variant])
        xla = fit(True, variant, kwargs, root / name, steps=STEPS, every_n_steps=every, save_every=4)
        cpu = fit(False, variant, kwargs, root / name, steps=STEPS, every_n_steps=every)
        resumed = "-"
        if resume:
            for step, path in xla.checkpoints.items():
                if step != STEPS_PER_EPOCH:
                    path.unlink()
            again = fit(
                True,
                variant,
                kwargs,
                root / name,
                steps=STEPS,
                every_n_steps=every,
                save_every=4,
                ckpt_path=xla.checkpoints[STEPS_PER_EPOCH],
            )
            resumed = f"{max_abs_diff(again.weights, xla.weights):.1e}"
        compiles = [c["compiles"] for c in xla.counts]
        transfers = sorted({d["from_device"] for step, d in enumerate(xla.penalty_path) if step % every == 0})
        rows.append(
            f"| `{name}` | {every} | {_steps(xla.start['compiles'], compiles)} | "
            f"{compiles[-1] - compiles[WARM_UP - 1]} | {'/'.join(map(str, transfers))} | "
            f"{max_abs_diff(xla.weights, cpu.weights):.1e} | {resumed} |"
        )
    return rows


def _uncollected(root: Path) -> list[str]:
    rows = ["| case | garbage collection before each step | graphs compiled per step |", "|---|---|---|"]
    for collect in (True, False):
        for variant in ("angle", "adversarial"):
            run = fit(
                True,
                variant,
                dict(VARIANT_KWARGS[variant]),
                root / f"gc-{variant}-{collect}",
                steps=STEPS,
                collect=collect,
            )
            compiles = [c["compiles"] for c in run.counts]
            rows.append(f"| `{variant}` | {'yes' if collect else 'no'} | {_steps(run.start['compiles'], compiles)} |")
    return rows


def main() -> None:
    """Print the report (Markdown) to stdout."""
    versions = {p: importlib.metadata.version(p) for p in ("torch", "torch_xla", "lightning", "lightning-comhe")}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        regularizer = _regularizer_table()
        callback = _callback_table(Path(tmp))
        uncollected = _uncollected(Path(tmp))
    lines = [
        "# XLA: compilations and host transfers (PyTorch/XLA's CPU client)",
        "",
        f"Generated on {datetime.date.today().isoformat()} by "
        "`PJRT_DEVICE=CPU TPU_SKIP_MDS_QUERY=1 TPU_ACCELERATOR_TYPE=v4-8 python tests/xla/report_compilation.py "
        "> benchmarks/results/xla_compilation.md`, in the XLA environment of `.ci/run` (step 3), "
        f"in {time.perf_counter() - started:.0f} s. Python {platform.python_version()}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; {os.cpu_count()} CPU cores, torch with {torch.get_num_threads()} thread. The same runs as the tests "
        "of `tests/xla` (`xla_helpers.CONFIGS`, `test_xla_callback.CASES`), which assert these properties.",
        "",
        "Figures from torch_xla's metrics (`torch_xla.debug.metrics`): graphs compiled = samples of `CompileTime`;"
        " host transfers = samples of `TransferFromDeviceTime` between the start of the penalty path and the end of "
        "its backward pass (hand-written loop) or around `CoMHE.on_before_backward` (Lightning); CPU fallbacks = the "
        "`aten::*` counters of ops without an XLA lowering (before the fix, `torch.frexp` in the overflow-safe "
        "normalization: 3 to 9 per step).",
        "",
        "## The regularizer in a hand-written loop (SGD, `torch_xla.sync()` per step)",
        "",
        "`CoMHERegularizer.lazy_penalty` + backward + SGD step; `gc.collect()` before each sync. Warm-up: 2 steps "
        "(4 with `every_n_steps=2`). Differences: against the same run on the CPU (float32).",
        "",
        *regularizer,
        "",
        "(1) All configurations run in one process, in this order: a graph that an earlier configuration compiled "
        "comes from the cache.",
        "",
        "## The callback under `SingleDeviceXLAStrategy` (Lightning)",
        "",
        "`CoMHE` on `XLANet` (Lightning's `mark_step` after each optimizer step), a checkpoint every 4 steps; the "
        "resumed run starts from the step-4 checkpoint. The extra graphs at the first step of the second epoch are "
        "Lightning's logging, compiled once: a module without CoMHE that logs its loss with `self.log(on_step=True)` "
        "compiles 1 1 0 0 1 0 0 0 0 0 0 0 graphs per step, the same pattern.",
        "",
        *callback,
        "",
        "## Reference cycles and compilations",
        "",
        "The same runs without a `gc.collect()` before each step. A penalty step leaves no reference cycle (before "
        "the fix `_EpsNormalize` kept its output on its autograd context, and the graphs then depended on when the "
        "collector ran), so these compile nothing the collected runs above did not (their graphs are in the cache).",
        "",
        *uncollected,
        "",
    ]
    sys.stdout.write("\n".join(lines))


if __name__ == "__main__":
    main()
