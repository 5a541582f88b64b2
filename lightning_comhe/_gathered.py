r"""A penalty split across FSDP2 ranks: weights gathered as local leaves, shares' gradients reduce-scattered.

Pure PyTorch (DeepSpeed only for its ZeRO-3 parameters). DeepSpeed ZeRO-3 uses the same leaves: its parameters are
empty placeholders outside their module's forward, so every penalized step gathers them
(``deepspeed.zero.GatheredParameters``), and the gradients with respect to the leaves are delivered during the
backward as under DDP; ZeRO-3 then averages them over the ranks into its partitions.

Under FSDP2 every weight is a ``DTensor`` shard and the neurons are read from ``full_tensor()`` (an all-gather).
Every rank computing the whole penalty makes ``full_tensor``'s default backward right (each rank keeps its chunk
of an identical gradient), but a rank that computes only its share :math:`R_r` must *sum* the ranks' gradients:

1. inside :class:`GatheredWeights`, :func:`lightning_comhe._extractors.full` gathers each ``DTensor`` once, as a
   detached leaf, in the order the neurons are read; the caller reads every group's neurons on every rank, so the
   all-gathers are the same collectives in the same order on every rank;
2. :meth:`GatheredWeights.shard_gradients` differentiates :math:`R_r` with respect to those local leaves (no
   collective), then reduce-scatters each full gradient into the parameter's placement, summing over ranks
   (``Partial`` → the parameter's ``Shard``), leaf by leaf in gathering order. The result, on every rank, is its
   shard of :math:`\nabla \sum_r R_r = \nabla R`: added after FSDP2's own reduce-scatter, nothing is rescaled.
"""

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["GatheredWeights", "gather_zero3", "gathered", "is_zero3", "mesh_covers_world"]

_ACTIVE: contextvars.ContextVar["GatheredWeights | None"] = contextvars.ContextVar("comhe_gathered", default=None)


class GatheredWeights:
    """The ``DTensor`` weights gathered during one penalized step, each as a local leaf that requires grad."""

    def __init__(self) -> None:
        self._leaves: dict[int, tuple[Tensor, Tensor]] = {}  # id(DTensor) -> (DTensor, local full leaf)

    def full(self, t: Tensor) -> Tensor:
        """The gathered leaf of the ``DTensor`` or ZeRO-3 parameter ``t`` (gathered on first use; a collective then)."""
        entry = self._leaves.get(id(t))
        if entry is None:
            full = gather_zero3(t) if is_zero3(t) else t.detach().full_tensor()
            entry = self._leaves[id(t)] = (t, full.requires_grad_(t.requires_grad))
        return entry[1]

    def __len__(self) -> int:
        return len(self._leaves)

    def shard_gradients(self, penalty: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(DTensor parameter, its shard of ∇ Σ_r penalty_r)`` for every gathered leaf that requires grad.

        All ranks must call it together, with their own share as ``penalty``: one reduce-scatter per leaf, in
        gathering order (zeros where this rank's share does not reach the leaf).
        """
        from torch.distributed.tensor import DTensor, Partial

        pairs = [(p, leaf) for p, leaf in self._leaves.values() if leaf.requires_grad]
        if not pairs:
            return []
        if penalty.requires_grad:
            grads = torch.autograd.grad(penalty, [leaf for _, leaf in pairs], allow_unused=True)
        else:
            grads = (None,) * len(pairs)
        out = []
        for (p, leaf), g in zip(pairs, grads, strict=True):
            g = torch.zeros_like(leaf) if g is None else g
            if is_zero3(p):  # ZeRO-3 reduces (averages) the full gradient into its partitions itself
                out.append((p, g))
                continue
            mesh = p.device_mesh
            partial = DTensor.from_local(g, mesh, [Partial()] * mesh.ndim, run_check=False)
            out.append((p, partial.redistribute(mesh, p.placements)))
        return out


def is_zero3(t: Tensor) -> bool:
    """Whether ``t`` is a parameter partitioned by DeepSpeed ZeRO-3 (an empty placeholder outside its forward)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_shape")


def gather_zero3(t: Tensor) -> Tensor:
    """A detached full copy of the ZeRO-3 parameter ``t`` (``deepspeed.zero.GatheredParameters``: a collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
        return t.detach().clone()


@contextmanager
def gathered() -> Iterator[GatheredWeights]:
    """A context in which :func:`lightning_comhe._extractors.full` reads ``DTensor`` weights as local leaves.

    It yields the :class:`GatheredWeights` that gathers them.
    """
    weights = GatheredWeights()
    token = _ACTIVE.set(weights)
    try:
        yield weights
    finally:
        _ACTIVE.reset(token)


def active() -> GatheredWeights | None:
    """The :class:`GatheredWeights` of the enclosing :func:`gathered` context, if any."""
    return _ACTIVE.get()


def mesh_covers_world(params: Sequence[Tensor], world_size: int) -> bool:
    """Whether every tensor of ``params`` is a ``DTensor`` on a mesh of all ``world_size`` ranks.

    Each placement must be ``Shard`` or ``Replicate``: summing the shares over the mesh then sums them over the world.
    """
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - a torch build without distributed support
        return False
    for p in params:
        if not isinstance(p, DTensor) or p.device_mesh.size() != world_size:
            return False
        if not all(isinstance(pl, (Shard, Replicate)) for pl in p.placements):
            return False
    return bool(params)
