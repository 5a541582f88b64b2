r"""FSDP v1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``): its parameters' layout. Pure PyTorch.

FSDP v1 flattens the parameters of each wrapped unit into one ``FlatParameter`` and keeps 1/W of it per rank. With
``use_orig_params=True`` (Lightning's default) the original ``nn.Parameter`` objects stay in the module, and outside
forward and backward each one is a 1-D view of *this rank's fragment* of it: the elements
``[start, end]`` of its flattened full tensor (:class:`torch.distributed.fsdp._flat_param._ShardParamInfo`), or
empty. After the backward pass its ``.grad`` is the same fragment of the averaged gradient.

:class:`Fsdp1Layout` maps each original parameter to its fragment, which is all the penalty needs:

- :meth:`Fsdp1Layout.gather`: the full tensor, as a sum over the unit's ranks of zeros holding each rank's
  fragment (one ``all_reduce`` of that parameter's size: exact, as every element has one non-zero term);
- :meth:`Fsdp1Layout.piece`: this rank's fragment of a full gradient, summed over the ranks first for a penalty
  split across them;
- :func:`add_to_gradients`: the fragments added to the parameters' ``.grad`` after the backward pass (FSDP writes
  a fresh ``.grad`` back into the ``FlatParameter``'s gradient before its next use).

Under ``NO_SHARD`` a parameter is whole on every rank; it is then read as it is and gets the whole gradient.

Inside ``no_sync`` (Lightning's accumulation micro-batches but the last) FSDP keeps each rank's *full, unreduced*
gradients instead, which a later backward reduce-scatters and averages over the ranks. Each rank then adds its full
share's gradient ×W (or, if every rank computes the whole penalty, the whole gradient), so that the average is
the gradient of the whole penalty: no collective.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Fsdp1Layout", "add_to_gradients", "unsupported_fsdp1"]

_HYBRID = ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")


@dataclass(frozen=True)
class _Place:
    shape: torch.Size
    start: int | None  # this rank's fragment: elements [start, end) of the flattened tensor; None: empty
    end: int | None
    group: Any  # the unit's process group (the ranks it is sharded over)
    sharded: bool


class Fsdp1Layout:
    """Where each original parameter of an FSDP v1 model lies across the ranks.

    Args:
        root: The FSDP-wrapped model (``trainer.strategy.model``), or any module holding FSDP units.

    Raises:
        ValueError: If a unit was built with ``use_orig_params=False`` or shards hybridly (see
            :func:`unsupported_fsdp1`).
    """

    def __init__(self, root: nn.Module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        self._places: dict[int, _Place] = {}
        units = FullyShardedDataParallel.fsdp_modules(root)
        #: Whether the gradients are reduced in this backward (``False`` inside ``no_sync``: full local gradients).
        self.synced = all(getattr(unit, "_sync_gradients", True) for unit in units)
        for unit in units:
            handle = getattr(unit, "_handle", None)
            if handle is None:
                continue
            flat = handle.flat_param
            problem = _problem(getattr(flat, "_params", None) is not None, str(handle._sharding_strategy.name))
            if problem is not None:
                raise ValueError(problem)
            sharded = bool(handle.uses_sharded_strategy)
            for p, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos, strict=True):
                start: int | None
                end: int | None
                if not sharded:
                    start, end = 0, shape.numel()
                elif info.in_shard:
                    start, end = info.intra_param_start_idx, info.intra_param_end_idx + 1
                else:
                    start = end = None
                self._places[id(p)] = _Place(torch.Size(shape), start, end, unit.process_group, sharded)

    def __len__(self) -> int:
        return len(self._places)

    def holds(self, t: Tensor) -> bool:
        """Whether ``t`` is an original parameter of an FSDP unit."""
        return id(t) in self._places

    def shape(self, t: Tensor) -> torch.Size:
        """The full shape of the parameter ``t``."""
        return self._places[id(t)].shape

    def gather(self, t: Tensor) -> Tensor:
        """A detached full copy of the parameter ``t`` (a collective over its unit's ranks, if sharded)."""
        place = self._places[id(t)]
        if not place.sharded:
            return t.detach().reshape(place.shape).clone()
        full = t.new_zeros(place.shape.numel())
        if place.start is not None:
            full[place.start : place.end] = t.detach().reshape(-1)
        torch.distributed.all_reduce(full, group=place.group)
        return full.view(place.shape)

    def piece(self, t: Tensor, grad: Tensor, summed: bool) -> Tensor:
        """This rank's fragment of the full gradient ``grad`` of ``t`` (summed over all ranks first if ``summed``).

        Inside ``no_sync``: the full gradient itself, ×W if ``summed`` (a later reduce-scatter averages it).
        """
        place = self._places[id(t)]
        if not self.synced:
            return (grad * torch.distributed.get_world_size() if summed else grad).reshape(place.shape).clone()
        if summed:
            grad = grad.contiguous().clone()
            torch.distributed.all_reduce(grad)
        flat = grad.reshape(-1)
        if place.start is None:
            return flat[:0].clone()
        return flat[place.start : place.end].reshape(t.shape).clone()


def add_to_gradients(pieces: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Add each ``(parameter, fragment)``'s fragment to the parameter's (sharded) ``.grad``, after the backward."""
    for p, piece in pieces:
        if piece.numel() == 0:
            continue
        if p.grad is None:
            if piece.shape != p.shape:  # inside `no_sync`: a full gradient, but the parameter is a fragment
                raise RuntimeError(
                    f"The CoMHE penalty's gradient (shape {tuple(piece.shape)}) could not be added under FSDP v1's "
                    f"no_sync: the parameter (a fragment of shape {tuple(p.shape)}) got no gradient from the loss. "
                    "HINT: regularize only layers that the loss uses (`CoMHE(exclude=...)`)."
                )
            p.grad = piece.to(device=p.device, dtype=p.dtype).clone()
        else:
            p.grad.add_(piece.to(device=p.grad.device, dtype=p.grad.dtype))


def _problem(orig_params: bool, sharding: str) -> str | None:
    if not orig_params:
        return (
            "CoMHE under FSDPStrategy (FSDP v1) needs `use_orig_params=True` (Lightning's default), got "
            "use_orig_params=False: the regularized layers' weights must stay their own parameters. HINT: remove "
            "`use_orig_params=False` from `FSDPStrategy(...)`."
        )
    if sharding in _HYBRID:
        return (
            f"CoMHE under FSDPStrategy (FSDP v1) supports sharding_strategy FULL_SHARD, SHARD_GRAD_OP or NO_SHARD, "
            f"got {sharding}. HINT: use `FSDPStrategy(sharding_strategy='FULL_SHARD')`, or FSDP2 "
            "(`ModelParallelStrategy`) for hybrid sharding."
        )
    return None


def unsupported_fsdp1(strategy: Any) -> str | None:
    """Why CoMHE cannot run under this ``FSDPStrategy``'s configuration (``None``: it can)."""
    kwargs = getattr(strategy, "kwargs", {}) or {}
    sharding = getattr(strategy, "sharding_strategy", None)
    return _problem(kwargs.get("use_orig_params", True) is not False, str(getattr(sharding, "name", sharding)))
