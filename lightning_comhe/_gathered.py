r"""A penalty read from sharded weights (FSDP2, FSDP v1, ZeRO-3): gathered one group at a time. Pure PyTorch.

Under FSDP2 every weight is a ``DTensor`` shard, under FSDP v1 a 1-D fragment of itself
(:class:`~lightning_comhe._fsdp1.Fsdp1Layout`) and under DeepSpeed ZeRO-3 an empty placeholder outside its
module's forward. The penalty's neurons are read from full copies, gathered (a collective) as local leaves, and
**one group's weights at a time**: the leaves of a group are freed once that group's term has been differentiated,
so no rank ever holds more than one group's full weights (never the whole model).

Every rank computes only its share :math:`R_r` (``shard=True``), but every rank must join every gather. So the
groups are gathered in one fixed order, the same on every rank (:class:`GatheredWeights` ``units``), whatever
share a rank reads:

1. :meth:`GatheredWeights.full` gathers, on first use, the group that holds a weight, and first every group before
   it that this rank skipped (their gathers are collectives too; they are freed at once);
2. :meth:`GatheredWeights.settle` is called for every group in order, with this rank's term of it (``None`` if its
   share has none): it differentiates the term with respect to the group's leaves (no collective), reduces the
   gradients over the ranks, keeps this rank's piece, and frees the leaves;
3. :meth:`GatheredWeights.phase` wraps a refresh: after one that read the neurons it gathers what is left, so that
   the next pass starts from the first group on every rank.

The pieces kept are 1/W of the gradient: under FSDP2 the parameter's ``DTensor`` shard of
:math:`\nabla \sum_r R_r` (``Partial`` → its placement: a reduce-scatter), added after FSDP2's own reduce-scatter;
under FSDP v1 this rank's fragment of it (an all-reduce, then the fragment), added to the fragment's gradient
after the backward pass; under ZeRO-3 this rank's partition slice of it (an all-reduce, then the slice), which
:class:`ZeroPartitionGradient` delivers in the backward, while the parameter holds its full gradient, just before
ZeRO-3 reduce-scatters and averages that gradient into the partitions.
"""

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import Tensor

from lightning_comhe._fsdp1 import Fsdp1Layout

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - a torch build without distributed support
    _DTensor = None

__all__ = ["GatheredWeights", "ZeroPartitionGradient", "gather_zero3", "gathered", "is_zero3", "mesh_covers_world"]

_ACTIVE: contextvars.ContextVar["GatheredWeights | None"] = contextvars.ContextVar("comhe_gathered", default=None)


class ZeroPartitionGradient:
    r"""This rank's slice of a ZeRO-3 parameter's penalty gradient, delivered into its full gradient in the backward.

    ZeRO-3 averages the full gradients of the ``W`` ranks into their partitions; rank ``r`` adds ``W`` times its
    slice, at its partition's place (zeros elsewhere), so that the average holds exactly the slice.
    """

    def __init__(self, piece: Tensor, rank: int, world: int, shape: torch.Size) -> None:
        self.piece, self.rank, self.world, self.shape = piece, rank, world, shape

    def __call__(self, grad: Tensor) -> Tensor:
        """The addend of ``grad`` (the parameter's full gradient, of shape ``ds_shape``)."""
        size = self.piece.numel()
        flat = grad.new_zeros(size * self.world)
        flat[self.rank * size : (self.rank + 1) * size] = self.piece.to(grad.dtype) * self.world
        return flat[: grad.numel()].view_as(grad)

    def add_(self, other: "ZeroPartitionGradient") -> "ZeroPartitionGradient":
        """Add another piece of the same parameter (a parameter read by two groups)."""
        self.piece = self.piece + other.piece
        return self


