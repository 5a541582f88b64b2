r"""Neuron extractors of timm's layer types, registered once timm is imported. timm is optional: never imported here.

A timm module can only exist once ``timm`` is imported, so :func:`timm_layers` only returns ``timm.layers`` when
``timm`` is already in ``sys.modules``, and the registration below is deferred to the first extractor lookup after
that (:func:`~lightning_comhe._extractors.defer_registration`). User registrations take precedence.

* ``StdConv2d`` / ``StdConv2dSame`` / ``ScaledStdConv2d`` / ``ScaledStdConv2dSame`` (weight standardisation):
  ``std_conv="raw"`` uses the stored weight, ``"standardized"`` the weight the forward pass convolves with,
  :math:`\hat w_i = (w_i - \bar w_i) / \sqrt{\operatorname{var}(w_i) + \epsilon}` (times ``gain_i · scale`` for the
  scaled variants), computed with the same ``F.batch_norm`` call as timm.
* ``CondConv2d``, weight ``[E, out · in/G · k_h · k_w]``: one set per expert and group, ``(E·G, out/G, in/G · k_h
  · k_w)``.
* ``MixedConv2d`` (a ``ModuleDict`` of convs with different kernel sizes): the sets of each child, in order; it owns
  its children, so discovery takes it as one layer.

Example::

    >>> import timm.layers
    >>> from lightning_comhe._extractors import lookup
    >>> conv = timm.layers.StdConv2d(4, 6, 3)
    >>> [tuple(t.shape) for t in lookup(conv).fn(conv, "standardized")]
    [(1, 6, 36)]
    >>> timm_classes("CondConv2d", "NoSuchLayer") == (timm.layers.CondConv2d,)
    True
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_comhe._extractors import (
    REGISTRY,
    Extractor,
    Shape,
    conv_shapes,
    declared_shapes,
    defer_registration,
    full,
    grouped_rows,
    module_weight,
    prod,
    require,
)

__all__ = ["register_timm_extractors", "standardized_weight", "timm_classes", "timm_layers"]


def timm_layers() -> ModuleType | None:
    """Return ``timm.layers`` if timm is already imported (a timm module can only exist then), else ``None``."""
    if "timm" not in sys.modules:
        return None
    try:
        import timm.layers as layers
    except ImportError:  # pragma: no cover - broken timm install
        return None
    return layers


def timm_classes(*names: str) -> tuple[type, ...]:
    """The classes of ``timm.layers`` with these names that exist (``()`` while timm is not imported)."""
    layers = timm_layers()
    if layers is None:
        return ()
    return tuple(cls for cls in (getattr(layers, n, None) for n in names) if isinstance(cls, type))


def standardized_weight(module: nn.Module, weight: Tensor, *, scaled: bool) -> Tensor:
    """The weight a timm weight-standardised conv convolves with (``scaled``: times ``gain · scale``)."""
    affine = (full(module.gain) * module.scale).reshape(-1) if scaled else None
    out = weight.shape[0]
    # Exactly timm's forward: per-output-channel standardisation with the biased variance.
    std = F.batch_norm(
        weight.reshape(1, out, -1), None, None, weight=affine, training=True, momentum=0.0, eps=module.eps
    )
    return std.reshape_as(weight)


def _std_conv_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    weight = module_weight(module)
    if std_conv == "standardized":
        weight = standardized_weight(module, weight, scaled=False)
    return [grouped_rows(weight, int(module.groups))]


def _scaled_std_conv_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    weight = module_weight(module)
    if std_conv == "standardized":
        weight = standardized_weight(module, weight, scaled=True)
    return [grouped_rows(weight, int(module.groups))]


def _cond_conv_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    weight = module_weight(module)  # [E, out * in/G * kh * kw]
    experts = weight.shape[0]
    groups = int(module.groups)
    out = int(module.out_channels)
    return [weight.reshape(experts * groups, out // groups, -1)]


def _cond_conv_shapes(module: nn.Module) -> list[Shape]:
    groups = int(module.groups)
    d = int(module.in_channels) // groups * prod(module.kernel_size)
    return [(int(module.num_experts) * groups, int(module.out_channels) // groups, d)]


def _mixed_conv_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    sets: list[Tensor] = []
    for child in module.children():
        sets.extend(require(child).fn(child, std_conv))
    return sets


def _mixed_conv_shapes(module: nn.Module) -> list[Shape] | None:
    shapes: list[Shape] = []
    for child in module.children():
        child_shapes = declared_shapes(child)
        if child_shapes is None:
            return None
        shapes.extend(child_shapes)
    return shapes


_ENTRIES: dict[str, Extractor] = {
    "StdConv2d": Extractor(_std_conv_sets, conv_shapes),
    "StdConv2dSame": Extractor(_std_conv_sets, conv_shapes),
    "ScaledStdConv2d": Extractor(_scaled_std_conv_sets, conv_shapes),
    "ScaledStdConv2dSame": Extractor(_scaled_std_conv_sets, conv_shapes),
    "CondConv2d": Extractor(_cond_conv_sets, _cond_conv_shapes),
    "MixedConv2d": Extractor(_mixed_conv_sets, _mixed_conv_shapes, owns_children=True),
}


def register_timm_extractors() -> bool:
    """Register the timm layer types if timm is imported (user registrations take precedence).

    Returns:
        Whether timm is imported (and so its types are now registered).
    """
    layers = timm_layers()
    if layers is None:
        return False
    for name, entry in _ENTRIES.items():
        cls = getattr(layers, name, None)
        if isinstance(cls, type):
            REGISTRY.setdefault(cls, entry)
    return True


defer_registration(register_timm_extractors, "timm CondConv2d / MixedConv2d / StdConv2d (when timm is imported)")
