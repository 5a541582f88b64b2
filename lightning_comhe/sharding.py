r"""The penalty split across data-parallel ranks: a cost model and a deterministic, balanced plan. Pure PyTorch.

Under DDP every rank holds the same weights, so every rank computing the whole penalty repeats the same work
``W`` times. With a plan, rank ``r`` computes only its share :math:`R_r` (with :math:`\sum_r R_r = R`) and adds
the gradient of :math:`W R_r`; DDP's gradient all-reduce averages over ranks, which yields exactly
:math:`\frac{1}{W}\sum_r W \nabla R_r = \nabla R` (up to float reassociation).

The unit of work (the family's :meth:`~lightning_comhe.energies.EnergyFamily.shard_unit`) is one **(neuron set,
projection)** pair for Gaussian random projections (``C`` units per set; a rank draws only its own projections),
one neuron set for MHE, half-space MHE, the expected kernel and learned projections (a rank fits and evaluates
only its sets' projections: each set's fit depends on that set alone), and one whole group for structured ones.
An MHE set that alone costs more than a rank's share (ranks outnumber the sets) is split further into **row
blocks** of its pair matrix
(:func:`row_blocks`, computed by ``hyperspherical_energy(rows=...)``), so the share stays about ``1/W``. Each unit's
cost is modelled in multiply-adds from the shapes alone (:func:`unit_cost`). The units are laid out in a fixed
order (groups in the regularizer's order, then sets, then projections or rows) and cut into ``W`` contiguous runs of
about equal cost: rank ``r`` owns the units whose cumulative-cost midpoint falls in
:math:`[r T / W, (r + 1) T / W)`. The plan depends only on the groups' shapes, the configuration and ``W``, so every
rank computes the same plan without communicating, and recomputes it the same way when the selection changes.

Example::

    >>> from lightning_comhe.config import EnergyConfig
    >>> from lightning_comhe.energies import Group, SetRef, build_energy
    >>> groups = [Group("rp:projected:64x576", "projected", 1.0, 64, 576, [SetRef("a", 0, 3)])]
    >>> family = build_energy(EnergyConfig(variant="random", num_projections=4))
    >>> plan = plan_shards(groups, family, world_size=2)
    >>> [sorted(p["rp:projected:64x576"]) for p in plan]
    [[(0, 0, 4), (1, 0, 2)], [(1, 2, 4), (2, 0, 4)]]
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_comhe._validation import check_int
from lightning_comhe.config import EnergyConfig
from lightning_comhe.energies.base import EnergyFamily, Group

__all__ = [
    "ROWS_OVERHEAD",
    "UNIT_OVERHEAD",
    "Part",
    "ShardPlan",
    "imbalance",
    "plan_shards",
    "rank_costs",
    "row_blocks",
    "unit_cost",
]

#: ``(set index, first projection, end projection)`` of a group: the projections ``[start, stop)`` of one set
#: (``(s, 0, 1)`` for an energy without projections, ``(s, 0, C)`` for a whole set of a random-projection group).
Part = tuple[int, int, int]
#: Per rank: group key -> the parts of that group the rank computes (absent key: none).
ShardPlan = list[dict[str, list[Part]]]


#: Cost of a row block per pair relative to the fused kernel of a whole set (it runs the same fused tiles on its
#: rows, and every block normalizes its rows and those below: about 1.1-1.2 on CPU for a 1024 × 4608 half-space set).
#: The plan prices blocks with it, and splits a set only when the set alone costs more than a rank's share.
ROWS_OVERHEAD = 1.2


@dataclass(frozen=True)
class _Unit:
    key: str
    set_index: int
    start: int
    stop: int
    cost: float
    split: bool = False  # a whole MHE set, which may be cut into row blocks


#: The work of one energy evaluation that does not grow with the shapes (dispatch, small passes), in multiply-adds:
#: about 0.15 ms at this CPU's GEMM rate (``benchmarks/shard.py``), so many small sets are not priced as free.
UNIT_OVERHEAD = 2.0**21


def unit_cost(config: EnergyConfig, group: Group) -> float:
    """Modelled multiply-adds of one unit of ``group`` (forward; backward is about twice that, for every unit).

    Each energy evaluation costs :data:`UNIT_OVERHEAD` plus:

    * full-space / half-space MHE, the expected RP kernel, the peers: the Gram :math:`N^2 d` of one set (a row block
      of MHE: its share of the set's pairs, times :data:`ROWS_OVERHEAD`);
    * random projection: one projection of one set, :math:`N d k + N^2 k`;
    * learned projections: one set's fit and energy, :math:`(T + 1)(N d k + N^2 k) + N^2 d` for ``T`` inner steps
      (``T + 2`` evaluations).
    """
    n, d = group.num_neurons, group.dim
    if group.mode != "projected" or (config.projection_kind == "expected" and config.variant == "random"):
        return float(n * n * d) + UNIT_OVERHEAD
    k = int(config.dim or 1)
    projected = float(n * d * k + n * n * k)
    if config.variant == "random":
        return projected + UNIT_OVERHEAD
    steps = int(config.steps or 0)
    return (steps + 1) * projected + n * n * d + (steps + 2) * UNIT_OVERHEAD


def _pairs(n: int, start: int, stop: int) -> int:
    """The pairs ``(i, j > i)`` of the rows ``[start, stop)`` of an ``n × n`` pair matrix."""
    return (stop - start) * (n - 1) - (start + stop - 1) * (stop - start) // 2


def row_blocks(n: int, num_blocks: int) -> list[tuple[int, int]]:
    r"""``num_blocks`` consecutive row blocks of an ``n``-neuron set holding about equal numbers of pairs.

    Block ``b`` ends at row :math:`\mathrm{round}(n (1 - \sqrt{1 - (b+1)/m}))` (the upper triangle's rows get shorter
    downwards); empty blocks are dropped, so fewer may be returned for small ``n``.

    Example::

        >>> row_blocks(8, 2)
        [(0, 2), (2, 8)]
    """
    ends = [round(n * (1 - (1 - (b + 1) / num_blocks) ** 0.5)) for b in range(num_blocks)]
    bounds = [0] + [e for e in ends[:-1] if 0 < e < n] + [n]
    bounds = sorted(set(bounds))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _units(groups: Sequence[Group], family: EnergyFamily, world_size: int) -> list[_Unit]:
    units = []
    config = family.config
    for group in groups:
        cost = unit_cost(config, group)
        unit = family.shard_unit(group)
        if unit == "group":
            units.append(_Unit(group.key, -1, 0, 1, _group_cost(config, group, cost)))
            continue
        n = group.num_neurons
        per_set = int(config.num or 1) if unit == "projection" else 1
        for s in range(group.num_sets):
            if unit == "rows":
                units.append(_Unit(group.key, s, 0, n, cost, split=True))
                continue
            for c in range(per_set):
                units.append(_Unit(group.key, s, c, c + 1, cost))
    # an MHE set that costs more than a rank's share (ranks outnumber the sets) is split into row blocks of at most
    # half a share; a rank's consecutive blocks of one set are then computed as one block (one normalization)
    target = sum(u.cost for u in units) / world_size
    out = []
    for u in units:
        if not u.split or u.cost <= target:
            out.append(u)
            continue
        n = u.stop
        blocks = row_blocks(n, min(n, math.ceil(2 * u.cost * ROWS_OVERHEAD / target)))
        total = _pairs(n, 0, n)
        for start, stop in blocks:
            share = _pairs(n, start, stop) / total
            out.append(_Unit(u.key, u.set_index, start, stop, u.cost * ROWS_OVERHEAD * share))
    return out


def _group_cost(config: EnergyConfig, group: Group, unit: float) -> float:
    """The cost of a whole group from :func:`unit_cost`'s (a group computed by one rank)."""
    per_set = int(config.num or 1) if group.mode == "projected" and config.variant == "random" else 1
    return unit * group.num_sets * per_set


def plan_shards(groups: Sequence[Group], family: EnergyFamily, world_size: int) -> ShardPlan:
    """Split the penalty of ``groups`` into ``world_size`` shares of about equal modelled cost.

    Args:
        groups: The regularizer's groups, in its order.
        family: The energy family (its :meth:`~lightning_comhe.energies.EnergyFamily.shard_unit` and its
            configuration: the variant, ``k``, ``C`` and the inner steps enter the costs).
        world_size: ``W >= 1``.

    Returns:
        ``W`` dicts ``{group key: [(set, start, stop), ...]}``; a group computed whole (learned or structured
        projections) has the one part ``(-1, 0, 1)``; an MHE set has ``(s, 0, N)`` whole, or row blocks
        ``(s, r0, r1)``. Consecutive projections, or row blocks, of one set are merged into one part.
    """
    world_size = check_int("world_size", world_size, 1)  # type: ignore[assignment]
    units = _units(groups, family, world_size)
    total = sum(u.cost for u in units) or 1.0
    plan: ShardPlan = [{} for _ in range(world_size)]
    acc = 0.0
    for u in units:
        mid = acc + u.cost / 2
        acc += u.cost
        rank = min(world_size - 1, int(mid * world_size / total))
        parts = plan[rank].setdefault(u.key, [])
        if parts and parts[-1][0] == u.set_index and parts[-1][2] == u.start:
            parts[-1] = (u.set_index, parts[-1][1], u.stop)  # the next projection of the same set
        else:
            parts.append((u.set_index, u.start, u.stop))
    return plan


def rank_costs(groups: Sequence[Group], family: EnergyFamily, plan: ShardPlan) -> list[float]:
    """The modelled cost of each rank's share of ``plan``."""
    by_set: dict[tuple[str, int], list[_Unit]] = {}
    for u in _units(groups, family, len(plan)):
        by_set.setdefault((u.key, u.set_index), []).append(u)
    costs = [0.0] * len(plan)
    for rank, share in enumerate(plan):
        for key, parts in share.items():
            for s, start, stop in parts:
                costs[rank] += sum(u.cost for u in by_set[(key, s)] if start <= u.start and u.stop <= stop)
    return costs


def imbalance(costs: Sequence[float]) -> float:
    """``max / mean`` of the ranks' costs: 1 is a perfect split; the step waits for the slowest rank."""
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean > 0 else 1.0
