r"""The protocol of an energy family, and the groups of neuron sets it works on.

The regularizer splits a model's neuron sets into :class:`Group`\ s of equal shape and equal treatment (one batched
computation each) and hands them to one :class:`EnergyFamily`. A family answers three questions:

* :meth:`EnergyFamily.route`: how is a set of ``N`` neurons of dimension ``d`` with a role (``"hidden"`` or
  ``"head"``) treated: which *mode* (a name the family understands) and which :math:`\kappa`;
* :meth:`EnergyFamily.refresh`: what changes between optimizer steps (random projections redrawn, learned
  projections fitted, power-iteration vectors advanced);
* :meth:`EnergyFamily.energy`: the differentiable energy of each set of a group, ``(G, N, d) -> (G,)``;

plus :meth:`~EnergyFamily.state_dict` / :meth:`~EnergyFamily.load_state_dict` for bit-exact resume. A new variant is
one new subclass registered with :func:`~lightning_comhe.energies.register_energy`.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from lightning_comhe.config import EnergyConfig
from lightning_comhe.functional.energy import hyperspherical_energy

__all__ = ["EnergyFamily", "Group", "NeuronsOf", "Route", "SetRef", "mhe_energy"]


@dataclass(frozen=True)
class SetRef:
    """One layer's tensor of equally shaped neuron sets inside a group."""

    layer: str
    tensor_index: int  # which of the layer's extracted tensors
    num_sets: int


@dataclass
class Group:
    """Neuron sets of one shape ``(N, d)`` and one treatment, computed together as a ``(G, N, d)`` batch.

    Attributes:
        key: Stable name, ``"<tag>:<mode>:<N>x<d>"``; projections and other state are keyed by it.
        mode: The family's name for the treatment (``"plain"``, ``"half"``, ``"projected"``, ...).
        kappa: The weight of each set's energy in the penalty.
        num_neurons: ``N``.
        dim: ``d``.
        members: The layers' tensors stacked in this group, in order.
    """

    key: str
    mode: str
    kappa: float
    num_neurons: int
    dim: int
    members: list[SetRef] = field(default_factory=list)

    @property
    def num_sets(self) -> int:
        """``G``: how many sets the group stacks."""
        return sum(m.num_sets for m in self.members)


class Route(NamedTuple):
    """How a family treats a set: group ``tag`` (sets of different tags never share a group), ``mode`` and κ."""

    tag: str
    mode: str
    kappa: float


#: ``neurons_of(group)``: the group's current ``(G, N, d)`` neurons (differentiable, not detached).
NeuronsOf = Callable[[Group], Tensor]


def mhe_energy(
    config: EnergyConfig, neurons: Tensor, *, half_space: bool, rows: list[tuple[int, int]] | None = None
) -> Tensor:
    """Full-space (``half_space=False``) or half-space MHE of every set, with the config's power and eps.

    ``rows``: the parts held by these row blocks of the pair matrix, ``(G, len(rows))`` (see
    :func:`~lightning_comhe.functional.hyperspherical_energy`).
    """
    return hyperspherical_energy(
        neurons,
        config.s,
        half_space=half_space,
        angular=config.is_angular,
        eps=config.eps,
        check_finite=False,
        rows=rows,
    )


