r"""Neuron extraction: from a module's weight to stacked ``(S, N, d)`` neuron sets.

This module is pure PyTorch; timm is optional. A *neuron* is the weight vector of one output unit. MHE / CoMHE
(Liu et al., NeurIPS 2018; Lin et al., CVPR 2020) take the energy of the neurons of a layer, so every supported layer
type is mapped to ``S`` independent *neuron sets* of ``N`` neurons of dimension ``d``, returned as one ``(S, N, d)``
tensor (or several tensors when the sets of one module differ in ``N`` or ``d``):

* :class:`torch.nn.Linear` (and subclasses such as ``timm.layers.Linear``), weight ``[out, in]``: the rows,
  :math:`W \in \mathbb{R}^{1 \times out \times in}`.
* :class:`torch.nn.Conv1d` / ``Conv2d`` / ``Conv3d`` (and subclasses such as timm's ``Conv2dSame``), weight
  ``[out, in/G, *k]``: one set per group, ``(G, out/G, in/G · ∏k)``. Neurons of different groups read disjoint
  input channels, so they are never compared with each other; a depthwise conv has ``N = out/in`` (usually 1).
* :class:`torch.nn.ConvTranspose1d` / ``2d`` / ``3d``, weight ``[in, out/G, *k]``: the output channels are dimension
  1, so the neuron of output channel ``j`` of group ``g`` is ``weight[g·in/G:(g+1)·in/G, j].flatten()``, giving
  ``(G, out/G, in/G · ∏k)``.
* timm ``StdConv2d`` / ``StdConv2dSame`` / ``ScaledStdConv2d`` / ``ScaledStdConv2dSame`` (weight standardisation):
  ``std_conv="raw"`` (the default) uses the stored weight, ``std_conv="standardized"`` the weight the forward pass
  convolves with, :math:`\hat w_i = (w_i - \bar w_i) / \sqrt{\operatorname{var}(w_i) + \epsilon}` (times
  ``gain_i · scale`` for the scaled variants), computed with the same ``F.batch_norm`` call as timm.
* timm ``CondConv2d``, weight ``[E, out · in/G · k_h · k_w]``: one set per expert and group, ``(E·G, out/G,
  in/G · k_h · k_w)``.
* timm ``MixedConv2d`` (a ``ModuleDict`` of convs with different kernel sizes): the sets of each child, in order.

Fused weights (``split``): a fused ``qkv`` projection is three layers in one weight, so ``split=3`` cuts the neuron
axis into ``q``, ``k``, ``v`` parts that are regularised separately. Other layer types can be added with
:func:`register_extractor`.

All results are differentiable functions (views where the memory layout allows) of the live weight, so a loss on
them back-propagates into ``module.weight``. FSDP2 ``DTensor`` weights are gathered with ``full_tensor()``
(differentiable, collective: call it on every rank).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

try:  # DTensor is public since torch 2.4 but absent from builds without distributed support.
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    _DTensor = None

__all__ = ["extract_neuron_sets", "extract_neurons", "register_extractor", "Split", "StdConvMode", "STD_CONV_MODES"]

#: ``split`` argument: the number of equal parts, or the sizes of the parts, of the neuron axis.
Split = int | Sequence[int] | None
#: ``std_conv`` argument: which weight of a weight-standardised conv is regularised.
StdConvMode = Literal["raw", "standardized"]
#: Allowed values of ``std_conv``.
STD_CONV_MODES: tuple[str, ...] = ("raw", "standardized")

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class _Extractor:
    """One registry entry.

    ``fn(module, std_conv)`` returns ``(S, N, d)`` tensors; ``shape_fn(module)`` returns their shapes from the
    module's declared sizes (``None`` for user extractors); ``owns_children`` marks containers whose extractor already
    covers its submodules (``MixedConv2d``), so that layer discovery does not take the children a second time.
    """

    fn: Callable[[nn.Module, str], list[Tensor]]
    shape_fn: Callable[[nn.Module], list[Shape] | None] | None = None
    owns_children: bool = False


_REGISTRY: dict[type, _Extractor] = {}
_TIMM_REGISTERED = False


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _timm_layers() -> Any | None:
    """Return ``timm.layers`` if timm is already imported (a timm module can only exist then), else ``None``."""
    if "timm" not in sys.modules:
        return None
    try:
        import timm.layers as timm_layers
    except ImportError:  # pragma: no cover - broken timm install
        return None
    return timm_layers


def _timm_classes(*names: str) -> tuple[type, ...]:
    layers = _timm_layers()
    if layers is None:
        return ()
    return tuple(cls for cls in (getattr(layers, n, None) for n in names) if isinstance(cls, type))


def _full(t: Tensor) -> Tensor:
    """Gather an FSDP2 ``DTensor`` into a plain tensor (differentiable); return other tensors unchanged."""
    if _DTensor is not None and isinstance(t, _DTensor):
        return t.full_tensor()
    return t


def _type_name(module: object) -> str:
    return type(module).__name__


def _weight(module: nn.Module) -> Tensor:
    """Return the live (gathered) weight of ``module`` after checking that it is a tensor with ``ndim >= 2``."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(
            f"Expected module {_type_name(module)} to have a `weight` tensor, but got {_type_name(weight)}."
        )
    if is_lazy(weight):
        raise ValueError(
            f"The weight of {_type_name(module)} is an uninitialized lazy parameter; run a forward pass first."
        )
    if weight.ndim < 2:
        raise ValueError(
            f"Expected the `weight` of {_type_name(module)} to have ndim >= 2, but got shape {tuple(weight.shape)}."
        )
    return _full(weight)


