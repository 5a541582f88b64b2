"""Energy families: one small class per variant, and the registry that maps variant names to them.

Built-in families: ``"mhe"`` (:class:`FullSpaceMHE`), ``"half_mhe"`` (:class:`HalfSpaceMHE`), ``"random"``
(:class:`RandomProjectionEnergy`), ``"angle"`` and ``"adversarial"`` (:class:`LearnedProjectionEnergy`),
``"orthogonal"`` and ``"orthonormal"`` (:class:`SoftOrthogonality`), ``"srip"`` (:class:`SpectralRestrictedIsometry`).
A user-defined energy is a subclass of :class:`EnergyFamily` registered with :func:`register_energy`; it is then a
``variant`` of :class:`~lightning_comhe.CoMHERegularizer` and :class:`~lightning_comhe.CoMHE` (``docs/api.md``).
"""

from collections.abc import Callable
from typing import TypeVar

from lightning_comhe import _registry
from lightning_comhe.config import EnergyConfig
from lightning_comhe.energies.base import EnergyFamily, Group, NeuronsOf, Route, SetRef, build_groups, mhe_energy
from lightning_comhe.energies.mhe import FullSpaceMHE, HalfSpaceMHE
from lightning_comhe.energies.peers import SoftOrthogonality, SpectralRestrictedIsometry
from lightning_comhe.energies.projected import LearnedProjectionEnergy, RandomProjectionEnergy

__all__ = [
    "EnergyFamily",
    "FullSpaceMHE",
    "Group",
    "HalfSpaceMHE",
    "LearnedProjectionEnergy",
    "NeuronsOf",
    "RandomProjectionEnergy",
    "Route",
    "SetRef",
    "SoftOrthogonality",
    "SpectralRestrictedIsometry",
    "build_energy",
    "build_groups",
    "mhe_energy",
    "register_energy",
]

F = TypeVar("F", bound=type[EnergyFamily])


def register_energy(name: str) -> Callable[[F], F]:
    """Class decorator: make an :class:`EnergyFamily` subclass available as ``variant=name``.

    Example::

        >>> @register_energy("doc_half")
        ... class MyHalf(HalfSpaceMHE):
        ...     '''Half-space MHE under another name.'''
        >>> build_energy(EnergyConfig(variant="doc_half")).name
        'doc_half'
    """

    def decorate(cls: F) -> F:
        if not (isinstance(cls, type) and issubclass(cls, EnergyFamily)):
            raise ValueError(f"`cls` must be a subclass of EnergyFamily, got {cls!r}.")
        _registry.register(name, cls)
        if not cls.__dict__.get("name"):
            cls.name = name
        return cls

    return decorate


for _name, _cls in (
    ("mhe", FullSpaceMHE),
    ("half_mhe", HalfSpaceMHE),
    ("random", RandomProjectionEnergy),
    ("angle", LearnedProjectionEnergy),
    ("adversarial", LearnedProjectionEnergy),
    ("orthogonal", SoftOrthogonality),
    ("orthonormal", SoftOrthogonality),
    ("srip", SpectralRestrictedIsometry),
):
    _registry.register(_name, _cls)


def build_energy(config: EnergyConfig) -> EnergyFamily:
    """The family object of ``config.variant``, built from the (validated) config."""
    return _registry.lookup(config.variant)(config)
