r"""CoMHE: a Lightning callback for (compressive) minimum hyperspherical energy regularization.

The math lives in the pure-PyTorch :class:`~lightning_comhe.regularizer.CoMHERegularizer`, and the arguments are
validated once, by the dataclasses of :mod:`lightning_comhe.config`; this module only decides *when* the penalty is
computed and *how* it enters the backward pass under every precision and optimization mode.
"""

import inspect
import itertools
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parameter import is_lazy
from typing_extensions import override

from lightning_comhe._fsdp1 import add_to_gradients
from lightning_comhe._injection import GradientInjection
from lightning_comhe._strategy import (
    all_reduce_sum,
    batch_index,
    check_strategy,
    fsdp1_root,
    gathering,
    main_lr,
    merge_owned_entries,
    optimizer_step_index,
    penalty_scale,
    penalty_shard,
    totals_over_ranks,
)
from lightning_comhe._timing import PenaltyTiming
from lightning_comhe.config import EnergyConfig, ScheduleConfig, SelectionConfig, split_kwargs
from lightning_comhe.regularizer import CoMHERegularizer

__all__ = ["CoMHE"]

_STATE_VERSION = 1


class CoMHE(Callback):
    r"""Regularize a LightningModule's neurons towards minimum hyperspherical energy (MHE / CoMHE).

    At every optimizer step the callback adds :math:`R = \sum_s \kappa_s E_s(W_s)` to the training loss, where
    :math:`W_s` are the neuron sets of the selected layers (rows of ``weight.flatten(1)``, one set per conv group)
    and :math:`E_s` the energy of the ``variant``: ``"mhe"``, ``"half_mhe"``, ``"random"`` (RP-CoMHE), ``"angle"``
    (AP-CoMHE), ``"adversarial"``, or a peer (``"orthogonal"``, ``"orthonormal"``, ``"srip"``). The classifier
    (``head``) gets full-space MHE with its own weight. See :class:`~lightning_comhe.regularizer.CoMHERegularizer`.

    * Projections are refreshed once per optimizer step, before its first backward pass.
    * The gradient that reaches the optimizer is :math:`\nabla \text{task} + \nabla R` once per optimizer step,
      whatever ``accumulate_grad_batches`` is (the penalty's gradient joins the first backward of each step), in
      automatic and manual optimization; every closure re-evaluation of a step (LBFGS, two-pass optimizers) gets
      it too. The loss is never modified: the penalty's gradient is delivered by gradient hooks
      (:class:`~lightning_comhe._injection.GradientInjection`), so any last op of the loss (``sqrt``: RMSE) works.
    * fp16 with a GradScaler: the penalty is scaled with the loss. The penalty is computed in float32 outside
      autocast.
    * Strategies: single device, DDP and multi-node, FSDP2 (``ModelParallelStrategy``), FSDP v1 (``FSDPStrategy``,
      whose penalty joins the sharded gradients after the backward), DeepSpeed ZeRO-1/2/3 (ZeRO-3 without
      accumulation). ``docs/strategies/`` has one page per strategy and mode.
    * Logs ``comhe/penalty`` (:math:`R`, without the ``every_n_steps`` factor) on every penalized step and
      ``comhe/energy/<layer>`` every ``log_every`` penalized steps (prefix
      ``comhe/<name>/`` with a ``name``). The state (generators, learned projections, step) is checkpointed, so a
      resumed run continues bit-exactly.

    Args:
        variant: The energy: ``"mhe"``, ``"half_mhe"``, ``"random"`` (RP-CoMHE), ``"angle"`` (AP-CoMHE),
            ``"adversarial"``, or a peer: ``"orthogonal"``, ``"orthonormal"``, ``"srip"`` (``docs/peers.md``).
        weight: κ of the hidden layers. ``None``: the official 1 (0.1 for angular powers ``s > 0``).
        head_weight: κ of the classifier. ``None``: the official 10 (1 for angular powers ``s > 0``).
        power: The energy's power ``s``: ``0``, a float ``> 0``, or ``"0" "1" "2" "a0" "a1" "a2"`` (a = angular).
        angular: Use the angular distance arccos(c)/π instead of the chord.
        projection_dim: Projection dimension ``k``. ``None``: official (random 40, angle/adversarial 30).
        num_projections: Number of random projections ``C``. ``None``: official (random 20; learned only 1).
        resample_every: Redraw the random projections every this many (penalized) optimizer steps.
        inner_steps: Side-optimizer steps per step of a learned projection. ``None``: angle 1, adversarial 10.
        inner_lr: Side-optimizer learning rate ``> 0``. ``None``: follow the main optimizer's current lr.
        lookahead: Look-ahead of a learned projection: ``"none"``, ``"first"`` (detached) or ``"second"``.
        projection_kind: ``variant="random"`` only: ``"gaussian"`` (official), ``"sparse"``, ``"srht"``, or
            ``"expected"`` (the exact mean over infinitely many Gaussian projections: no draws, no noise).
        seed: Seed of the projections' own random generators (the global RNG is never touched).
        eps: The constant inside each norm's square root (official 1e-4).
        ortho_normalize: ``"orthogonal"``/``"srip"`` only: use eps-normalized neurons.
        srip_iterations: ``"srip"`` only: power-iteration steps per optimizer step.
        srip_squared: ``"srip"`` only: penalize the squared spectral norm (released code) instead of the norm.
        include: Regex, or list of regexes, over module names; only matching layers are regularized.
        exclude: Regex, or list of regexes, over module names of layers to leave out.
        head: Module name(s) of the classifier. ``"auto"``: timm's ``get_classifier()``, else the last Linear.
        grouped: Grouped convs: ``"per_group"`` (one energy per group) or ``"skip"``.
        std_conv: timm's standardized convs: regularize the ``"raw"`` or the ``"standardized"`` weight.
        every_n_steps: Lazy regularization: the penalty (×m) only on every m-th optimizer step (``docs/math.md``).
        log_every: Log the per-layer energies every this many penalized optimizer steps.
        name: Instance name: log prefix ``comhe/<name>/`` and checkpoint key (one per instance when several run).
        shard: Under DDP, DeepSpeed ZeRO-1/2 and FSDP2, split the penalty across ranks (each computes a balanced
            share, about ``1/W``); no effect in one process or for the peers (``docs/strategies/ddp.md``).

    The fields and their validation live in :mod:`lightning_comhe.config` (``EnergyConfig``, ``SelectionConfig``,
    ``ScheduleConfig``); this signature mirrors them for LightningCLI, and a test keeps the two in sync.

    Raises:
        MisconfigurationException: At construction, for any invalid argument (the message names it, the allowed
            values and the value received). At ``setup``, when no layer is selected, when the configuration does
            not fit the model, under DeepSpeed ZeRO-3 with accumulation, or an unsupported FSDP v1 configuration.

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
        projection_kind: Literal["gaussian", "sparse", "srht", "expected"] = "gaussian",
        seed: int = 0,
        eps: float = 1e-4,
        ortho_normalize: bool = False,
        srip_iterations: int = 1,
        srip_squared: bool = False,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        head: str | list[str] | None = "auto",
        grouped: Literal["per_group", "skip"] = "per_group",
        std_conv: Literal["raw", "standardized"] = "raw",
        every_n_steps: int = 1,
        log_every: int = 50,
        name: str | None = None,
        shard: bool = True,
    ) -> None:
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k in inspect.signature(CoMHE).parameters}
        try:
            configs = split_kwargs(arguments)
        except ValueError as err:
            raise MisconfigurationException(f"CoMHE: {err}") from err
        self.energy_config: EnergyConfig = configs[0]
        self.selection_config: SelectionConfig = configs[1]
        self.schedule: ScheduleConfig = configs[2]

        self._regularizer: CoMHERegularizer | None = None
        self._module: pl.LightningModule | None = None
        self._build_on_backward = False
        self._pending_state: dict[str, Any] | None = None
        self._timing = PenaltyTiming(self.schedule.every_n_steps)  # which backward passes get the penalty
        self._injection = GradientInjection()
        self._shard: tuple[int, int] | None = None  # (rank, world size) of a penalty split across ranks
        self._said_unsharded = False

    def __getattr__(self, name: str) -> Any:
        # the configuration fields, read-only: `callback.variant`, `callback.weight`, ... (as passed, not resolved)
        for cfg in ("energy_config", "selection_config", "schedule"):
            obj = self.__dict__.get(cfg)
            if obj is not None and name in type(obj).__dataclass_fields__:
                return getattr(obj, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
        """The flat keyword arguments of :class:`~lightning_comhe.regularizer.CoMHERegularizer` (both configs)."""
        return {**asdict(self.energy_config), **asdict(self.selection_config)}

    # ----------------------------------------------------------------------------------------------------------
    # building
    # ----------------------------------------------------------------------------------------------------------
    def _describe(self) -> str:
        return (
            f"CoMHE(variant={self.variant!r}, include={self.include!r}, exclude={self.exclude!r}, "
            f"head={self.head!r}, grouped={self.grouped!r})"
        )

    def _build(self, pl_module: "pl.LightningModule") -> None:
        try:
            regularizer = CoMHERegularizer(pl_module, energy=self.energy_config, selection=self.selection_config)
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

    # ----------------------------------------------------------------------------------------------------------
    # hooks
    # ----------------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, trainer.accumulate_grad_batches)
        self._warn_log_collisions(trainer)
        # A new fit starts from its own global step; a checkpoint (restored after `setup`) sets it back.
        self._timing.last_refresh = None
        self._timing.reset()
        self._injection.cancel()
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
        if any(is_lazy(p) for p in pl_module.parameters()):
            self._build_on_backward = True  # lazy layers get their shapes in the first forward pass
            return
        self._build(pl_module)

    def _warn_log_collisions(self, trainer: "pl.Trainer") -> None:
        earlier = itertools.takewhile(lambda cb: cb is not self, trainer.callbacks)
        if any(isinstance(cb, CoMHE) and cb.log_prefix == self.log_prefix for cb in earlier):
            rank_zero_warn(
                f"Several CoMHE callbacks log under {self.log_prefix!r}; their values overwrite each other. "
                "HINT: give each instance its own `name`, e.g. `CoMHE(..., name='backbone')`."
            )

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if self._regularizer is None:
            if not self._build_on_backward:
                return
            self._build(pl_module)
        if fsdp1_root(trainer.strategy) is None:  # FSDP v1: after the backward (`on_after_backward`)
            self._penalize(trainer, pl_module, loss)

    def _penalize(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor | None) -> None:
        """Refresh and penalize if due; ``loss=None``: after FSDP v1's backward, into the sharded gradients."""
        regularizer = self._regularizer
        assert regularizer is not None
        step, timing = optimizer_step_index(trainer), self._timing
        if not timing.due(step):
            return  # lazy regularization: nothing is computed or added on this step
        refresh = timing.needs_refresh(step)
        if refresh and regularizer.sync():  # requires_grad or the module tree changed (fine-tuning, a new head)
            rank_zero_info(f"{'' if self.name is None else f'[{self.name}] '}{regularizer.summary()}")
        self._shard = shard = penalty_shard(trainer, self.shard, regularizer.family.shardable, regularizer.parameters())
        if shard is None and self.shard and trainer.world_size > 1 and not self._said_unsharded:
            self._said_unsharded = True
            rank_zero_info(
                f"CoMHE(shard=True) has no effect under {type(trainer.strategy).__name__} with variant "
                f"{self.variant!r}: every rank computes the whole penalty (docs/strategies/ddp.md)."
            )
        # sharded weights (FSDP2, FSDP v1, ZeRO-3): one group at a time
        with gathering(shard, regularizer, fsdp1_root(trainer.strategy)) as weights:
            if refresh:
                with nullcontext() if weights is None else weights.phase(reads=regularizer.family.refresh_reads):
                    lr = None if self.inner_lr is not None or not regularizer.family.uses_lr else main_lr(trainer)
                    regularizer.refresh(lr, self._share(regularizer))
            if not timing.penalize(step, batch_index(trainer)):
                return  # a later micro-batch (or `manual_backward`) of the step: its first backward has the penalty
            # lazy ×m; under DDP a share R_r counts ×W (DDP averages); FSDP2 / ZeRO-3 sum the shares' gradients
            factor = timing.factor * (shard.world if shard is not None and not shard.scatter else 1)
            scale = penalty_scale(factor, getattr(trainer.precision_plugin, "scaler", None))
            if weights is not None:
                weights.scale = scale
            if weights is not None:  # each group's term is differentiated as soon as it is computed
                out = regularizer.compute(self._share(regularizer), on_group=weights.settle)
                if loss is None:
                    add_to_gradients(weights.shard_gradients())  # type: ignore[arg-type] - FSDP v1: fragments
                else:
                    self._injection.arm_gradients(loss, weights.shard_gradients())
            else:
                out = regularizer.compute(self._share(regularizer))
                assert loss is not None
                self._injection.arm(loss, scale(out.penalty), regularizer.parameters(), materialize=shard is not None)
        self._log(pl_module, regularizer, out, log_energies=(step // timing.factor) % self.log_every == 0)

    def _share(self, regularizer: CoMHERegularizer) -> Any:
        return None if self._shard is None else regularizer.shard_plan(self._shard[1])[self._shard[0]]

    def _log(self, pl_module: "pl.LightningModule", reg: CoMHERegularizer, out: Any, log_energies: bool) -> None:
        prefix, penalty, energies = self.log_prefix, out.penalty.detach(), out.energies
        if self._shard is not None:  # the totals over ranks
            penalty, energies = totals_over_ranks(penalty, energies, reg.selection.names if log_energies else [])
        pl_module.log(f"{prefix}/penalty", penalty, on_step=True, on_epoch=False, sync_dist=False)
        if log_energies:
            for layer, energy in energies.items():
                pl_module.log(f"{prefix}/energy/{layer}", energy, on_step=True, on_epoch=False, sync_dist=False)

    @override
    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._regularizer is not None and fsdp1_root(trainer.strategy) is not None:
            self._penalize(trainer, pl_module, None)  # the weights are their shards again, with sharded gradients
        elif self._injection.armed:
            shard = self._shard
            # gradients no hook delivered come after DDP's all-reduce: a sharded penalty reduces them itself (under
            # FSDP2 the shares' gradients are already reduce-scattered)
            world = None if shard is None or shard.scatter else shard.world
            self._injection.finish(None if world is None else lambda g: all_reduce_sum(g) / world)

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        # after every closure evaluation: a further backward of the same batch re-evaluates it (LBFGS, SAM)
        self._timing.closure_evaluated(optimizer_step_index(trainer), batch_index(trainer))

    # ----------------------------------------------------------------------------------------------------------
    # state
    # ----------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._regularizer is not None:
            reg_state: dict[str, Any] | None = self._regularizer.state_dict()
            if self._shard is not None and "entries" in (reg_state.get("projector") or {}):
                # each rank drew / fitted only its own share's projections: the checkpoint gets every owner's
                share = self._regularizer.shard_plan(self._shard[1])[self._shard[0]]
                projector = dict(reg_state["projector"])
                projector["entries"] = merge_owned_entries(projector["entries"], share)
                reg_state = {**reg_state, "projector": projector}
        elif self._pending_state is not None:
            reg_state = self._pending_state.get("regularizer")
        else:
            reg_state = None
        return {"version": _STATE_VERSION, "last_refresh_step": self._timing.last_refresh, "regularizer": reg_state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._timing.last_refresh = state_dict.get("last_refresh_step")
        self._timing.reset()
        if self._regularizer is not None:
            self._load_regularizer_state(state_dict)
        else:
            # Lightning restores callback state after `setup`, but before `on_fit_start`: keep it until built.
            self._pending_state = dict(state_dict)
