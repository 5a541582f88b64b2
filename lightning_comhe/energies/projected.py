r"""The CoMHE families: half-space MHE of projected neurons (Lin et al., CVPR 2020).

* ``"random"`` (RP-CoMHE): the mean over ``C`` fresh random ``k × d`` projections of half-space MHE;
* ``"angle"`` (AP-CoMHE): half-space MHE after a projection fitted to preserve the angles;
* ``"adversarial"``: half-space MHE after a projection fitted to maximise the energy.

A hidden set whose dimension ``d`` is at most ``k`` gets half-space MHE without projection: this generalizes the
official rule for the first layer (``d = 27 <= k``). The classifier gets full-space MHE (the base class's route).
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_comhe.config import EnergyConfig
from lightning_comhe.energies.base import EnergyFamily, Group, NeuronsOf, mhe_energy
from lightning_comhe.functional._dtype import compute_dtype
from lightning_comhe.functional.energy import projected_energy
from lightning_comhe.functional.expected import expected_projected_energy
from lightning_comhe.projections import AdversarialProjection, AngleProjection, RandomProjection
from lightning_comhe.projections.learned import as_index

__all__ = ["LearnedProjectionEnergy", "ProjectedFamily", "RandomProjectionEnergy"]

#: The side optimizer's learning rate when neither ``inner_lr`` nor the main optimizer's is known (official base lr).
DEFAULT_INNER_LR = 0.1


class ProjectedFamily(EnergyFamily):
    """Shared routing of the projected families: ``"projected"`` if ``d > k``, else unprojected ``"half"``."""

    def hidden_mode(self, n: int, d: int) -> str:
        """``"half"`` for ``d <= k``, else ``"projected"``."""
        assert self.config.dim is not None
        return "half" if d <= self.config.dim else "projected"

    def describe(self, groups: Sequence[Group]) -> str:
        """Which layers run unprojected."""
        full = list(dict.fromkeys(m.layer for g in groups if g.mode == "half" for m in g.members))
        if not full:
            return ""
        more = f", … and {len(full) - 5} more" if len(full) > 5 else ""
        return f"unprojected (d <= k={self.config.dim}): {', '.join(full[:5])}{more}"

    projector: Any  # RandomProjection | AngleProjection | AdversarialProjection (None where nothing is drawn)

    def state_dict(self) -> dict[str, Any]:
        """``{"projector": ...}``: the generators and draws, or the fitted projections and their side optimizer."""
        return {"projector": None if self.projector is None else self.projector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the projector (none saved: keep the fresh one)."""
        if self.projector is not None and state.get("projector") is not None:
            self.projector.load_state_dict(state["projector"])

    def _kw(self) -> dict[str, Any]:
        return {"power": self.config.s, "angular": self.config.is_angular, "eps": self.config.eps}


class RandomProjectionEnergy(ProjectedFamily):
    r"""``"random"``: :math:`\frac{1}{C}\sum_c E([W P_c^\top; -W P_c^\top])` with fresh projections.

    With ``projection_kind="expected"`` the mean over ``C → ∞`` Gaussian projections, computed exactly
    (:func:`~lightning_comhe.functional.expected.expected_projected_energy`): no draws and no random state.
    """

    name = "random"

    def __init__(self, config: EnergyConfig) -> None:
        super().__init__(config)
        assert config.dim is not None
        if config.projection_kind == "expected":
            self.projector = None  # the exact C → ∞ mean: nothing is drawn
            return
        assert config.num is not None
        self.projector = RandomProjection(
            dim=config.dim,
            num=config.num,
            resample_every=config.resample_every,
            seed=config.seed,
            kind=config.projection_kind,
        )

    def refresh(self, groups: Sequence[Group], neurons_of: NeuronsOf) -> None:
        """Redraw the projections when due (every ``resample_every`` refreshes)."""
        if self.projector is not None:
            self.projector.step()

    def shard_unit(self, group: Group) -> str:
        """Gaussian projections split per (set, projection); the expected kernel per set; structured kinds whole."""
        if group.mode != "projected":
            return super().shard_unit(group)
        if self.projector is None:
            return "set"
        return "projection" if self.projector.kind == "gaussian" else "group"

    def energy_parts(
        self, group: Group, neurons: Tensor, parts: Sequence[tuple[int, int, int]]
    ) -> tuple[Tensor, list[int]]:
        r"""Per part ``(s, c0, c1)``: :math:`\frac{1}{C}\sum_{c_0 \le c < c_1} E(W_s P_{s,c}^\top)` per part."""
        if self.shard_unit(group) != "projection":
            return super().energy_parts(group, neurons, parts)
        assert self.projector is not None
        proj = self.projector.projections(
            group.key, neurons.shape[0], group.dim, neurons.device, compute_dtype(neurons), parts=parts
        )  # only this share's projections are drawn
        num = proj.shape[1]
        whole = [s for s, c0, c1 in parts if c0 == 0 and c1 == num]
        values, sets = [], []
        if whole:
            pick = as_index(whole)  # a run of consecutive sets is read as a view (no copy)
            values.append(
                projected_energy(neurons[pick], proj[pick], half_space=True, check_finite=False, **self._kw())
            )
            sets += whole
        for s, c0, c1 in parts:
            if c0 == 0 and c1 == num:
                continue
            e = projected_energy(
                neurons[s : s + 1], proj[s : s + 1, c0:c1], half_space=True, check_finite=False, **self._kw()
            )
            values.append(e * ((c1 - c0) / num))  # the mean over [c0, c1) times its share of the C projections
            sets.append(s)
        return torch.cat(values), sets

    def energy(self, group: Group, neurons: Tensor) -> Tensor:
        """The mean projected half-space energy of every set (unprojected modes: the base class)."""
        if group.mode != "projected":
            return super().energy(group, neurons)
        if self.projector is None:
            cfg = self.config
            assert cfg.dim is not None
            return expected_projected_energy(
                neurons, cfg.dim, cfg.s, angular=cfg.is_angular, eps=cfg.eps, check_finite=False
            )
        if self.projector.kind != "gaussian":
            # structured projections are applied, never materialised: (G, C, N, k) -> half-space energy per set
            v = self.projector.project(group.key, neurons)
            g, c, n, k = v.shape
            return mhe_energy(self.config, v.reshape(g * c, n, k), half_space=True).reshape(g, c).mean(-1)
        proj = self.projector.projections(
            group.key, neurons.shape[0], group.dim, neurons.device, compute_dtype(neurons)
        )
        return projected_energy(neurons, proj, half_space=True, check_finite=False, **self._kw())


