"""Pure-PyTorch functional core: energies and projection objectives (no Lightning import)."""

from lightning_comhe.functional.energy import (
    OFFICIAL_POWERS,
    PowerLike,
    hyperspherical_energy,
    parse_power,
    projected_energy,
)

__all__ = ["OFFICIAL_POWERS", "PowerLike", "hyperspherical_energy", "parse_power", "projected_energy"]
