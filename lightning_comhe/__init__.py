"""lightning-comhe: Compressive Minimum Hyperspherical Energy regularization for PyTorch and Lightning.

The core (the configuration, energies, projections, neuron extraction, layer discovery, the regularizer) is pure
PyTorch. The Lightning
callback :class:`CoMHE` and the torchmetrics metric :class:`HypersphericalEnergy` are thin adapters over it; they
are imported lazily so that ``import lightning_comhe`` works for raw-PyTorch users without touching Lightning.
"""

from typing import Any

from lightning_comhe.config import EnergyConfig, ScheduleConfig, SelectionConfig, default_weights
from lightning_comhe.discovery import LayerSelection, NeuronLayer, discover_layers, find_heads
from lightning_comhe.energies import EnergyFamily, register_energy
from lightning_comhe.functional import (
    OFFICIAL_POWERS,
    expected_projected_energy,
    hyperspherical_energy,
    parse_power,
    projected_energy,
)
from lightning_comhe.functional.angles import angle_objective, eps_cosine
from lightning_comhe.functional.orthogonality import orthonormality, soft_orthogonality, srip, srip_power_iteration
from lightning_comhe.neurons import extract_neuron_sets, extract_neurons, register_extractor
from lightning_comhe.projections import AdversarialProjection, AngleProjection, RandomProjection
from lightning_comhe.regularizer import VARIANTS, CoMHERegularizer, RegularizerOutput, variant_defaults

__version__ = "0.1.0.dev0"

__all__ = [
    "OFFICIAL_POWERS",
    "VARIANTS",
    "AdversarialProjection",
    "AngleProjection",
    "CoMHE",
    "CoMHERegularizer",
    "EnergyConfig",
    "EnergyFamily",
    "HypersphericalEnergy",
    "LayerSelection",
    "NeuronLayer",
    "RandomProjection",
    "RegularizerOutput",
    "ScheduleConfig",
    "SelectionConfig",
    "__version__",
    "angle_objective",
    "default_weights",
    "discover_layers",
    "eps_cosine",
    "expected_projected_energy",
    "extract_neuron_sets",
    "extract_neurons",
    "find_heads",
    "hyperspherical_energy",
    "orthonormality",
    "parse_power",
    "projected_energy",
    "register_energy",
    "register_extractor",
    "soft_orthogonality",
    "srip",
    "srip_power_iteration",
    "variant_defaults",
]


def __getattr__(name: str) -> Any:
    # Lightning and torchmetrics adapters are imported on first use.
    if name == "CoMHE":
        from lightning_comhe.callback import CoMHE

        return CoMHE
    if name == "HypersphericalEnergy":
        from lightning_comhe.metric import HypersphericalEnergy

        return HypersphericalEnergy
    raise AttributeError(f"module 'lightning_comhe' has no attribute {name!r}")
