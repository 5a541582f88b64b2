r"""The configuration of a CoMHE run: what to compute, on which layers, and when. The only place arguments are checked.

Three frozen, keyword-only dataclasses, pure Python (no Lightning):

* :class:`EnergyConfig`: the energy and its projections (variant, power, :math:`\kappa`, ``k``, ``C``, the side
  optimizer of learned projections, seeds, eps);
* :class:`SelectionConfig`: which layers (include / exclude regexes, the head, grouped and standardized convs);
* :class:`ScheduleConfig`: the Lightning callback's own settings (logging, instance name).

Each ``__post_init__`` validates every field and raises :class:`ValueError` in one style,
`` `name` must be …, got … ``. :class:`~lightning_comhe.CoMHE` keeps flat keyword arguments (for LightningCLI) and
builds these objects from them; :class:`~lightning_comhe.CoMHERegularizer`, the metric and ``comhe energy`` take
or build the same objects. The official defaults that depend on the variant (:func:`variant_defaults`,
:func:`default_weights`) are resolved by the properties of :class:`EnergyConfig`.

Example::

    >>> cfg = EnergyConfig(variant="angle")
    >>> cfg.dim, cfg.num, cfg.steps, cfg.hidden_weight, cfg.head_kappa
    (30, 1, 1, 1.0, 10.0)
    >>> EnergyConfig(inner_lr=0.0)
    Traceback (most recent call last):
    ...
    ValueError: `inner_lr` must be a finite float > 0 or None (follow the main optimizer's lr), got 0.0.
"""

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Literal

from lightning_comhe._registry import BUILTIN_VARIANTS, PEER_VARIANTS, is_registered, registered
from lightning_comhe._validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_name,
    check_regexes,
)
from lightning_comhe.functional.energy import parse_power

__all__ = [
    "GROUPED_MODES",
    "LOOKAHEADS",
    "PEER_DEFAULT_WEIGHTS",
    "ENERGY_PROJECTION_KINDS",
    "PROJECTION_KINDS",
    "STD_CONV_MODES",
    "SampledKind",
    "EnergyConfig",
    "Grouped",
    "Lookahead",
    "ProjectionKind",
    "ScheduleConfig",
    "SelectionConfig",
    "StdConv",
    "Variant",
    "config_fields",
    "default_weights",
    "resolve_configs",
    "split_kwargs",
    "variant_defaults",
]

Variant = Literal["mhe", "half_mhe", "random", "angle", "adversarial", "orthogonal", "orthonormal", "srip"]
Lookahead = Literal["none", "first", "second"]
ProjectionKind = Literal["gaussian", "sparse", "srht", "expected"]
SampledKind = Literal["gaussian", "sparse", "srht"]
Grouped = Literal["per_group", "skip"]
StdConv = Literal["raw", "standardized"]

LOOKAHEADS: tuple[str, ...] = ("none", "first", "second")
#: The kinds of random projection that are drawn: the official Gaussian, and two opt-in structured sketches.
PROJECTION_KINDS: tuple[str, ...] = ("gaussian", "sparse", "srht")
#: ``projection_kind`` of ``variant="random"``: a drawn kind, or ``"expected"`` (the exact C → ∞ mean, no draws).
ENERGY_PROJECTION_KINDS: tuple[str, ...] = (*PROJECTION_KINDS, "expected")
GROUPED_MODES: tuple[str, ...] = ("per_group", "skip")
STD_CONV_MODES: tuple[str, ...] = ("raw", "standardized")

#: Default κ (hidden and head) of the peer variants: Bansal et al. (NeurIPS 2018) use 1e-4..1e-2 scales; the released
#: SRIP code starts at 1e-2 (docs/peers.md).
PEER_DEFAULT_WEIGHTS: dict[str, float] = {"orthogonal": 1e-4, "orthonormal": 1e-4, "srip": 1e-2}

#: Official defaults per variant (algorithm.md §6.1): projection dim k, number of projections C, inner steps.
_VARIANT_DEFAULTS: dict[str, dict[str, int | None]] = {
    "random": {"projection_dim": 40, "num_projections": 20, "inner_steps": None},
    "angle": {"projection_dim": 30, "num_projections": 1, "inner_steps": 1},
    "adversarial": {"projection_dim": 30, "num_projections": 1, "inner_steps": 10},
}
_NO_DEFAULTS: dict[str, int | None] = {"projection_dim": None, "num_projections": None, "inner_steps": None}
_LEARNED = ("angle", "adversarial")
_NONE_OFFICIAL = "the official default"


def _check_variant(variant: Any) -> str:
    if not is_registered(variant):
        raise ValueError(f"`variant` must be one of {', '.join(map(repr, registered()))}, got {variant!r}.")
    return variant


