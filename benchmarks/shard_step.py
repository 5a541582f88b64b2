"""Per-rank DDP step time with and without the penalty split across ranks: real 2-process runs (gloo, CPU).

Lightning's own ``DDPStrategy`` with ``devices=2`` on CPU (one torch thread per rank), one process group for all
fits, timed in one run: a fit without CoMHE, then for each variant a fit with ``CoMHE(shard=False)`` (every rank
computes the whole penalty) and one with ``shard=True`` (each rank its share). A step is timed from
``on_train_batch_start`` to ``on_train_batch_end`` (forward, penalty, backward, DDP's all-reduce, optimizer step);
the first steps are warm-up. The penalty per rank is the step time minus the CoMHE-free step's, on the slowest
rank: with ``shard=True`` it should be about 1/W of ``shard=False``'s.

    python -m benchmarks.shard_step            # ResNet-18 at 32×32, batch 8 per rank
    python -m benchmarks.shard_step --quick

The command starts the DDP job as a subprocess (Lightning's launcher re-runs that subprocess for rank 1), so it can
be called from other benchmarks and tests.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

VARIANTS = ("random", "half_mhe", "angle")
LABELS = {"random": "RP-CoMHE (official k = 40, C = 20)", "half_mhe": "half-space MHE", "angle": "AP-CoMHE"}
WORLD = 2


def _configs() -> list[tuple[str, dict[str, Any] | None]]:
    runs: list[tuple[str, dict[str, Any] | None]] = [("none", None)]
    for variant in VARIANTS:
        runs += [(f"{variant}/unsharded", {"variant": variant, "shard": False})]
        runs += [(f"{variant}/sharded", {"variant": variant, "shard": True})]
    return runs


def _job(model_name: str, steps: int, warmup: int, out: Path) -> None:
    """The DDP job (both ranks): every fit of :func:`_configs`, each rank's step times written to ``out``."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.lightning_parts import Classifier
    from lightning_comhe import CoMHE

    torch.set_num_threads(1)

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)

    generator = torch.Generator().manual_seed(0)
    n = 8 * WORLD * (steps + warmup)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 100, (n,)))
    results: dict[str, list[float]] = {}
    rank = 0
    for name, comhe in _configs():
        torch.manual_seed(0)
        timer = StepTimer()
        callbacks: list[Callback] = [timer] + ([] if comhe is None else [CoMHE(**comhe, seed=1)])
        trainer = Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy=DDPStrategy(process_group_backend="gloo"),
            max_steps=steps + warmup,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        module = Classifier(common.create_model(model_name), momentum=0.9, weight_decay=0.0)
        trainer.fit(module, DataLoader(data, batch_size=8, shuffle=False))
        rank = trainer.global_rank
        results[name] = timer.times[warmup:]
    (out / f"rank{rank}.json").write_text(json.dumps(results), encoding="utf-8")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model_name: str, steps: int, warmup: int, out: Path) -> dict[str, list[list[float]]]:
    """Run the DDP job in a subprocess; per config, each rank's step times."""
    work = out / "shard_step_ranks"
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(common.REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "benchmarks.shard_step", "--job", model_name, str(steps), str(warmup), str(work)]
    done = subprocess.run(cmd, env=env, cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the DDP job failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    ranks = [json.loads((work / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(WORLD)]
    return {name: [r[name] for r in ranks] for name in ranks[0]}


def summarize(times: dict[str, list[list[float]]]) -> list[dict[str, Any]]:
    """Per variant: the slowest rank's median step time and penalty time, unsharded and sharded."""

    def slowest(name: str) -> float:
        return max(statistics.median(t) for t in times[name])

    base = slowest("none")
    rows = []
    for variant in VARIANTS:
        whole, share = slowest(f"{variant}/unsharded"), slowest(f"{variant}/sharded")
        rows.append(
            {
                "variant": variant,
                "world": WORLD,
                "step_none_s": base,
                "step_unsharded_s": whole,
                "step_sharded_s": share,
                "penalty_unsharded_s": whole - base,
                "penalty_sharded_s": share - base,
                "fraction": (share - base) / max(whole - base, 1e-12),
                "step_ratio": share / whole,
            }
        )
    return rows


def render(model_name: str, rows: list[dict[str, Any]]) -> str:
    """The Markdown table of one run."""
    label = common.MODEL_LABELS.get(model_name, model_name)
    md = [
        f"Measured, real DDP (2 processes, gloo, 1 thread each), {label}, batch 8 per rank, slowest rank's median "
        "step; the penalty is the step minus the CoMHE-free step:\n",
        common.md_table(
            ["variant", "W", "step without CoMHE", "step, shard=False", "step, shard=True", "penalty, shard=False"]
            + ["penalty, shard=True", "penalty fraction", "ideal 1/W", "step ratio"],
            [
                [LABELS[r["variant"]], r["world"], common.fmt_s(r["step_none_s"]), common.fmt_s(r["step_unsharded_s"])]
                + [common.fmt_s(r["step_sharded_s"]), common.fmt_s(r["penalty_unsharded_s"])]
                + [common.fmt_s(r["penalty_sharded_s"]), f"{r['fraction']:.2f}", f"{1 / r['world']:.2f}"]
                + [f"{r['step_ratio']:.2f}"]
                for r in rows
            ],
        ),
    ]
    return "\n".join(md) + "\n"


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    model_name = "tiny" if args.quick else "resnet18"
    steps, warmup = (2, 1) if args.quick else (args.repeats or 6, 2)
    times = measure(model_name, steps, warmup, Path(args.out))
    rows = summarize(times)
    markdown = render(model_name, rows)
    data = common.payload("shard_step", torch.device("cpu"), argv, model=model_name, times=times, rows=rows)
    common.save("shard_step", Path(args.out), data, markdown)
    print(markdown)
    return data


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        _job(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        run()
