"""Layer discovery's walk over a model: the candidate layers, the name filters and the skip rules.

Pure PyTorch; timm classes are only looked up once timm is imported. A *candidate* is a module with a neuron
extractor, in ``named_modules()`` order; the submodules of a container that owns its children (timm
``MixedConv2d``) are not candidates again, and a module with several weight matrices (``nn.MultiheadAttention``,
the recurrent layers: :mod:`lightning_comhe._parts`) gives one candidate per weight matrix, named
``<module>.<param>``. A candidate is skipped (with a reason) when it is a LoRA adapter (``lora_A`` / ``lora_B``),
its weight is parametrized in a way that does not say which parameter holds the neuron directions, frozen, lazy,
shared with an earlier layer, a grouped conv under ``grouped="skip"``, when a set has fewer than two neurons, or
when its neurons are all collinear by construction (dimension ``d = 1``; ``d = 2`` for standardized weights).
:func:`unregularized` lists the trainable tensors with ``ndim >= 2`` that belong to no candidate (embeddings,
tokens, position tables, adapters held as parameters, weights of unsupported modules).

Example::

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Linear(8, 1))
    >>> [c.name for c in candidates(model)]
    ['0', '1', '3']
    >>> skip_reason(candidates(model)[1], "skip", {})
    "depthwise conv (groups=8), grouped='skip'"
    >>> size_reason(candidates(model)[2], "head", [(1, 1, 8)])
    '1 neuron per set (1-output head)'
    >>> [(c.name, c.split) for c in candidates(nn.GRU(4, 6))]
    [('weight_ih_l0', 3), ('weight_hh_l0', 3)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_comhe import _parts
from lightning_comhe._extractors import Shape, lookup
from lightning_comhe._parametrized import weight_direction
from lightning_comhe._timm_extractors import timm_classes

__all__ = [
    "LORA_NAMES",
    "Candidate",
    "Weights",
    "candidates",
    "compile_patterns",
    "groups_of",
    "is_lora",
    "is_under",
    "listing",
    "selected",
    "size_reason",
    "skip_reason",
    "unregularized",
    "weights_of",
]

#: Module / parameter names of LoRA-style adapters (peft: ``lora_A`` / ``lora_B`` ModuleDicts of Linear layers).
LORA_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
LORA_REASON = "LoRA adapter (lora_A / lora_B): a low-rank update of another layer, not a layer's neurons"
_STD_CONVS = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
_TOKEN = re.compile(
    r"(^|[._])(cls|class|reg|dist|mask)_token|pos_emb|position|rel_pos|attention_biases|(^|[._])latent", re.I
)
_MAX_LISTED = 10


def compile_patterns(patterns: str | Sequence[str] | None) -> list[re.Pattern[str]] | None:
    """Compile already validated ``include`` / ``exclude`` regexes (``None`` stays ``None``)."""
    if patterns is None:
        return None
    return [re.compile(p) for p in ([patterns] if isinstance(patterns, str) else patterns)]


def selected(name: str, include: list[re.Pattern[str]] | None, exclude: list[re.Pattern[str]] | None) -> bool:
    """Whether ``name`` passes the filters: one ``include`` regex (if any) and no ``exclude`` regex matches it."""
    if include is not None and not any(p.search(name) for p in include):
        return False
    return not (exclude is not None and any(p.search(name) for p in exclude))


def is_under(name: str, prefix: str) -> bool:
    """Whether ``name`` is a strict descendant of the module named ``prefix`` (``""`` is the root)."""
    return name != prefix and (prefix == "" or name.startswith(prefix + "."))


class Candidate(NamedTuple):
    """A layer discovery may take.

    Attributes:
        name: The layer name: the module's qualified name, or ``<module>.<param>`` for one weight matrix of a module
            with several.
        module: The module.
        param: The weight matrix (``None``: the module's own neurons).
        split: The cut of that weight matrix into sets (its projections or gates).
    """

    name: str
    module: nn.Module
    param: str | None = None
    split: int | None = None


def is_lora(name: str) -> bool:
    """Whether the qualified ``name`` is (inside) a LoRA adapter: one of its components is in :data:`LORA_NAMES`."""
    return any(part in LORA_NAMES for part in name.split("."))


def candidates(model: nn.Module) -> list[Candidate]:
    """The modules with a neuron extractor (one candidate per weight matrix of a module with several), in order.

    The children of containers that own them are left out.
    """
    owned: list[str] = []
    out: list[Candidate] = []
    for name, module in model.named_modules():
        if any(is_under(name, p) for p in owned):
            continue
        entry = lookup(module)
        if entry is None:
            continue
        if entry.parts is not None:
            out.extend(
                Candidate(f"{name}.{p.param}" if name else p.param, module, p.param, p.split)
                for p in _parts.parts_of(module)
            )
            continue
        out.append(Candidate(name, module))
        if entry.owns_children:
            owned.append(name)
    return out


def groups_of(module: nn.Module) -> tuple[int, bool]:
    """``(groups, depthwise)`` of a (possibly mixed) conv; ``(1, False)`` for other layers."""
    mixed = timm_classes("MixedConv2d")
    if mixed and isinstance(module, mixed):
        info = [groups_of(child) for child in module.children()]
        return max((g for g, _ in info), default=1), bool(info) and all(dw for _, dw in info)
    groups = getattr(module, "groups", 1)
    groups = groups if isinstance(groups, int) else 1
    return groups, groups > 1 and groups == getattr(module, "in_channels", None)


class Weights(NamedTuple):
    """The tensors of a candidate's neurons.

    Attributes:
        sources: What the neurons are read from: the weight, its direction parameter (weight norm, spectral norm),
            or all the parameters of a container. Checked for lazy and frozen tensors.
        identity: Every parameter the weight is computed from (``g`` and ``v`` of a weight norm): its identity, to
            detect weights shared between layers, and what counts as covered by the layer.
        reason: Why the neurons cannot be read (a parametrization that does not say where they are), else ``None``.
    """

    sources: list[Tensor]
    identity: list[Tensor]
    reason: str | None = None


def weights_of(candidate: Candidate) -> Weights:
    """The tensors a candidate's neurons come from (see :class:`Weights`); never evaluates a parametrization."""
    module = candidate.module
    found = weight_direction(module, candidate.param or "weight")
    if found.reason is not None:
        entry = lookup(module)
        if candidate.param is not None or entry is None or not entry.user:
            return Weights([], found.params, found.reason)
        return Weights(found.params, found.params)  # a user extractor reads the weight its own way
    if found.tensor is not None:
        return Weights([found.tensor], found.params)
    params = list(module.parameters())  # a container (MixedConv2d, user containers)
    return Weights(params, params)


def skip_reason(candidate: Candidate, grouped: str, seen: dict[int, str]) -> str | None:
    """Why a candidate is not regularized before its shapes are known (``seen``: ``id(parameter)`` -> layer name)."""
    if is_lora(candidate.name):
        return LORA_REASON
    weights = weights_of(candidate)
    if weights.reason is not None:
        return weights.reason
    if not weights.sources:
        return "no parameters"
    if any(is_lazy(w) for w in weights.sources):
        return "uninitialized lazy parameter"
    if not any(w.requires_grad for w in weights.sources):
        return "frozen weight (requires_grad=False)"
    for w in weights.identity:
        if id(w) in seen:
            return f"weight shared with {seen[id(w)] or '<root>'}"
    groups, depthwise = groups_of(candidate.module)
    kind = "depthwise conv" if depthwise else "grouped conv"
    if groups > 1 and grouped == "skip":
        return f"{kind} (groups={groups}), grouped='skip'"
    return None


def size_reason(candidate: Candidate, role: str, shapes: list[Shape], std_conv: str = "raw") -> str | None:
    """Why a candidate with these set shapes is not regularized.

    A set with fewer than two neurons has no pair; neurons of dimension ``d = 1`` are all collinear (every pair is
    parallel or antiparallel, so the energy is about ``1/eps`` and its gradient only inflates the weights), and so
    are the standardized neurons of dimension ``d = 2`` of a timm weight-standardised conv (centring leaves a
    one-dimensional subspace).
    """
    if any(n < 2 for _, n, _ in shapes):
        groups, depthwise = groups_of(candidate.module)
        if groups > 1:
            detail = "depthwise conv" if depthwise else "grouped conv"
        else:
            detail = "1-output head" if role == "head" else "1 output"
        return f"1 neuron per set ({detail})"
    if any(d == 1 for _, _, d in shapes):
        return "neurons of dimension d=1 are all collinear (no energy to minimize)"
    std = timm_classes(*_STD_CONVS)
    if std_conv == "standardized" and std and isinstance(candidate.module, std) and any(d == 2 for *_, d in shapes):
        return "standardized neurons of dimension d=2 are all collinear (centring leaves one dimension)"
    return None


def _unregularized_reason(name: str, owner: nn.Module) -> str | None:
    """Why a trainable tensor of no candidate is not regularized; ``None``: not worth listing (a scale or a bias)."""
    p = owner._parameters[name.rpartition(".")[2]]
    matrix = sum(int(size) > 1 for size in p.shape) >= 2  # gains / layer scales / temperatures are (C, 1, 1)
    if is_lora(name):
        return "LoRA adapter"
    if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding table"
    if _TOKEN.search(name):
        return "token or position table"
    if not matrix:
        return None
    if lookup(owner) is not None:
        return f"not a weight matrix of {type(owner).__name__}"
    return f"{type(owner).__name__} parameter without a neuron extractor"


def unregularized(model: nn.Module, found: list[Candidate]) -> list[tuple[str, str]]:
    """``(parameter name, reason)`` of the trainable tensors outside every candidate that are worth naming.

    Those are the tensors with ``ndim >= 2`` that hold a matrix (two dimensions of size > 1) or are a token,
    position table, embedding or LoRA adapter; per-channel scales shaped ``(C, 1, 1)`` and biases are not listed.
    They are out of scope by design (embeddings, class / register tokens, position embeddings and tables, LoRA
    parameters) or belong to a module type without an extractor (e.g. ``nn.Bilinear``; add one with
    ``register_extractor``).
    """
    covered = {id(p) for c in found for p in weights_of(c).identity}
    out: list[tuple[str, str]] = []
    for module_name, module in model.named_modules():
        for param_name, p in module._parameters.items():
            if p is None or is_lazy(p) or not p.requires_grad or p.ndim < 2 or id(p) in covered:
                continue
            covered.add(id(p))
            name = f"{module_name}.{param_name}" if module_name else param_name
            reason = _unregularized_reason(name, module)
            if reason is not None:
                out.append((name, reason))
    return out


def listing(names: list[str]) -> str:
    """At most ten names (``<root>`` for ``""``), then how many more."""
    shown = ", ".join(n or "<root>" for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f", … and {more} more" if more > 0 else "")