def variant_defaults(variant: str) -> dict[str, int | None]:
    """Official per-variant defaults: ``projection_dim`` (k), ``num_projections`` (C) and ``inner_steps``.

    Example::

        >>> variant_defaults("random")
        {'projection_dim': 40, 'num_projections': 20, 'inner_steps': None}
    """
    _check_variant(variant)
    return dict(_VARIANT_DEFAULTS.get(variant, _NO_DEFAULTS))


def default_weights(variant: str, power: float | str = 2, angular: bool = False) -> tuple[float, float]:
    r"""The default :math:`\kappa` of a variant: ``(hidden, head)``.

    The official MHE/CoMHE values are 1 for hidden layers and 10 for the classifier, and 0.1 / 1 for the angular
    powers ``s > 0``; the peers use :data:`PEER_DEFAULT_WEIGHTS` for both.

    Example::

        >>> default_weights("random"), default_weights("mhe", "a2"), default_weights("srip")
        ((1.0, 10.0), (0.1, 1.0), (0.01, 0.01))
    """
    _check_variant(variant)
    if variant in PEER_DEFAULT_WEIGHTS:
        return PEER_DEFAULT_WEIGHTS[variant], PEER_DEFAULT_WEIGHTS[variant]
    s, is_angular = parse_power(power, angular)
    return (0.1, 1.0) if (is_angular and s > 0) else (1.0, 10.0)


def _check_power(power: Any, angular: Any) -> None:
    if isinstance(power, bool) or not isinstance(power, (int, float, str)):
        raise ValueError(f"`power` must be 0, a float > 0, or one of '0', '1', '2', 'a0', 'a1', 'a2', got {power!r}.")
    parse_power(power, angular)