def _check_std_conv(std_conv: str) -> None:
    if std_conv not in STD_CONV_MODES:
        raise ValueError(f"Expected argument `std_conv` to be one of {STD_CONV_MODES}, but got {std_conv!r}.")


def _std_conv_weight(module: nn.Module, weight: Tensor, std_conv: str) -> Tensor:
    """Return the weight the forward pass of a timm weight-standardised conv uses (or ``weight`` itself)."""
    if std_conv == "raw":
        return weight
    scaled = _timm_classes("ScaledStdConv2d", "ScaledStdConv2dSame")
    plain = _timm_classes("StdConv2d", "StdConv2dSame")
    if not (scaled or plain) or not isinstance(module, scaled + plain):
        return weight
    out = weight.shape[0]
    affine = None
    if scaled and isinstance(module, scaled):
        affine = (_full(module.gain) * module.scale).reshape(-1)
    # Exactly timm's forward: per-output-channel standardisation with the biased variance.
    std = F.batch_norm(
        weight.reshape(1, out, -1), None, None, weight=affine, training=True, momentum=0.0, eps=module.eps
    )
    return std.reshape_as(weight)


def _prod(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)


# ----------------------------------------------------------------------------------------------------------------
# built-in extractors
# ----------------------------------------------------------------------------------------------------------------
def _linear_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    weight = _weight(module)
    return [weight.reshape(1, weight.shape[0], -1)]


def _linear_shapes(module: nn.Module) -> list[Shape]:
    return [(1, int(module.out_features), int(module.in_features))]


