"""Pure-PyTorch functional core: energies and projection objectives (no Lightning import)."""

from lightning_comhe.functional.energy import (
    OFFICIAL_POWERS,
    PowerLike,
    hyperspherical_energy,
    parse_power,
    projected_energy,
)
from lightning_comhe.functional.expected import expected_kernel, expected_projected_energy
from lightning_comhe.functional.orthogonality import (
    gram_residual,
    orthonormality,
    soft_orthogonality,
    srip,
    srip_power_iteration,
)
from lightning_comhe.functional.projection import project_sets

__all__ = [
    "OFFICIAL_POWERS",
    "PowerLike",
    "expected_kernel",
    "expected_projected_energy",
    "gram_residual",
    "hyperspherical_energy",
    "orthonormality",
    "parse_power",
    "project_sets",
    "projected_energy",
    "soft_orthogonality",
    "srip",
    "srip_power_iteration",
]
