"""Helpers of the multi-process tests: free ports, process launching with hard timeouts, and a data-parallel reference.

The reference reproduces, in one process, what Lightning's data-parallel training does:

- Lightning always replaces the training loader's sampler with ``DistributedSampler(dataset, num_replicas=W,
  rank=r, shuffle=True, seed=int(PL_GLOBAL_SEED or 0), drop_last=False)`` and calls ``set_epoch(epoch)`` at every
  epoch. :func:`distributed_indices` re-derives the per-rank index lists by hand (a permutation of a generator
  seeded with ``seed + epoch``, padded with its own first indices up to a multiple of ``W``, then every ``W``-th
  index from ``rank``).
- DDP (and FSDP2) average the gradients over the ranks. Every rank adds the same penalty (same weights, same
  projection seed), so the averaged gradient of a step is ``mean_r(task gradient of rank r) + penalty gradient``.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from tests.helpers import Batch, PenaltyFn, TinyMLP

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "tests" / "scripts"


# --------------------------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """The current environment, cleaned of distributed/launcher variables, with the repository on ``PYTHONPATH``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {
            "MASTER_ADDR",
            "MASTER_PORT",
            "NODE_RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "GROUP_RANK",
            "RANK",
            "PL_GLOBAL_SEED",
            "SLURM_NTASKS",
            "SLURM_JOB_ID",
            "TORCHELASTIC_RUN_ID",
        }
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@dataclass
class Finished:
    """The outcome of one started process."""

    returncode: int
    output: str


