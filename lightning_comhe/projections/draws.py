r"""Typed draws of :class:`~lightning_comhe.projections.RandomProjection`: the randomness of one key and window.

A draw holds the tensors one resampling window of one key uses, for ``G`` neuron sets of dimension ``d`` and
``R = C·k`` projected rows per set:

* :class:`GaussianDraw`: the dense matrices :math:`P \in \mathbb{R}^{G \times C \times k \times d}`, entries
  :math:`\mathcal{N}(0, 1)`;
* :class:`SRHTDraw`: the random signs :math:`D_r` and the kept rows of the subsampled randomized Hadamard transform;
* :class:`SparseDraw`: the support (flat positions) and signs of very sparse sign matrices of density :math:`\rho`.

Each is immutable and offers ``clone()``, ``to(device)``, and ``to_state()`` / ``from_state()``, which write and read
the ``"draw"`` entry of ``RandomProjection.state_dict()`` exactly as it has always been stored (a plain tensor for the
Gaussian kind, a plain dict of tensors and numbers for the structured kinds), so old checkpoints load unchanged.
:func:`draw_from_state` reads any of the three.

Example::

    >>> import torch
    >>> gen = torch.Generator().manual_seed(0)
    >>> draw = SRHTDraw.sample(num_sets=2, rows=12, d=7, generator=gen, device=torch.device("cpu"))
    >>> sorted(draw.to_state())
    ['d', 'index', 'num_sets', 'signs']
    >>> again = draw_from_state(draw.to_state())
    >>> type(again).__name__, torch.equal(again.index, draw.index)
    ('SRHTDraw', True)
"""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import Tensor

from lightning_comhe.functional import sketch
from lightning_comhe.projections._rng import normalize_device, randn

__all__ = ["DRAW_TYPES", "Draw", "GaussianDraw", "SRHTDraw", "SparseDraw", "draw_from_state"]


def _tensor(state: dict[str, Any], name: str, owner: str) -> Tensor:
    value = state.get(name)
    if not isinstance(value, Tensor):
        raise ValueError(f"`{name}` of a saved {owner} must be a torch.Tensor, got {type(value).__name__}.")
    return value.detach()


def _field(state: dict[str, Any], name: str, owner: str) -> Any:
    if name not in state:
        raise ValueError(f"`{name}` of a saved {owner} must be present, got keys {sorted(state)}.")
    return state[name]