@dataclass(frozen=True, kw_only=True)
class EnergyConfig:
    r"""The energy of a CoMHE penalty and its projections.

    Args:
        variant: ``"mhe"``, ``"half_mhe"``, ``"random"`` (RP-CoMHE), ``"angle"`` (AP-CoMHE), ``"adversarial"``, a
            peer (``"orthogonal"``, ``"orthonormal"``, ``"srip"``) or a registered custom family.
        weight: :math:`\kappa` of hidden layers. ``None``: :func:`default_weights`.
        head_weight: :math:`\kappa` of the classifier. ``None``: :func:`default_weights`.
        power: ``0``, a float ``> 0``, or ``"0" "1" "2" "a0" "a1" "a2"`` (official strings, ``a`` = angular).
        angular: Use the angular distance (implied by the ``"a"`` strings).
        projection_dim: ``k``. ``None``: :func:`variant_defaults`.
        num_projections: ``C``. ``None``: :func:`variant_defaults`; learned projections allow only 1.
        resample_every: Redraw random projections every this many refreshes (official: 1).
        inner_steps: Side-optimizer steps per refresh of learned projections. ``None``: :func:`variant_defaults`.
        inner_lr: Side-optimizer learning rate ``> 0``. ``None``: the main optimizer's current learning rate.
        lookahead: The official look-ahead of a learned projection: ``"none"``, ``"first"`` or ``"second"``.
        projection_kind: ``variant="random"`` only: ``"gaussian"`` (official), ``"sparse"``, ``"srht"``, or
            ``"expected"``: the exact mean over C → ∞ Gaussian projections (no draws, no noise; needs
            ``num_projections=None`` and ``k > s + 1``; see ``docs/math.md``).
        seed: Seed ``>= 0`` of the projections' own generators.
        eps: The constant ``> 0`` inside each norm's square root (official 1e-4).
        ortho_normalize: ``"orthogonal"``/``"srip"``: use eps-normalized neurons.
        srip_iterations: ``"srip"``: power-iteration steps per refresh.
        srip_squared: ``"srip"``: penalize :math:`\sigma^2` (released code) instead of :math:`\sigma` (paper).

    Raises:
        ValueError: Naming the argument, what is allowed and the value received.
    """

    variant: Variant = "random"
    weight: float | None = None
    head_weight: float | None = None
    power: float | str = 2
    angular: bool = False
    projection_dim: int | None = None
    num_projections: int | None = None
    resample_every: int = 1
    inner_steps: int | None = None
    inner_lr: float | None = None
    lookahead: Lookahead = "none"
    projection_kind: ProjectionKind = "gaussian"
    seed: int = 0
    eps: float = 1e-4
    ortho_normalize: bool = False
    srip_iterations: int = 1
    srip_squared: bool = False

    def __post_init__(self) -> None:
        _check_variant(self.variant)
        check_bool("angular", self.angular)
        _check_power(self.power, self.angular)
        check_float("weight", self.weight, allow_none=True, none_means=_NONE_OFFICIAL)
        check_float("head_weight", self.head_weight, allow_none=True, none_means=_NONE_OFFICIAL)
        check_int("projection_dim", self.projection_dim, 1, allow_none=True, none_means=_NONE_OFFICIAL)
        check_int("num_projections", self.num_projections, 1, allow_none=True, none_means=_NONE_OFFICIAL)
        check_int("resample_every", self.resample_every, 1)
        check_int("inner_steps", self.inner_steps, 0, allow_none=True, none_means=_NONE_OFFICIAL)
        follow = "follow the main optimizer's lr"
        check_float("inner_lr", self.inner_lr, strict=True, allow_none=True, none_means=follow)
        check_choice("lookahead", self.lookahead, LOOKAHEADS)
        check_choice("projection_kind", self.projection_kind, ENERGY_PROJECTION_KINDS)
        check_int("seed", self.seed, 0)
        check_float("eps", self.eps, strict=True)
        check_bool("ortho_normalize", self.ortho_normalize)
        check_int("srip_iterations", self.srip_iterations, 0)
        check_bool("srip_squared", self.srip_squared)
        if self.projection_kind != "gaussian" and self.variant != "random":
            raise ValueError(
                f"`projection_kind` must be 'gaussian' unless variant='random', got {self.projection_kind!r} "
                f"with variant={self.variant!r}."
            )
        if self.projection_kind == "expected":
            self._check_expected()
        if self.variant in _LEARNED and self.num_projections not in (None, 1):
            raise ValueError(
                f"`num_projections` must be 1 or None for variant {self.variant!r} (one learned projection per set, "
                f"as in the official code), got {self.num_projections!r}."
            )

    def _check_expected(self) -> None:
        if self.num_projections is not None:
            raise ValueError(
                "`num_projections` must be None with projection_kind='expected' (the exact mean over C → ∞ "
                f"projections), got {self.num_projections!r}."
            )
        k, s = self.dim, self.s
        if k is not None and k <= s + 1:
            raise ValueError(
                f"`projection_dim` must be > s + 1 = {s + 1:g} for projection_kind='expected' with power s = {s:g} "
                f"(the expected projected energy diverges), got {k}."
            )

    @cached_property
    def parsed_power(self) -> tuple[float, bool]:
        """``(s, angular)`` of :func:`~lightning_comhe.functional.energy.parse_power`."""
        return parse_power(self.power, self.angular)

    @property
    def s(self) -> float:
        """The exponent ``s >= 0``."""
        return self.parsed_power[0]

    @property
    def is_angular(self) -> bool:
        """Whether the angular distance is used (``angular=True`` or an ``"a"`` power)."""
        return self.parsed_power[1]

    @property
    def is_peer(self) -> bool:
        """Whether the variant is one of the peer regularizers (same penalty on hidden layers and the head)."""
        return self.variant in PEER_VARIANTS

    @property
    def hidden_weight(self) -> float:
        r""":math:`\kappa` of hidden sets, defaults resolved."""
        return float(default_weights(self.variant, self.power, self.angular)[0] if self.weight is None else self.weight)

    @property
    def head_kappa(self) -> float:
        r""":math:`\kappa` of the classifier, defaults resolved."""
        default = default_weights(self.variant, self.power, self.angular)[1]
        return float(default if self.head_weight is None else self.head_weight)

    @property
    def dim(self) -> int | None:
        """``k``, defaults resolved (``None`` for unprojected variants)."""
        default = variant_defaults(self.variant)["projection_dim"]
        return self.projection_dim if self.projection_dim is not None else default

    @property
    def num(self) -> int | None:
        """``C``, defaults resolved (``None`` for unprojected variants)."""
        default = variant_defaults(self.variant)["num_projections"]
        return self.num_projections if self.num_projections is not None else default

    @property
    def steps(self) -> int | None:
        """Side-optimizer steps per refresh, defaults resolved (``None`` without a learned projection)."""
        return self.inner_steps if self.inner_steps is not None else variant_defaults(self.variant)["inner_steps"]