def run_processes(commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], timeout: float) -> list[Finished]:
    """Start every command at once (each in its own session), wait for all, and never hang.

    After ``timeout`` seconds (for all of them together) every process group still alive is killed, including the
    children a process launched itself (Lightning's DDP launcher starts local rank 1 from rank 0), and the test fails.
    """
    procs = [
        subprocess.Popen(
            list(cmd),
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd, env in zip(commands, envs, strict=True)
    ]
    deadline = time.monotonic() + timeout
    outputs: list[str] = []
    timed_out = False
    try:
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
            outputs.append(out)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call created, children included
            except (ProcessLookupError, PermissionError):
                pass
        for proc in procs[len(outputs) :]:
            out, _ = proc.communicate()
            outputs.append(out or "")
    if timed_out:
        raise AssertionError(f"processes did not finish within {timeout} s:\n" + "\n-----\n".join(outputs))
    return [Finished(p.returncode, o) for p, o in zip(procs, outputs, strict=True)]


def python_script(name: str, *args: str) -> list[str]:
    """Command running ``tests/scripts/<name>`` with this interpreter."""
    return [sys.executable, str(SCRIPTS / name), *args]


# --------------------------------------------------------------------------------------------------------------------
# Lightning's DistributedSampler, by hand
# --------------------------------------------------------------------------------------------------------------------
def distributed_indices(n: int, world_size: int, rank: int, epoch: int, seed: int = 0) -> list[int]:
    """The indices ``DistributedSampler(shuffle=True, drop_last=False, seed=seed)`` yields to ``rank`` in ``epoch``."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    total = -(-n // world_size) * world_size
    while len(order) < total:  # padding: repeat the permutation's head
        order += order[: total - len(order)]
    return order[rank:total:world_size]


def rank_batches(dataset: TensorDataset, indices: Sequence[int], batch_size: int) -> list[Batch]:
    """The batches an unshuffled ``DataLoader(batch_size, drop_last=False)`` builds from ``indices``."""
    idx = torch.tensor(list(indices))
    x, y = dataset.tensors
    return [(x[idx[i : i + batch_size]], y[idx[i : i + batch_size]]) for i in range(0, len(idx), batch_size)]


def epoch_batches(dataset: TensorDataset, world_size: int, epoch: int, batch_size: int) -> list[list[Batch]]:
    """Per rank, the batches of ``epoch``."""
    n = len(dataset)
    return [rank_batches(dataset, distributed_indices(n, world_size, r, epoch), batch_size) for r in range(world_size)]


# --------------------------------------------------------------------------------------------------------------------
# data-parallel reference
# --------------------------------------------------------------------------------------------------------------------
def reference_fit_data_parallel(
    model: TinyMLP,
    dataset: TensorDataset,
    *,
    world_size: int,
    batch_size: int,
    max_steps: int,
    penalty_fn: PenaltyFn | None,
    accumulate: int = 1,
    dtype: torch.dtype = torch.float64,
) -> tuple[TinyMLP, list[Tensor]]:
    """Data-parallel SGD on ``world_size`` simulated ranks, in one process; returns the model and the penalties.

    Per optimizer step (a window of ``r <= accumulate`` consecutive batch indices of the epoch; every rank has the
    same number of batches): for each rank, ``zero_grad``, backward of ``task / accumulate`` over its micro-batches
    (plus the penalty, once), and the rank's gradient is kept; the step's gradient is the mean of the ranks'
    gradients; SGD step. The ranks share the model, so each sees the same weights, and the penalty is evaluated
    once per step (its projections are refreshed once per step, as on every real rank).
    """
    opt = model.configure_optimizers()
    params = [p for p in model.parameters() if p.requires_grad]
    penalties: list[Tensor] = []
    step, epoch = 0, 0
    while step < max_steps:
        per_rank = epoch_batches(dataset, world_size, epoch, batch_size)
        num = len(per_rank[0])
        assert all(len(b) == num for b in per_rank)
        for start in range(0, num, accumulate):
            window = range(start, min(start + accumulate, num))
            penalty = None
            if penalty_fn is not None:
                penalty = penalty_fn(step, opt.param_groups[0]["lr"])
                penalties.append(penalty.detach().clone())
                pen_grads = torch.autograd.grad(penalty, params, allow_unused=True)
            total = [torch.zeros_like(p) for p in params]
            for batches in per_rank:
                for i in window:
                    x, y = batches[i]
                    loss = model.task_loss((x.to(dtype), y.to(dtype))) / accumulate
                    grads = torch.autograd.grad(loss, params)
                    for t, g in zip(total, grads, strict=True):
                        t.add_(g)
                if penalty is not None:  # every rank adds the same penalty gradient
                    for t, g in zip(total, pen_grads, strict=True):
                        if g is not None:
                            t.add_(g)
            for p, t in zip(params, total, strict=True):
                p.grad = t / world_size
            opt.step()
            step += 1
            if step >= max_steps:
                break
        epoch += 1
    return model, penalties


def reference_fit_deepspeed(
    model: TinyMLP,
    dataset: TensorDataset,
    *,
    world_size: int,
    batch_size: int,
    micro_batches: int,
    penalty_fn: PenaltyFn | None,
    accumulate: int = 1,
    dtype: torch.dtype = torch.float32,
) -> tuple[TinyMLP, list[Tensor]]:
    """What Lightning + DeepSpeed (ZeRO-1/2) compute, in one process; returns the model and the penalties.

    DeepSpeed, not Lightning, decides the optimizer steps: every ``accumulate`` consecutive micro-batches of a rank's
    stream form a window, **across epoch ends** (the stream is the ranks' ``DistributedSampler`` batches, epoch after
    epoch, cut after ``micro_batches``; a trailing incomplete window never steps). Lightning divides each task loss
    by ``accumulate`` and the engine divides every backward by ``accumulate`` again. The callback adds the penalty
    once per window (first micro-batch), so it is divided by ``accumulate`` once. The step's gradient is the mean
    over ranks: ``mean_r sum_i task_ri / A**2 + grad(penalty) / A``.
    """
    streams: list[list[Batch]] = [[] for _ in range(world_size)]
    epoch = 0
    while len(streams[0]) < micro_batches:
        for stream, batches in zip(streams, epoch_batches(dataset, world_size, epoch, batch_size), strict=True):
            stream.extend(batches)
        epoch += 1
    opt = model.configure_optimizers()
    params = [p for p in model.parameters() if p.requires_grad]
    penalties: list[Tensor] = []
    for step in range(micro_batches // accumulate):
        window = range(step * accumulate, (step + 1) * accumulate)
        total = [torch.zeros_like(p) for p in params]
        if penalty_fn is not None:
            penalty = penalty_fn(step, opt.param_groups[0]["lr"])
            penalties.append(penalty.detach().clone())
            pen_grads = torch.autograd.grad(penalty / accumulate, params, allow_unused=True)
            for t, g in zip(total, pen_grads, strict=True):
                if g is not None:
                    t.add_(g, alpha=world_size)  # every rank adds it
        for stream in streams:
            for i in window:
                x, y = stream[i]
                loss = model.task_loss((x.to(dtype), y.to(dtype))) / accumulate**2
                for t, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                    t.add_(g)
        for p, t in zip(params, total, strict=True):
            p.grad = t / world_size
        opt.step()
    return model, penalties