@dataclass(frozen=True, eq=False)
class GaussianDraw:
    r"""Dense Gaussian projections: ``matrices`` of shape ``(G, C, k, d)``, i.i.d. :math:`\mathcal{N}(0, 1)` entries.

    A draw may be **partial**: a data-parallel rank draws only the projections ``(s, c)`` it owns
    (:meth:`sample_slots`); ``filled`` then names them and the other matrices are zeros.

    Args:
        matrices: ``(G, C, k, d)``, without gradient.
        filled: The drawn ``(set, projection)`` slots of a partial draw; ``None``: all of them.

    Example::

        >>> import torch
        >>> draw = GaussianDraw.sample((2, 3, 4, 5), torch.Generator().manual_seed(0), torch.device("cpu"))
        >>> draw.num_sets, draw.d, draw.matrices.shape, draw.complete
        (2, 5, torch.Size([2, 3, 4, 5]), True)
        >>> torch.equal(GaussianDraw.from_state(draw.to_state()).matrices, draw.matrices)
        True
        >>> seeds = lambda s, c: 10 * s + c  # one stream per (set, projection)
        >>> part = GaussianDraw.sample_slots((2, 3, 4, 5), [(1, 2)], torch.Generator(), seeds, torch.device("cpu"))
        >>> part.complete, part.covers([(1, 2)]), part.covers([(0, 0)])
        (False, True, False)
        >>> whole = GaussianDraw.sample_slots((2, 3, 4, 5), None, torch.Generator(), seeds, torch.device("cpu"))
        >>> torch.equal(whole.matrices[1, 2], part.matrices[1, 2])
        True
    """

    matrices: Tensor
    filled: frozenset[tuple[int, int]] | None = None

    @classmethod
    def sample_slots(
        cls,
        shape: tuple[int, int, int, int],
        slots: Sequence[tuple[int, int]] | None,
        generator: torch.Generator,
        seed_of: Callable[[int, int], int],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        base: "GaussianDraw | None" = None,
    ) -> "GaussianDraw":
        """Draw the ``slots`` (``None``: all) that ``base`` lacks, each from ``generator`` seeded with ``seed_of``.

        The matrix of slot ``(s, c)`` is ``randn(k, d)`` right after ``generator.manual_seed(seed_of(s, c))``, so it
        is the same whichever slots are drawn together. ``base`` (a partial draw of the same window) is never modified:
        a new draw holding its slots and the new ones is returned (``base`` itself if it has them all).
        """
        g, c, k, d = shape
        every = [(i, j) for i in range(g) for j in range(c)]
        have = set() if base is None else set(every if base.filled is None else base.filled)
        todo = sorted(set(every if slots is None else slots) - have)
        if base is not None and not todo:
            return base
        dtype = dtype if base is None else base.matrices.dtype
        filled = have | set(todo)
        # drawn in place (where the generator lives), each element written once: the slots drawn, zeros elsewhere
        if base is None:
            mats = torch.empty(shape, dtype=dtype, device=generator.device)
        else:
            mats = base.matrices.to(generator.device, copy=True)  # `base` is never modified
        for i, j in todo:
            generator.manual_seed(seed_of(i, j))
            torch.randn((k, d), generator=generator, dtype=dtype, device=generator.device, out=mats[i, j])
        if base is None:
            for i, j in set(every) - set(todo):
                mats[i, j].zero_()
        mats = mats.to(device)
        return cls(mats, None if len(filled) == len(every) else frozenset(filled))  # the new draw: `base` is unchanged

    @property
    def complete(self) -> bool:
        """Whether every ``(set, projection)`` slot is drawn."""
        return self.filled is None

    def covers(self, slots: Sequence[tuple[int, int]] | None) -> bool:
        """Whether the draw holds all ``slots`` (``None``: all slots)."""
        if self.filled is None:
            return True
        return slots is not None and self.filled.issuperset(slots)

    @classmethod
    def sample(
        cls,
        shape: tuple[int, int, int, int],
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> "GaussianDraw":
        """Draw ``shape = (G, C, k, d)`` standard normal entries from ``generator``, placed on ``device``."""
        return cls(randn(shape, generator, device, dtype))

    @property
    def num_sets(self) -> int:
        """``G``."""
        return int(self.matrices.shape[0])

    @property
    def d(self) -> int:
        """The neuron dimension."""
        return int(self.matrices.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """``(G, C, k, d)``."""
        return tuple(self.matrices.shape)

    @property
    def device(self) -> torch.device:
        """The device of the matrices."""
        return self.matrices.device

    def clone(self) -> "GaussianDraw":
        """A detached copy."""
        return GaussianDraw(self.matrices.detach().clone(), self.filled)

    def to(self, device: torch.device) -> "GaussianDraw":
        """The same draw on ``device``."""
        return GaussianDraw(self.matrices.to(device), self.filled)

    def to_state(self) -> Tensor:
        """The saved form: the matrices themselves (a detached copy)."""
        return self.matrices.detach().clone()

    @classmethod
    def from_state(cls, state: Any) -> "GaussianDraw":
        """Read :meth:`to_state` (a tensor; kept, not copied)."""
        if not isinstance(state, Tensor):
            raise ValueError(f"`draw` of a saved GaussianDraw must be a torch.Tensor, got {type(state).__name__}.")
        return cls(state.detach())


@dataclass(frozen=True, eq=False)
class SRHTDraw:
    r"""The randomness of ``G`` subsampled randomized Hadamard transforms (``sketch.draw_srht``).

    Args:
        num_sets: ``G``.
        d: The neuron dimension (padded to :math:`d' = 2^{\lceil \log_2 d \rceil}` by the transform).
        signs: ``(G, T, d)`` int8 of ``±1``: the diagonal :math:`D_t` of each of the ``T = ceil(R / d')`` transforms.
        index: ``(G, R)`` int64: the kept rows among the ``T·d'`` rows of the transforms.
        device: The device of the tensors (as requested, normalized).

    Example::

        >>> import torch
        >>> draw = SRHTDraw.sample(1, 6, 5, torch.Generator().manual_seed(0), torch.device("cpu"))
        >>> draw.signs.shape, draw.index.shape
        (torch.Size([1, 1, 5]), torch.Size([1, 6]))
    """

    num_sets: int
    d: int
    signs: Tensor
    index: Tensor
    device: torch.device

    @classmethod
    def sample(cls, num_sets: int, rows: int, d: int, generator: torch.Generator, device: torch.device) -> "SRHTDraw":
        """Draw ``G`` transforms with ``rows = C·k`` rows each from ``generator``, placed on ``device``."""
        parts = sketch.draw_srht(num_sets, rows, d, generator, device)
        return cls(num_sets, d, parts["signs"], parts["index"], device)

    def project(self, neurons: Tensor, num: int, dim: int) -> Tensor:
        """``(G, N, d)`` neurons -> ``(G, C, N, k)`` (:func:`~lightning_comhe.functional.sketch.srht_project`)."""
        return sketch.srht_project(neurons, self.signs, self.index, num, dim)

    def clone(self) -> "SRHTDraw":
        """A detached copy."""
        return dataclasses.replace(self, signs=self.signs.detach().clone(), index=self.index.detach().clone())

    def to(self, device: torch.device) -> "SRHTDraw":
        """The same draw on ``device``."""
        return dataclasses.replace(self, signs=self.signs.to(device), index=self.index.to(device), device=device)

    def to_state(self) -> dict[str, Any]:
        """The saved form: ``{"num_sets", "d", "signs", "index"}`` (detached copies)."""
        signs, index = self.signs.detach().clone(), self.index.detach().clone()
        return {"num_sets": self.num_sets, "d": self.d, "signs": signs, "index": index}

    @classmethod
    def from_state(cls, state: Any) -> "SRHTDraw":
        """Read :meth:`to_state` (tensors kept, not copied; the device is theirs)."""
        if not isinstance(state, dict):
            raise ValueError(f"`draw` of a saved SRHTDraw must be a dict, got {type(state).__name__}.")
        signs, index = _tensor(state, "signs", "SRHTDraw"), _tensor(state, "index", "SRHTDraw")
        num_sets, d = _field(state, "num_sets", "SRHTDraw"), _field(state, "d", "SRHTDraw")
        return cls(num_sets, d, signs, index, normalize_device(signs.device))


@dataclass(frozen=True, eq=False)
class SparseDraw:
    r"""Very sparse sign matrices (:func:`~lightning_comhe.functional.sketch.draw_sparse`).

    The ``G`` matrices of ``R`` rows have entries :math:`\pm 1/\sqrt{\rho}` on an i.i.d. Bernoulli(:math:`\rho`)
    support, and zeros elsewhere.

    Args:
        num_sets: ``G``.
        d: The neuron dimension.
        density: :math:`\rho`, the fraction of nonzero entries it was drawn with.
        pos: int64, the sorted flat positions of the nonzeros in the ``(G, R, d)`` index space.
        sign: int8 of ``±1``, one per nonzero.
        device: The device of the tensors (as requested, normalized).

    Example::

        >>> import torch
        >>> draw = SparseDraw.sample(1, 4, 9, 0.5, torch.Generator().manual_seed(0), torch.device("cpu"))
        >>> draw.pos.shape == draw.sign.shape, draw.density
        (True, 0.5)
    """

    num_sets: int
    d: int
    density: float
    pos: Tensor
    sign: Tensor
    device: torch.device
    _csr: dict[Any, tuple[Tensor, Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def sample(
        cls, num_sets: int, rows: int, d: int, density: float, generator: torch.Generator, device: torch.device
    ) -> "SparseDraw":
        """Draw ``G`` matrices of ``rows = C·k`` rows with density ``density`` from ``generator``, on ``device``."""
        parts = sketch.draw_sparse(num_sets, rows, d, density, generator, device)
        return cls(num_sets, d, density, parts["pos"], parts["sign"], device)

    def matrices(self, rows: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The block-diagonal CSR matrix ``P`` and its transpose in ``dtype``, built once per ``(rows, dtype)``."""
        key = (rows, dtype)
        mats = self._csr.get(key)
        if mats is None:
            mats = sketch.sparse_matrices(self.pos, self.sign, self.num_sets, rows, self.d, self.density, dtype)
            self._csr.clear()  # one dtype at a time, as training uses one
            self._csr[key] = mats
        return mats

    def project(self, neurons: Tensor, num: int, dim: int) -> Tensor:
        """``(G, N, d)`` neurons -> ``(G, C, N, k)`` (:func:`~lightning_comhe.functional.sketch.sparse_project`)."""
        p, pt = self.matrices(num * dim, neurons.dtype)
        return sketch.sparse_project(neurons, p, pt, num, dim)

    def clone(self) -> "SparseDraw":
        """A detached copy."""
        return dataclasses.replace(self, pos=self.pos.detach().clone(), sign=self.sign.detach().clone())

    def to(self, device: torch.device) -> "SparseDraw":
        """The same draw on ``device``."""
        return dataclasses.replace(self, pos=self.pos.to(device), sign=self.sign.to(device), device=device)

    def to_state(self) -> dict[str, Any]:
        """The saved form: ``{"num_sets", "d", "density", "pos", "sign"}`` (detached copies)."""
        return {
            "num_sets": self.num_sets,
            "d": self.d,
            "density": self.density,
            "pos": self.pos.detach().clone(),
            "sign": self.sign.detach().clone(),
        }

    @classmethod
    def from_state(cls, state: Any) -> "SparseDraw":
        """Read :meth:`to_state` (tensors kept, not copied; the device is theirs)."""
        if not isinstance(state, dict):
            raise ValueError(f"`draw` of a saved SparseDraw must be a dict, got {type(state).__name__}.")
        pos, sign = _tensor(state, "pos", "SparseDraw"), _tensor(state, "sign", "SparseDraw")
        num_sets, d = _field(state, "num_sets", "SparseDraw"), _field(state, "d", "SparseDraw")
        density = _field(state, "density", "SparseDraw")
        return cls(num_sets, d, density, pos, sign, normalize_device(pos.device))


#: Any draw of a :class:`~lightning_comhe.projections.RandomProjection`.
Draw: TypeAlias = GaussianDraw | SRHTDraw | SparseDraw

#: The draw type of each ``RandomProjection.kind``.
DRAW_TYPES: dict[str, type[GaussianDraw] | type[SRHTDraw] | type[SparseDraw]] = {
    "gaussian": GaussianDraw,
    "sparse": SparseDraw,
    "srht": SRHTDraw,
}


def draw_from_state(state: Any, kind: str | None = None) -> Draw:
    """Read a saved draw of any kind: a tensor (Gaussian), or a dict with ``"index"`` (SRHT) or ``"pos"`` (sparse).

    Args:
        state: The ``"draw"`` entry of a ``RandomProjection.state_dict()``.
        kind: If given, the ``RandomProjection.kind`` the draw must be of.

    Raises:
        ValueError: If ``state`` is no saved draw, or not one of ``kind``.

    Example::

        >>> import torch
        >>> type(draw_from_state(torch.zeros(1, 2, 3, 4))).__name__
        'GaussianDraw'
    """
    if isinstance(state, Tensor):
        found = "gaussian"
    elif isinstance(state, dict) and "index" in state:
        found = "srht"
    elif isinstance(state, dict) and "pos" in state:
        found = "sparse"
    else:
        raise ValueError(
            "`draw` must be a saved draw (a tensor, or a dict with 'index' or 'pos'), "
            f"got {type(state).__name__}{f' with keys {sorted(state)}' if isinstance(state, dict) else ''}."
        )
    if kind is not None and found != kind:
        raise ValueError(f"`draw` must be a saved {kind!r} draw, got a {found!r} one.")
    return DRAW_TYPES[found].from_state(state)
