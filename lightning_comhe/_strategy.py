"""What the callback needs to know about Lightning's strategies: the step counter, what is refused, the shard."""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_comhe._fsdp1 import Fsdp1Layout, unsupported_fsdp1
from lightning_comhe._gathered import GatheredWeights, gathered, is_zero3, mesh_covers_world

__all__ = [
    "PenaltyShard",
    "all_reduce_sum",
    "batch_index",
    "check_strategy",
    "fsdp1_root",
    "gathering",
    "main_lr",
    "merge_owned_entries",
    "optimizer_step_index",
    "penalty_scale",
    "penalty_shard",
    "totals_over_ranks",
]


def optimizer_step_index(trainer: "pl.Trainer") -> int:
    """The number of optimizer steps taken so far: constant within an accumulation window.

    ``trainer.global_step`` in general. A strategy that handles gradient accumulation itself (DeepSpeed) gets an
    optimizer-step call on every micro-batch, so ``global_step`` no longer counts real steps; its engine's own
    counter (``global_steps``, advanced only at the engine's accumulation boundaries) is used instead.
    """
    if trainer.strategy.handles_gradient_accumulation:
        steps = getattr(trainer.strategy.model, "global_steps", None)
        if isinstance(steps, int):
            return steps
    return trainer.global_step


def main_lr(trainer: "pl.Trainer") -> float | None:
    """The current learning rate of the first optimizer's first group (``None`` without an optimizer)."""
    if not trainer.optimizers:
        return None
    lr = trainer.optimizers[0].param_groups[0].get("lr")
    if isinstance(lr, Tensor):  # tensor learning rates (capturable optimizers): one sync per optimizer step
        lr = float(lr)
    return lr


