r"""Parametrized weights: which parameter holds the neuron directions, read without evaluating the parametrization.

Pure PyTorch. The ``weight`` of a layer registered with :mod:`torch.nn.utils.parametrize` (or with the older hook
based :func:`torch.nn.utils.weight_norm` / :func:`torch.nn.utils.spectral_norm`) is computed from other parameters
on every read: a fresh tensor each time (its ``id()`` is meaningless), and reading the ``weight`` of a spectral-norm
layer in training mode runs a power-iteration step that changes the module's ``_u`` / ``_v`` buffers. So the
penalty never reads it. Instead it regularizes the parameter whose rows have the directions of the effective
weight's rows:

* weight norm (``parametrizations.weight_norm`` or the hook based ``weight_norm``) with ``dim=0`` (per output
  row, the default) or ``dim=None`` (one norm for the whole tensor): :math:`w_i = g_i\, v_i / \|v_i\|`, so row
  ``i`` of the direction parameter ``v`` (``parametrizations.weight.original1``, or ``weight_v``) has the direction
  of :math:`w_i` (up to the sign of :math:`g_i`, positive unless training makes it negative);
* spectral norm (``parametrizations.spectral_norm`` or the hook based ``spectral_norm``):
  :math:`W = W_0 / \sigma(W_0)` with a positive scalar :math:`\sigma`, so the rows of the unconstrained parameter
  :math:`W_0` (``parametrizations.weight.original``, or ``weight_orig``) have the directions of the rows of ``W``.

Any other parametrization (``orthogonal``, a chain of several, weight norm over another ``dim``, a user
parametrization) does not say which parameter holds the neuron directions: :func:`weight_direction` gives no
tensor and a reason, and layer discovery lists the layer as skipped with that reason.

Example::

    >>> from torch import nn
    >>> from torch.nn.utils import parametrizations
    >>> layer = parametrizations.weight_norm(nn.Linear(3, 4))
    >>> found = weight_direction(layer)
    >>> found.tensor is layer.parametrizations.weight.original1, found.kind
    (True, 'weight_norm')
    >>> print(weight_direction(parametrizations.orthogonal(nn.Linear(4, 4))).reason[:36])
    weight parametrized by _Orthogonal (
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["Direction", "weight_direction"]

_KNOWN = "only weight_norm with dim=0 or None and spectral_norm keep the row directions of a parameter"


class Direction(NamedTuple):
    """Where the neurons of a weight come from.

    Attributes:
        tensor: The tensor whose rows are the neurons (the weight itself, or its direction parameter); ``None`` if
            the weight is parametrized in a way that does not say (then ``reason`` says why), or missing.
        params: Every parameter the effective weight is computed from (both ``g`` and ``v`` of a weight norm): the
            identity of a weight, used to detect weights shared between layers.
        kind: ``None`` for a plain weight, else ``"weight_norm"`` or ``"spectral_norm"``.
        reason: Why ``tensor`` is ``None`` (``None`` otherwise).
    """

    tensor: Tensor | None
    params: list[Tensor]
    kind: str | None = None
    reason: str | None = None


def _weight_norm_direction(v: Tensor, params: list[Tensor], dim: int | None) -> Direction:
    # torch stores dim=None as -1, which means one norm over the whole tensor (not the last axis)
    if dim in (0, -1, None):
        return Direction(v, params, "weight_norm")
    return Direction(None, params, None, f"weight_norm over dim={dim} rescales columns, not rows ({_KNOWN})")


def _parametrized(module: nn.Module, name: str) -> Direction:
    plist = module.parametrizations[name]
    params = list(plist.parameters())
    kinds = [type(p).__name__ for p in plist]
    if len(kinds) == 1 and kinds[0] == "_WeightNorm" and hasattr(plist, "original1"):
        return _weight_norm_direction(plist.original1, params, getattr(plist[0], "dim", 0))
    if len(kinds) == 1 and kinds[0] == "_SpectralNorm" and hasattr(plist, "original"):
        return Direction(plist.original, params, "spectral_norm")
    return Direction(None, params, None, f"weight parametrized by {' then '.join(kinds)} ({_KNOWN})")


def _hooked(module: nn.Module, name: str) -> Direction | None:
    """The hook based (deprecated) ``torch.nn.utils.weight_norm`` / ``spectral_norm`` of ``name``, if any."""
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "name", None) != name:
            continue
        kind = type(hook).__name__
        if kind == "WeightNorm" and isinstance(module._parameters.get(f"{name}_v"), Tensor):
            v, g = module._parameters[f"{name}_v"], module._parameters[f"{name}_g"]
            return _weight_norm_direction(v, [g, v], getattr(hook, "dim", 0))
        if kind == "SpectralNorm" and isinstance(module._parameters.get(f"{name}_orig"), Tensor):
            orig = module._parameters[f"{name}_orig"]
            return Direction(orig, [orig], "spectral_norm")
    return None


def weight_direction(module: nn.Module, name: str = "weight") -> Direction:
    """Find the tensor whose rows are the neurons of ``module``'s weight ``name``, without computing the weight.

    Args:
        module: The layer.
        name: The attribute of the weight (``"weight"``, ``"in_proj_weight"``, ``"weight_hh_l0"``, ...).

    Returns:
        A :class:`Direction`: the plain parameter, the direction parameter of a weight norm / spectral norm (see the
        module docstring), or no tensor and a reason for other parametrizations. A missing attribute gives no tensor
        and no reason.
    """
    plain = module._parameters.get(name)
    if plain is not None:
        return Direction(plain, [plain])
    if parametrize.is_parametrized(module, name):
        return _parametrized(module, name)
    hooked = _hooked(module, name)
    if hooked is not None:
        return hooked
    value = getattr(module, name, None)  # a plain tensor attribute (or a wrapper's property)
    return Direction(value, [value]) if isinstance(value, Tensor) else Direction(None, [])