class LearnedProjectionEnergy(ProjectedFamily):
    r"""``"angle"`` / ``"adversarial"``: one learned ``k × d`` projection per set, fitted by a side SGD."""

    name = "angle"
    uses_lr = True
    refresh_reads = True

    def __init__(self, config: EnergyConfig) -> None:
        super().__init__(config)
        assert config.dim is not None and config.steps is not None
        cls = AngleProjection if config.variant == "angle" else AdversarialProjection
        self.projector: AngleProjection | AdversarialProjection = cls(
            dim=config.dim,
            steps=config.steps,
            lr=DEFAULT_INNER_LR if config.inner_lr is None else config.inner_lr,
            lookahead=config.lookahead,
            seed=config.seed,
        )

    def inner_lr(self) -> float:
        """``inner_lr``, else the main optimizer's learning rate at the last refresh, else 0.1."""
        if self.config.inner_lr is not None:
            return float(self.config.inner_lr)
        return float(self.lr) if self.lr is not None else DEFAULT_INNER_LR

    def refresh(self, groups: Sequence[Group], neurons_of: NeuronsOf) -> None:
        """``inner_steps`` side-optimizer steps on the detached weights of every projected group (a rank: its sets)."""
        lr = self.inner_lr()
        for group in groups:  # one group's neurons at a time (gathered weights are freed group by group)
            if group.mode != "projected":
                continue
            with torch.no_grad():
                neurons = neurons_of(group).detach()
            self.projector.fit(group.key, neurons, lr=lr, sets=self._sets(group))

    def _sets(self, group: Group, parts: Sequence[tuple[int, int, int]] | None = None) -> list[int] | None:
        """The sets of ``group`` in ``parts`` (default: the share being refreshed); ``None``: all of them."""
        parts = parts if parts is not None else (None if self.share is None else self.share.get(group.key))
        if not parts or parts[0][0] < 0:
            return None
        return [s for s, _, _ in parts]

    def shard_unit(self, group: Group) -> str:
        """Projected groups split per set (each rank fits and evaluates its sets' projections); MHE sets by rows."""
        return "set" if group.mode == "projected" else super().shard_unit(group)

    def energy_parts(
        self, group: Group, neurons: Tensor, parts: Sequence[tuple[int, int, int]]
    ) -> tuple[Tensor, list[int]]:
        """The half-space energies of the share's sets, after their fitted projections."""
        sets = self._sets(group, parts)
        if group.mode != "projected" or sets is None:
            return super().energy_parts(group, neurons, parts)
        proj = self.projector.projections(group.key, neurons, lr=self.inner_lr(), sets=sets)
        mine = neurons[as_index(sets)]
        return projected_energy(mine, proj, half_space=True, check_finite=False, **self._kw()), sets

    def retain(self, groups: Sequence[Group]) -> None:
        """Fitted projections of groups that are gone or changed shape start afresh (their generators continue)."""
        self.projector.retain({g.key: (g.num_sets, g.dim) for g in groups if g.mode == "projected"})

    def energy(self, group: Group, neurons: Tensor) -> Tensor:
        """Half-space energy after the fitted projection (with the configured look-ahead)."""
        if group.mode != "projected":
            return super().energy(group, neurons)
        proj = self.projector.projections(group.key, neurons, lr=self.inner_lr())
        return projected_energy(neurons, proj, half_space=True, check_finite=False, **self._kw())
