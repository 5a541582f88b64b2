r"""The penalty split across data-parallel ranks: a cost model and a deterministic, balanced plan. Pure PyTorch.

Under DDP every rank holds the same weights, so every rank computing the whole penalty repeats the same work
``W`` times. With a plan, rank ``r`` computes only its share :math:`R_r` (with :math:`\sum_r R_r = R`) and adds
the gradient of :math:`W R_r`; DDP's gradient all-reduce averages over ranks, which yields exactly
:math:`\frac{1}{W}\sum_r W \nabla R_r = \nabla R` (up to float reassociation).

The unit of work (the family's :meth:`~lightning_comhe.energies.EnergyFamily.shard_unit`) is one **(neuron set,
projection)** pair for Gaussian random projections (``C`` units per set), one neuron set for MHE, half-space MHE
and the expected kernel, and one whole group for learned projections (a group's projection is fitted as one
tensor, so it has one owner) and structured ones. Each unit's cost is modelled in multiply-adds from the shapes alone
(:func:`unit_cost`). The units are laid out in a fixed order (groups in the regularizer's order, then sets, then
projections) and cut into ``W`` contiguous runs of about equal cost: rank ``r`` owns the units whose cumulative-
cost midpoint falls in :math:`[r T / W, (r + 1) T / W)`. The plan depends only on the groups' shapes, the
configuration and ``W``, so every rank computes the same plan without communicating, and recomputes it the same
way when the selection changes.

Example::

    >>> from lightning_comhe.config import EnergyConfig
    >>> from lightning_comhe.energies import Group, SetRef, build_energy
    >>> groups = [Group("rp:projected:64x576", "projected", 1.0, 64, 576, [SetRef("a", 0, 3)])]
    >>> family = build_energy(EnergyConfig(variant="random", num_projections=4))
    >>> plan = plan_shards(groups, family, world_size=2)
    >>> [sorted(p["rp:projected:64x576"]) for p in plan]
    [[(0, 0, 4), (1, 0, 2)], [(1, 2, 4), (2, 0, 4)]]
"""

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_comhe._validation import check_int
from lightning_comhe.config import EnergyConfig
from lightning_comhe.energies.base import EnergyFamily, Group

__all__ = ["Part", "ShardPlan", "imbalance", "plan_shards", "rank_costs", "unit_cost"]

#: ``(set index, first projection, end projection)`` of a group: the projections ``[start, stop)`` of one set
#: (``(s, 0, 1)`` for an energy without projections, ``(s, 0, C)`` for a whole set of a random-projection group).
Part = tuple[int, int, int]
#: Per rank: group key -> the parts of that group the rank computes (absent key: none).
ShardPlan = list[dict[str, list[Part]]]


@dataclass(frozen=True)
class _Unit:
    key: str
    set_index: int
    start: int
    stop: int
    cost: float


def unit_cost(config: EnergyConfig, group: Group) -> float:
    """Modelled multiply-adds of one unit of ``group`` (forward; backward is about twice that, for every unit).

    * full-space / half-space MHE, the expected RP kernel, the peers: the Gram :math:`N^2 d` of one set;
    * random projection: one projection of one set, :math:`N d k + N^2 k`;
    * learned projections: the whole group, :math:`G ((T + 1)(N d k + N^2 k) + N^2 d)` for ``T`` inner steps.
    """
    n, d = group.num_neurons, group.dim
    if group.mode != "projected" or (config.projection_kind == "expected" and config.variant == "random"):
        return float(n * n * d)
    k = int(config.dim or 1)
    projected = float(n * d * k + n * n * k)
    if config.variant == "random":
        return projected
    steps = int(config.steps or 0)
    return group.num_sets * ((steps + 1) * projected + n * n * d)


def _units(groups: Sequence[Group], family: EnergyFamily) -> list[_Unit]:
    units = []
    config = family.config
    for group in groups:
        cost = unit_cost(config, group)
        unit = family.shard_unit(group)
        if unit == "group":
            units.append(_Unit(group.key, -1, 0, 1, _group_cost(config, group, cost)))
            continue
        per_set = int(config.num or 1) if unit == "projection" else 1
        for s in range(group.num_sets):
            for c in range(per_set):
                units.append(_Unit(group.key, s, c, c + 1, cost))
    return units


def _group_cost(config: EnergyConfig, group: Group, unit: float) -> float:
    """The cost of a whole group from :func:`unit_cost`'s: learned projections are priced whole already."""
    if group.mode == "projected" and config.variant in ("angle", "adversarial"):
        return unit
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
        projections) has the one part ``(-1, 0, 1)``. Consecutive projections of one set are merged into one part.
    """
    world_size = check_int("world_size", world_size, 1)  # type: ignore[assignment]
    units = _units(groups, family)
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
    costs = [0.0] * len(plan)
    keys = {(u.key, u.set_index, u.start): u.cost for u in _units(groups, family)}
    for rank, share in enumerate(plan):
        for key, parts in share.items():
            for s, start, stop in parts:
                costs[rank] += sum(keys[(key, s, c)] for c in range(start, stop))
    return costs


def imbalance(costs: Sequence[float]) -> float:
    """``max / mean`` of the ranks' costs: 1 is a perfect split; the step waits for the slowest rank."""
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean > 0 else 1.0
