r"""The CoMHE regularizer: a model, a layer selection and an energy give one penalty.

Pure PyTorch (no Lightning import). The Lightning callback :class:`lightning_comhe.CoMHE` is a thin adapter over
:class:`CoMHERegularizer`; Fabric and raw-PyTorch users call it directly.

For the selected layers, with neuron sets :math:`W_s` (rows are neurons) and per-set weights :math:`\kappa_s`:

.. math::

    R = \sum_s \kappa_s\, E_s(W_s)

where :math:`E_s` is given by the variant's energy family (:mod:`lightning_comhe.energies`) and the set's role:

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
peers              ``"orthogonal"``, ``"orthonormal"``,        the same penalty
                   ``"srip"`` (``docs/peers.md``)
=================  ==========================================  ====================================

A hidden set whose dimension ``d`` is at most the projection dimension ``k`` is regularized with half-space MHE in
full space, without projection (the official first-layer rule, generalized). Sets with equal shapes and equal
treatment are stacked into one group and computed together in batched matmuls.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_comhe._registry import PEER_VARIANTS
from lightning_comhe._validation import check_float, check_int
from lightning_comhe.config import (
    PEER_DEFAULT_WEIGHTS,
    EnergyConfig,
    SelectionConfig,
    Variant,
    resolve_configs,
    variant_defaults,
)
from lightning_comhe.config import VARIANTS as VARIANTS
from lightning_comhe.discovery import LayerSelection
from lightning_comhe.energies import EnergyFamily, Group, build_energy
from lightning_comhe.sharding import Part, ShardPlan, plan_shards
from lightning_comhe.tracking import TrackedLayers

__all__ = [
    "CoMHERegularizer",
    "PEER_DEFAULT_WEIGHTS",
    "PEER_VARIANTS",
    "RegularizerOutput",
    "Variant",
    "VARIANTS",
    "variant_defaults",
]

_STATE_VERSION = 1


@dataclass
class RegularizerOutput:
    r"""What one regularizer call returns.

    Attributes:
        penalty: The differentiable total :math:`\sum_s \kappa_s E_s`, a 0-dim float32 (float64) tensor.
        energies: Detached per-layer energies (mean over the layer's sets, without κ), keyed by module name.
        scale: The factor already in ``penalty`` (``every_n_steps`` of :meth:`CoMHERegularizer.lazy_penalty`, else
            1): ``penalty / scale`` is :math:`R`.
    """

    penalty: Tensor
    energies: dict[str, Tensor] = field(default_factory=dict)
    scale: int = 1


class CoMHERegularizer:
    r"""Hyperspherical-energy regularizer for the neurons of a model (MHE, half-space MHE, CoMHE, peers).

    Args:
        model: The model whose layers are regularized. Only a reference is kept (it is not registered as a child).
        variant: The energy family (see the module docstring); ``None``: ``"random"``, or ``energy.variant``.
        energy: An :class:`~lightning_comhe.config.EnergyConfig` (instead of its flat keyword arguments).
        selection: A :class:`~lightning_comhe.config.SelectionConfig` (instead of its flat keyword arguments).
        **kwargs: The fields of :class:`~lightning_comhe.config.EnergyConfig` (``power``, ``weight``,
            ``projection_dim``, ``inner_lr``, ...) and :class:`~lightning_comhe.config.SelectionConfig`
            (``include``, ``exclude``, ``head``, ``grouped``, ``std_conv``), documented there.

    Raises:
        ValueError: For an invalid argument (the message names it), or when no layer is selected.
        TypeError: For an unknown keyword argument or a ``model`` that is not an ``nn.Module``.

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
        variant: Variant | str | None = None,
        *,
        energy: EnergyConfig | None = None,
        selection: SelectionConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        self.config, self.selection_config = resolve_configs(variant, energy, selection, kwargs)
        self.family: EnergyFamily = build_energy(self.config)
        self._model_ref = model
        self._layers = TrackedLayers(model, self.selection_config, self.family)
        self._plan: tuple[tuple, ShardPlan] | None = None
        self._refreshes = 0

    # ------------------------------------------------------------------------------------------------------------
    # the resolved settings, read by callers and tests
    @property
    def variant(self) -> str:
        """The energy family's name."""
        return self.config.variant

    @property
    def s(self) -> float:
        """The power ``s``."""
        return self.config.s

    @property
    def angular(self) -> bool:
        """Whether the angular distance is used."""
        return self.config.is_angular

    @property
    def weight(self) -> float:
        r""":math:`\kappa` of hidden sets (defaults resolved)."""
        return self.config.hidden_weight

    @property
    def head_weight(self) -> float:
        r""":math:`\kappa` of the classifier (defaults resolved)."""
        return self.config.head_kappa

    @property
    def projection_dim(self) -> int | None:
        """``k`` (defaults resolved)."""
        return self.config.dim

    @property
    def num_projections(self) -> int | None:
        """``C`` (defaults resolved)."""
        return self.config.num

    @property
    def inner_steps(self) -> int | None:
        """Side-optimizer steps per refresh (defaults resolved)."""
        return self.config.steps

    def __getattr__(self, name: str) -> Any:
        # the remaining configuration fields (power, seed, eps, include, head, ...), read-only
        for cfg in ("config", "selection_config"):
            obj = self.__dict__.get(cfg)
            if obj is not None and name in type(obj).__dataclass_fields__:
                return getattr(obj, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
        extra = self.family.describe(self.groups)
        return self.selection.summary() + (f"; {extra}" if extra else "")

    # ------------------------------------------------------------------------------------------------------------
    @property
    def selection(self) -> LayerSelection:
        """The selected layers (and the skipped ones, with reasons), as of the last :meth:`sync`."""
        return self._layers.selection

    @property
    def groups(self) -> tuple[Group, ...]:
        """The groups of equally shaped, equally treated neuron sets, computed together."""
        return self._layers.groups

    def sync(self) -> bool:
        """Follow the model as it is now; cheap when nothing changed (one pass over its parameters).

        The layers are selected again when a parameter was added, removed or replaced (a new head, a registered
        parametrization, a changed module tree) or its ``requires_grad`` flipped (a fine-tuning schedule freezing
        or unfreezing a backbone). Groups that keep their shape keep their state (generators, fitted projections);
        the others start afresh. An empty selection (everything frozen) gives a zero penalty until layers return.

        Returns:
            Whether the selection was rebuilt.
        """
        if not self._layers.changed():
            return False
        self._layers.rebuild(allow_empty=True)
        self.family.retain(self.groups)
        return True

    def group_neurons(self, group: Group, cache: dict[str, list[Tensor]] | None = None) -> Tensor:
        """The current ``(G, N, d)`` neurons of ``group`` (differentiable); ``cache`` shares layer extractions."""
        return self._layers.group_neurons(group, cache)

    def parameters(self, group: Group | None = None) -> list[Tensor]:
        """The distinct tensors the penalty (or ``group``) is read from (weights or their direction parameters)."""
        return self._layers.parameters(group)

    def refresh(self, lr: float | None = None, share: dict[str, list[Part]] | None = None) -> None:
        """Prepare the energy for the next optimizer step; call it once per step, before :meth:`__call__`.

        Random projections are redrawn when due (every ``resample_every`` calls). Learned projections take
        ``inner_steps`` side-optimizer steps on the current (detached) weights, with learning rate ``inner_lr``, or
        ``lr`` (the main optimizer's current learning rate) when ``inner_lr`` is ``None``.

        Args:
            lr: The main optimizer's current learning rate.
            share: A rank's share of :meth:`shard_plan`: only its groups are refreshed (fitted).
        """
        check_float("lr", lr, allow_none=True)
        self._refreshes += 1
        self.family.lr = lr
        groups = self.groups if share is None else tuple(g for g in self.groups if share.get(g.key))
        self.family.share = share
        try:  # no extraction is kept across groups: gathered weights (ZeRO-3, FSDP2) are freed group by group
            self.family.refresh(groups, self.group_neurons)
        finally:
            self.family.share = None

    def shard_plan(self, world_size: int) -> ShardPlan:
        """The split of the penalty over ``world_size`` ranks (:func:`~lightning_comhe.sharding.plan_shards`).

        Deterministic in the groups' shapes, the configuration and ``world_size``: every rank computes the same plan.
        """
        key = (world_size, tuple((g.key, g.num_sets) for g in self.groups))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, plan_shards(self.groups, self.family, world_size))
        return self._plan[1]

    def __call__(self) -> RegularizerOutput:
        r"""Compute the penalty :math:`\sum_s \kappa_s E_s` and the per-layer energies."""
        return self.compute()

    def compute(
        self,
        share: dict[str, list[Part]] | None = None,
        on_group: Callable[[int, Tensor | None], None] | None = None,
    ) -> RegularizerOutput:
        r"""Compute the penalty and per-layer energies (see the class docstring). Differentiable.

        Args:
            share: A rank's share of :meth:`shard_plan`: only its parts are computed. The penalty is then that
                rank's :math:`R_r` (:math:`\sum_r R_r = R`), and each energy the share's contribution to the layer's
                mean (the sum over ranks is the mean).
            on_group: ``on_group(i, term)`` after each group ``i``'s term (``None``: not in the share), in order;
                it takes the term's gradient (:class:`~lightning_comhe._gathered.GatheredWeights`). The penalty is
                then detached.
        """
        cache: dict[str, list[Tensor]] = {}
        penalty: Tensor | None = None
        per_layer: dict[str, list[Tensor]] = {}
        for index, group in enumerate(self.groups):
            sets, cache = None, {} if on_group is not None else cache
            if share is None:
                energy = self.family.energy(group, self.group_neurons(group, cache))  # (G,)
            elif share.get(group.key):
                energy, sets = self.family.energy_parts(group, self.group_neurons(group, cache), share[group.key])
            else:
                if on_group is not None:
                    on_group(index, None)
                continue
            term = energy.sum() * group.kappa
            if on_group is not None:
                on_group(index, term)
                term = term.detach()
            # weights on several devices (model or pipeline parallelism): the total lives on the first group's
            penalty = term if penalty is None else penalty + term.to(penalty.device)
            detached = energy.detach()
            start = 0
            for m in group.members:
                if sets is None:
                    per_layer.setdefault(m.layer, []).append(detached[start : start + m.num_sets])
                else:
                    mine = [j for j, s in enumerate(sets) if start <= s < start + m.num_sets]
                    if mine:
                        part = detached[mine].sum() / self._layers.layer_sets[m.layer]
                        per_layer.setdefault(m.layer, []).append(part.reshape(1))
                start += m.num_sets
        if penalty is None:  # nothing is selected right now (:meth:`sync` after a freeze), or nothing is this rank's
            first = next(iter(self._model_ref.parameters()), None)
            penalty = torch.zeros((), device=None if first is None else first.device)
        if share is None:
            energies = {name: torch.cat(parts).mean() for name, parts in per_layer.items()}
        else:
            energies = {name: torch.cat(parts).sum() for name, parts in per_layer.items()}
        return RegularizerOutput(penalty=penalty, energies=energies)

    def lazy_penalty(self, step: int, every_n_steps: int = 1, lr: float | None = None) -> RegularizerOutput | None:
        r"""Lazy regularization for hand-written loops: refresh and compute only on the steps ``step % m == 0``.

        The penalty of a penalized step is weighted by ``m = every_n_steps`` (StyleGAN2's lazy R1 regularization),
        so that on average it counts once per step; on the other steps nothing is computed and ``None`` is returned.

        Args:
            step: The optimizer step about to be taken (0, 1, 2, ...).
            every_n_steps: ``m >= 1``.
            lr: The main optimizer's current learning rate (see :meth:`refresh`).

        Returns:
            ``None``, or the output with ``penalty`` :math:`= m R` and ``scale = m``.

        Example::

            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
            >>> reg = CoMHERegularizer(model, "mhe")
            >>> [reg.lazy_penalty(step, every_n_steps=4) is None for step in range(5)]
            [False, True, True, True, False]
        """
        check_int("step", step, 0)
        check_int("every_n_steps", every_n_steps, 1)
        if step % every_n_steps:
            return None
        self.refresh(lr)
        out = self.compute()
        if every_n_steps > 1:
            out = RegularizerOutput(out.penalty * every_n_steps, out.energies, every_n_steps)
        return out

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: step count, projection generators, learned projections."""
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "variant": self.variant,
            "layers": [layer.name for layer in self.selection.layers],
            "refreshes": self._refreshes,
            "last_lr": self.family.lr,
            "projector": None,
            "srip_vectors": {},
        }
        state.update(self.family.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Tensors move to the weights' device lazily, at the next use.

        A state saved for another layer selection (a checkpoint from a version that covered fewer layers, or a
        model whose selection changed) still loads: groups that kept their shape continue from it, new or changed
        groups start afresh, and a warning names the layers that differ.

        Raises:
            ValueError: If the state belongs to another variant.
        """
        if state.get("variant") != self.variant:
            raise ValueError(
                f"Cannot load CoMHE state of variant {state.get('variant')!r} into variant {self.variant!r}."
            )
        layers = [layer.name for layer in self.selection.layers]
        saved = list(state.get("layers") or [])
        self._refreshes = int(state.get("refreshes", 0))
        self.family.lr = state.get("last_lr")
        self.family.load_state_dict(state)
        if saved != layers:
            self.family.retain(self.groups)
            new, gone = [n for n in layers if n not in saved], [n for n in saved if n not in layers]
            warnings.warn(
                f"CoMHE state was saved for another layer selection ({len(saved)} layers saved, {len(layers)} "
                f"selected now; new: {new or 'none'}, no longer selected: {gone or 'none'}). Groups of unchanged "
                "shape continue from it; the others start afresh.",
                UserWarning,
                stacklevel=2,
            )