def batch_index(trainer: "pl.Trainer") -> int:
    """How many training batches the fit has started: the same for every closure evaluation of one batch."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready


def check_strategy(strategy: Any, accumulate: int = 1) -> None:
    """Refuse what is not supported: ZeRO-3 with accumulation, FSDP v1 without orig params or with hybrid sharding.

    Under ZeRO-3 with ``accumulate > 1`` DeepSpeed's own accumulation departs from ZeRO-1/2's even without CoMHE, so
    the penalty's placement in it cannot be checked against a reference (docs/strategies/deepspeed.md). FSDP v1:
    docs/strategies/fsdp-v1.md.
    """
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
    except ImportError:  # pragma: no cover - depends on the lightning build
        DeepSpeedStrategy = FSDPStrategy = None  # noqa: N806
    if DeepSpeedStrategy is not None and isinstance(strategy, DeepSpeedStrategy) and accumulate > 1:
        try:
            stage3 = bool(strategy.zero_stage_3)
        except Exception:  # noqa: BLE001 - an unconfigured strategy has no config yet
            stage3 = False
        if stage3:
            raise MisconfigurationException(
                f"CoMHE does not support DeepSpeed ZeRO stage 3 with gradient accumulation (got "
                f"accumulate_grad_batches={accumulate}): the engine's stage-3 accumulation is not the one CoMHE is "
                "verified against. HINT: use accumulate_grad_batches=1 with ZeRO-3, or ZeRO stage 1 or 2 "
                "(`strategy='deepspeed_stage_2'`), which support accumulation."
            )
    if FSDPStrategy is not None and isinstance(strategy, FSDPStrategy):
        problem = unsupported_fsdp1(strategy)
        if problem is not None:
            raise MisconfigurationException(problem)


def fsdp1_root(strategy: Any) -> torch.nn.Module | None:
    """The wrapped model of an ``FSDPStrategy`` (FSDP v1), ``None`` under any other strategy."""
    from lightning.pytorch.strategies import FSDPStrategy

    return strategy.model if isinstance(strategy, FSDPStrategy) else None


class PenaltyShard(NamedTuple):
    """This rank's part of a penalty split across ranks.

    Attributes:
        rank: The rank.
        world: The world size ``W``.
        scatter: FSDP2, FSDP v1 and DeepSpeed ZeRO-3: the shares' gradients are summed over the ranks into each
            rank's shard, fragment or partition slice, one group at a time (:mod:`lightning_comhe._gathered`).
            DDP and ZeRO-1/2 (``False``): each rank adds ``∇(W·R_r)`` before the strategy's all-reduce, which averages.
    """

    rank: int
    world: int
    scatter: bool


def penalty_shard(trainer: "pl.Trainer", shard: bool, shardable: bool, params: Sequence[Tensor]) -> PenaltyShard | None:
    """This rank's :class:`PenaltyShard` when this step's penalty is split across ranks (``CoMHE(shard=True)``).

    DDP and DeepSpeed ZeRO-1/2 (a ``DDPStrategy``): the gradient hooks add ``∇(W·R_r)`` before the strategy
    averages the gradients over the ranks (DDP's reducer, ZeRO's reduction hooks); under ZeRO-3 the shares'
    gradients are summed first (``scatter``). ``None`` (every rank computes
    the whole penalty) in one process, for families that keep per-group state on every rank, and under
    ``ModelParallelStrategy`` unless every weight read is an FSDP2 ``DTensor`` on a mesh of all ranks
    (tensor-parallel or plain weights: not split). FSDP v1 (``FSDPStrategy``): the shares' gradients are summed,
    and each rank adds its fragment after the backward pass.
    """
    if not shard or trainer.world_size < 2 or not shardable:
        return None
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if fsdp1_root(strategy) is not None:
        return PenaltyShard(trainer.global_rank, trainer.world_size, True)
    if isinstance(strategy, ModelParallelStrategy):
        if not mesh_covers_world(params, trainer.world_size):
            return None
        return PenaltyShard(trainer.global_rank, trainer.world_size, True)
    if not isinstance(strategy, DDPStrategy):
        return None
    # ZeRO-3: the shares' gradients are summed over the ranks, and each rank delivers its partition's slice
    return PenaltyShard(trainer.global_rank, trainer.world_size, any(is_zero3(p) for p in params))


@contextmanager
def gathering(
    shard: PenaltyShard | None, regularizer: Any, fsdp1: torch.nn.Module | None = None
) -> Iterator[GatheredWeights | None]:
    """The context of one penalized step, in which sharded weights are gathered one group at a time.

    They are gathered under a scattered (FSDP2) shard, and always for DeepSpeed ZeRO-3 parameters (empty placeholders
    outside their forward) and FSDP v1 ones (the wrapped model ``fsdp1``: 1-D fragments), group by group in the
    regularizer's group order (:class:`GatheredWeights`). ``None`` is yielded (and nothing gathered) otherwise.
    """
    layout = None if fsdp1 is None else Fsdp1Layout(fsdp1)
    if layout is None and (shard is None or not shard.scatter):
        if not any(is_zero3(p) for p in regularizer.parameters()):
            yield None
            return
    units = [regularizer.parameters(group) for group in regularizer.groups]
    with gathered(units, summed=shard is not None, layout=layout) as weights:
        yield weights


def penalty_scale(factor: int, scaler: Any = None) -> Callable[[Tensor], Tensor]:
    """What a penalty (or a group's term) enters the backward as: ``× factor``, then ``scaler.scale`` (if any).

    ``scaler`` is the precision plugin's ``GradScaler``.
    """

    def scale(term: Tensor) -> Tensor:
        term = term * factor if factor > 1 else term
        return term if scaler is None else scaler.scale(term)

    return scale


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over all ranks (a new tensor; one collective)."""
    out = t.detach().clone()
    torch.distributed.all_reduce(out)
    return out


def totals_over_ranks(penalty: Tensor, energies: dict[str, Tensor], names: list[str]) -> tuple[Tensor, dict]:
    """The penalty and the energies of ``names`` summed over ranks: one collective of ``[R_r, energies...]``."""
    zero = penalty.new_zeros(())
    totals = all_reduce_sum(torch.stack([penalty, *(energies.get(n, zero).to(penalty) for n in names)]))
    return totals[0], dict(zip(names, totals[1:], strict=True))


def merge_owned_entries(entries: dict[str, Any], share: dict[str, list[tuple[int, int, int]]]) -> dict[str, Any]:
    """Every rank's ``entries`` for its ``share``, merged: the whole projection state on every rank.

    A learned projection's entry (a ``"projection"`` tensor of shape ``(G, k, d)``) is merged set by set: each row
    comes from the rank that fits that set. Other entries (random projections) come whole from an owner. One
    ``all_gather_object``: all ranks must call it together (Lightning calls ``state_dict`` on every rank).
    """
    mine = {}
    for key, parts in share.items():
        entry = entries.get(key)
        if entry is None or not parts:
            continue
        by_set = isinstance(entry.get("projection"), Tensor) and all(p[0] >= 0 for p in parts)
        mine[key] = ([p[0] for p in parts] if by_set else None, entry)
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    merged = dict(entries)
    copied: set[str] = set()
    for part in gathered:
        for key, (sets, entry) in part.items():
            if sets is None or key not in merged:
                merged[key], copied = entry, copied - {key}
            if sets is None:
                continue
            if key not in copied:  # write rows into a copy, never into this rank's live state
                merged[key] = {**merged[key], "projection": merged[key]["projection"].clone()}
                copied.add(key)
            rows = torch.tensor(sets, dtype=torch.long)
            target = merged[key]["projection"]
            target[rows.to(target.device)] = entry["projection"][rows.to(entry["projection"].device)].to(target)
    return {k: merged[k] for k in sorted(merged)}  # the same order on every rank
