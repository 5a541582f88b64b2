"""The penalty split across ranks (lightning_comhe.sharding): the plan, and the shares against the whole penalty.

Single-process: the shares of every rank of a plan are computed one after the other on one regularizer; their
penalties (and the gradients of ``W R_r``, averaged over ranks as DDP does) must equal the unsharded penalty and
its gradient in float64. The 2-process DDP runs are in ``tests/test_distributed.py``.
"""

from typing import Any

import pytest
import torch
from torch import nn

from lightning_comhe import CoMHERegularizer
from lightning_comhe.sharding import imbalance, plan_shards, rank_costs

VARIANTS: dict[str, dict[str, Any]] = {
    "mhe": {"variant": "mhe"},
    "half_mhe": {"variant": "half_mhe"},
    "random": {"variant": "random", "projection_dim": 4, "num_projections": 5},
    "expected": {"variant": "random", "projection_dim": 5, "projection_kind": "expected"},
    "srht": {"variant": "random", "projection_dim": 4, "num_projections": 3, "projection_kind": "srht"},
    "angle": {"variant": "angle", "projection_dim": 4, "inner_steps": 2, "lookahead": "second"},
    "adversarial": {"variant": "adversarial", "projection_dim": 4, "inner_steps": 2},
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, groups=1),
        nn.Conv2d(8, 8, 3, groups=2),  # two sets of 4 neurons
        nn.Conv2d(8, 8, 3),
        nn.Flatten(),
        nn.Linear(8, 12),
        nn.Linear(12, 12),
        nn.Linear(12, 5),
    ).double()