def _conv_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    weight = _std_conv_weight(module, _weight(module), std_conv)
    groups = int(module.groups)
    out = weight.shape[0]
    return [weight.reshape(groups, out // groups, -1)]


def _conv_shapes(module: nn.Module) -> list[Shape]:
    groups = int(module.groups)
    d = int(module.in_channels) // groups * _prod(module.kernel_size)
    return [(groups, int(module.out_channels) // groups, d)]


def _conv_transpose_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    weight = _weight(module)  # [in, out/G, *k]
    groups = int(module.groups)
    in_channels, out_per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, -1)  # [G, in/G, out/G, prod(k)]
    return [grouped.transpose(1, 2).reshape(groups, out_per_group, -1)]


def _cond_conv_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    weight = _weight(module)  # [E, out * in/G * kh * kw]
    experts = weight.shape[0]
    groups = int(module.groups)
    out = int(module.out_channels)
    return [weight.reshape(experts * groups, out // groups, -1)]


def _cond_conv_shapes(module: nn.Module) -> list[Shape]:
    groups = int(module.groups)
    d = int(module.in_channels) // groups * _prod(module.kernel_size)
    return [(int(module.num_experts) * groups, int(module.out_channels) // groups, d)]


def _mixed_conv_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    sets: list[Tensor] = []
    for child in module.children():
        sets.extend(extract_neuron_sets(child, std_conv=std_conv))
    return sets


def _mixed_conv_shapes(module: nn.Module) -> list[Shape] | None:
    shapes: list[Shape] = []
    for child in module.children():
        child_shapes = _declared_shapes(child)
        if child_shapes is None:
            return None
        shapes.extend(child_shapes)
    return shapes


for _cls in (nn.Linear,):
    _REGISTRY[_cls] = _Extractor(_linear_sets, _linear_shapes)
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    _REGISTRY[_cls] = _Extractor(_conv_sets, _conv_shapes)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    _REGISTRY[_cls] = _Extractor(_conv_transpose_sets, _conv_shapes)


def _ensure_timm_registered() -> None:
    """Register the timm layer types once timm is imported (user registrations take precedence)."""
    global _TIMM_REGISTERED
    if _TIMM_REGISTERED:
        return
    layers = _timm_layers()
    if layers is None:
        return
    _TIMM_REGISTERED = True
    cond = getattr(layers, "CondConv2d", None)
    if isinstance(cond, type):
        _REGISTRY.setdefault(cond, _Extractor(_cond_conv_sets, _cond_conv_shapes))
    mixed = getattr(layers, "MixedConv2d", None)
    if isinstance(mixed, type):
        _REGISTRY.setdefault(mixed, _Extractor(_mixed_conv_sets, _mixed_conv_shapes, owns_children=True))


def _lookup(module: nn.Module) -> _Extractor | None:
    """Return the extractor of the most derived registered class of ``module`` (``None`` if unsupported)."""
    _ensure_timm_registered()
    for cls in type(module).__mro__:
        entry = _REGISTRY.get(cls)
        if entry is not None:
            return entry
    return None


def _supported_names() -> str:
    _ensure_timm_registered()
    names = [cls.__name__ for cls in _REGISTRY]
    if not _TIMM_REGISTERED:
        names.append("timm CondConv2d / MixedConv2d (when timm is imported)")
    return ", ".join(names)


def _declared_shapes(module: nn.Module) -> list[Shape] | None:
    """Shapes of the unsplit sets from the module's declared sizes (``None`` if they must be computed)."""
    entry = _lookup(module)
    if entry is None or entry.shape_fn is None:
        return None
    try:
        return entry.shape_fn(module)
    except (AttributeError, TypeError):  # a subclass without the usual attributes
        return None


# ----------------------------------------------------------------------------------------------------------------
# split
# ----------------------------------------------------------------------------------------------------------------
def _split_sizes(split: Split, num: int, module: nn.Module) -> list[int] | None:
    """Validate ``split`` against ``num`` neurons per set and return the part sizes (``None``: no split)."""
    if split is None:
        return None
    where = f"the {num} neurons per set of {_type_name(module)}"
    if isinstance(split, bool) or not isinstance(split, (int, Sequence)) or isinstance(split, str):
        raise ValueError(f"Expected argument `split` to be an int or a list of ints, but got split={split!r}.")
    if isinstance(split, int):
        if split < 1 or num % split:
            raise ValueError(f"Expected argument `split` to divide {where} into equal parts, but got split={split}.")
        return [num // split] * split
    sizes = list(split)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes) or sum(sizes) != num:
        raise ValueError(
            f"Expected argument `split` to be positive sizes summing to {where}, but got split={sizes} ({num} neurons)."
        )
    return sizes


def _size_groups(sizes: list[int]) -> dict[int, list[int]]:
    """Map each part size (in order of first occurrence) to the start offsets of the parts of that size."""
    groups: dict[int, list[int]] = {}
    start = 0
    for size in sizes:
        groups.setdefault(size, []).append(start)
        start += size
    return groups


def _apply_split(sets: Tensor, split: Split, module: nn.Module) -> list[Tensor]:
    num_sets, num, dim = sets.shape
    sizes = _split_sizes(split, num, module)
    if sizes is None or len(sizes) == 1:
        return [sets]
    out: list[Tensor] = []
    for size, starts in _size_groups(sizes).items():
        parts = len(starts)
        if all(b - a == size for a, b in zip(starts[:-1], starts[1:], strict=True)):  # contiguous: a narrow + reshape
            block = sets.narrow(1, starts[0], size * parts)
        else:
            block = torch.stack([sets.narrow(1, s, size) for s in starts], dim=1)
        out.append(block.reshape(num_sets * parts, size, dim))
    return out


def _split_shapes(shapes: list[Shape], split: Split, module: nn.Module) -> list[Shape]:
    out: list[Shape] = []
    for num_sets, num, dim in shapes:
        sizes = _split_sizes(split, num, module)
        if sizes is None or len(sizes) == 1:
            out.append((num_sets, num, dim))
            continue
        out.extend((num_sets * len(starts), size, dim) for size, starts in _size_groups(sizes).items())
    return out


def _neuron_set_shapes(module: nn.Module, *, split: Split = None, std_conv: StdConvMode = "raw") -> list[Shape]:
    """Shapes ``(S, N, d)`` of :func:`extract_neuron_sets`, from declared sizes when possible.

    For built-in layer types the shapes come from ``out_features`` / ``in_channels`` / ``kernel_size`` / ``groups``
    and so are the full shapes even when the weight is an FSDP2 shard; for user extractors the sets are extracted
    under ``torch.no_grad()``.
    """
    _check_std_conv(std_conv)
    shapes = _declared_shapes(module)
    if shapes is None:
        with torch.no_grad():
            return [tuple(t.shape) for t in extract_neuron_sets(module, split=split, std_conv=std_conv)]
    if split is not None and _lookup(module).owns_children:  # type: ignore[union-attr]
        raise ValueError(f"Argument `split` is not supported for {_type_name(module)} (got split={split!r}).")
    return _split_shapes(shapes, split, module)


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def register_extractor(
    cls: type[nn.Module], fn: Callable[[nn.Module], Tensor | Sequence[Tensor]], *, owns_children: bool = False
) -> None:
    """Register (or override) the neuron extractor of a module type.

    The most derived registered class in ``type(module).__mro__`` wins, so registering a subclass of
    :class:`torch.nn.Linear` overrides the built-in rule for that subclass only.

    Args:
        cls: The module class.
        fn: ``fn(module)`` returning one tensor or a sequence of tensors, each an ``(N, d)`` matrix (one set, rows
            are neurons) or ``(S, N, d)`` stacked sets. It should be a differentiable function of the module's
            parameters; ``DTensor`` results are gathered with ``full_tensor()``.
        owns_children: Set it when ``fn`` already covers the weights of the submodules of ``cls`` (a container), so
            that :func:`lightning_comhe.discovery.discover_layers` does not also take the submodules.

    Raises:
        TypeError: If ``cls`` is not an ``nn.Module`` subclass or ``fn`` is not callable.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> class Bilinear2(nn.Bilinear):
        ...     pass
        >>> register_extractor(Bilinear2, lambda m: m.weight.flatten(1))  # [out, in1, in2] -> (out, in1 * in2)
        >>> [tuple(t.shape) for t in extract_neuron_sets(Bilinear2(3, 4, 5))]
        [(1, 5, 12)]
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"Expected argument `cls` to be an nn.Module subclass, but got {cls!r}.")
    if not callable(fn):
        raise TypeError(f"Expected argument `fn` to be callable, but got {_type_name(fn)}.")

    def _user(module: nn.Module, std_conv: str) -> list[Tensor]:
        result = fn(module)
        tensors = [result] if isinstance(result, Tensor) else list(result)
        out: list[Tensor] = []
        for t in tensors:
            if not isinstance(t, Tensor) or t.ndim not in (2, 3):
                shape = tuple(t.shape) if isinstance(t, Tensor) else _type_name(t)
                raise ValueError(
                    f"The extractor registered for {cls.__name__} must return (N, d) or (S, N, d) tensors, "
                    f"but returned {shape}."
                )
            t = _full(t)
            out.append(t.unsqueeze(0) if t.ndim == 2 else t)
        return out

    _REGISTRY[cls] = _Extractor(_user, None, owns_children=owns_children)


def extract_neuron_sets(module: nn.Module, *, split: Split = None, std_conv: StdConvMode = "raw") -> list[Tensor]:
    r"""Return the neurons of ``module`` as stacked neuron sets.

    Each returned tensor has shape ``(S, N, d)``: ``S`` independent sets of ``N`` neurons of dimension ``d``, whose
    energies are computed separately. For a layer with weight :math:`W` and ``G`` groups,

    .. math::

        \text{Linear } [out, in] &\to (1, out, in), \\
        \text{Conv } [out, in/G, \textstyle\prod k] &\to (G, out/G, in/G \cdot \textstyle\prod k), \\
        \text{ConvTranspose } [in, out/G, \textstyle\prod k] &\to (G, out/G, in/G \cdot \textstyle\prod k), \\
        \text{CondConv2d } [E, out \cdot in/G \cdot k_h k_w] &\to (E G, out/G, in/G \cdot k_h k_w),

    and ``MixedConv2d`` gives the sets of each child in order. With ``split`` the neuron axis of every set is cut
    into parts (``N → N_1 + N_2 + …``) that become independent sets; parts of equal size are stacked into one
    tensor (set-major order: set ``s`` part ``p`` is entry ``s · parts + p``), parts of different sizes give separate
    tensors, ordered by the first occurrence of their size.

    Weight-standardised convs (timm ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d``, ``ScaledStdConv2dSame``)
    convolve with :math:`\hat w_i = (w_i - \bar w_i)/\sqrt{\operatorname{var}(w_i) + \epsilon}` (times
    ``gain_i · scale`` for the scaled ones). ``std_conv="raw"`` (default) regularises the stored weight :math:`w`,
    the parameter the optimizer updates, which is what the official MHE code would do; ``"standardized"``
    regularises :math:`\hat w`, the neurons the network actually uses. Note that centring makes the ``N`` neurons
    lie in a ``d - 1`` dimensional subspace and fixes their norm, so the two energies differ. The option is
    ignored for other layer types.

    Args:
        module: A supported module (see the module docstring) or a type added with :func:`register_extractor`.
        split: ``None`` (no split), an ``int`` number of equal parts (``3`` for a fused ``qkv`` projection), or a
            list of part sizes summing to the number of neurons per set (timm ``ParallelScalingBlock.in_proj``:
            ``[mlp_hidden] + [dim] * 3``).
        std_conv: ``"raw"`` or ``"standardized"``, see above.

    Returns:
        A list of ``(S, N, d)`` tensors, differentiable functions (views where possible) of the live weight.

    Raises:
        TypeError: If there is no extractor for ``type(module)``.
        ValueError: If ``module`` has no weight with ``ndim >= 2``, ``split`` does not fit the number of neurons, or
            ``std_conv`` is invalid.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> [tuple(t.shape) for t in extract_neuron_sets(nn.Linear(16, 48), split=3)]  # fused qkv
        [(3, 16, 16)]
        >>> [tuple(t.shape) for t in extract_neuron_sets(nn.Conv2d(8, 12, 3, groups=4))]
        [(4, 3, 18)]
        >>> [tuple(t.shape) for t in extract_neuron_sets(nn.Linear(4, 10), split=[4, 2, 2, 2])]
        [(1, 4, 4), (3, 2, 4)]
    """
    _check_std_conv(std_conv)
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected argument `module` to be an nn.Module, but got {_type_name(module)}.")
    entry = _lookup(module)
    if entry is None:
        raise TypeError(
            f"No neuron extractor for module type {_type_name(module)} ({type(module).__module__}). "
            f"Supported (and subclasses): {_supported_names()}. "
            "Add one with `lightning_comhe.neurons.register_extractor(cls, fn)`."
        )
    if split is not None and entry.owns_children:
        raise ValueError(f"Argument `split` is not supported for {_type_name(module)} (got split={split!r}).")
    sets = entry.fn(module, std_conv)
    out: list[Tensor] = []
    for t in sets:
        out.extend(_apply_split(t, split, module))
    return out


def extract_neurons(module: nn.Module, **kwargs: Any) -> list[Tensor]:
    """Return the neuron sets of ``module`` unbound into ``(N, d)`` matrices.

    The same as :func:`extract_neuron_sets` (which takes the same keyword arguments), with every ``(S, N, d)``
    tensor unbound along ``S``.

    Args:
        module: A supported module.
        **kwargs: ``split`` and ``std_conv``, see :func:`extract_neuron_sets`.

    Returns:
        A list of ``(N, d)`` tensors, one per neuron set.

    Example::

        >>> from torch import nn
        >>> [tuple(m.shape) for m in extract_neurons(nn.Conv1d(4, 6, 3, groups=2))]
        [(3, 6), (3, 6)]
    """
    return [matrix for sets in extract_neuron_sets(module, **kwargs) for matrix in sets.unbind(0)]