class GatheredWeights:
    """The sharded weights of one penalized step, gathered as local leaves one unit (a group's weights) at a time.

    Args:
        units: The weights of each group, in group order (the same on every rank).
        summed: Whether each rank's terms are its share of the penalty, whose gradients are summed over the ranks
            (``shard=True``); else every rank computes the whole penalty and keeps its piece of its own gradient.
        layout: The FSDP v1 parameters' layout, under ``FSDPStrategy``.
    """

    #: The most elements any instance held at once in this process (a diagnostic; tests reset it to 0).
    high_water: ClassVar[int] = 0

    def __init__(
        self, units: Sequence[Sequence[Tensor]] = (), summed: bool = True, layout: Fsdp1Layout | None = None
    ) -> None:
        self._units = [list(u) for u in units]
        self._summed = summed
        self._layout = layout
        self._next = 0  # the next unit to gather
        self._index = -1  # the unit held now
        self._leaves: dict[int, tuple[Tensor, Tensor]] = {}  # id(weight) -> (weight, local full leaf)
        self._pieces: dict[int, tuple[Tensor, object]] = {}  # id(weight) -> (weight, its piece of the gradient)
        self._locked = False
        #: Applied to each term before it is differentiated (the lazy / DDP factor, the loss scale).
        self.scale: Callable[[Tensor], Tensor] = lambda term: term
        #: The most elements held as gathered leaves at once (one group's weights).
        self.peak = 0

    def holds(self, t: Tensor) -> bool:
        """Whether ``t`` is a sharded weight that this context gathers (``DTensor``, FSDP v1 or ZeRO-3 parameter)."""
        return _is_dtensor(t) or is_zero3(t) or (self._layout is not None and self._layout.holds(t))

    def full(self, t: Tensor) -> Tensor:
        """The gathered leaf of the sharded weight ``t`` (gathering its unit: collectives)."""
        entry = self._leaves.get(id(t))
        if entry is not None:
            return entry[1]
        if self._locked:
            raise RuntimeError(
                "A sharded weight was read where no rank gathers (an energy family's refresh that reads the neurons "
                "must set `refresh_reads = True`)."
            )
        target = next((i for i in range(self._next, len(self._units)) if any(p is t for p in self._units[i])), None)
        if target is None:  # not in the plan (e.g. a tensor computed from the weights): gathered ad hoc, as it is
            self._add_leaf(t)
        else:
            while self._next <= target:
                self._gather(self._next)
        return self._leaves[id(t)][1]

    def _add_leaf(self, t: Tensor) -> None:
        if self._layout is not None and self._layout.holds(t):
            full = self._layout.gather(t)
        elif is_zero3(t):
            full = gather_zero3(t)
        elif _is_dtensor(t):
            full = t.detach().full_tensor()
        else:  # a plain tensor among sharded ones (a module FSDP v1 ignores): read as it is
            full = t.detach()
        self._leaves[id(t)] = (t, full.requires_grad_(t.requires_grad))
        self.peak = max(self.peak, sum(leaf.numel() for _, leaf in self._leaves.values()))
        GatheredWeights.high_water = max(GatheredWeights.high_water, self.peak)

    def _gather(self, index: int) -> None:
        self._leaves.clear()
        for t in self._units[index]:
            self._add_leaf(t)
        self._index, self._next = index, index + 1

    def __len__(self) -> int:
        return len(self._leaves)

    def settle(self, index: int, term: Tensor | None) -> None:
        """Group ``index``'s ``term`` on this rank (``None``: none): keep this rank's piece of its gradient, free it.

        All ranks must call it for every group, in order: one reduction per weight of the group.
        """
        if self._index != index:  # this rank read none of it: join its gather all the same
            while self._next <= index:
                self._gather(self._next)
        pairs = [(p, leaf) for p, leaf in self._leaves.values() if leaf.requires_grad]
        grads: Sequence[Tensor | None] = (None,) * len(pairs)
        if pairs and term is not None and term.requires_grad:
            grads = torch.autograd.grad(self.scale(term), [leaf for _, leaf in pairs], allow_unused=True)
        for (p, leaf), g in zip(pairs, grads, strict=True):
            piece = self._piece(p, torch.zeros_like(leaf) if g is None else g)
            held = self._pieces.get(id(p))
            if held is not None:  # a weight read by two groups
                piece = held[1].add_(piece) if isinstance(piece, ZeroPartitionGradient) else held[1] + piece
            self._pieces[id(p)] = (p, piece)
        self._leaves.clear()
        self._index = -1

    def _piece(self, p: Tensor, g: Tensor) -> object:
        if self._layout is not None and self._layout.holds(p):
            return self._layout.piece(p, g, self._summed)
        if not is_zero3(p) and not _is_dtensor(p):  # a plain tensor: the whole gradient, like DDP's
            if self._summed:
                g = g.contiguous().clone()
                torch.distributed.all_reduce(g)
            return g
        if is_zero3(p):
            group = getattr(p, "ds_process_group", None)
            world = torch.distributed.get_world_size(group)
            rank = torch.distributed.get_rank(group)
            size = p.ds_tensor.numel()
            flat = g.new_zeros(size * world)
            flat[: g.numel()] = g.reshape(-1)
            if self._summed:
                torch.distributed.all_reduce(flat, group=group)
            return ZeroPartitionGradient(flat[rank * size : (rank + 1) * size].clone(), rank, world, p.ds_shape)
        from torch.distributed.tensor import DTensor, Partial, Replicate

        mesh = p.device_mesh
        placement = Partial() if self._summed else Replicate()
        return DTensor.from_local(g, mesh, [placement] * mesh.ndim, run_check=False).redistribute(mesh, p.placements)

    @contextmanager
    def phase(self, reads: bool) -> Iterator[None]:
        """A pass over the groups that only reads (a refresh), with every rank joining every gather.

        ``reads=True``: after it, the groups this rank did not reach are gathered (every rank must join) and freed,
        and the next pass starts from the first group. ``reads=False``: no rank gathers; a read raises.
        """
        self._locked = not reads
        try:
            yield
        finally:
            self._locked = False
        if reads:
            while self._next < len(self._units):
                self._gather(self._next)
            self._leaves.clear()
            self._next, self._index = 0, -1

    def shard_gradients(self) -> list[tuple[Tensor, object]]:
        """``(weight, its piece)`` for every weight settled.

        A piece is a ``DTensor`` shard, an FSDP v1 fragment (a tensor), a :class:`ZeroPartitionGradient`, or a plain
        weight's whole gradient.
        """
        return list(self._pieces.values())


def _is_dtensor(t: Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def is_zero3(t: Tensor) -> bool:
    """Whether ``t`` is a parameter partitioned by DeepSpeed ZeRO-3 (an empty placeholder outside its forward)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_shape")


def gather_zero3(t: Tensor) -> Tensor:
    """A detached full copy of the ZeRO-3 parameter ``t`` (``deepspeed.zero.GatheredParameters``: a collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
        return t.detach().clone()


@contextmanager
def gathered(
    units: Sequence[Sequence[Tensor]] = (), summed: bool = True, layout: Fsdp1Layout | None = None
) -> Iterator[GatheredWeights]:
    """A context in which :func:`lightning_comhe._extractors.full` reads sharded weights as local leaves.

    It yields the :class:`GatheredWeights` (of ``units``, ``summed`` and ``layout``) that gathers them.
    """
    weights = GatheredWeights(units, summed, layout)
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
