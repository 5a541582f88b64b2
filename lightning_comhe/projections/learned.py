r"""The shared base of the learned projections (AP-CoMHE and adversarial CoMHE): one fitted ``P`` per key.

Each key (one per group of equally shaped neuron sets) holds one learnable
:math:`P \in \mathbb{R}^{G \times k \times d}`, initialised with :math:`\mathcal{N}(0, 1)` entries from the key's own
generator (:mod:`~lightning_comhe.projections._rng`) and fitted by its own plain SGD side optimizer:
:class:`~lightning_comhe.projections.angle.AngleProjection` descends the angle-preservation objective,
:class:`~lightning_comhe.projections.adversarial.AdversarialProjection` ascends the full-space projected energy.
The model's optimizer never updates ``P``. Pure PyTorch.

Cost: ``W`` is fixed during a fit, so what the inner steps share is computed once per fit (AP-CoMHE's
:math:`C(W)`); each step takes the objective's value and :math:`\nabla_P` without an autograd graph through the
projection (a closed form for the angle objective, the energy's own backward to the projected set for the
adversarial one), projects as ``P·Wᵀ`` (:func:`~lightning_comhe.functional.projection.project_sets`), and applies
``torch.optim.SGD``'s momentum-free update in place, op for op, instead of ``optimizer.step()`` (the side optimizer
keeps no state, so its ``state_dict`` is unchanged; a restored optimizer that is not momentum-free SGD still steps
itself). The results equal the autograd and optimizer path up to float reassociation.
"""

import copy
from typing import Any

import torch
from torch import Tensor

from lightning_comhe._validation import check_choice, check_float, check_int
from lightning_comhe.config import LOOKAHEADS, Lookahead
from lightning_comhe.functional._dtype import compute_dtype
from lightning_comhe.projections._common import STATE_VERSION, check_key, check_sets, check_state, warn_config
from lightning_comhe.projections._inner import is_plain_sgd, optimizer_steps, sgd_steps
from lightning_comhe.projections._rng import KeyedGenerators, randn

__all__ = ["LearnedProjection"]


def _check_call_lr(lr: Any) -> float:
    """A per-call learning rate ``>= 0``: the main optimizer's current one, which a warmup may make 0 (a no-op step)."""
    return check_float("lr", lr)  # type: ignore[return-value]


def _check_sets_arg(sets: list[int] | None, num_sets: int) -> list[int] | slice | None:
    """``sets`` checked to name distinct sets in ``[0, num_sets)``, as an index (:func:`as_index`)."""
    if sets is None:
        return None
    if (
        not isinstance(sets, list | tuple)
        or not sets
        or len(set(sets)) != len(sets)
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_sets for i in sets)
    ):
        raise ValueError(f"`sets` must be None or distinct set indices in [0, {num_sets}), got {sets!r}.")
    return as_index(list(sets))


def as_index(sets: list[int]) -> list[int] | slice:
    """``sets`` as an index: a ``slice`` for a run of consecutive sets (a view, no copy), else the list."""
    return slice(sets[0], sets[0] + len(sets)) if sets == list(range(sets[0], sets[0] + len(sets))) else sets


