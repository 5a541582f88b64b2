r"""CoMHE: a Lightning callback for (compressive) minimum hyperspherical energy regularization.

A Lightning callback that adds the (compressive) minimum hyperspherical energy of a model's neurons to the training
loss: MHE (Liu et al., "Learning towards Minimum Hyperspherical Energy", NeurIPS 2018), half-space MHE, and the
random, angle-preserving and adversarial projections of CoMHE (Lin et al., "Regularizing Neural Networks via
Minimizing Hyperspherical Energy", CVPR 2020).

The math lives in the pure-PyTorch :class:`~lightning_comhe.regularizer.CoMHERegularizer`; this module only decides
*when* the penalty is computed and *how* it enters the backward pass under every precision and optimization mode.
"""

import math
import re
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_comhe.functional.energy import parse_power
from lightning_comhe.regularizer import VARIANTS as _VARIANTS
from lightning_comhe.regularizer import CoMHERegularizer

__all__ = ["CoMHE"]

_LOOKAHEADS: tuple[str, ...] = ("none", "first", "second")
_GROUPED: tuple[str, ...] = ("per_group", "skip")
_STD_CONV: tuple[str, ...] = ("raw", "standardized")
_STATE_VERSION = 1


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(repr(v) for v in values)


def _check_choice(arg: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise MisconfigurationException(f"`CoMHE({arg}=...)` must be one of {_choices(allowed)}, got {value!r}.")


def _check_int(arg: str, value: Any, minimum: int, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None (the official default)" if allow_none else "")
        raise MisconfigurationException(f"`CoMHE({arg}=...)` must be {allowed}, got {value!r}.")


def _check_float(arg: str, value: Any, *, strict: bool) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if strict else value < 0):
        bound = "> 0" if strict else ">= 0"
        raise MisconfigurationException(
            f"`CoMHE({arg}=...)` must be a finite float {bound} or None (the official default), got {value!r}."
        )


def _check_regexes(arg: str, value: Any) -> None:
    if value is None:
        return
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise MisconfigurationException(
            f"`CoMHE({arg}=...)` must be a regex string, a list of regex strings or None, got {value!r}."
        )
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise MisconfigurationException(
                f"`CoMHE({arg}=...)` holds an invalid regular expression {pattern!r}: {err}."
            ) from err


def _optimizer_step_index(trainer: "pl.Trainer") -> int:
    """The number of optimizer steps taken so far: constant within an accumulation window.

    ``trainer.global_step`` in general. A strategy that handles gradient accumulation itself (DeepSpeed) gets an
    optimizer-step call on every micro-batch, so ``global_step`` no longer counts real steps; its engine's own
    counter (``global_steps``, advanced only at the engine's accumulation boundaries) is used instead.
    """
    if trainer.strategy.handles_gradient_accumulation:
        steps = getattr(trainer.strategy.model, "global_steps", None)
        if isinstance(steps, int):
            return steps
    return trainer.global_step


class CoMHE(Callback):
    r"""Regularize a LightningModule's neurons towards minimum hyperspherical energy (MHE / CoMHE).

    At every optimizer step the callback adds

    .. math::

        R = \sum_s \kappa_s\, E_s(W_s)

    to the training loss, where :math:`W_s` are the neuron sets (rows of ``weight.flatten(1)``, one set per conv
    group) of the selected layers and :math:`E_s` the (projected) hyperspherical energy of the variant: ``"mhe"``
    (full-space), ``"half_mhe"`` (the energy of :math:`[W; -W]`), ``"random"`` (RP-CoMHE: mean over C fresh
    Gaussian ``k × d`` projections of half-space MHE), ``"angle"`` (AP-CoMHE: a projection fitted to preserve the
    angles) and ``"adversarial"`` (a projection fitted to maximise the energy). The classifier (``head``) always
    uses full-space MHE with its own weight; see :class:`~lightning_comhe.regularizer.CoMHERegularizer`.

    How the penalty enters training (``on_before_backward``, in place, since the hook's return value is ignored):

    * **Projections** are refreshed (random: redrawn; angle/adversarial: ``inner_steps`` side-optimizer steps) once
      per optimizer step, before the first backward of the step, so all micro-batches of a step see the same
      projections.
    * **Automatic optimization**: the gradient that reaches the optimizer step is
      :math:`\nabla(\text{task}) + \nabla R`, i.e. the penalty counts exactly once per optimizer step whatever
      ``accumulate_grad_batches`` is. Lightning divides every micro-batch's task loss by
      ``accumulate_grad_batches`` (also in a ragged last window of ``r < A`` micro-batches, whose task gradient is
      then scaled by ``r / A``); the callback adds :math:`R` in full to the first micro-batch of each accumulation
      window that runs backward and nothing to the others. This is equal to adding :math:`R / r` to each of the
      window's ``r`` micro-batches, costs one energy evaluation per optimizer step instead of ``r``, and needs no
      knowledge of the window's length (iterable datasets, ``limit_train_batches``).
    * **Manual optimization**: the full penalty is added to the tensor passed to every
      :meth:`~lightning.pytorch.core.LightningModule.manual_backward` call. **That tensor is mutated in place**:
      after the call it holds task + penalty. Call ``manual_backward`` once per optimizer step (or lower
      ``weight``) if you accumulate by hand.
    * **fp16 with a GradScaler**: the hook receives the scaled loss, so the penalty goes through
      ``scaler.scale(...)`` too and its effective weight is :math:`\kappa`, not :math:`\kappa / \text{scale}`.
    * The penalty is computed in float32 outside autocast (the energies upcast low-precision weights), then cast to
      the loss's dtype. Gradient clipping acts on the sum of the task and penalty gradients.
    * No host synchronisation happens on the hot path; the code is device-agnostic (TPU/XLA: untested).

    Strategies: single device, DDP (also multi-node; every rank computes the same penalty from the same weights and
    projections), FSDP2 through :class:`~lightning.pytorch.strategies.ModelParallelStrategy` (DTensor weights are
    gathered with ``full_tensor()``, a collective every rank runs in the same order), DeepSpeed ZeRO-1/2 (the
    weights are whole on every rank; the engine's fp16 scaler scales the penalty with the loss). Under DeepSpeed with
    ``accumulate_grad_batches = A > 1`` the engine decides the optimizer steps (its windows of ``A`` micro-batches run
    across epoch ends): the callback refreshes and adds the penalty once per engine step (its ``global_steps``
    counter), and DeepSpeed divides it by ``A`` like the task loss, which Lightning has already divided by ``A``
    too, so the penalty keeps its weight relative to the task. FSDP v1
    (``FSDPStrategy``) and DeepSpeed ZeRO-3 are refused at ``setup`` with an actionable error: inside their backward
    pass the weights are flat shards or empty placeholders. ``torch.compile``\ d submodules work (their layers are
    named ``..._orig_mod...``), and so does ``trainer.fit(torch.compile(module))``.

    Logging (``pl_module.log``, ``sync_dist=False``: the value is identical on every rank): ``comhe/penalty``
    (:math:`R`, before any accumulation or scaler factor) at every step, and ``comhe/energy/<layer>`` (the layer's
    energy without :math:`\kappa`) every ``log_every`` optimizer steps. Lightning keeps reporting the last value of
    a step-level key until the epoch ends, so loggers repeat an energy between its updates. With ``name="x"`` the
    prefix is ``comhe/x/``.

    Layer selection happens in ``setup("fit")``; it is deferred to ``on_fit_start`` when the LightningModule
    overrides ``configure_model`` (layers may be created there), and to the first backward when the module has
    uninitialized lazy parameters. The state (projection generators, learned projections and their side-optimizer
    state, step bookkeeping) is saved in checkpoints, so a resumed run continues bit-exactly.

    Args:
        variant: The energy:

            - ``"mhe"``: full-space MHE on every selected layer.
            - ``"half_mhe"``: half-space MHE on hidden layers.
            - ``"random"``: RP-CoMHE, random Gaussian projections redrawn every ``resample_every`` steps.
            - ``"angle"``: AP-CoMHE, an angle-preserving projection fitted by a side optimizer.
            - ``"adversarial"``: a projection fitted by a side optimizer to maximise the energy.
            - ``"orthogonal"``, ``"orthonormal"``, ``"srip"``: the peer regularizers of the paper's tables (soft
              orthogonality, orthonormality of the neuron directions, spectral restricted isometry), with the same
              penalty on hidden layers and the classifier; see ``docs/peers.md``. ``weight`` and ``head_weight``
              default to 1e-4 (``"srip"``: 1e-2).
        weight: :math:`\kappa` of the hidden layers. ``None``: the official 1 (0.1 for angular powers ``s > 0``).
        head_weight: :math:`\kappa` of the classifier. ``None``: the official 10 (1 for angular powers ``s > 0``).
        power: The energy's power ``s``: ``0`` (logarithmic), a float ``> 0``, or one of the official strings
            ``"0"``, ``"1"``, ``"2"``, ``"a0"``, ``"a1"``, ``"a2"`` (``a`` = angular distance).
        angular: Use the angular distance :math:`\arccos(c)/\pi` instead of the chord (implied by ``"a"`` powers).
        projection_dim: Projection dimension ``k``. ``None``: official per variant (random 40, angle/adversarial
            30). Layers whose neuron dimension is ``<= k`` use half-space MHE without projection.
        num_projections: Number of random projections ``C``. ``None``: official per variant (random 20,
            angle/adversarial 1; learned projections only allow 1).
        resample_every: Redraw the random projections every this many optimizer steps (official: 1).
        inner_steps: Side-optimizer steps per optimizer step for the learned projections. ``None``: official
            (angle 1, adversarial 10).
        inner_lr: Side-optimizer learning rate. ``None``: follow the main optimizer's current learning rate
            (``trainer.optimizers[0].param_groups[0]["lr"]``, schedulers included), as the official code does.
        lookahead: The official one-step look-ahead of a learned projection inside the penalty:

            - ``"none"``: use the fitted projection as is.
            - ``"first"``: look ahead with a detached step.
            - ``"second"``: differentiate through the look-ahead step (as the official code; more memory).
        include: Regex, or list of regexes, over module names (``pl_module.named_modules()``, searched with
            ``re.search``); only matching layers are regularized. ``None``: all supported layers.
        exclude: Regex, or list of regexes, over module names of layers to leave out.
        head: Module name of the classifier (full-space MHE, weight ``head_weight``). ``"auto"``: timm's
            ``get_classifier()``, else the last ``nn.Linear``. ``None``: no classifier treatment.
        grouped: Grouped / depthwise convolutions:

            - ``"per_group"``: one energy per group (neurons of different groups read disjoint inputs).
            - ``"skip"``: leave them out.
        std_conv: For timm's weight-standardized convs, regularize the ``"raw"`` stored weight or the
            ``"standardized"`` one the forward pass uses.
        projection_kind: Random projections of ``variant="random"``: ``"gaussian"`` (official, dense N(0, 1)),
            ``"sparse"`` (very sparse signs, density 1/sqrt(d)) or ``"srht"`` (subsampled randomized Hadamard
            transform). The structured kinds cut the projection cost; see docs/benchmarks.md for the guarantees.
        seed: Seed of the projections' own random generators (the global RNG is never touched).
        log_every: Log the per-layer energies every this many optimizer steps (``comhe/penalty`` is logged every
            step).
        name: Optional instance name, used as log prefix ``comhe/<name>/`` and in the checkpoint state key. Give
            one to each instance when several ``CoMHE`` callbacks run together.
        ortho_normalize: ``"orthogonal"`` and ``"srip"`` only: regularize the eps-normalized neurons instead of the
            raw ones (default ``False``, as Bansal et al.).
        srip_iterations: ``"srip"`` only: power-iteration steps per optimizer step on the persistent vectors, which
            are saved in checkpoints.
        srip_squared: ``"srip"`` only: penalize the squared spectral norm (the released SRIP code) instead of the
            spectral norm (the paper).

    Raises:
        MisconfigurationException: At construction, for an unknown ``variant``, ``lookahead``, ``grouped`` or
            ``std_conv``, a bad ``power``, a negative ``weight``/``head_weight``, ``projection_dim``,
            ``num_projections``, ``resample_every`` or ``log_every`` below 1, negative ``inner_steps``, a
            non-positive ``inner_lr``, a negative ``seed`` or an invalid regex. At ``setup``, when no layer is
            selected, when the configuration does not fit the model, or under FSDP v1 / DeepSpeed ZeRO-3.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> comhe = CoMHE(variant="half_mhe", head=None)
        >>> trainer = Trainer(max_steps=2, callbacks=[comhe], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> sorted(trainer.callback_metrics)
        ['comhe/energy/layer', 'comhe/penalty']
    """

    def __init__(
        self,
        variant: Literal[
            "mhe", "half_mhe", "random", "angle", "adversarial", "orthogonal", "orthonormal", "srip"
        ] = "random",
        weight: float | None = None,
        head_weight: float | None = None,
        power: float | str = 2,
        angular: bool = False,
        projection_dim: int | None = None,
        num_projections: int | None = None,
        resample_every: int = 1,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        lookahead: Literal["none", "first", "second"] = "none",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        head: str | None = "auto",
        grouped: Literal["per_group", "skip"] = "per_group",
        std_conv: Literal["raw", "standardized"] = "raw",
        projection_kind: Literal["gaussian", "sparse", "srht"] = "gaussian",
        seed: int = 0,
        log_every: int = 50,
        name: str | None = None,
        ortho_normalize: bool = False,
        srip_iterations: int = 1,
        srip_squared: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("variant", variant, _VARIANTS)
        _check_choice("lookahead", lookahead, _LOOKAHEADS)
        _check_choice("grouped", grouped, _GROUPED)
        _check_choice("std_conv", std_conv, _STD_CONV)
        _check_choice("projection_kind", projection_kind, ("gaussian", "sparse", "srht"))
        if projection_kind != "gaussian" and variant != "random":
            raise MisconfigurationException(
                f"`CoMHE(projection_kind={projection_kind!r})` needs variant='random', got variant={variant!r}."
            )
        _check_float("weight", weight, strict=False)
        _check_float("head_weight", head_weight, strict=False)
        _check_float("inner_lr", inner_lr, strict=True)
        if isinstance(power, bool) or not isinstance(power, (int, float, str)):
            raise MisconfigurationException(
                f"`CoMHE(power=...)` must be 0, a float > 0, or one of '0', '1', '2', 'a0', 'a1', 'a2', got {power!r}."
            )
        try:
            parse_power(power, angular)
        except ValueError as err:
            raise MisconfigurationException(f"`CoMHE(power=...)`: {err}") from err
        if not isinstance(angular, bool):
            raise MisconfigurationException(f"`CoMHE(angular=...)` must be a bool, got {angular!r}.")
        _check_int("projection_dim", projection_dim, 1, allow_none=True)
        _check_int("num_projections", num_projections, 1, allow_none=True)
        _check_int("resample_every", resample_every, 1, allow_none=False)
        _check_int("inner_steps", inner_steps, 0, allow_none=True)
        _check_int("seed", seed, 0, allow_none=False)
        _check_int("log_every", log_every, 1, allow_none=False)
        _check_int("srip_iterations", srip_iterations, 0, allow_none=False)
        for flag, flag_value in (("ortho_normalize", ortho_normalize), ("srip_squared", srip_squared)):
            if not isinstance(flag_value, bool):
                raise MisconfigurationException(f"`CoMHE({flag}=...)` must be a bool, got {flag_value!r}.")
        if variant in ("angle", "adversarial") and num_projections not in (None, 1):
            raise MisconfigurationException(
                f"`CoMHE(num_projections=...)` must be 1 or None for variant {variant!r} (one learned projection per "
                f"neuron set, as in the official code), got {num_projections!r}."
            )
        _check_regexes("include", include)
        _check_regexes("exclude", exclude)
        if head is not None and not isinstance(head, str):
            raise MisconfigurationException(f"`CoMHE(head=...)` must be 'auto', a module name or None, got {head!r}.")
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise MisconfigurationException(
                f"`CoMHE(name=...)` must be None or a non-empty string without '/', got {name!r}."
            )

        self.variant = variant
        self.weight = weight
        self.head_weight = head_weight
        self.power = power
        self.angular = angular
        self.projection_dim = projection_dim
        self.num_projections = num_projections
        self.resample_every = resample_every
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.lookahead = lookahead
        self.include = include
        self.exclude = exclude
        self.head = head
        self.grouped = grouped
        self.std_conv = std_conv
        self.projection_kind = projection_kind
        self.seed = seed
        self.log_every = log_every
        self.name = name
        self.ortho_normalize = ortho_normalize
        self.srip_iterations = srip_iterations
        self.srip_squared = srip_squared

        self._regularizer: CoMHERegularizer | None = None
        self._module: pl.LightningModule | None = None
        self._build_on_backward = False
        self._pending_state: dict[str, Any] | None = None
        # Global step whose projections are current (restored from checkpoints).
        self._last_refresh_step: int | None = None
        # Global step whose penalty was already added (automatic optimization; runtime only, never restored).
        self._penalized_step: int | None = None

    # ----------------------------------------------------------------------------------------------------------
    # public helpers
    # ----------------------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """Checkpoint key built from identity fields only (not from tunable values such as ``weight``)."""
        return self._generate_state_key(
            variant=self.variant, include=self.include, exclude=self.exclude, head=self.head, name=self.name
        )

    @property
    def regularizer(self) -> CoMHERegularizer | None:
        """The underlying :class:`~lightning_comhe.regularizer.CoMHERegularizer` (``None`` before it is built)."""
        return self._regularizer

    @property
    def log_prefix(self) -> str:
        """Prefix of the logged keys: ``"comhe"`` or ``"comhe/<name>"``."""
        return "comhe" if self.name is None else f"comhe/{self.name}"

    def regularizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments this callback passes to :class:`~lightning_comhe.regularizer.CoMHERegularizer`."""
        return {
            "variant": self.variant,
            "power": self.power,
            "angular": self.angular,
            "weight": self.weight,
            "head_weight": self.head_weight,
            "projection_dim": self.projection_dim,
            "num_projections": self.num_projections,
            "resample_every": self.resample_every,
            "inner_steps": self.inner_steps,
            "inner_lr": self.inner_lr,
            "lookahead": self.lookahead,
            "include": self.include,
            "exclude": self.exclude,
            "head": self.head,
            "grouped": self.grouped,
            "std_conv": self.std_conv,
            "projection_kind": self.projection_kind,
            "seed": self.seed,
            "ortho_normalize": self.ortho_normalize,
            "srip_iterations": self.srip_iterations,
            "srip_squared": self.srip_squared,
        }

    # ----------------------------------------------------------------------------------------------------------
    # building
    # ----------------------------------------------------------------------------------------------------------
    def _describe(self) -> str:
        return (
            f"CoMHE(variant={self.variant!r}, include={self.include!r}, exclude={self.exclude!r}, "
            f"head={self.head!r}, grouped={self.grouped!r})"
        )

    def _build(self, pl_module: "pl.LightningModule") -> None:
        kwargs = self.regularizer_kwargs()
        variant = kwargs.pop("variant")
        try:
            regularizer = CoMHERegularizer(pl_module, variant, **kwargs)
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(
                f"{self._describe()} cannot regularize {type(pl_module).__name__}: {err}"
            ) from err
        self._regularizer = regularizer
        self._module = pl_module
        self._build_on_backward = False
        prefix = "" if self.name is None else f"[{self.name}] "
        rank_zero_info(f"{prefix}{regularizer.summary()}")
        skipped = regularizer.selection.skipped
        if skipped:
            listing = "; ".join(f"{name or '<root>'}: {reason}" for name, reason in skipped)
            rank_zero_warn(f"{prefix}CoMHE skipped {len(skipped)} layer(s) it cannot regularize: {listing}.")
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load_regularizer_state(state)

    def _load_regularizer_state(self, state: dict[str, Any]) -> None:
        assert self._regularizer is not None
        reg_state = state.get("regularizer")
        if reg_state is None:
            return
        try:
            self._regularizer.load_state_dict(reg_state)
        except (ValueError, KeyError) as err:
            raise MisconfigurationException(
                f"{self._describe()} cannot restore its checkpointed state: {err} Resume with the same model and "
                "CoMHE configuration, or give this instance another `name` to start its state afresh."
            ) from err

    @staticmethod
    def _check_strategy(strategy: Any) -> None:
        try:
            from lightning.pytorch.strategies import FSDPStrategy
        except ImportError:  # pragma: no cover - depends on the lightning build
            FSDPStrategy = None  # noqa: N806
        try:
            from lightning.pytorch.strategies import DeepSpeedStrategy
        except ImportError:  # pragma: no cover - depends on the lightning build
            DeepSpeedStrategy = None  # noqa: N806
        if FSDPStrategy is not None and isinstance(strategy, FSDPStrategy):
            raise MisconfigurationException(
                "CoMHE does not support `FSDPStrategy` (FSDP v1): inside its backward pass the weights are flat 1-D "
                "shards, so the neurons cannot be formed where the penalty is added. HINT: use FSDP2 instead: "
                "`strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` with "
                "`torch.distributed.fsdp.fully_shard` applied in `LightningModule.configure_model`, or DDP."
            )
        if DeepSpeedStrategy is not None and isinstance(strategy, DeepSpeedStrategy):
            try:
                stage3 = bool(strategy.zero_stage_3)
            except Exception:  # noqa: BLE001 - an unconfigured strategy has no config yet
                stage3 = False
            if stage3:
                raise MisconfigurationException(
                    "CoMHE does not support DeepSpeed ZeRO stage 3: outside the forward pass its parameters are "
                    "empty placeholders, so the neurons cannot be read when the penalty is added. HINT: use ZeRO "
                    "stage 1 or 2 (`strategy='deepspeed_stage_2'`), or FSDP2 through `ModelParallelStrategy`."
                )

    @staticmethod
    def _has_lazy_parameters(module: torch.nn.Module) -> bool:
        from torch.nn.parameter import is_lazy

        return any(is_lazy(p) for p in module.parameters())

    # ----------------------------------------------------------------------------------------------------------
    # hooks
    # ----------------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer.strategy)
        self._warn_log_collisions(trainer)
        # A new fit starts from its own global step; a checkpoint (restored after `setup`) sets it back.
        self._last_refresh_step = None
        self._penalized_step = None
        self._build_on_backward = False
        if self._regularizer is not None and self._module is pl_module:
            return  # a second `fit` with the same module continues with the same state
        self._regularizer = None
        self._module = None
        if is_overridden("configure_model", pl_module):
            return  # layers may be created in `configure_model`: build in `on_fit_start`
        self._build_or_defer(pl_module)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._regularizer is None and not self._build_on_backward:
            self._build_or_defer(pl_module)

    def _build_or_defer(self, pl_module: "pl.LightningModule") -> None:
        if self._has_lazy_parameters(pl_module):
            self._build_on_backward = True  # lazy layers get their shapes in the first forward pass
            return
        self._build(pl_module)

    def _warn_log_collisions(self, trainer: "pl.Trainer") -> None:
        earlier = []
        for callback in trainer.callbacks:
            if callback is self:
                break
            if isinstance(callback, CoMHE):
                earlier.append(callback)
        if any(cb.log_prefix == self.log_prefix for cb in earlier):
            rank_zero_warn(
                f"Several CoMHE callbacks log under {self.log_prefix!r}; their values overwrite each other. "
                "HINT: give each instance its own `name`, e.g. `CoMHE(..., name='backbone')`."
            )

    def _current_lr(self, trainer: "pl.Trainer") -> float | None:
        if self.inner_lr is not None or self.variant not in ("angle", "adversarial"):
            return None
        optimizers = trainer.optimizers
        if not optimizers:
            return None
        lr = optimizers[0].param_groups[0].get("lr")
        if isinstance(lr, Tensor):  # tensor learning rates (capturable optimizers): one sync per optimizer step
            lr = float(lr)
        return lr

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if self._regularizer is None:
            if not self._build_on_backward:
                return
            self._build(pl_module)
        regularizer = self._regularizer
        assert regularizer is not None
        step = _optimizer_step_index(trainer)
        if step != self._last_refresh_step:
            regularizer.refresh(self._current_lr(trainer))
            self._last_refresh_step = step
        if pl_module.automatic_optimization:
            if step == self._penalized_step:
                return  # later micro-batch of an accumulation window: the penalty was added to the first one
            self._penalized_step = step
        out = regularizer()
        penalty = out.penalty
        added = penalty
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            added = scaler.scale(added)
        loss.add_(added.to(loss.dtype))

        prefix = self.log_prefix
        pl_module.log(f"{prefix}/penalty", penalty.detach(), on_step=True, on_epoch=False, sync_dist=False)
        if step % self.log_every == 0:
            for layer, energy in out.energies.items():
                pl_module.log(f"{prefix}/energy/{layer}", energy, on_step=True, on_epoch=False, sync_dist=False)

    # ----------------------------------------------------------------------------------------------------------
    # state
    # ----------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._regularizer is not None:
            reg_state: dict[str, Any] | None = self._regularizer.state_dict()
        elif self._pending_state is not None:
            reg_state = self._pending_state.get("regularizer")
        else:
            reg_state = None
        return {"version": _STATE_VERSION, "last_refresh_step": self._last_refresh_step, "regularizer": reg_state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_refresh_step = state_dict.get("last_refresh_step")
        self._penalized_step = None
        if self._regularizer is not None:
            self._load_regularizer_state(state_dict)
        else:
            # Lightning restores callback state after `setup`, but before `on_fit_start`: keep it until built.
            self._pending_state = dict(state_dict)
