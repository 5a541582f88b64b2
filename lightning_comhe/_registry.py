"""The name → energy-family registry: a leaf module (the built-in families register when `energies` is imported)."""

from typing import Any

__all__ = ["BUILTIN_VARIANTS", "PEER_VARIANTS", "is_registered", "lookup", "register", "registered"]

#: The built-in variants, in documentation order (the ``Literal`` of ``CoMHE(variant=...)``).
BUILTIN_VARIANTS: tuple[str, ...] = (
    "mhe",
    "half_mhe",
    "random",
    "angle",
    "adversarial",
    "orthogonal",
    "orthonormal",
    "srip",
)
#: The peer regularizers of the paper's tables (docs/peers.md): same penalty on hidden layers and the classifier.
PEER_VARIANTS: tuple[str, ...] = ("orthogonal", "orthonormal", "srip")

_FAMILIES: dict[str, Any] = {}


def register(name: str, family: Any) -> None:
    """Map ``name`` to an energy-family class (see :func:`lightning_comhe.energies.register_energy`)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"`name` must be an identifier-like string, got {name!r}.")
    current = _FAMILIES.get(name)
    if current is not None and current is not family:
        raise ValueError(f"`name` must be unused, got {name!r}, which is registered to {current.__name__}.")
    _FAMILIES[name] = family


def is_registered(name: Any) -> bool:
    """Whether ``name`` is a built-in variant or a registered energy family."""
    return isinstance(name, str) and (name in BUILTIN_VARIANTS or name in _FAMILIES)


def registered() -> tuple[str, ...]:
    """Every known variant name: the built-ins first, then user-registered ones."""
    return BUILTIN_VARIANTS + tuple(n for n in _FAMILIES if n not in BUILTIN_VARIANTS)


def lookup(name: str) -> Any:
    """The family class registered under ``name``."""
    if name not in _FAMILIES:
        raise ValueError(f"`variant` must be one of {', '.join(map(repr, registered()))}, got {name!r}.")
    return _FAMILIES[name]