def _grads(model: nn.Module, penalty: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize("world", [2, 3, 7, 64])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_shares_add_up_to_the_whole_penalty_and_gradient(name: str, world: int) -> None:
    model = _model()
    reg = CoMHERegularizer(model, **VARIANTS[name], seed=3)
    reg.refresh(0.1)
    whole = reg.compute()
    plan = reg.shard_plan(world)
    assert len(plan) == world
    penalty = torch.zeros((), dtype=torch.float64)
    want = _grads(model, whole.penalty)
    grads = [torch.zeros_like(g) for g in want]
    energies: dict[str, torch.Tensor] = {}
    for share in plan:
        part = reg.compute(share)
        penalty = penalty + part.penalty.detach()
        if not share:  # more ranks than units: nothing to compute, no gradient
            assert part.penalty.item() == 0.0 and not part.energies
            continue
        for acc, g in zip(grads, _grads(model, world * part.penalty), strict=True):
            acc += g / world  # DDP averages the ranks' gradients of W·R_r
        for layer, e in part.energies.items():
            energies[layer] = energies.get(layer, 0) + e
    torch.testing.assert_close(penalty, whole.penalty.detach(), rtol=1e-12, atol=1e-12)
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert energies.keys() == whole.energies.keys()
    for layer, e in whole.energies.items():
        torch.testing.assert_close(energies[layer], e, rtol=1e-12, atol=1e-12)


def test_the_plan_is_deterministic_complete_and_balanced() -> None:
    reg = CoMHERegularizer(_model(), **VARIANTS["random"])
    plan = reg.shard_plan(4)
    assert plan == plan_shards(reg.groups, reg.family, 4)  # a pure function of shapes, config and W
    covered: dict[str, list[tuple[int, int]]] = {}
    for share in plan:
        for key, parts in share.items():
            for s, start, stop in parts:
                covered.setdefault(key, []).extend((s, c) for c in range(start, stop))
    for group in reg.groups:  # every (set, projection), or every row of an MHE set, exactly once
        units = 5 if group.mode == "projected" else group.num_neurons
        assert sorted(covered[group.key]) == [(s, c) for s in range(group.num_sets) for c in range(units)]
    costs = rank_costs(reg.groups, reg.family, plan)
    assert imbalance(costs) < 1.5
    assert imbalance([1.0, 1.0]) == 1.0 and imbalance([3.0, 1.0]) == 1.5


def test_learned_projections_are_owned_set_by_set() -> None:
    """Every set of a learned group has exactly one owner; a group's sets may be spread over ranks."""
    reg = CoMHERegularizer(_model(), **VARIANTS["angle"])
    plan = reg.shard_plan(3)
    modes = {g.key: g.mode for g in reg.groups}
    owners: dict[tuple[str, int], list[int]] = {}
    for rank, share in enumerate(plan):
        for key, parts in share.items():
            if modes[key] == "projected":
                assert all(start == 0 and stop == 1 for _, start, stop in parts)
                for s, _, _ in parts:
                    owners.setdefault((key, s), []).append(rank)
    projected = [g for g in reg.groups if g.mode == "projected"]
    assert projected and sorted(owners) == sorted((g.key, s) for g in projected for s in range(g.num_sets))
    assert all(len(ranks) == 1 for ranks in owners.values())


@pytest.mark.parametrize("name", ["angle", "adversarial"])
def test_a_rank_fits_only_its_own_sets_and_they_equal_the_whole_fit(name: str) -> None:
    """Fitting a rank's sets gives those sets exactly the projections of a whole fit; the other sets are not fitted."""
    whole = CoMHERegularizer(_model(), **VARIANTS[name], seed=3)
    world = 3
    ranks = [CoMHERegularizer(_model(), **VARIANTS[name], seed=3) for _ in range(world)]
    for _ in range(2):  # two refreshes: the fitted state carries over
        whole.refresh(0.1)
        for r, reg in enumerate(ranks):
            reg.refresh(0.1, reg.shard_plan(world)[r])
    fresh = CoMHERegularizer(_model(), **VARIANTS[name], seed=3)  # P at initialization (nothing fitted)
    for group in (g for g in whole.groups if g.mode == "projected"):
        ref = whole.family.projector.get_projection(group.key)
        init = fresh.family.projector.get_projection(group.key)
        if init is None:
            fresh.family.projector.objective(group.key, fresh.group_neurons(group).detach())
            init = fresh.family.projector.get_projection(group.key)
        for r, reg in enumerate(ranks):
            mine = [s for s, _, _ in reg.shard_plan(world)[r].get(group.key, [])]
            got = reg.family.projector.get_projection(group.key)
            if not mine:
                assert got is None  # never touched by this rank
                continue
            torch.testing.assert_close(got[mine], ref[mine], rtol=1e-12, atol=1e-12)
            others = [s for s in range(group.num_sets) if s not in mine]
            assert torch.equal(got[others], init[others])  # left at their initialization


def test_ranks_outnumbering_the_units_get_empty_shares_and_a_zero_penalty() -> None:
    reg = CoMHERegularizer(_model(), "angle", projection_dim=4)
    plan = reg.shard_plan(512)
    units = sum(1 if g.mode == "projected" else g.num_sets for g in reg.groups)  # whole learned groups, MHE sets
    assert units < sum(1 for share in plan if share) < 512  # MHE sets split into row blocks; the rest idle
    empty = next(share for share in plan if not share)
    assert reg.compute(empty).penalty.item() == 0.0


@pytest.mark.parametrize("world", [2, 8, 64])
def test_sets_larger_than_a_share_are_split_into_row_blocks(world: int) -> None:
    """One MHE set alone: it is split into row blocks (no rank idles) that partition its rows, with balanced costs."""
    from lightning_comhe.sharding import row_blocks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 200)).double()
    reg = CoMHERegularizer(model, "half_mhe", head=[])
    plan = reg.shard_plan(world)
    key = reg.groups[0].key
    blocks = sorted(part for share in plan for part in share[key])
    assert all(share for share in plan) and blocks[0][1] == 0 and blocks[-1][2] == 200
    assert all(a[2] == b[1] for a, b in zip(blocks, blocks[1:], strict=False))  # contiguous, no overlap
    assert imbalance(rank_costs(reg.groups, reg.family, plan)) < (1.25 if world < 64 else 1.6)  # 200 rows / 64
    reg.refresh()
    whole = reg.compute().penalty
    shares = sum(reg.compute(share).penalty for share in plan)
    torch.testing.assert_close(shares, whole, rtol=1e-12, atol=0)
    n = 1000
    for m in (1, 2, 7, 64):
        b = row_blocks(n, m)
        pairs = [(r1 - r0) * (n - 1) - (r0 + r1 - 1) * (r1 - r0) // 2 for r0, r1 in b]
        assert len(b) == m and b[0][0] == 0 and b[-1][1] == n and sum(pairs) == n * (n - 1) // 2
        assert max(pairs) / min(pairs) < 1.1 if m < 64 else True  # about equal numbers of pairs


def test_world_size_is_validated() -> None:
    reg = CoMHERegularizer(_model(), "mhe")
    with pytest.raises(ValueError, match="`world_size` must be an int >= 1, got 0"):
        reg.shard_plan(0)