class LearnedProjection:
    r"""The base of the learned projections: one learnable ``P`` of shape ``(G, dim, d)`` per key, fitted by SGD.

    A subclass defines the inner objective :math:`L(W, P)` (per set, shape ``(G,)``) and whether the side optimizer
    descends (``_maximize = False``) or ascends it, and its official ``steps`` (``_default_steps``, taken when
    ``steps`` is ``None``): :meth:`fit` takes ``steps`` steps
    :math:`P \leftarrow P \mp \eta(\nabla_P L \pm \lambda P)` and :meth:`projections` returns ``P`` or the official
    look-ahead :math:`\tilde P = P \mp \eta \nabla_P L`. The arguments are those of :class:`AngleProjection`.

    Raises:
        ValueError: If an argument is out of its allowed range (`` `name` must be …, got … ``).

    Example::

        >>> import torch
        >>> class Shrink(LearnedProjection):  # a toy objective: the squared norm of P, per set
        ...     def _objective(self, neurons, p):
        ...         return p.pow(2).sum((-1, -2))
        >>> proj = Shrink(dim=2, steps=3, lr=0.1, weight_decay=0.0, lookahead="none", seed=0)
        >>> before = proj.fit("k", torch.randn(1, 4, 5))
        >>> bool(proj.objective("k", torch.randn(1, 4, 5)) < before)
        True
    """

    _maximize = False
    #: ``steps`` when the constructor is given ``None``: the official count of the subclass.
    _default_steps = 1

    def __init__(
        self,
        dim: int = 30,
        steps: int | None = None,
        lr: float = 0.1,
        weight_decay: float = 5e-7,
        lookahead: Lookahead = "none",
        seed: int = 0,
    ) -> None:
        self.dim: int = check_int("dim", dim, 1)  # type: ignore[assignment]
        steps = self._default_steps if steps is None else steps
        self.steps: int = check_int("steps", steps, 0)  # type: ignore[assignment]
        self.lr: float = check_float("lr", lr, strict=True)  # type: ignore[assignment]
        self.weight_decay: float = check_float("weight_decay", weight_decay)  # type: ignore[assignment]
        self.lookahead: Lookahead = check_choice("lookahead", lookahead, LOOKAHEADS)
        self.seed: int = check_int("seed", seed, 0)  # type: ignore[assignment]
        self._gens = KeyedGenerators(type(self).__name__, self.seed)
        self._params: dict[str, Tensor] = {}
        self._optims: dict[str, torch.optim.SGD] = {}
        self._pending: dict[str, tuple[Tensor, dict | None]] = {}  # key -> (P, optimizer state), lazily restored

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, steps={self.steps}, lr={self.lr}, "
            f"weight_decay={self.weight_decay}, lookahead={self.lookahead!r}, seed={self.seed})"
        )

    # -- inner objective -----------------------------------------------------------------------------------------

    def _objective(self, neurons: Tensor, p: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fit_context(self, neurons: Tensor) -> Any:
        """What the inner steps of one fit share (``neurons`` is fixed during a fit); ``None`` by default."""
        return None

    def _value_and_grad(self, neurons: Tensor, context: Any, p: Tensor) -> tuple[Tensor, Tensor]:
        """The objective per set ``(G,)`` and its gradient with respect to ``p``, the neurons held fixed.

        The default differentiates :meth:`_objective` with autograd; subclasses override it with a cheaper exact
        form. ``neurons`` and ``p`` are detached and in the compute dtype.
        """
        with torch.enable_grad():
            leaf = p.detach().requires_grad_(True)
            obj = self._objective(neurons, leaf)
            (grad,) = torch.autograd.grad(obj.sum(), leaf)
        return obj.detach(), grad

    def _config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "steps": self.steps,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "lookahead": self.lookahead,
            "seed": self.seed,
        }

    # -- entries -------------------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """The keys that have a projection (live, or restored and waiting for their first use)."""
        return sorted(set(self._params) | set(self._pending))

    def _new_optimizer(self, p: Tensor) -> torch.optim.SGD:
        return torch.optim.SGD([p], lr=self.lr, weight_decay=self.weight_decay, maximize=self._maximize)

    def _entry(self, key: str, neurons: Tensor) -> tuple[Tensor, torch.optim.SGD]:
        """The live ``P`` and optimizer of a key, created or restored on the neurons' device."""
        check_key(key)
        check_sets(neurons)
        device = neurons.device
        g, _, d = neurons.shape
        p = self._params.get(key)
        if p is None and key in self._pending:
            saved, opt_state = self._pending.pop(key)
            p = saved.detach().to(device).clone().requires_grad_(True)
            opt = self._new_optimizer(p)
            if opt_state is not None:
                opt.load_state_dict(opt_state)
                for group in opt.param_groups:  # the current configuration wins over the saved hyper-parameters
                    group["lr"], group["weight_decay"] = self.lr, self.weight_decay
            self._params[key], self._optims[key] = p, opt
        elif p is None:
            gen = self._gens.get(key, device)
            init = randn((g, self.dim, d), gen, device, compute_dtype(neurons))
            p = init.requires_grad_(True)
            self._params[key], self._optims[key] = p, self._new_optimizer(p)
        elif p.device != device:  # the neurons moved (e.g. CPU sanity check, then GPU): move P and its optimizer
            moved = p.detach().to(device).requires_grad_(True)
            opt_state = self._optims[key].state_dict()
            opt = self._new_optimizer(moved)
            opt.load_state_dict(opt_state)
            self._params[key], self._optims[key] = moved, opt
            p = moved
        if tuple(p.shape) != (g, self.dim, d):
            raise ValueError(
                f"`neurons` must have shape (G, N, d) = ({p.shape[0]}, N, {p.shape[2]}) for key {key!r} of this "
                f"{type(self).__name__} (its projections have shape {tuple(p.shape)} = (G, dim, d); use one key per "
                f"group of equally shaped neuron sets), got shape {tuple(neurons.shape)}."
            )
        return p, self._optims[key]

    def retain(self, shapes: dict[str, tuple[int, int]]) -> list[str]:
        """Keep only the projections of the keys in ``shapes`` whose ``(G, d)`` still match; return the dropped keys.

        A dropped key starts afresh at its next use, from its generator's current state (so still deterministic).
        """
        dropped = []
        for key in self.keys():
            p = self._params[key] if key in self._params else self._pending[key][0]
            if shapes.get(key) != (p.shape[0], p.shape[2]):
                self._params.pop(key, None)
                self._optims.pop(key, None)
                self._pending.pop(key, None)
                dropped.append(key)
        return dropped

    def set_projection(self, key: str, projection: Tensor) -> None:
        """Set the projection of a key (e.g. to start from a given ``P``); its optimizer state is reset.

        The tensor is copied (detached) and keeps its dtype and device; it is moved to the neurons' device at next
        use.

        Args:
            key: The neuron-set group.
            projection: ``(G, dim, d)``, one ``dim × d`` matrix per neuron set of the group.

        Raises:
            ValueError: If the key or the shape is bad.
        """
        check_key(key)
        if not isinstance(projection, Tensor) or not projection.is_floating_point():
            raise ValueError(f"`projection` must be a floating-point torch.Tensor, got {type(projection).__name__}.")
        if projection.ndim != 3 or projection.shape[1] != self.dim or projection.shape[0] < 1:
            raise ValueError(
                f"`projection` must have shape (G, dim, d) with dim = {self.dim}, got {tuple(projection.shape)}."
            )
        p = projection.detach().clone().requires_grad_(True)
        self._pending.pop(key, None)
        self._params[key], self._optims[key] = p, self._new_optimizer(p)

    def get_projection(self, key: str) -> Tensor | None:
        """The current (pre-look-ahead) projection of a key, detached and copied, or ``None`` if it has none.

        Args:
            key: The neuron-set group.

        Returns:
            ``(G, dim, d)`` or ``None``.
        """
        check_key(key)
        if key in self._params:
            return self._params[key].detach().clone()
        if key in self._pending:
            return self._pending[key][0].detach().clone()
        return None

    # -- fitting -------------------------------------------------------------------------------------------------

    def objective(self, key: str, neurons: Tensor) -> Tensor:
        """The inner objective at the current ``P``, per set, without any update (the ``P`` is created if missing).

        Args:
            key: The neuron-set group.
            neurons: ``(G, N, d)`` (detached inside).

        Returns:
            ``(G,)``, detached.
        """
        p, _ = self._entry(key, neurons)
        with torch.no_grad():
            return self._objective(neurons.detach(), p.detach())

    def fit(self, key: str, neurons: Tensor, lr: float | None = None, sets: list[int] | None = None) -> Tensor:
        """Run ``steps`` side-optimizer steps on the key's ``P`` against the (detached) neurons.

        Args:
            key: The neuron-set group.
            neurons: ``(G, N, d)``; detached inside, so the model gets no gradient from fitting.
            lr: Learning rate ``>= 0`` for this call only (the official code uses the model's current learning rate,
                which a warmup may make 0: the steps then leave ``P`` as it is); the configured ``lr`` when ``None``.
            sets: Fit only these sets' projections (a data-parallel rank's share): the objective and the update of
                one set depend on that set alone, so they equal a whole fit's. ``None``: all.

        Returns:
            The inner objective per fitted set (``(G,)``, or ``(len(sets),)``), detached, measured **before** the
            steps (at the ``P`` the call started from), like the official training loop's logged value.

        Raises:
            ValueError: For bad ``neurons``, ``key``, ``lr`` or ``sets``.
        """
        lr_now = self.lr if lr is None else _check_call_lr(lr)
        p, opt = self._entry(key, neurons)
        w = neurons.detach()
        index = _check_sets_arg(sets, p.shape[0])
        if self.steps == 0:
            with torch.no_grad():
                return self._objective(w if index is None else w[index], p.detach() if index is None else p[index])
        if not is_plain_sgd(opt, p):  # a restored optimizer that is not plain SGD on P: it steps all of P
            before = optimizer_steps(p, w, self._objective, opt, self.steps, lr_now)
            return before if index is None else before[index]
        w = w.to(compute_dtype(w))
        if index is None:
            return sgd_steps(p, w, self._fit_context(w), self._value_and_grad, opt, self.steps, lr_now)
        part, w = p.detach()[index].clone(), w[index]
        before = sgd_steps(part, w, self._fit_context(w), self._value_and_grad, opt, self.steps, lr_now)
        with torch.no_grad():
            p[index] = part
        return before

    def projections(self, key: str, neurons: Tensor, lr: float | None = None, sets: list[int] | None = None) -> Tensor:
        r"""The projections to feed ``projected_energy(neurons, P, half_space=True)``.

        With ``lookahead="none"`` this is a copy of ``P`` (the model's optimizer never updates it). Otherwise it is
        the official one-step look-ahead :math:`\tilde P = P \mp \eta \nabla_P L(P, W)` (``-`` for the angle
        objective, ``+`` for the adversarial ascent), without the weight decay term:

        * ``"first"``: :math:`\nabla_P L` is computed from detached neurons, so no gradient reaches ``W`` through
          :math:`\tilde P`;
        * ``"second"``: :math:`\nabla_P L` is built with ``create_graph=True``, so the energy's gradient also flows
          into ``W`` through :math:`\tilde P(W)` (second order, as the official in-graph look-ahead).

        Args:
            key: The neuron-set group.
            neurons: ``(G, N, d)``, the live (differentiable) neurons.
            lr: The look-ahead step :math:`\eta \ge 0` (official: the model's current learning rate; 0 gives ``P``
                itself); the configured ``lr`` when ``None``.
            sets: Only these sets' projections (``neurons`` still holds all ``G`` sets). ``None``: all.

        Returns:
            ``(G, 1, dim, d)``, or ``(len(sets), 1, dim, d)``.

        Raises:
            ValueError: For bad ``neurons``, ``key`` or ``lr``.
        """
        eta = self.lr if lr is None else _check_call_lr(lr)
        p, _ = self._entry(key, neurons)
        index = _check_sets_arg(sets, p.shape[0])
        base = p.detach().clone() if index is None else p.detach()[index].clone()
        neurons = neurons if index is None else neurons[index]
        if self.lookahead == "none" or eta == 0.0:
            return base[:, None]
        sign = 1.0 if self._maximize else -1.0
        if self.lookahead == "first":  # no gradient to W through the look-ahead: the fit's closed form
            w = neurons.detach()
            w = w.to(compute_dtype(w))
            _, grad = self._value_and_grad(w, self._fit_context(w), base.to(w.dtype))
        else:
            w = neurons
            with torch.enable_grad():
                leaf = base.clone().requires_grad_(True)
                obj = self._objective(w, leaf).sum()
                (grad,) = torch.autograd.grad(obj, leaf, create_graph=w.requires_grad)
        return (base + (sign * eta) * grad.to(base.dtype))[:, None]

    # -- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A picklable snapshot: config, per-key ``P``, side-optimizer state and generator state.

        Returns:
            ``{"type", "version", "config", "entries"}``; tensors are clones on their current device.
        """
        gens = self._gens.state_dict()
        entries: dict[str, dict[str, Any]] = {}
        for key in self.keys():
            if key in self._params:
                p = self._params[key].detach().clone()
                opt_state: dict | None = copy.deepcopy(self._optims[key].state_dict())
            else:
                saved, opt_state = self._pending[key]
                p, opt_state = saved.detach().clone(), copy.deepcopy(opt_state)
            entries[key] = {"projection": p, "optimizer": opt_state, "generator": gens.get(key)}
        for key, gen_state in gens.items():
            entries.setdefault(key, {"projection": None, "optimizer": None, "generator": gen_state})
        return {"type": type(self).__name__, "version": STATE_VERSION, "config": self._config(), "entries": entries}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot.

        Tensors may be on any device; each ``P`` (and its optimizer) is moved to the neurons' device at its next use.
        A snapshot saved with another ``dim`` raises; other configuration differences only warn (the current
        configuration, e.g. ``lr``, is kept).

        Args:
            state_dict: A dict returned by :meth:`state_dict`.

        Raises:
            ValueError: If it is not such a dict, or if it was saved with another ``dim``.
        """
        name = type(self).__name__
        state = check_state(state_dict, name)
        cfg, current = state["config"], self._config()
        if cfg.get("dim") != self.dim:
            raise ValueError(
                f"`state_dict` must be saved with dim={self.dim} (this {name}'s), got dim={cfg.get('dim')!r}."
            )
        warn_config(name, cfg, current, ("steps", "lr", "weight_decay", "lookahead", "seed"))
        entries = state["entries"]
        self._params, self._optims = {}, {}
        self._pending = {
            k: (e["projection"].detach(), e.get("optimizer"))
            for k, e in entries.items()
            if e.get("projection") is not None
        }
        self._gens.load_state_dict({k: e["generator"] for k, e in entries.items() if e.get("generator")})
