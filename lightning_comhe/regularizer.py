r"""The CoMHE regularizer: a model, a layer selection and a variant give one penalty.

Pure PyTorch (no Lightning import). The Lightning callback :class:`lightning_comhe.CoMHE` is a thin adapter over
:class:`CoMHERegularizer`; Fabric and raw-PyTorch users call it directly.

For the selected layers, with neuron sets :math:`W_s` (rows are neurons) and per-set weights :math:`\kappa_s`:

.. math::

    R = \sum_s \kappa_s\, E_s(W_s)

where :math:`E_s` depends on the variant and on the set's role:

=================  ==========================================  ====================================
variant            hidden sets (:math:`\kappa` = ``weight``)   head (:math:`\kappa` = ``head_weight``)
=================  ==========================================  ====================================
``"mhe"``          full-space MHE                              full-space MHE
``"half_mhe"``     half-space MHE                              full-space MHE
``"random"``       RP-CoMHE: mean over C fresh Gaussian        full-space MHE
                   projections of half-space MHE
``"angle"``        AP-CoMHE: half-space MHE after a learned    full-space MHE
                   angle-preserving projection
``"adversarial"``  half-space MHE after an adversarially       full-space MHE
                   learned projection
=================  ==========================================  ====================================

A hidden set whose dimension ``d`` is at most the projection dimension ``k`` is regularized with half-space MHE in
full space, without projection: this generalizes the official rule for the first layer (``d = 27 <= k``).
Sets with equal shapes are stacked and computed together in batched matmuls.

The peer regularizers of the paper's comparison tables are further variants (``docs/peers.md``): ``"orthogonal"``
(soft orthogonality :math:`\|G - I\|_F^2`, Bansal et al., NeurIPS 2018), ``"orthonormal"`` (the same on
eps-normalized neurons) and ``"srip"`` (the spectral norm :math:`\sigma(G - I)` by power iteration, Bansal et al.),
where ``G`` is the smaller Gram matrix of the set. They apply the same penalty to hidden layers (``weight``) and the
classifier (``head_weight``), both defaulting to :data:`PEER_DEFAULT_WEIGHTS`, as Bansal et al. regularize every
weight matrix.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_comhe.discovery import LayerSelection, discover_layers
from lightning_comhe.functional.energy import PowerLike, hyperspherical_energy, parse_power, projected_energy
from lightning_comhe.functional.orthogonality import soft_orthogonality, srip, srip_power_iteration
from lightning_comhe.projections import (
    PROJECTION_KINDS,
    AdversarialProjection,
    AngleProjection,
    ProjectionKind,
    RandomProjection,
    key_seed,
)

__all__ = [
    "CoMHERegularizer",
    "PEER_DEFAULT_WEIGHTS",
    "PEER_VARIANTS",
    "RegularizerOutput",
    "Variant",
    "VARIANTS",
    "variant_defaults",
]

Variant = Literal["mhe", "half_mhe", "random", "angle", "adversarial", "orthogonal", "orthonormal", "srip"]
VARIANTS: tuple[str, ...] = (
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
#: Default κ (hidden and head) of the peer variants: Bansal et al. (NeurIPS 2018) use 1e-4..1e-2 scales; the released
#: SRIP code starts at 1e-2 (docs/peers.md).
PEER_DEFAULT_WEIGHTS: dict[str, float] = {"orthogonal": 1e-4, "orthonormal": 1e-4, "srip": 1e-2}

#: Official defaults per variant (algorithm.md §6.1): projection dim k, number of projections C, inner steps.
_VARIANT_DEFAULTS: dict[str, dict[str, int | None]] = {
    "mhe": {"projection_dim": None, "num_projections": None, "inner_steps": None},
    "half_mhe": {"projection_dim": None, "num_projections": None, "inner_steps": None},
    "random": {"projection_dim": 40, "num_projections": 20, "inner_steps": None},
    "angle": {"projection_dim": 30, "num_projections": 1, "inner_steps": 1},
    "adversarial": {"projection_dim": 30, "num_projections": 1, "inner_steps": 10},
    "orthogonal": {"projection_dim": None, "num_projections": None, "inner_steps": None},
    "orthonormal": {"projection_dim": None, "num_projections": None, "inner_steps": None},
    "srip": {"projection_dim": None, "num_projections": None, "inner_steps": None},
}
_DEFAULT_INNER_LR = 0.1  # the official base learning rate, used when neither inner_lr nor the caller's lr is known


def variant_defaults(variant: str) -> dict[str, int | None]:
    """Official per-variant defaults: ``projection_dim`` (k), ``num_projections`` (C) and ``inner_steps``.

    Example::

        >>> variant_defaults("random")
        {'projection_dim': 40, 'num_projections': 20, 'inner_steps': None}
    """
    if variant not in _VARIANT_DEFAULTS:
        raise ValueError(f"`variant` must be one of {', '.join(map(repr, VARIANTS))}; got {variant!r}.")
    return dict(_VARIANT_DEFAULTS[variant])


@dataclass
class RegularizerOutput:
    r"""What one regularizer call returns.

    Attributes:
        penalty: The differentiable total :math:`\sum_s \kappa_s E_s`, a 0-dim float32 (float64) tensor.
        energies: Detached per-layer energies (mean over the layer's sets, without κ), keyed by module name.
    """

    penalty: Tensor
    energies: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _SetRef:
    layer: str
    tensor_index: int  # which of the layer's extracted tensors
    num_sets: int


@dataclass
class _Group:
    key: str
    mode: Literal["plain", "half", "projected", "orthogonal", "orthonormal", "srip"]
    kappa: float
    num_neurons: int
    dim: int
    members: list[_SetRef]

    @property
    def num_sets(self) -> int:
        return sum(m.num_sets for m in self.members)


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}; got {value!r}.")


def _check_float(name: str, value: Any, minimum: float = 0.0, allow_none: bool = True, strict: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        rel = ">" if strict else ">="
        raise ValueError(
            f"`{name}` must be a finite float {rel} {minimum}"
            + (" or None" if allow_none else "")
            + f"; got {value!r}."
        )


def _find_timm_head(model: nn.Module) -> str | None:
    """Qualified name of the classifier of the first timm-style submodule (one with ``get_classifier``)."""
    for prefix, sub in model.named_modules():
        getter = getattr(sub, "get_classifier", None)
        if not callable(getter):
            continue
        try:
            head = getter()
        except Exception:  # noqa: BLE001 - some models need arguments; fall back to discovery's rule
            continue
        if not isinstance(head, nn.Module) or not isinstance(getattr(head, "weight", None), Tensor):
            return None
        for name, mod in sub.named_modules():
            if mod is head:
                return f"{prefix}.{name}" if prefix and name else (prefix or name)
        return None
    return None


class CoMHERegularizer:
    r"""Hyperspherical-energy regularizer for the neurons of a model (MHE, half-space MHE, CoMHE).

    Args:
        model: The model whose layers are regularized. Only a reference is kept (it is not registered as a child).
        variant: ``"mhe"``, ``"half_mhe"``, ``"random"`` (RP-CoMHE), ``"angle"`` (AP-CoMHE) or ``"adversarial"``;
            or a peer regularizer: ``"orthogonal"``, ``"orthonormal"``, ``"srip"`` (see ``docs/peers.md``).
        power: Energy power: ``0``, a float ``> 0``, or ``"0" "1" "2" "a0" "a1" "a2"`` (official strings).
        angular: Use the angular distance (implied by the ``"a"`` strings).
        weight: κ of hidden sets. ``None``: official, 1 (0.1 for angular powers ``s > 0``).
        head_weight: κ of the classifier. ``None``: official, 10 (1 for angular powers ``s > 0``).
        projection_dim: k. ``None``: official per variant (random 40, angle/adversarial 30).
        num_projections: C. ``None``: official per variant (random 20, angle/adversarial 1; C > 1 for the learned
            projections is an extension: the learned P is shared, so only C = 1 is allowed there).
        resample_every: Redraw random projections every this many :meth:`refresh` calls (official: 1).
        projection_kind: For ``variant="random"``: ``"gaussian"`` (official), or an opt-in structured projection that
            cuts the projection cost, which dominates RP-CoMHE: ``"sparse"`` (very sparse signs, density
            ``1/sqrt(d)``, the fastest) or ``"srht"`` (subsampled randomized Hadamard; JL for every input). See
            :class:`~lightning_comhe.projections.RandomProjection` and ``docs/benchmarks.md``.
        inner_steps: Side-optimizer steps per :meth:`refresh` for learned projections (official: angle 1,
            adversarial 10).
        inner_lr: Side-optimizer learning rate. ``None``: the ``lr`` given to :meth:`refresh` (the main optimizer's
            current learning rate, as in the official code), else 0.1.
        lookahead: The official in-graph one-step look-ahead of the learned projection: ``"none"``, ``"first"``
            (detached) or ``"second"`` (differentiated through, as in the official code).
        include: Regex (or list) over module names; only matching modules are regularized. ``None``: all.
        exclude: Regex (or list) over module names to leave out.
        head: The classifier's module name, ``"auto"`` (timm's ``get_classifier()``, else the last ``Linear``), or
            ``None`` (no classifier treatment).
        grouped: ``"per_group"``: grouped/depthwise convs get one energy per group; ``"skip"``: leave them out.
        std_conv: For timm's standardized convs: use the ``"raw"`` or the ``"standardized"`` weight.
        seed: Seed of the projections' own generators (same seed, same stream, on every process).
        eps: The constant inside each norm's square root.
        ortho_normalize: ``"orthogonal"`` and ``"srip"`` only: use the eps-normalized neurons instead of the raw
            ones (default ``False``, as Bansal et al.). ``"orthonormal"`` always normalizes.
        srip_iterations: ``"srip"`` only: power-iteration steps per :meth:`refresh` on the persistent vectors
            (default 1, i.e. two matrix-vector products per step with the penalty's own, as the released code).
        srip_squared: ``"srip"`` only: penalize :math:`\sigma^2` (the released code) instead of :math:`\sigma`
            (the paper).

    Raises:
        ValueError: For an invalid argument (the message names it), or when no layer is selected.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        >>> _ = model(torch.randn(1, 3, 8, 8))
        >>> reg = CoMHERegularizer(model, "random")
        >>> reg.refresh()
        >>> out = reg()
        >>> out.penalty.backward()
        >>> sorted(out.energies)
        ['0', '3']
    """

    def __init__(
        self,
        model: nn.Module,
        variant: Variant = "random",
        *,
        power: PowerLike = 2,
        angular: bool = False,
        weight: float | None = None,
        head_weight: float | None = None,
        projection_dim: int | None = None,
        num_projections: int | None = None,
        resample_every: int = 1,
        projection_kind: ProjectionKind = "gaussian",
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        lookahead: Literal["none", "first", "second"] = "none",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        head: str | None = "auto",
        grouped: Literal["per_group", "skip"] = "per_group",
        std_conv: Literal["raw", "standardized"] = "raw",
        seed: int = 0,
        eps: float = 1e-4,
        ortho_normalize: bool = False,
        srip_iterations: int = 1,
        srip_squared: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {', '.join(map(repr, VARIANTS))}; got {variant!r}.")
        self.s, self.angular = parse_power(power, angular)
        self.power = power
        _check_float("weight", weight)
        _check_float("head_weight", head_weight)
        _check_int("projection_dim", projection_dim, 1)
        _check_int("num_projections", num_projections, 1)
        _check_int("resample_every", resample_every, 1, allow_none=False)
        _check_int("inner_steps", inner_steps, 0)
        _check_float("inner_lr", inner_lr)
        _check_float("eps", eps, 0.0, allow_none=False, strict=True)
        if not isinstance(ortho_normalize, bool):
            raise ValueError(f"`ortho_normalize` must be a bool; got {ortho_normalize!r}.")
        _check_int("srip_iterations", srip_iterations, 0, allow_none=False)
        if not isinstance(srip_squared, bool):
            raise ValueError(f"`srip_squared` must be a bool; got {srip_squared!r}.")
        _check_int("seed", seed, 0, allow_none=False)
        if projection_kind not in PROJECTION_KINDS:
            raise ValueError(
                f"`projection_kind` must be one of {', '.join(map(repr, PROJECTION_KINDS))}; got {projection_kind!r}."
            )
        if projection_kind != "gaussian" and variant != "random":
            raise ValueError(
                f"`projection_kind={projection_kind!r}` applies to variant='random' only; got variant={variant!r}."
            )
        if lookahead not in ("none", "first", "second"):
            raise ValueError(f"`lookahead` must be one of 'none', 'first', 'second'; got {lookahead!r}.")
        if grouped not in ("per_group", "skip"):
            raise ValueError(f"`grouped` must be 'per_group' or 'skip'; got {grouped!r}.")
        if std_conv not in ("raw", "standardized"):
            raise ValueError(f"`std_conv` must be 'raw' or 'standardized'; got {std_conv!r}.")
        defaults = variant_defaults(variant)
        self.variant: str = variant
        official_hidden, official_head = (0.1, 1.0) if (self.angular and self.s > 0) else (1.0, 10.0)
        if variant in PEER_VARIANTS:
            official_hidden = official_head = PEER_DEFAULT_WEIGHTS[variant]
        self.ortho_normalize = ortho_normalize
        self.srip_iterations = srip_iterations
        self.srip_squared = srip_squared
        self._srip_vectors: dict[str, Tensor] = {}
        self.weight = float(official_hidden if weight is None else weight)
        self.head_weight = float(official_head if head_weight is None else head_weight)
        self.projection_dim = projection_dim if projection_dim is not None else defaults["projection_dim"]
        self.num_projections = num_projections if num_projections is not None else defaults["num_projections"]
        self.inner_steps = inner_steps if inner_steps is not None else defaults["inner_steps"]
        if variant in ("angle", "adversarial") and self.num_projections != 1:
            raise ValueError(
                f"`num_projections` must be 1 for variant {variant!r} (one learned projection per set, as in the "
                f"official code); got {num_projections!r}."
            )
        self.resample_every = resample_every
        self.projection_kind = projection_kind
        self.inner_lr = inner_lr
        self.lookahead = lookahead
        self.seed = seed
        self.eps = float(eps)
        self.include = include
        self.exclude = exclude
        self.grouped = grouped
        self.std_conv = std_conv
        self._model_ref = model

        if head == "auto":
            timm_head = _find_timm_head(model)
            head_arg: str | None = timm_head if timm_head is not None else "auto"
        else:
            head_arg = head
        self.head = head
        self.selection: LayerSelection = discover_layers(
            model, include=include, exclude=exclude, head=head_arg, grouped=grouped, std_conv=std_conv
        )
        self._layer_by_name = {layer.name: layer for layer in self.selection.layers}
        self._groups = self._build_groups()
        self._projector: RandomProjection | AngleProjection | AdversarialProjection | None = None
        if variant == "random":
            self._projector = RandomProjection(
                dim=self.projection_dim,
                num=self.num_projections,
                resample_every=resample_every,
                seed=seed,
                kind=projection_kind,
            )
        elif variant == "angle":
            self._projector = AngleProjection(
                dim=self.projection_dim,
                steps=self.inner_steps,
                lr=inner_lr or _DEFAULT_INNER_LR,
                lookahead=lookahead,
                seed=seed,
            )
        elif variant == "adversarial":
            self._projector = AdversarialProjection(
                dim=self.projection_dim,
                steps=self.inner_steps,
                lr=inner_lr or _DEFAULT_INNER_LR,
                lookahead=lookahead,
                seed=seed,
            )
        self._refreshes = 0
        self._last_lr: float | None = None

    # ------------------------------------------------------------------------------------------------------------
    @property
    def identity(self) -> tuple:
        """Stable identity fields (variant and regularized layer names), for state keys."""
        return (self.variant, tuple(layer.name for layer in self.selection.layers))

    @property
    def num_refreshes(self) -> int:
        """How many times :meth:`refresh` ran (optimizer steps seen)."""
        return self._refreshes

    def summary(self) -> str:
        """One line saying what is regularized, which sets run in full space, and what was skipped."""
        line = self.selection.summary()
        if self.variant in ("random", "angle", "adversarial"):
            full = [m.layer for g in self._groups if g.mode == "half" for m in g.members]
            full = list(dict.fromkeys(full))
            if full:
                more = f", … and {len(full) - 5} more" if len(full) > 5 else ""
                line += f"; unprojected (d <= k={self.projection_dim}): {', '.join(full[:5])}{more}"
        return line

    def _build_groups(self) -> list[_Group]:
        k = self.projection_dim
        projected_variant = self.variant in ("random", "angle", "adversarial")
        groups: dict[tuple, _Group] = {}
        for layer in self.selection.layers:
            for index, (num_sets, n, d) in enumerate(layer.shapes()):
                if self.variant in PEER_VARIANTS:
                    role_kappa = self.head_weight if layer.role == "head" else self.weight
                    mode, kappa, tag = self.variant, role_kappa, layer.role
                elif layer.role == "head":
                    mode, kappa, tag = "plain", self.head_weight, "head"
                elif self.variant == "mhe":
                    mode, kappa, tag = "plain", self.weight, "hidden"
                elif self.variant == "half_mhe" or (projected_variant and d <= k):
                    mode, kappa, tag = "half", self.weight, "hidden"
                else:
                    mode, kappa, tag = "projected", self.weight, "hidden"
                gkey = (tag, mode, n, d)
                if gkey not in groups:
                    groups[gkey] = _Group(f"{tag}:{mode}:{n}x{d}", mode, kappa, n, d, [])
                groups[gkey].members.append(_SetRef(layer.name, index, num_sets))
        return list(groups.values())

    def _group_neurons(self, group: _Group, cache: dict[str, list[Tensor]]) -> Tensor:
        parts = []
        for m in group.members:
            if m.layer not in cache:
                cache[m.layer] = self._layer_by_name[m.layer].neuron_sets()
            parts.append(cache[m.layer][m.tensor_index])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    # ------------------------------------------------------------------------------------------------------------
    def refresh(self, lr: float | None = None) -> None:
        """Prepare the projections for the next optimizer step; call it once per step, before :meth:`__call__`.

        Random projections are redrawn when due (every ``resample_every`` calls). Learned projections take
        ``inner_steps`` side-optimizer steps on the current (detached) weights, with learning rate ``inner_lr``, or
        ``lr`` (the main optimizer's current learning rate) when ``inner_lr`` is ``None``.

        Args:
            lr: The main optimizer's current learning rate.
        """
        _check_float("lr", lr)
        self._refreshes += 1
        self._last_lr = lr
        if self.variant == "srip":
            cache_srip: dict[str, list[Tensor]] = {}
            for group in self._groups:
                self._srip_vector(group, self._group_neurons(group, cache_srip), advance=True)
        if self._projector is None:
            return
        if isinstance(self._projector, RandomProjection):
            self._projector.step()
            return
        cache: dict[str, list[Tensor]] = {}
        step_lr = self._inner_lr()
        with torch.no_grad():
            groups = [(g, self._group_neurons(g, cache).detach()) for g in self._groups if g.mode == "projected"]
        for group, neurons in groups:
            self._projector.fit(group.key, neurons, lr=step_lr)

    def _inner_lr(self) -> float:
        if self.inner_lr is not None:
            return float(self.inner_lr)
        return float(self._last_lr) if self._last_lr is not None else _DEFAULT_INNER_LR

    def __call__(self) -> RegularizerOutput:
        r"""Compute the penalty :math:`\sum_s \kappa_s E_s` and the per-layer energies."""
        return self.compute()

    def compute(self) -> RegularizerOutput:
        """Compute the penalty and per-layer energies (see the class docstring). Differentiable."""
        cache: dict[str, list[Tensor]] = {}
        penalty: Tensor | None = None
        per_layer: dict[str, list[Tensor]] = {}
        for group in self._groups:
            neurons = self._group_neurons(group, cache)
            energy = self._group_energy(group, neurons)  # (G,)
            term = energy.sum() * group.kappa
            penalty = term if penalty is None else penalty + term
            detached = energy.detach()
            start = 0
            for m in group.members:
                per_layer.setdefault(m.layer, []).append(detached[start : start + m.num_sets])
                start += m.num_sets
        assert penalty is not None  # the selection is never empty
        energies = {name: torch.cat(parts).mean() for name, parts in per_layer.items()}
        return RegularizerOutput(penalty=penalty, energies=energies)

    def _srip_vector(self, group: _Group, neurons: Tensor, advance: bool) -> Tensor:
        """The group's persistent power-iteration vectors, created on first use; ``advance`` runs the iterations."""
        current = self._srip_vectors.get(group.key)
        if current is None:
            generator = torch.Generator().manual_seed(key_seed(self.seed, f"srip:{group.key}"))
            current = srip_power_iteration(
                neurons, None, self.srip_iterations, normalize=self.ortho_normalize, eps=self.eps, generator=generator
            )
        elif advance:
            current = srip_power_iteration(
                neurons, current, self.srip_iterations, normalize=self.ortho_normalize, eps=self.eps
            )
        self._srip_vectors[group.key] = current
        return current

    def _group_energy(self, group: _Group, neurons: Tensor) -> Tensor:
        if group.mode in ("orthogonal", "orthonormal"):
            normalize = group.mode == "orthonormal" or self.ortho_normalize
            return soft_orthogonality(neurons, normalize=normalize, eps=self.eps, check_finite=False)
        if group.mode == "srip":
            vectors = self._srip_vector(group, neurons, advance=False)
            return srip(
                neurons,
                vectors,
                normalize=self.ortho_normalize,
                squared=self.srip_squared,
                eps=self.eps,
                check_finite=False,
            )
        kw: dict[str, Any] = {"power": self.s, "angular": self.angular, "eps": self.eps}
        if group.mode == "plain":
            return hyperspherical_energy(neurons, half_space=False, check_finite=False, **kw)
        if group.mode == "half":
            return hyperspherical_energy(neurons, half_space=True, check_finite=False, **kw)
        if isinstance(self._projector, RandomProjection) and self._projector.kind != "gaussian":
            # structured projections are applied, never materialised: (G, C, N, k) -> half-space energy per set
            v = self._projector.project(group.key, neurons)
            g, c, n, k = v.shape
            energy = hyperspherical_energy(v.reshape(g * c, n, k), half_space=True, check_finite=False, **kw)
            return energy.reshape(g, c).mean(-1)
        if isinstance(self._projector, RandomProjection):
            dtype = torch.float64 if neurons.dtype == torch.float64 else torch.float32
            proj = self._projector.projections(group.key, neurons.shape[0], group.dim, neurons.device, dtype)
        else:
            assert self._projector is not None
            proj = self._projector.projections(group.key, neurons, lr=self._inner_lr())
        return projected_energy(neurons, proj, half_space=True, check_finite=False, **kw)

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: step count, projection generators, learned projections."""
        return {
            "version": 1,
            "variant": self.variant,
            "layers": [layer.name for layer in self.selection.layers],
            "refreshes": self._refreshes,
            "last_lr": self._last_lr,
            "projector": None if self._projector is None else self._projector.state_dict(),
            "srip_vectors": {key: v.detach().clone() for key, v in self._srip_vectors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Tensors move to the weights' device lazily, at the next use.

        Raises:
            ValueError: If the state belongs to another variant or layer selection.
        """
        if state.get("variant") != self.variant:
            raise ValueError(
                f"Cannot load CoMHE state of variant {state.get('variant')!r} into variant {self.variant!r}."
            )
        layers = [layer.name for layer in self.selection.layers]
        if state.get("layers") != layers:
            raise ValueError(
                "Cannot load CoMHE state: it was saved for a different layer selection "
                f"({len(state.get('layers') or [])} layers saved, {len(layers)} selected now)."
            )
        self._refreshes = int(state.get("refreshes", 0))
        self._last_lr = state.get("last_lr")
        if self._projector is not None and state.get("projector") is not None:
            self._projector.load_state_dict(state["projector"])
        self._srip_vectors = {key: v.detach().clone() for key, v in (state.get("srip_vectors") or {}).items()}
