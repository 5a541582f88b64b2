"""Layer discovery: which modules of a model CoMHE regularises, and in which role.

This module is pure PyTorch and timm-aware without importing timm (timm classes are only looked up once timm is
imported). :func:`discover_layers` walks ``model.named_modules()`` and returns a :class:`LayerSelection`:

* **Candidates** are the modules that have a neuron extractor (:mod:`lightning_comhe.neurons`): ``Linear``,
  ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (and subclasses, e.g. timm ``Conv2dSame`` and ``StdConv2d``), timm
  ``CondConv2d`` and timm ``MixedConv2d`` (taken as one layer; its child convs are not taken again), plus types added
  with :func:`~lightning_comhe.neurons.register_extractor`; and every weight matrix of ``nn.MultiheadAttention``
  (``in_proj_weight`` as q / k / v, or the separate ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``)
  and of the recurrent layers (each ``weight_ih_l{k}`` / ``weight_hh_l{k}`` as one set per gate), each a layer of
  its own named ``<module>.<param>``. Only weight matrices are used, so embeddings, norms, class / register tokens,
  position embeddings, layer scales and biases are never regularised; the trainable tensors with ``ndim >= 2``
  outside every candidate are listed in :attr:`LayerSelection.not_regularized`.
* **Parametrized weights** (``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` and their hook
  based forms) are regularised through their direction parameter (``v``, or the unnormalised weight), never by
  evaluating the parametrization (:mod:`lightning_comhe._parametrized`).
* **Filters**: ``include`` / ``exclude`` regexes are matched with :func:`re.search` against the qualified module
  name. They apply to every layer, the head included.
* **Head**: the classifier gets ``role="head"`` (the paper gives the last layer its own, uncompressed treatment);
  :func:`find_heads` is the ``head="auto"`` rule.
* **Fused weights** are split automatically: a ``qkv`` projection of a timm-style attention into ``q``, ``k``,
  ``v`` (``split=3``), ``ParallelScalingBlock.in_proj`` into ``in_split`` parts, and ``GluMlp.fc1`` into its value
  and gate halves (``split=2``).
* **Skipped** layers are reported with a reason: LoRA adapters (``lora_A`` / ``lora_B``, never a head either),
  weights under another parametrization, frozen or uninitialised (lazy) weights, grouped convs when
  ``grouped="skip"``, weights shared with an earlier layer (the same parameter object), sets with fewer than two
  neurons (a depthwise conv has one neuron per group, a one-output head has a single neuron): there are no pairs,
  so there is no energy; and neurons of dimension ``d = 1`` (``nn.Linear(1, H)``, a 1×1 conv on one channel per
  group), which are all collinear, so the energy is about ``1/eps`` and only inflates the weights.

This module is the public API; the walk and the skip rules are in :mod:`lightning_comhe._walk`, the head rule in
:mod:`lightning_comhe._heads` and the detection of fused projections in :mod:`lightning_comhe._fused`. The
arguments are checked by :class:`~lightning_comhe.config.SelectionConfig`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from torch import Tensor, nn

from lightning_comhe._extractors import check_module
from lightning_comhe._fused import fused_split, neuron_set_shapes
from lightning_comhe._heads import auto_heads, named_heads
from lightning_comhe._parts import part_sets, part_shapes
from lightning_comhe._walk import (
    Candidate,
    candidates,
    compile_patterns,
    listing,
    selected,
    size_reason,
    skip_reason,
    unregularized,
    weights_of,
)
from lightning_comhe.config import Grouped, SelectionConfig
from lightning_comhe.neurons import STD_CONV_MODES as STD_CONV_MODES  # re-exported: importable from here as before
from lightning_comhe.neurons import Split as Split
from lightning_comhe.neurons import StdConvMode, extract_neuron_sets

__all__ = ["LayerSelection", "NeuronLayer", "Role", "discover_layers", "find_heads"]

Role = Literal["hidden", "head"]

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
        param: For a module with several weight matrices (``nn.MultiheadAttention``, ``nn.LSTM``, ...): the one
            this layer is (``"in_proj_weight"``, ``"weight_hh_l0"``, ...), cut by ``split``; ``None`` otherwise.

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
    param: str | None = None

    def neuron_sets(self) -> list[Tensor]:
        """Return the live ``(S, N, d)`` neuron sets (differentiable; gathers FSDP2 ``DTensor`` weights)."""
        if self.param is not None:
            return part_sets(self.module, self.param, self.split)  # type: ignore[arg-type]
        return extract_neuron_sets(self.module, split=self.split, std_conv=self.std_conv)

    def weights(self) -> list[Tensor]:
        """Return the tensors the neurons are read from: the weight, its direction parameter or the weight matrix."""
        return weights_of(Candidate(self.name, self.module, self.param)).sources

    def shapes(self) -> list[tuple[int, int, int]]:
        """Return ``(S, N, d)`` of every tensor of :meth:`neuron_sets`.

        For built-in layer types this uses the declared sizes (``out_features``, ``in_channels``, ``kernel_size``,
        ``groups``, ...), so it is cheap and gives the full shapes even when the weight is an FSDP2 shard; for
        user-registered types the sets are extracted under ``torch.no_grad()``.
        """
        if self.param is not None:
            return part_shapes(self.module, self.param, self.split)  # type: ignore[arg-type]
        return neuron_set_shapes(self.module, split=self.split, std_conv=self.std_conv)

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
        not_regularized: ``(parameter name, reason)`` for the trainable tensors with ``ndim >= 2`` that belong to
            no candidate layer: embeddings, class / register tokens, position embeddings, LoRA parameters, weights of
            module types without an extractor. Out of scope by design; listed so that nothing is left out silently.
    """

    layers: list[NeuronLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    not_regularized: list[tuple[str, str]] = field(default_factory=list)

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
        text += _entries(self.skipped)
        if self.not_regularized:
            text += f"; not regularized {len(self.not_regularized):,}" + _entries(self.not_regularized)
        return text


def _entries(entries: list[tuple[str, str]]) -> str:
    """``": a (why), b (why), … and 3 more"`` (empty for no entries)."""
    if not entries:
        return ""
    shown = [f"{name or '<root>'} ({reason})" for name, reason in entries[:_MAX_SKIPS_IN_SUMMARY]]
    more = len(entries) - len(shown)
    return ": " + ", ".join(shown) + (f", … and {more:,} more" if more else "")


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def find_heads(model: nn.Module) -> list[str]:
    """Return the qualified names of the layers ``head="auto"`` makes the head, in ``named_modules()`` order per root.

    Every outermost timm-style model (a module with a callable ``get_classifier()`` that is not inside another one:
    the root, or e.g. the ``self.model`` of a ``LightningModule``; each of several models side by side) contributes
    the layer(s) its ``get_classifier()`` returns, else its ``pretrained_cfg["classifier"]`` name(s); a headless timm
    model (``num_classes=0``) contributes none. Without any timm-style module the head is the last ``nn.Linear``. A
    head that is a container resolves to the last candidate layer inside it. A LoRA adapter (``lora_A`` /
    ``lora_B``) is never the head. ``include`` / ``exclude`` and the skip rules of :func:`discover_layers` are not
    applied here.

    Args:
        model: The model.

    Returns:
        The names in ``model.named_modules()`` (``[]`` if there is no head).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.

    Example::

        >>> from torch import nn
        >>> find_heads(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
        ['2']
        >>> class Net(nn.Module):  # timm style
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.fc = nn.Linear(4, 8), nn.Linear(8, 3)
        ...     def get_classifier(self):
        ...         return self.fc
        >>> class Ensemble(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b, self.mix = Net(), Net(), nn.Linear(6, 3)
        >>> find_heads(Ensemble())
        ['a.fc', 'b.fc']
    """
    check_module("model", model)
    return auto_heads(model, candidates(model))


_DEFAULTS = {f.name: f.default for f in fields(SelectionConfig)}


def _selection_config(config: SelectionConfig | None, **kwargs: Any) -> SelectionConfig:
    """Build (and so validate) the config from the keywords, or check that ``config`` comes alone."""
    if config is None:
        return SelectionConfig(**kwargs)
    if not isinstance(config, SelectionConfig):
        raise TypeError(f"`config` must be a SelectionConfig or None, got {type(config).__name__}.")
    given = [f"{k}={v!r}" for k, v in kwargs.items() if v != _DEFAULTS[k]]
    if given:
        raise ValueError(
            "`config` must be the only selection argument (not with include, exclude, head, grouped or std_conv), "
            f"got config={config!r} and {', '.join(given)}."
        )
    return config


def discover_layers(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    head: str | Sequence[str] | None = "auto",
    grouped: Grouped = "per_group",
    std_conv: StdConvMode = "raw",
    config: SelectionConfig | None = None,
    allow_empty: bool = False,
) -> LayerSelection:
    """Select the layers of ``model`` whose neurons CoMHE regularises.

    Head rules (``head="auto"``, :func:`find_heads`): for timm models (any module with ``get_classifier()``, the
    outermost one(s) when a timm model is wrapped, e.g. in a ``LightningModule``, or several side by side) the
    module(s) ``get_classifier()`` returns, else the ``pretrained_cfg["classifier"]`` name(s); a headless timm model
    (``num_classes=0``, ``get_classifier()`` is ``nn.Identity``) has no head. For other models the head is the last
    ``nn.Linear`` in ``named_modules()`` order. A head that is a container (e.g. LeViT's ``NormLinear``) resolves to
    the last candidate layer inside it. LoRA adapters (``lora_A`` / ``lora_B``) are never the head.

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
        config: The five arguments above as one :class:`~lightning_comhe.config.SelectionConfig`, instead of the
            keywords (which must then keep their defaults).
        allow_empty: Return an empty selection instead of raising when no layer is selected (a model whose layers
            are all frozen for now, e.g. by a fine-tuning schedule).

    Returns:
        The selected layers (``named_modules()`` order) and the skipped candidates with their reasons. Candidates
        filtered out by ``include`` / ``exclude`` are not listed as skipped.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``config`` not a ``SelectionConfig``.
        ValueError: If an argument is invalid (a regex, ``head``, ``grouped``, ``std_conv``; see
            :class:`~lightning_comhe.config.SelectionConfig`), ``head`` names no (usable) module, ``config`` comes
            with a keyword that is not at its default, or no layer is selected.

    Example::

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> selection = discover_layers(model, exclude=r"^0$")
        >>> [(layer.name, layer.role) for layer in selection]
        [('2', 'hidden'), ('4', 'head')]
        >>> selection.summary()
        'CoMHE regularizes 2 layers (11 neurons in 2 sets); head: 4; skipped 0'
        >>> discover_layers(model, config=SelectionConfig(exclude=r"^0$", head="2")).names
        ['2', '4']
    """
    check_module("model", model)
    cfg = _selection_config(config, include=include, exclude=exclude, head=head, grouped=grouped, std_conv=std_conv)
    include_re = compile_patterns(cfg.include)
    exclude_re = compile_patterns(cfg.exclude)

    found = candidates(model)
    if cfg.head is None:
        head_names: list[str] = []
    elif cfg.head == "auto":
        head_names = auto_heads(model, found)
    else:
        head_names = named_heads(cfg.head, model, found)

    modules = dict(model.named_modules())
    selection = LayerSelection(not_regularized=unregularized(model, found))
    seen: dict[int, str] = {}
    for candidate in found:
        name, module = candidate.name, candidate.module
        if not selected(name, include_re, exclude_re):
            continue
        role: Role = "head" if name in head_names else "hidden"
        layer = NeuronLayer(name, module, role, candidate.split, cfg.std_conv, candidate.param)
        reason = skip_reason(candidate, cfg.grouped, seen)
        if reason is None:
            base = layer.shapes()
            if candidate.param is None and len({n for _, n, _ in base}) == 1:
                layer.split = fused_split(modules, name, module, base[0][1])
            reason = size_reason(candidate, role, layer.shapes(), cfg.std_conv)
        if reason is not None:
            selection.skipped.append((name, reason))
            continue
        for w in weights_of(candidate).identity:
            seen[id(w)] = name
        selection.layers.append(layer)

    if not selection.layers and not allow_empty:
        names = [c.name for c in found]
        msg = (
            f"No layer selected for CoMHE with include={cfg.include!r}, exclude={cfg.exclude!r}, "
            f"grouped={cfg.grouped!r}. The model has {len(names)} candidate layers"
        )
        msg += f": {listing(names)}." if names else " (no Linear / Conv / ConvTranspose / CondConv2d / MixedConv2d)."
        if selection.skipped:
            msg += " Skipped: " + listing([f"{n or '<root>'} ({r})" for n, r in selection.skipped]) + "."
        raise ValueError(msg)
    return selection
