r"""The peer regularizers of the paper's tables (``docs/peers.md``): the same penalty on hidden sets and the head.

* ``"orthogonal"``: soft orthogonality :math:`\|G - I\|_F^2` (Bansal et al., NeurIPS 2018), ``G`` the smaller Gram
  matrix of the set (eps-normalized neurons with ``ortho_normalize=True``);
* ``"orthonormal"``: the same on the eps-normalized neurons;
* ``"srip"``: the spectral norm :math:`\sigma(G - I)` by power iteration on persistent vectors (Bansal et al.).
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_comhe.energies.base import EnergyFamily, Group, NeuronsOf, Route
from lightning_comhe.functional.orthogonality import soft_orthogonality, srip, srip_power_iteration
from lightning_comhe.projections import key_seed

__all__ = ["SoftOrthogonality", "SpectralRestrictedIsometry"]


class _Peer(EnergyFamily):
    shardable = False  # SRIP keeps per-group power-iteration vectors on every rank; the peers are cheap anyway

    def route(self, role: str, n: int, d: int) -> Route:
        """Every set, hidden or head, gets the family's penalty; κ by role."""
        kappa = self.config.head_kappa if role == "head" else self.config.hidden_weight
        return Route(role, self.config.variant, kappa)


class SoftOrthogonality(_Peer):
    r"""``"orthogonal"`` / ``"orthonormal"``: :math:`\|G - I\|_F^2` of raw (or normalized) neurons."""

    name = "orthogonal"

    def energy(self, group: Group, neurons: Tensor) -> Tensor:
        """Soft orthogonality of every set."""
        normalize = group.mode == "orthonormal" or self.config.ortho_normalize
        return soft_orthogonality(neurons, normalize=normalize, eps=self.config.eps, check_finite=False)


class SpectralRestrictedIsometry(_Peer):
    r"""``"srip"``: :math:`\sigma(G - I)` (or :math:`\sigma^2`) with persistent power-iteration vectors."""

    name = "srip"
    refresh_reads = True  # the power iterations run on the neurons

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vectors: dict[str, Tensor] = {}

    def _vector(self, group: Group, neurons: Tensor, advance: bool) -> Tensor:
        cfg = self.config
        current = self.vectors.get(group.key)
        if current is None:
            generator = torch.Generator().manual_seed(key_seed(cfg.seed, f"srip:{group.key}"))
            current = srip_power_iteration(
                neurons, None, cfg.srip_iterations, normalize=cfg.ortho_normalize, eps=cfg.eps, generator=generator
            )
        elif advance:
            current = srip_power_iteration(
                neurons, current, cfg.srip_iterations, normalize=cfg.ortho_normalize, eps=cfg.eps
            )
        self.vectors[group.key] = current
        return current

    def refresh(self, groups: Sequence[Group], neurons_of: NeuronsOf) -> None:
        """Run ``srip_iterations`` power-iteration steps on every group's vectors (created on first use)."""
        for group in groups:
            self._vector(group, neurons_of(group), advance=True)

    def energy(self, group: Group, neurons: Tensor) -> Tensor:
        """The spectral-norm penalty of every set, with the group's current vectors."""
        cfg = self.config
        vectors = self._vector(group, neurons, advance=False)
        return srip(
            neurons, vectors, normalize=cfg.ortho_normalize, squared=cfg.srip_squared, eps=cfg.eps, check_finite=False
        )

    def state_dict(self) -> dict[str, Any]:
        """``{"srip_vectors": {group key: vectors}}``."""
        return {"srip_vectors": {key: v.detach().clone() for key, v in self.vectors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the vectors (none saved: start afresh)."""
        self.vectors = {key: v.detach().clone() for key, v in (state.get("srip_vectors") or {}).items()}
