"""lightning-comhe: Compressive Minimum Hyperspherical Energy regularization for PyTorch and Lightning."""

from lightning_comhe.functional import OFFICIAL_POWERS, hyperspherical_energy, parse_power, projected_energy

__version__ = "0.1.0.dev0"

__all__ = ["OFFICIAL_POWERS", "__version__", "hyperspherical_energy", "parse_power", "projected_energy"]
