"""Layer discovery: which modules of a model CoMHE regularises, and in which role.

This module is pure PyTorch and timm-aware without importing timm (timm classes are only looked up once timm is
imported). :func:`discover_layers` walks ``model.named_modules()`` and returns a :class:`LayerSelection`:

* **Candidates** are the modules that have a neuron extractor (:mod:`lightning_comhe.neurons`): ``Linear``,
  ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (and subclasses, e.g. timm ``Conv2dSame`` and ``StdConv2d``), timm
  ``CondConv2d`` and timm ``MixedConv2d`` (taken as one layer; its child convs are not taken again), plus types added
  with :func:`~lightning_comhe.neurons.register_extractor`. Only their weight matrices are used, so embeddings,
  norms, class / register tokens, position embeddings, layer scales and biases are never regularised.
* **Filters**: ``include`` / ``exclude`` regexes are matched with :func:`re.search` against the qualified module
  name. They apply to every layer, the head included.
* **Head**: the classifier gets ``role="head"`` (the paper gives the last layer its own, uncompressed treatment).
* **Fused weights** are split automatically: a ``qkv`` projection of a timm-style attention into ``q``, ``k``,
  ``v`` (``split=3``), ``ParallelScalingBlock.in_proj`` into ``in_split`` parts, and ``GluMlp.fc1`` into its value
  and gate halves (``split=2``).
* **Skipped** layers are reported with a reason: frozen or uninitialised (lazy) weights, grouped convs when
  ``grouped="skip"``, weights shared with an earlier layer, and sets with fewer than two neurons (a depthwise conv
  has one neuron per group, a one-output head has a single neuron): there are no pairs, so there is no energy.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_comhe.neurons import (
    STD_CONV_MODES,
    Split,
    StdConvMode,
    _lookup,
    _neuron_set_shapes,
    _timm_classes,
    extract_neuron_sets,
)

__all__ = ["discover_layers", "LayerSelection", "NeuronLayer"]

Role = Literal["hidden", "head"]

# Attributes of attention modules whose ``qkv`` is not three equal, contiguous [q; k; v] blocks (per-head
# interleaved or with different key / value widths: timm EfficientFormer, TinyViT, LeViT, BottleneckAttn, GCViT).
_ASYMMETRIC_QKV_ATTRS = ("key_dim", "val_dim", "key_attn_dim", "val_attn_dim", "dim_out_qk", "dim_out_v", "use_global")
_MAX_LISTED = 10
_MAX_SKIPS_IN_SUMMARY = 5


@dataclass
class NeuronLayer:
    """One regularised layer.

    Attributes:
        name: Qualified name in ``model.named_modules()`` (``""`` for the root).
        module: The module.
        role: ``"head"`` for the classifier, ``"hidden"`` otherwise.
        split: How the neuron axis is split into independent sets (see
            :func:`~lightning_comhe.neurons.extract_neuron_sets`).
        std_conv: ``"raw"`` or ``"standardized"`` weight for timm weight-standardised convs.

    Example::

        >>> from torch import nn
        >>> layer = NeuronLayer("qkv", nn.Linear(8, 24), "hidden", split=3)
        >>> layer.shapes()
        [(3, 8, 8)]
        >>> [tuple(t.shape) for t in layer.neuron_sets()]
        [(3, 8, 8)]
    """

    name: str
    module: nn.Module = field(repr=False)
    role: Role = "hidden"
    split: int | list[int] | None = None
    std_conv: StdConvMode = "raw"

    def neuron_sets(self) -> list[Tensor]:
        """Return the live ``(S, N, d)`` neuron sets (differentiable; gathers FSDP2 ``DTensor`` weights)."""
        return extract_neuron_sets(self.module, split=self.split, std_conv=self.std_conv)

    def shapes(self) -> list[tuple[int, int, int]]:
        """Return ``(S, N, d)`` of every tensor of :meth:`neuron_sets`.

        For built-in layer types this uses the declared sizes (``out_features``, ``in_channels``, ``kernel_size``,
        ``groups``, ...), so it is cheap and gives the full shapes even when the weight is an FSDP2 shard; for
        user-registered types the sets are extracted under ``torch.no_grad()``.
        """
        return _neuron_set_shapes(self.module, split=self.split, std_conv=self.std_conv)

    @property
    def num_neurons(self) -> int:
        """Total number of neurons ``Σ S·N`` over the sets."""
        return sum(s * n for s, n, _ in self.shapes())

    @property
    def num_sets(self) -> int:
        """Total number of neuron sets ``Σ S``."""
        return sum(s for s, _, _ in self.shapes())


@dataclass
class LayerSelection:
    """The result of :func:`discover_layers`.

    Attributes:
        layers: The regularised layers, in ``named_modules()`` order.
        skipped: ``(name, reason)`` for candidate layers that passed ``include`` / ``exclude`` but are not
            regularised.
    """

    layers: list[NeuronLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[NeuronLayer]:
        return iter(self.layers)

    @property
    def names(self) -> list[str]:
        """Names of the regularised layers."""
        return [layer.name for layer in self.layers]

    @property
    def heads(self) -> list[NeuronLayer]:
        """The layers with ``role="head"``."""
        return [layer for layer in self.layers if layer.role == "head"]

    def summary(self) -> str:
        """Return a one-line human-readable summary.

        Example::

            >>> from torch import nn
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8, 4))
            >>> print(discover_layers(model).summary())
            CoMHE regularizes 2 layers (12 neurons in 2 sets); head: 3; skipped 1: 1 (1 neuron per set (depthwise conv))
        """
        n_layers = len(self.layers)
        neurons = sum(layer.num_neurons for layer in self.layers)
        sets = sum(layer.num_sets for layer in self.layers)
        heads = ", ".join(layer.name or "<root>" for layer in self.heads) or "none"
        text = (
            f"CoMHE regularizes {n_layers:,} layer{'s' if n_layers != 1 else ''} "
            f"({neurons:,} neuron{'s' if neurons != 1 else ''} in {sets:,} set{'s' if sets != 1 else ''}); "
            f"head: {heads}; skipped {len(self.skipped):,}"
        )
        if self.skipped:
            shown = [f"{name or '<root>'} ({reason})" for name, reason in self.skipped[:_MAX_SKIPS_IN_SUMMARY]]
            more = len(self.skipped) - len(shown)
            text += ": " + ", ".join(shown) + (f", … and {more:,} more" if more else "")
        return text


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _compile(patterns: str | Sequence[str] | None, arg: str) -> list[re.Pattern[str]] | None:
    if patterns is None:
        return None
    items = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(items, Sequence) or not all(isinstance(p, str) for p in items):
        raise TypeError(f"Expected argument `{arg}` to be a regex string or a list of them, but got {patterns!r}.")
    compiled = []
    for pattern in items:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"Argument `{arg}` has an invalid regular expression {pattern!r}: {err}.") from err
    return compiled


def _selected(name: str, include: list[re.Pattern[str]] | None, exclude: list[re.Pattern[str]] | None) -> bool:
    if include is not None and not any(p.search(name) for p in include):
        return False
    return not (exclude is not None and any(p.search(name) for p in exclude))


def _under(name: str, prefix: str) -> bool:
    """Whether ``name`` is a strict descendant of the module named ``prefix``."""
    return name != prefix and (prefix == "" or name.startswith(prefix + "."))


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    owned: list[str] = []
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(_under(name, p) for p in owned):
            continue
        entry = _lookup(module)
        if entry is None:
            continue
        out.append((name, module))
        if entry.owns_children:
            owned.append(name)
    return out


def _resolve(name: str, modules: dict[str, nn.Module], candidates: list[tuple[str, nn.Module]]) -> str | None:
    """The candidate named ``name`` or else the last candidate inside it (e.g. ``head`` -> ``head.fc``)."""
    if name not in modules:
        return None
    inside = [c for c, _ in candidates if c == name or _under(c, name)]
    if name in inside:
        return name
    return inside[-1] if inside else None


def _auto_heads(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> list[str]:
    modules = dict(model.named_modules())
    names_by_id = {id(m): n for n, m in modules.items()}
    roots = []  # outermost timm-style models (the root, or e.g. `self.model` of a LightningModule)
    for name, module in modules.items():
        if callable(getattr(module, "get_classifier", None)) and not any(_under(name, r) for r in roots):
            roots.append(name)
    if not roots:
        linears = [n for n, m in candidates if isinstance(m, nn.Linear)]
        return linears[-1:]
    heads: list[str] = []
    for root in roots:
        found: list[str] = []
        try:
            classifier = modules[root].get_classifier()
        except (AttributeError, TypeError, NotImplementedError):
            classifier = None
        items = classifier if isinstance(classifier, (tuple, list)) else [classifier]
        for item in items:
            if isinstance(item, nn.Module) and id(item) in names_by_id:
                resolved = _resolve(names_by_id[id(item)], modules, candidates)
                if resolved is not None:
                    found.append(resolved)
        if not found:
            cfg = getattr(modules[root], "pretrained_cfg", None) or getattr(modules[root], "default_cfg", None)
            cfg_names = cfg.get("classifier") if isinstance(cfg, dict) else None
            cfg_names = [cfg_names] if isinstance(cfg_names, str) else list(cfg_names or [])
            for cfg_name in cfg_names:
                resolved = _resolve(f"{root}.{cfg_name}" if root else cfg_name, modules, candidates)
                if resolved is not None:
                    found.append(resolved)
        heads.extend(n for n in found if n not in heads)
    return heads


def _named_heads(head: str | Sequence[str], model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> list[str]:
    names = [head] if isinstance(head, str) else list(head)
    modules = dict(model.named_modules())
    heads = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"Expected argument `head` to be 'auto', None or module name(s), but got {head!r}.")
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise ValueError(f"Argument `head` names no module of the model: {name!r}.{hint}")
        resolved = _resolve(name, modules, candidates)
        if resolved is None:
            raise ValueError(
                f"Argument `head` names module {name!r} ({type(modules[name]).__name__}), which has no weight "
                "matrix CoMHE can regularise."
            )
        heads.append(resolved)
    return heads


def _groups(module: nn.Module) -> tuple[int, bool]:
    """``(groups, depthwise)`` of a (possibly mixed) conv; ``(1, False)`` for other layers."""
    mixed = _timm_classes("MixedConv2d")
    if mixed and isinstance(module, mixed):
        info = [_groups(child) for child in module.children()]
        return max((g for g, _ in info), default=1), bool(info) and all(dw for _, dw in info)
    groups = getattr(module, "groups", 1)
    groups = groups if isinstance(groups, int) else 1
    return groups, groups > 1 and groups == getattr(module, "in_channels", None)


def _weights(module: nn.Module) -> list[Tensor]:
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        return [weight]
    return list(module.parameters())


def _fused_split(model_modules: dict[str, nn.Module], name: str, module: nn.Module, num: int) -> Split:
    """Detect fused projections from the parent module (``num`` = neurons per unsplit set)."""
    if not name:
        return None
    parent_name, _, attr = name.rpartition(".")
    parent = model_modules.get(parent_name)
    if parent is None or getattr(parent, attr, None) is not module:
        return None
    if attr == "qkv":
        if any(getattr(parent, a, None) for a in _ASYMMETRIC_QKV_ATTRS):
            return None
        heads, head_dim = getattr(parent, "num_heads", None), getattr(parent, "head_dim", None)
        if isinstance(heads, int) and isinstance(head_dim, int) and 3 * heads * head_dim != num:
            return None
        return 3 if num % 3 == 0 else None
    in_split = getattr(parent, "in_split", None)
    if attr == "in_proj" and isinstance(in_split, (list, tuple)) and sum(in_split) == num:
        return [int(s) for s in in_split]
    glu = _timm_classes("GluMlp")
    is_glu = bool(glu) and isinstance(parent, glu)
    is_glu = is_glu or (hasattr(parent, "gate_last") and hasattr(parent, "chunk_dim"))
    if attr == "fc1" and is_glu and getattr(parent, "chunk_dim", -1) in (1, -1) and num % 2 == 0:
        return 2
    return None


def _skip_reason(module: nn.Module, grouped: str, seen: dict[int, str]) -> str | None:
    weights = _weights(module)
    if not weights:
        return "no parameters"
    if any(is_lazy(w) for w in weights):
        return "uninitialized lazy parameter"
    if not any(w.requires_grad for w in weights):
        return "frozen weight (requires_grad=False)"
    for w in weights:
        if id(w) in seen:
            return f"weight shared with {seen[id(w)] or '<root>'}"
    groups, depthwise = _groups(module)
    kind = "depthwise conv" if depthwise else "grouped conv"
    if groups > 1 and grouped == "skip":
        return f"{kind} (groups={groups}), grouped='skip'"
    return None


def _size_reason(module: nn.Module, role: Role, shapes: list[tuple[int, int, int]]) -> str | None:
    if all(n >= 2 for _, n, _ in shapes):
        return None
    groups, depthwise = _groups(module)
    if groups > 1:
        detail = "depthwise conv" if depthwise else "grouped conv"
    else:
        detail = "1-output head" if role == "head" else "1 output"
    return f"1 neuron per set ({detail})"


def _listing(names: list[str]) -> str:
    shown = ", ".join(n or "<root>" for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f", … and {more} more" if more > 0 else "")


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def discover_layers(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = "auto",
    grouped: Literal["per_group", "skip"] = "per_group",
    std_conv: StdConvMode = "raw",
) -> LayerSelection:
    """Select the layers of ``model`` whose neurons CoMHE regularises.

    Head rules (``head="auto"``): for timm models (any module with ``get_classifier()``, the outermost one(s) when a
    timm model is wrapped, e.g. in a ``LightningModule``) the module(s) ``get_classifier()`` returns, else the
    ``pretrained_cfg["classifier"]`` name(s); a headless timm model (``num_classes=0``, ``get_classifier()`` is
    ``nn.Identity``) has no head. For other models the head is the last ``nn.Linear`` in ``named_modules()`` order.
    A head that is a container (e.g. LeViT's ``NormLinear``) resolves to the last candidate layer inside it.

    Args:
        model: The model.
        include: Regex or list of regexes; a layer is kept if one matches its name (:func:`re.search`). ``None``
            keeps all. Applies to the head too.
        exclude: Regex or list of regexes; a layer is dropped if one matches its name. Applies to the head too.
        head: ``"auto"`` (see above), ``None`` (no head: every layer is ``"hidden"``), or the name(s) of the head
            module(s) in ``model.named_modules()``.
        grouped: ``"per_group"`` (default): grouped and depthwise convs get one neuron set (and energy) per group,
            since neurons of different groups read disjoint inputs; ``"skip"``: skip them. Either way sets with
            fewer than two neurons (depthwise convs without channel multiplier, one-output heads) are skipped.
        std_conv: ``"raw"`` (default) or ``"standardized"`` weight of timm weight-standardised convs, see
            :func:`~lightning_comhe.neurons.extract_neuron_sets`.

    Returns:
        The selected layers (``named_modules()`` order) and the skipped candidates with their reasons. Candidates
        filtered out by ``include`` / ``exclude`` are not listed as skipped.

    Raises:
        ValueError: If a regex is invalid, ``head`` names no (usable) module, ``grouped`` or ``std_conv`` is invalid,
            or no layer is selected.

    Example::

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> selection = discover_layers(model, exclude=r"^0$")
        >>> [(layer.name, layer.role) for layer in selection]
        [('2', 'hidden'), ('4', 'head')]
        >>> selection.summary()
        'CoMHE regularizes 2 layers (11 neurons in 2 sets); head: 4; skipped 0'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}.")
    if grouped not in ("per_group", "skip"):
        raise ValueError(f"Expected argument `grouped` to be 'per_group' or 'skip', but got {grouped!r}.")
    if std_conv not in STD_CONV_MODES:
        raise ValueError(f"Expected argument `std_conv` to be one of {STD_CONV_MODES}, but got {std_conv!r}.")
    include_re = _compile(include, "include")
    exclude_re = _compile(exclude, "exclude")

    candidates = _candidates(model)
    if head is None:
        head_names: list[str] = []
    elif head == "auto":
        head_names = _auto_heads(model, candidates)
    else:
        head_names = _named_heads(head, model, candidates)

    modules = dict(model.named_modules())
    selection = LayerSelection()
    seen: dict[int, str] = {}
    for name, module in candidates:
        if not _selected(name, include_re, exclude_re):
            continue
        role: Role = "head" if name in head_names else "hidden"
        layer = NeuronLayer(name, module, role, None, std_conv)
        reason = _skip_reason(module, grouped, seen)
        if reason is None:
            base = layer.shapes()
            if len({n for _, n, _ in base}) == 1:
                layer.split = _fused_split(modules, name, module, base[0][1])
            reason = _size_reason(module, role, layer.shapes())
        if reason is not None:
            selection.skipped.append((name, reason))
            continue
        for w in _weights(module):
            seen[id(w)] = name
        selection.layers.append(layer)

    if not selection.layers:
        names = [n for n, _ in candidates]
        msg = (
            f"No layer selected for CoMHE with include={include!r}, exclude={exclude!r}, grouped={grouped!r}. "
            f"The model has {len(names)} candidate layers"
        )
        msg += f": {_listing(names)}." if names else " (no Linear / Conv / ConvTranspose / CondConv2d / MixedConv2d)."
        if selection.skipped:
            msg += " Skipped: " + _listing([f"{n or '<root>'} ({r})" for n, r in selection.skipped]) + "."
        raise ValueError(msg)
    return selection
