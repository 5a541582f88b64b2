"""Fused weights: cutting a module's neuron axis into independent sets (``split``), and detecting fused projections.

A fused ``qkv`` projection is three layers in one weight, so ``split=3`` cuts the neuron axis of each set into the
``q``, ``k``, ``v`` parts, regularized separately; a list of sizes cuts unequal parts (timm
``ParallelScalingBlock.in_proj``: ``[mlp_hidden] + [dim] * 3``). Parts of equal size are stacked into one tensor
(set-major: set ``s`` part ``p`` is entry ``s · parts + p``); parts of different sizes give separate tensors, in
the order of the first occurrence of their size. :func:`fused_split` is the rule discovery uses to recognise fused
projections (timm-style attention ``qkv``, ``in_proj`` with ``in_split``, ``GluMlp.fc1``).

Example::

    >>> from torch import nn
    >>> [tuple(t.shape) for t in split_sets(nn.Linear(4, 10), [4, 2, 2, 2], "raw")]
    [(1, 4, 4), (3, 2, 4)]
    >>> neuron_set_shapes(nn.Conv2d(4, 8, 1, groups=2), split=2)
    [(4, 2, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_comhe._extractors import Extractor, Shape, check_module, declared_shapes, require, type_name
from lightning_comhe._timm_extractors import timm_classes
from lightning_comhe._validation import check_choice
from lightning_comhe.config import STD_CONV_MODES

__all__ = [
    "ASYMMETRIC_QKV_ATTRS",
    "Split",
    "apply_split",
    "fused_split",
    "neuron_set_shapes",
    "split_sets",
    "split_shapes",
    "split_sizes",
]

#: ``split`` argument: the number of equal parts, or the sizes of the parts, of the neuron axis.
Split = int | Sequence[int] | None

#: Attributes of attention modules whose ``qkv`` is not three equal, contiguous [q; k; v] blocks (per-head
#: interleaved or with different key / value widths: timm EfficientFormer, TinyViT, LeViT, BottleneckAttn, GCViT).
ASYMMETRIC_QKV_ATTRS = ("key_dim", "val_dim", "key_attn_dim", "val_attn_dim", "dim_out_qk", "dim_out_v", "use_global")


def split_sizes(split: Split, num: int, module: nn.Module) -> list[int] | None:
    """Validate ``split`` against ``num`` neurons per set of ``module``; return the part sizes (``None``: no split).

    Raises:
        ValueError: If ``split`` is not an int or a list of ints, or does not cut ``num`` into positive parts.
    """
    if split is None:
        return None
    where = f"the {num} neurons per set of {type_name(module)}"
    if isinstance(split, bool) or not isinstance(split, (int, Sequence)) or isinstance(split, str):
        raise ValueError(f"`split` must be an int or a list of ints, got {split!r}.")
    if isinstance(split, int):
        if split < 1 or num % split:
            raise ValueError(f"`split` must divide {where} into equal parts, got {split}.")
        return [num // split] * split
    sizes = list(split)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes) or sum(sizes) != num:
        raise ValueError(f"`split` must be positive sizes summing to {where}, got {sizes} ({num} neurons).")
    return sizes


def _size_groups(sizes: list[int]) -> dict[int, list[int]]:
    """Map each part size (in order of first occurrence) to the start offsets of the parts of that size."""
    groups: dict[int, list[int]] = {}
    start = 0
    for size in sizes:
        groups.setdefault(size, []).append(start)
        start += size
    return groups


def apply_split(sets: Tensor, split: Split, module: nn.Module) -> list[Tensor]:
    """Cut the neuron axis of ``(S, N, d)`` sets of ``module``: one tensor per part size (views where possible)."""
    num_sets, num, dim = sets.shape
    sizes = split_sizes(split, num, module)
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


def split_shapes(shapes: list[Shape], split: Split, module: nn.Module) -> list[Shape]:
    """The shapes :func:`apply_split` gives for sets of these ``shapes``."""
    out: list[Shape] = []
    for num_sets, num, dim in shapes:
        sizes = split_sizes(split, num, module)
        if sizes is None or len(sizes) == 1:
            out.append((num_sets, num, dim))
            continue
        out.extend((num_sets * len(starts), size, dim) for size, starts in _size_groups(sizes).items())
    return out


def _check_splittable(entry: Extractor, split: Split, module: nn.Module) -> None:
    if split is not None and entry.owns_children:
        raise ValueError(f"`split` must be None for {type_name(module)} (a container of layers), got {split!r}.")
    if split is not None and entry.parts is not None:
        raise ValueError(
            f"`split` must be None for {type_name(module)} (its weight matrices are already cut into their "
            f"projections or gates), got {split!r}."
        )


def split_sets(module: nn.Module, split: Split, std_conv: str) -> list[Tensor]:
    """The ``(S, N, d)`` sets of ``module``, cut by ``split`` (``std_conv`` is not checked here).

    Raises:
        TypeError: If there is no extractor for ``type(module)``.
        ValueError: If ``split`` does not fit, or ``module`` owns its children and ``split`` is not ``None``.
    """
    entry = require(module)
    _check_splittable(entry, split, module)
    return [part for sets in entry.fn(module, std_conv) for part in apply_split(sets, split, module)]


def neuron_set_shapes(module: nn.Module, *, split: Split = None, std_conv: str = "raw") -> list[Shape]:
    """Shapes ``(S, N, d)`` of :func:`~lightning_comhe.neurons.extract_neuron_sets`, from declared sizes if possible.

    For built-in layer types the shapes come from ``out_features`` / ``in_channels`` / ``kernel_size`` / ``groups``
    and so are the full shapes even when the weight is an FSDP2 shard; for user extractors the sets are extracted
    under ``torch.no_grad()``.

    Raises:
        TypeError: If ``module`` is not an ``nn.Module`` or has no extractor.
        ValueError: If ``std_conv`` is invalid or ``split`` does not fit.
    """
    check_choice("std_conv", std_conv, STD_CONV_MODES)
    check_module("module", module)
    shapes = declared_shapes(module)
    if shapes is None:
        with torch.no_grad():
            return [tuple(t.shape) for t in split_sets(module, split, std_conv)]
    _check_splittable(require(module), split, module)
    return split_shapes(shapes, split, module)


def _is_glu(module: nn.Module) -> bool:
    glu = timm_classes("GluMlp")
    return (bool(glu) and isinstance(module, glu)) or (hasattr(module, "gate_last") and hasattr(module, "chunk_dim"))


def fused_split(modules: dict[str, nn.Module], name: str, module: nn.Module, num: int) -> Split:
    """The ``split`` of a fused projection, detected from its parent module (``None``: not fused).

    Args:
        modules: ``dict(model.named_modules())``.
        name: The qualified name of ``module``.
        module: The layer.
        num: Its number of neurons per (unsplit) set.

    Returns:
        ``3`` for the ``qkv`` of a timm-style attention with equal, contiguous q / k / v blocks; the ``in_split``
        sizes of an ``in_proj`` (timm ``ParallelScalingBlock``); ``2`` for the ``fc1`` of a ``GluMlp`` (value and
        gate halves); else ``None``.

    Example::

        >>> from torch import nn
        >>> attn = nn.Module()
        >>> attn.qkv, attn.num_heads, attn.head_dim = nn.Linear(8, 24), 2, 4
        >>> fused_split(dict(attn.named_modules()), "qkv", attn.qkv, 24)
        3
    """
    if not name:
        return None
    parent_name, _, attr = name.rpartition(".")
    parent = modules.get(parent_name)
    if parent is None or getattr(parent, attr, None) is not module:
        return None
    if attr == "qkv":
        if any(getattr(parent, a, None) for a in ASYMMETRIC_QKV_ATTRS):
            return None
        heads, head_dim = getattr(parent, "num_heads", None), getattr(parent, "head_dim", None)
        if isinstance(heads, int) and isinstance(head_dim, int) and 3 * heads * head_dim != num:
            return None
        return 3 if num % 3 == 0 else None
    in_split = getattr(parent, "in_split", None)
    if attr == "in_proj" and isinstance(in_split, (list, tuple)) and sum(in_split) == num:
        return [int(s) for s in in_split]
    if attr == "fc1" and _is_glu(parent) and getattr(parent, "chunk_dim", -1) in (1, -1) and num % 2 == 0:
        return 2
    return None
