"""The neuron-extractor registry and the built-in PyTorch extractors (``Linear``, ``Conv*``, ``ConvTranspose*``).

The lowest layer of the neuron code: pure PyTorch, no timm. :data:`REGISTRY` maps a module class to an
:class:`Extractor`; :func:`lookup` returns the entry of the most derived registered class of a module. Extractors
for optional libraries (timm, :mod:`lightning_comhe._timm_extractors`) are registered lazily with
:func:`defer_registration`: the first lookup after the library is imported registers them.

Example::

    >>> from torch import nn
    >>> lookup(nn.Conv2d(8, 12, 3, groups=4)).fn is lookup(nn.Conv1d(2, 2, 1)).fn
    True
    >>> declared_shapes(nn.Conv2d(8, 12, 3, groups=4)), declared_shapes(nn.Linear(3, 5))
    ([(4, 3, 18)], [(1, 5, 3)])
    >>> lookup(nn.ReLU()) is None
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_comhe import _gathered
from lightning_comhe._parametrized import weight_direction

try:  # DTensor is public since torch 2.4 but absent from builds without distributed support.
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    _DTensor = None

__all__ = [
    "REGISTRY",
    "Extractor",
    "Part",
    "PartsFn",
    "SetsFn",
    "Shape",
    "ShapesFn",
    "check_module",
    "conv_shapes",
    "declared_shapes",
    "defer_registration",
    "full",
    "grouped_rows",
    "lookup",
    "module_weight",
    "prod",
    "require",
    "supported_names",
    "type_name",
]

#: ``(S, N, d)``: ``S`` sets of ``N`` neurons of dimension ``d``.
Shape = tuple[int, int, int]
#: ``fn(module, std_conv)``: the ``(S, N, d)`` tensors of a module.
SetsFn = Callable[[nn.Module, str], list[Tensor]]
#: ``shape_fn(module)``: the shapes of those tensors from the module's declared sizes.
ShapesFn = Callable[[nn.Module], list[Shape] | None]


class Part(NamedTuple):
    """One weight matrix of a module with several (``nn.MultiheadAttention``, ``nn.LSTM``, ...).

    Attributes:
        param: The attribute of the weight, e.g. ``"in_proj_weight"`` or ``"weight_hh_l0_reverse"``.
        split: How its rows are cut into independent sets (``3`` for a stacked q / k / v, the number of gates for an
            RNN weight), or ``None``.
    """

    param: str
    split: int | None = None


#: ``parts_fn(module)``: the weight matrices of a module whose weights are separate layers.
PartsFn = Callable[[nn.Module], list[Part]]


@dataclass(frozen=True)
class Extractor:
    """One registry entry.

    Attributes:
        fn: ``fn(module, std_conv)`` returns the ``(S, N, d)`` tensors of the module.
        shape_fn: ``shape_fn(module)`` returns their shapes from the module's declared sizes (``None`` for user
            extractors, whose sets are extracted to get the shapes).
        owns_children: Marks containers whose extractor already covers its submodules (``MixedConv2d``), so that
            layer discovery does not take the children a second time.
        parts: For modules with several weight matrices (``nn.MultiheadAttention``, the recurrent layers): lists
            them; layer discovery then takes each as a layer of its own, named ``<module>.<param>``.
        user: Registered with :func:`~lightning_comhe.neurons.register_extractor` (the user's function decides how
            the neurons are read, so the built-in rules for parametrized weights do not apply).
    """

    fn: SetsFn
    shape_fn: ShapesFn | None = None
    owns_children: bool = False
    parts: PartsFn | None = None
    user: bool = False


#: Module class -> extractor. The most derived registered class of ``type(module).__mro__`` wins.
REGISTRY: dict[type, Extractor] = {}


@dataclass(frozen=True)
class _Deferred:
    register: Callable[[], bool]
    pending: str


_DEFERRED: list[_Deferred] = []


def defer_registration(register: Callable[[], bool], pending: str) -> None:
    """Run ``register()`` before every lookup until it returns ``True`` (e.g. once an optional library is imported).

    Args:
        register: Registers extractors into :data:`REGISTRY` and returns ``True``, or returns ``False`` while it
            cannot yet (it must not import the optional library itself).
        pending: How the not yet registered types are named in the "no extractor" error, e.g.
            ``"timm CondConv2d (when timm is imported)"``.
    """
    _DEFERRED.append(_Deferred(register, pending))


def _run_deferred() -> None:
    for entry in list(_DEFERRED):
        if entry.register():
            _DEFERRED.remove(entry)


def type_name(obj: object) -> str:
    """The class name of ``obj``, as error messages show it."""
    return type(obj).__name__


def prod(values: Sequence[int]) -> int:
    """The product of ``values`` (e.g. of a kernel size) as an ``int``."""
    return math.prod(int(v) for v in values)


def full(t: Tensor) -> Tensor:
    """Gather a sharded weight into a plain tensor (a collective).

    The sharded weights: an FSDP2 ``DTensor`` (differentiable), a ZeRO-3 parameter, and inside a gathering context
    an FSDP v1 parameter's fragment. Other tensors are returned as they are.

    Inside :func:`lightning_comhe._gathered.gathered` (a penalty read from sharded weights) each sharded weight is
    gathered once, as a local leaf of that context.
    """
    weights = _gathered.active()
    if weights is not None and weights.holds(t):
        return weights.full(t)
    if _DTensor is not None and isinstance(t, _DTensor):
        return t.full_tensor()
    if _gathered.is_zero3(t):  # a DeepSpeed ZeRO-3 placeholder: a detached full copy
        return _gathered.gather_zero3(t)
    return t


def module_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """Return the live (gathered) neuron weight ``name`` of ``module`` after checking that it has ``ndim >= 2``.

    For a weight-normed or spectral-normed weight this is its direction parameter (``v``, or the unnormalized
    weight), read without evaluating the parametrization (:func:`~lightning_comhe._parametrized.weight_direction`);
    for another parametrization it is the computed weight.

    Raises:
        ValueError: If the weight is missing, not a tensor, an uninitialized lazy parameter or 1-D.
    """
    found = weight_direction(module, name)
    weight = found.tensor if found.reason is None else getattr(module, name)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Expected module {type_name(module)} to have a `{name}` tensor, but got {type_name(weight)}.")
    if is_lazy(weight):
        raise ValueError(
            f"The {name} of {type_name(module)} is an uninitialized lazy parameter; run a forward pass first."
        )
    weight = full(weight)  # a ZeRO-3 placeholder or an FSDP v1 fragment is 1-D: its full shape is checked
    if weight.ndim < 2:
        raise ValueError(
            f"Expected the `{name}` of {type_name(module)} to have ndim >= 2, but got shape {tuple(weight.shape)}."
        )
    return weight


def check_module(name: str, value: object) -> nn.Module:
    """Raise :class:`TypeError` unless ``value`` is an ``nn.Module``; return it."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"`{name}` must be an nn.Module, got {type_name(value)}.")
    return value