class EnergyFamily:
    r"""One energy family: routes neuron sets, refreshes its state between steps, and computes group energies.

    Subclasses set :attr:`name` and implement :meth:`hidden_mode` (or :meth:`route`) and, for modes of their own,
    :meth:`energy`. The base class computes the MHE modes ``"plain"`` (full space) and ``"half"`` (half space)
    and routes the classifier to full-space MHE with ``head_weight``, as the official code does.

    Attributes:
        config: The validated :class:`~lightning_comhe.config.EnergyConfig`.
        lr: The main optimizer's learning rate at the last :meth:`refresh` (``None`` if unknown).
        share: During :meth:`refresh`, the data-parallel rank's share being refreshed (``{group key: parts}``, see
            :mod:`lightning_comhe.sharding`), or ``None`` for everything.

    Example::

        >>> import torch
        >>> from lightning_comhe.energies import EnergyFamily, register_energy
        >>> @register_energy("doc_cosine")
        ... class MeanCosine(EnergyFamily):
        ...     '''Mean squared cosine of the hidden sets' neurons (a toy family).'''
        ...     def hidden_mode(self, n, d):
        ...         return "cos2"
        ...     def energy(self, group, neurons):
        ...         if group.mode != "cos2":
        ...             return super().energy(group, neurons)
        ...         u = torch.nn.functional.normalize(neurons, dim=-1)
        ...         return (u @ u.transpose(1, 2)).pow(2).mean((1, 2))
        >>> from lightning_comhe import CoMHERegularizer
        >>> reg = CoMHERegularizer(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)), "doc_cosine")
        >>> reg.refresh()
        >>> sorted(g.mode for g in reg.groups)
        ['cos2', 'plain']
    """

    name: ClassVar[str] = ""
    #: Whether :meth:`refresh` uses :attr:`lr` (the callback reads the optimizer's learning rate only then).
    uses_lr: ClassVar[bool] = False
    #: Whether the penalty may be split across data-parallel ranks (:mod:`lightning_comhe.sharding`): a family
    #: whose refresh keeps state for every group on every rank (e.g. SRIP's power iterations) says ``False``.
    shardable: ClassVar[bool] = True
    #: Whether :meth:`refresh` reads the neurons: a strategy that must gather the weights for it (DeepSpeed ZeRO-3,
    #: FSDP2) gathers them only then.
    refresh_reads: ClassVar[bool] = False

    def __init__(self, config: EnergyConfig) -> None:
        self.config = config
        self.lr: float | None = None
        self.share: dict[str, list[tuple[int, int, int]]] | None = None

    # ------------------------------------------------------------------------------------------------------------
    def hidden_mode(self, n: int, d: int) -> str:
        """The mode of a hidden set of ``n`` neurons of dimension ``d`` (subclasses override)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `hidden_mode` or `route`.")

    def route(self, role: str, n: int, d: int) -> Route:
        """The treatment of a set: the head gets full-space MHE (``head_weight``), hidden sets :meth:`hidden_mode`."""
        if role == "head":
            return Route("head", "plain", self.config.head_kappa)
        return Route("hidden", self.hidden_mode(n, d), self.config.hidden_weight)

    def refresh(self, groups: Sequence[Group], neurons_of: NeuronsOf) -> None:  # noqa: B027 - optional hook
        """Advance the family's state for the next optimizer step (nothing by default)."""

    def energy(self, group: Group, neurons: Tensor) -> Tensor:
        """The energy of every set of ``group``: ``(G, N, d) -> (G,)``, differentiable in ``neurons``."""
        if group.mode == "plain":
            return mhe_energy(self.config, neurons, half_space=False)
        if group.mode == "half":
            return mhe_energy(self.config, neurons, half_space=True)
        raise ValueError(f"`group.mode` must be 'plain' or 'half' for {type(self).__name__}, got {group.mode!r}.")

    def shard_unit(self, group: Group) -> str:
        """The finest piece of ``group`` one rank may compute alone.

        ``"rows"`` (row blocks of a set's pair matrix: full-space and half-space MHE), ``"set"``, ``"projection"``
        (one random projection of one set) or ``"group"``.
        """
        return "rows" if group.mode in ("plain", "half") else "group"

    def energy_parts(
        self, group: Group, neurons: Tensor, parts: Sequence[tuple[int, int, int]]
    ) -> tuple[Tensor, list[int]]:
        """The energies of a rank's ``parts`` of ``group`` and the set each belongs to.

        Summed over the parts of every rank, per set, they give :meth:`energy`. ``parts`` are ``(set, start, stop)``
        (:data:`lightning_comhe.sharding.Part`); ``(-1, 0, 1)`` is the whole group. For the ``"rows"`` unit,
        ``[start, stop)`` are rows of the set's pair matrix (``(s, 0, N)``: the whole set).
        """
        if parts and parts[0][0] < 0:
            return self.energy(group, neurons), list(range(neurons.shape[0]))
        n = neurons.shape[1]
        split = self.shard_unit(group) == "rows"
        whole = [s for s, start, stop in parts if not split or (start, stop) == (0, n)]
        values, sets = [self.energy(group, neurons[whole])] if whole else [], list(whole)
        blocks: dict[int, list[tuple[int, int]]] = {}
        for s, start, stop in parts:
            if split and (start, stop) != (0, n):
                blocks.setdefault(s, []).append((start, stop))
        for s, rows in blocks.items():  # the blocks of one set share its normalization
            values.append(mhe_energy(self.config, neurons[s : s + 1], half_space=group.mode == "half", rows=rows)[0])
            sets += [s] * len(rows)
        return torch.cat(values), sets

    def describe(self, groups: Sequence[Group]) -> str:
        """Extra words for the regularizer's one-line summary (empty by default)."""
        return ""

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The family's state (merged into the regularizer's state dict; keys must not clash with its own)."""
        return {}

    def retain(self, groups: Sequence[Group]) -> None:  # noqa: B027 - optional hook
        """The groups changed (re-selection, or a checkpoint of another selection): drop state that no longer fits."""

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict` (``state`` is the regularizer's whole state dict)."""


def build_groups(layers: Sequence[Any], family: EnergyFamily) -> tuple[Group, ...]:
    """Stack the neuron sets of ``layers`` into groups of one shape, one treatment and one device.

    Each layer (a :class:`~lightning_comhe.discovery.NeuronLayer`) contributes one member per extracted tensor;
    its route (tag, mode, κ) comes from ``family``. A group's key is ``"<tag>:<mode>:<N>x<d>"``; groups of the same
    key on further devices (model or pipeline parallelism) get ``"@<device>"`` appended, so the first device keeps
    the stable key that checkpoints use.
    """
    groups: dict[tuple, Group] = {}
    keys: set[str] = set()
    for layer in layers:
        device = layer.weights()[0].device  # sets on other devices form their own groups (computed there)
        for index, (num_sets, n, d) in enumerate(layer.shapes()):
            route = family.route(layer.role, n, d)
            gkey = (route.tag, route.mode, n, d, device)
            if gkey not in groups:
                key = f"{route.tag}:{route.mode}:{n}x{d}"
                key = key if key not in keys else f"{key}@{device}"
                keys.add(key)
                groups[gkey] = Group(key, route.mode, float(route.kappa), n, d, [])
            groups[gkey].members.append(SetRef(layer.name, index, num_sets))
    return tuple(groups.values())