@dataclass(frozen=True, kw_only=True)
class SelectionConfig:
    """Which layers a CoMHE penalty regularizes (see :func:`~lightning_comhe.discovery.discover_layers`).

    Args:
        include: Regex (or list) over module names; only matching modules are regularized. ``None``: all.
        exclude: Regex (or list) over module names to leave out.
        head: The classifier's module name (or names), ``"auto"`` (timm's ``get_classifier()`` of every outermost
            timm model, else the last ``Linear``), or ``None`` (no classifier treatment).
        grouped: ``"per_group"``: grouped/depthwise convs get one energy per group; ``"skip"``: leave them out.
        std_conv: For timm's standardized convs: the ``"raw"`` or the ``"standardized"`` weight.

    Raises:
        ValueError: Naming the argument, what is allowed and the value received.
    """

    include: str | list[str] | None = None
    exclude: str | list[str] | None = None
    head: str | list[str] | None = "auto"
    grouped: Grouped = "per_group"
    std_conv: StdConv = "raw"

    def __post_init__(self) -> None:
        check_regexes("include", self.include)
        check_regexes("exclude", self.exclude)
        head = self.head
        names = [head] if isinstance(head, str) else head
        if head is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(h, str) for h in names)):
            raise ValueError(f"`head` must be 'auto', a module name, a list of module names or None, got {head!r}.")
        check_choice("grouped", self.grouped, GROUPED_MODES)
        check_choice("std_conv", self.std_conv, STD_CONV_MODES)

    def discovery_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~lightning_comhe.discovery.discover_layers`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """The Lightning callback's own settings.

    Args:
        every_n_steps: Lazy regularization (StyleGAN2's lazy R1, applied to the energy): the penalty, and the
            refresh of the projections, run only on the optimizer steps ``step % m == 0`` (``m = every_n_steps``),
            weighted by ``m``; nothing is added on the other steps. ``resample_every``, ``srip_iterations`` and
            ``log_every`` then count penalized steps. ``step`` is ``trainer.global_step`` (the DeepSpeed engine's
            step under DeepSpeed accumulation; under manual optimization it counts every optimizer's ``step()``).
        log_every: Log the per-layer energies every this many penalized optimizer steps (``>= 1``).
        name: Instance name (log prefix ``comhe/<name>/`` and checkpoint key), or ``None``.
        shard: Under DDP (one or several nodes), DeepSpeed ZeRO-1/2 and FSDP2, split the penalty across the ranks
            (:mod:`lightning_comhe.sharding`): each computes a balanced share, so each rank does about ``1/W`` of the
            work. DDP's (DeepSpeed's) gradient averaging sums the shares; under FSDP2 their gradients are
            reduce-scattered into the weights' shards (:mod:`lightning_comhe._gathered`). No effect in a single
            process, and none (every rank computes everything, said once in the log) for the peer variants, or
            under ``ModelParallelStrategy`` with weights that are not FSDP2 ``DTensor`` shards on a mesh of all
            ranks.

    Raises:
        ValueError: Naming the argument, what is allowed and the value received.
    """

    every_n_steps: int = 1
    log_every: int = 50
    name: str | None = None
    shard: bool = True

    def __post_init__(self) -> None:
        check_int("every_n_steps", self.every_n_steps, 1)
        check_int("log_every", self.log_every, 1)
        check_name("name", self.name)
        check_bool("shard", self.shard)


_CONFIGS = (EnergyConfig, SelectionConfig, ScheduleConfig)


def config_fields() -> dict[str, Any]:
    """Every configuration field (name → dataclass field), in the order of the flat ``CoMHE`` signature."""
    return {f.name: f for cls in _CONFIGS for f in fields(cls)}


def split_kwargs(kwargs: dict[str, Any], classes: tuple[type, ...] = _CONFIGS, owner: str = "CoMHE") -> tuple[Any, ...]:
    """Build one config object per class from flat keyword arguments.

    Args:
        kwargs: Flat keyword arguments (each belongs to exactly one class).
        classes: The config classes to build, in order.
        owner: Named in the error for an unknown argument.

    Raises:
        TypeError: For a keyword no class has (Python's own wording for an unexpected keyword).
        ValueError: From the configs' validation.
    """
    known = {f.name: cls for cls in classes for f in fields(cls)}
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        raise TypeError(
            f"{owner}() got an unexpected keyword argument {unknown[0]!r}; allowed: {', '.join(sorted(known))}."
        )
    return tuple(cls(**{k: v for k, v in kwargs.items() if known[k] is cls}) for cls in classes)


# Re-exported for readers of this module: the built-in names.
VARIANTS = BUILTIN_VARIANTS


def resolve_configs(
    variant: Any, energy: Any, selection: Any, kwargs: dict[str, Any], owner: str = "CoMHERegularizer"
) -> tuple[EnergyConfig, SelectionConfig]:
    """The two configs from either config objects or flat keyword arguments (never both for the same config)."""
    if energy is not None and not isinstance(energy, EnergyConfig):
        raise ValueError(f"`energy` must be an EnergyConfig or None, got {type(energy).__name__}.")
    if selection is not None and not isinstance(selection, SelectionConfig):
        raise ValueError(f"`selection` must be a SelectionConfig or None, got {type(selection).__name__}.")
    flat = dict(kwargs)
    if energy is None:
        flat["variant"] = "random" if variant is None else variant
    elif variant is not None and variant != energy.variant:
        raise ValueError(f"`variant` must be None or {energy.variant!r} with `energy` given, got {variant!r}.")
    classes = tuple(cls for cls, given in ((EnergyConfig, energy), (SelectionConfig, selection)) if given is None)
    built = iter(split_kwargs(flat, classes, owner=owner))
    return (energy or next(built)), (selection or next(built))