def lookup(module: nn.Module) -> Extractor | None:
    """Return the extractor of the most derived registered class of ``module`` (``None`` if unsupported)."""
    _run_deferred()
    for cls in type(module).__mro__:
        entry = REGISTRY.get(cls)
        if entry is not None:
            return entry
    return None


def supported_names() -> str:
    """The registered class names (and the deferred ones), as the "no extractor" error lists them."""
    _run_deferred()
    return ", ".join([cls.__name__ for cls in REGISTRY] + [entry.pending for entry in _DEFERRED])


def require(module: nn.Module) -> Extractor:
    """Return the extractor of ``module``.

    Raises:
        TypeError: If there is none, listing the supported types and how to add one.
    """
    entry = lookup(module)
    if entry is None:
        raise TypeError(
            f"No neuron extractor for module type {type_name(module)} ({type(module).__module__}). "
            f"Supported (and subclasses): {supported_names()}. "
            "Add one with `lightning_comhe.neurons.register_extractor(cls, fn)`."
        )
    return entry


def declared_shapes(module: nn.Module) -> list[Shape] | None:
    """Shapes of the unsplit sets from the module's declared sizes (``None`` if they must be computed)."""
    entry = lookup(module)
    if entry is None or entry.shape_fn is None:
        return None
    try:
        return entry.shape_fn(module)
    except (AttributeError, TypeError):  # a subclass without the usual attributes
        return None


# ----------------------------------------------------------------------------------------------------------------
# built-in extractors
# ----------------------------------------------------------------------------------------------------------------
def grouped_rows(weight: Tensor, groups: int) -> Tensor:
    """``[out, ...] -> (G, out/G, prod(...))``: the rows (output units) of a weight, one set per group."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def _linear_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    return [grouped_rows(module_weight(module), 1)]


def _linear_shapes(module: nn.Module) -> list[Shape]:
    return [(1, int(module.out_features), int(module.in_features))]


def _conv_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    return [grouped_rows(module_weight(module), int(module.groups))]


def conv_shapes(module: nn.Module) -> list[Shape]:
    """``[(G, out/G, in/G · prod(kernel_size))]`` of a (transposed) conv, from its declared sizes."""
    groups = int(module.groups)
    d = int(module.in_channels) // groups * prod(module.kernel_size)
    return [(groups, int(module.out_channels) // groups, d)]


def _conv_transpose_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    weight = module_weight(module)  # [in, out/G, *k]
    groups = int(module.groups)
    in_channels, out_per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, -1)  # [G, in/G, out/G, prod(k)]
    return [grouped.transpose(1, 2).reshape(groups, out_per_group, -1)]


for _cls in (nn.Linear,):
    REGISTRY[_cls] = Extractor(_linear_sets, _linear_shapes)
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    REGISTRY[_cls] = Extractor(_conv_sets, conv_shapes)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    REGISTRY[_cls] = Extractor(_conv_transpose_sets, conv_shapes)
