r"""Random projections of RP-CoMHE: one seeded stream per key, redrawn every ``resample_every`` steps.

:class:`RandomProjection` keeps, per string ``key`` (one per group of equally shaped neuron sets), the current
:mod:`~lightning_comhe.projections.draws` object of its resampling window and a generator of its own
(:mod:`~lightning_comhe.projections._rng`), so the values a key sees do not depend on the order in which keys are
used and the global RNG is never touched. Pure PyTorch.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_comhe._validation import check_choice, check_float, check_int
from lightning_comhe.config import PROJECTION_KINDS, SampledKind
from lightning_comhe.functional import sketch
from lightning_comhe.functional._device import autocast_off
from lightning_comhe.functional._dtype import compute_dtype
from lightning_comhe.functional.projection import project_sets
from lightning_comhe.projections._common import STATE_VERSION, check_key, check_sets, check_state, warn_config
from lightning_comhe.projections._rng import KeyedGenerators, generator_device, normalize_device, slot_seed
from lightning_comhe.projections.draws import Draw, GaussianDraw, SparseDraw, SRHTDraw, draw_from_state

__all__ = ["RandomProjection"]

#: Device types with the sparse CSR matmuls ``kind="sparse"`` needs.
SPARSE_DEVICE_TYPES = ("cpu", "cuda")


def _check_density(density: Any, kind: str) -> float | None:
    if density is None:
        return None
    if kind != "sparse":
        raise ValueError(f"`density` must be None unless kind='sparse', got density={density!r} with kind={kind!r}.")
    try:
        value = check_float("density", density, strict=True)
    except ValueError:
        value = None
    if value is None or value > 1:
        raise ValueError(f"`density` must be a finite float in (0, 1] or None (1/sqrt(d)), got {density!r}.")
    return value


class RandomProjection:
    r"""Random projections of RP-CoMHE (Gaussian, or opt-in structured sketches), redrawn every few steps.

    For each key it holds ``num`` matrices :math:`P_c \in \mathbb{R}^{k \times d}` (``k = dim``) per neuron set. With
    ``kind="gaussian"`` (the official method, the default) their entries are i.i.d. :math:`\mathcal{N}(0, 1)` (no
    :math:`1/\sqrt{k}` factor: cosines are scale invariant). They feed
    :func:`~lightning_comhe.functional.projected_energy`, :math:`E^P(W) = \frac{1}{C}\sum_c E(W P_c^\top)`. By the
    Johnson–Lindenstrauss argument of the paper, for two neurons with cosine :math:`c` and :math:`\epsilon \in (0, 1)`,
    :math:`\frac{c - \epsilon}{1 + \epsilon} \le \cos\theta(Pw_1, Pw_2) \le \frac{c + \epsilon}{1 - \epsilon}` with
    high probability (about :math:`(1 - 2e^{-k\epsilon^2/8})^2`).

    The opt-in structured kinds cut the projection cost, which dominates RP-CoMHE (``2·N·d·C·k`` FLOPs per set each
    way, plus ``C·k·d`` normal draws per set and step), while keeping the entries' mean 0 and variance 1:

    * ``kind="sparse"``: very sparse sign matrices (Li, Hastie & Church 2006), entries :math:`\pm 1/\sqrt{\rho}` with
      density :math:`\rho` (``density``, default :math:`1/\sqrt d`), applied as one sparse matmul per group: about
      ``1/ρ`` times fewer FLOPs. Unbiased inner products; the JL bound holds for neurons whose mass is spread over
      many coordinates (exactly, like the Gaussian, for :math:`\rho = 1/3`, Achlioptas 2003). CPU and CUDA only
      (sparse CSR matmuls; other devices get a ``ValueError``).
    * ``kind="srht"``: the subsampled randomized Hadamard transform (Ailon & Chazelle 2009, Tropp 2011): random
      signs, a fast Walsh–Hadamard transform over ``d`` padded to a power of two, ``C·k`` rows kept uniformly without
      replacement. JL for every input, with a ``log d`` factor more rows than the Gaussian bound.

    See :mod:`lightning_comhe.functional.sketch` for the guarantees. Structured projections are applied by
    :meth:`project` (never materialised); :meth:`projections` returns their dense equivalent for inspection.

    Call :meth:`step` once per optimizer step, before :meth:`projections`. The draws become stale at the first call
    and then every ``resample_every`` calls (``(calls - 1) % resample_every == 0``); a stale key is redrawn lazily
    at its next :meth:`projections` call. The official code redraws at every step (``resample_every=1``). Each
    Gaussian matrix :math:`P_{s,c}` of window ``w`` is drawn from a stream of its own, seeded with
    :func:`~lightning_comhe.projections._rng.slot_seed` ``(seed, key, w, s, c)``: the same seed gives the same
    matrices in every process, and a data-parallel rank can draw only the matrices of its share (``parts``). The
    structured kinds draw a key's window at once from the key's generator, seeded with :func:`key_seed`
    ``(seed, key)``, which advances with every draw.

    Args:
        dim: ``k``, the dimension of the projected space (official: 40).
        num: ``C``, the number of projections per neuron set (official: 20).
        resample_every: Redraw every this many :meth:`step` calls.
        seed: Seed ``>= 0`` of the per-key generators.
        kind: ``"gaussian"`` (official), ``"sparse"`` or ``"srht"``.
        density: For ``kind="sparse"``: the fraction of nonzero entries, in ``(0, 1]``; ``None`` is ``1/sqrt(d)``.

    Raises:
        ValueError: If an argument is not in its allowed range.

    Example::

        >>> import torch
        >>> from lightning_comhe.functional import projected_energy
        >>> rp = RandomProjection(dim=40, num=20, seed=0)
        >>> w = torch.randn(2, 16, 72)  # two sets of 16 neurons in R^72
        >>> rp.step()
        >>> p = rp.projections("layer1", num_sets=2, d=72, device=w.device)
        >>> p.shape
        torch.Size([2, 20, 40, 72])
        >>> projected_energy(w, p).shape
        torch.Size([2])
        >>> rp.projections("layer1", num_sets=2, d=72, device=w.device) is p  # cached until the next resample
        True
        >>> rp.project("layer1", w).shape  # (G, C, N, k): the projected neurons W P_cᵀ
        torch.Size([2, 20, 16, 40])
        >>> fast = RandomProjection(kind="sparse", seed=0)
        >>> fast.step()
        >>> fast.project("layer1", w).shape
        torch.Size([2, 20, 16, 40])
    """

    def __init__(
        self,
        dim: int = 40,
        num: int = 20,
        resample_every: int = 1,
        seed: int = 0,
        kind: SampledKind = "gaussian",
        density: float | None = None,
    ) -> None:
        self.dim: int = check_int("dim", dim, 1)  # type: ignore[assignment]
        self.num: int = check_int("num", num, 1)  # type: ignore[assignment]
        self.resample_every: int = check_int("resample_every", resample_every, 1)  # type: ignore[assignment]
        self.seed: int = check_int("seed", seed, 0)  # type: ignore[assignment]
        self.kind: SampledKind = check_choice("kind", kind, PROJECTION_KINDS)
        self.density = _check_density(density, kind)
        self._calls = 0
        self._gens = KeyedGenerators(type(self).__name__, self.seed)
        self._cache: dict[str, tuple[int, Draw]] = {}  # key -> (window, draw of that window)
        self._scratch: dict[str, torch.Generator] = {}  # Gaussian kind: device type -> generator, re-seeded per slot

    def __repr__(self) -> str:
        extra = "" if self.kind == "gaussian" else f", kind={self.kind!r}"
        if self.density is not None:
            extra += f", density={self.density}"
        return (
            f"{type(self).__name__}(dim={self.dim}, num={self.num}, resample_every={self.resample_every}, "
            f"seed={self.seed}{extra})"
        )

    @property
    def calls(self) -> int:
        """Number of :meth:`step` calls so far."""
        return self._calls

    @property
    def window(self) -> int:
        """Index of the current resampling window: ``ceil(calls / resample_every)`` (0 before the first step)."""
        return -(-self._calls // self.resample_every)

    def keys(self) -> list[str]:
        """The keys that have a generator or a cached draw."""
        return sorted(set(self._cache) | self._gens.keys())

    def draw(self, key: str) -> Draw | None:
        """The key's cached draw (:mod:`~lightning_comhe.projections.draws`) and ``None`` if it has none.

        The draw of the last window the key was used in: it may be stale (:meth:`projections` and :meth:`project`
        redraw it when due). Do not modify its tensors in place.
        """
        cached = self._cache.get(check_key(key))
        return None if cached is None else cached[1]

    def step(self) -> None:
        """Advance the step counter; call once per optimizer step, before :meth:`projections`."""
        self._calls += 1

    def projections(
        self,
        key: str,
        num_sets: int,
        d: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        parts: Sequence[tuple[int, int, int]] | None = None,
    ) -> Tensor:
        """The current projections of a key, drawn lazily when missing or stale.

        Args:
            key: The neuron-set group.
            num_sets: ``G``, the number of neuron sets of the group (each gets its own ``num`` projections).
            d: The neuron dimension.
            device: The device of the neurons; the key's generator lives (and draws) there.
            dtype: The returned dtype. Draws are made in float64 if ``dtype`` is float64, else in float32, and cast.
            parts: Gaussian kind only: draw just the projections ``[c0, c1)`` of each ``(set, c0, c1)``
                (:data:`lightning_comhe.sharding.Part`), as a data-parallel rank does for its share; the other
                matrices of the returned tensor are zeros until drawn. ``None``: all.

        Returns:
            ``(num_sets, num, dim, d)`` matrices, without gradient: standard Gaussian entries (the cached draw: do not
            modify it in place), or for a structured ``kind`` their dense equivalent (materialised on each call, for
            inspection: training uses :meth:`project`). A cached draw of another shape (the group changed) is
            replaced by a fresh one.

        Raises:
            ValueError: For a bad ``key``, ``num_sets`` or ``d``.
        """
        check_key(key)
        num_sets = check_int("num_sets", num_sets, 1)  # type: ignore[assignment]
        d = check_int("d", d, 1)  # type: ignore[assignment]
        device = normalize_device(device)
        if self.kind != "gaussian":
            draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            eye = torch.eye(d, dtype=draw_dtype, device=device).expand(num_sets, d, d)
            with torch.no_grad():
                dense = self._apply(key, eye)  # (G, C, d, k) = (I P_cᵀ)
            return dense.transpose(-1, -2).contiguous().to(dtype)
        slots = None if parts is None else [(i, c) for i, c0, c1 in parts for c in range(c0, c1)]
        if slots is not None:
            for i, c in slots:
                if not (0 <= i < num_sets and 0 <= c < self.num):
                    raise ValueError(
                        f"`parts` must name sets in [0, {num_sets}) and projections in [0, {self.num}), got {parts!r}."
                    )
        shape = (num_sets, self.num, self.dim, d)
        window = self.window
        cached = self._cache.get(key)
        draw = cached[1] if cached is not None and cached[0] == window else None
        if not (isinstance(draw, GaussianDraw) and draw.shape == shape):
            draw = None
        elif draw.device != device:
            draw = draw.to(device)
        if draw is None or not draw.covers(slots):
            gen_device = generator_device(device)
            gen = self._scratch.get(gen_device.type) or torch.Generator(device=gen_device)
            self._scratch[gen_device.type] = gen
            draw = GaussianDraw.sample_slots(
                shape,
                slots,
                gen,
                lambda i, c: slot_seed(self.seed, key, window, i, c),
                device,
                torch.float64 if dtype == torch.float64 else torch.float32,
                base=draw,
            )
        self._cache[key] = (window, draw)
        p = draw.matrices
        return p if p.dtype == dtype else p.to(dtype)

    def project(self, key: str, neurons: Tensor) -> Tensor:
        r"""Project neuron sets with the key's current projections: :math:`W_g P_{g,c}^\top` for every set and ``c``.

        This is how the regularizer applies structured projections (without materialising them); for
        ``kind="gaussian"`` it is one batched matmul with :meth:`projections`.

        Args:
            key: The neuron-set group.
            neurons: ``(G, N, d)``, ``G`` sets of ``N`` neurons. Computed in float32 (float64 for float64 input) with
                autocast disabled.

        Returns:
            ``(G, num, N, dim)``, differentiable with respect to ``neurons``.

        Raises:
            ValueError: For a bad ``key`` or ``neurons``.
        """
        check_key(key)
        check_sets(neurons)
        return self._apply(key, neurons)

    def _apply(self, key: str, neurons: Tensor) -> Tensor:
        dtype = compute_dtype(neurons)
        g, n, d = neurons.shape
        device = normalize_device(neurons.device)
        if self.kind == "sparse" and device.type not in SPARSE_DEVICE_TYPES:
            raise ValueError(
                f"RandomProjection(kind='sparse') needs neurons on one of {SPARSE_DEVICE_TYPES} (it uses sparse CSR "
                f"matmuls); got neurons on {device.type!r}. Use kind='gaussian' or kind='srht' there."
            )
        with autocast_off(neurons.device):
            w = neurons.to(dtype)
            if self.kind == "gaussian":
                p = self.projections(key, g, d, device, dtype)
                vt = project_sets(w, p.reshape(g, self.num * self.dim, d))  # (G, C·k, N)
                return vt.reshape(g, self.num, self.dim, n).transpose(2, 3)
            return self._structured_draw(key, g, d, device).project(w, self.num, self.dim)

    def _structured_draw(self, key: str, num_sets: int, d: int, device: torch.device) -> SRHTDraw | SparseDraw:
        window = self.window
        cached = self._cache.get(key)
        if cached is not None and cached[0] == window:
            draw = cached[1]
            if not isinstance(draw, GaussianDraw) and (draw.num_sets, draw.d) == (num_sets, d):
                if draw.device != device:
                    draw = draw.to(device)
                    self._cache[key] = (window, draw)
                return draw
        gen = self._gens.get(key, device, salt=self._calls)
        rows = self.num * self.dim
        new: SRHTDraw | SparseDraw
        if self.kind == "srht":
            new = SRHTDraw.sample(num_sets, rows, d, gen, device)
        else:
            density = self.density if self.density is not None else sketch.default_density(d)
            new = SparseDraw.sample(num_sets, rows, d, density, gen, device)
        self._cache[key] = (window, new)
        return new

    def _config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "num": self.num,
            "resample_every": self.resample_every,
            "seed": self.seed,
            "kind": self.kind,
            "density": self.density,
        }

    def state_dict(self) -> dict[str, Any]:
        """A picklable snapshot: config, step counter, per-key generator states and the current draws.

        Returns:
            ``{"type", "version", "config", "calls", "entries"}``; tensors are clones on their current device. Each
            entry is ``{"generator", "window", "draw"}`` with the draw in its saved form (``to_state()`` of
            :mod:`~lightning_comhe.projections.draws`): the ``(G, C, k, d)`` tensor of a Gaussian draw, or a dict of
            tensors (the sparse support and signs, or the SRHT signs and rows) for a structured one. A partial
            Gaussian draw (a rank's share) is saved as ``None`` (its matrices are recomputed from their seeds), and
            the Gaussian kind has no generator states (``None``).
        """
        gens = self._gens.state_dict()
        entries: dict[str, dict[str, Any]] = {}
        for key in self.keys():
            window, draw = self._cache.get(key, (None, None))
            partial = isinstance(draw, GaussianDraw) and not draw.complete  # recomputed from its slot seeds
            saved = None if draw is None or partial else draw.to_state()
            entries[key] = {"generator": gens.get(key), "window": window, "draw": saved}
        return {
            "type": type(self).__name__,
            "version": STATE_VERSION,
            "config": self._config(),
            "calls": self._calls,
            "entries": entries,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot.

        Tensors may be on any device (e.g. CPU after ``torch.load(map_location="cpu")``); they are moved to the
        neurons' device at the next :meth:`projections` call. A generator saved on another device type cannot be
        restored there: it is then re-seeded deterministically with a warning. A different ``seed``,
        ``resample_every`` or ``density`` in the snapshot only warns (the current configuration is kept; restored
        sparse draws keep the density they were drawn with).

        Args:
            state_dict: A dict returned by :meth:`state_dict`.

        Raises:
            ValueError: If it is not such a dict, or if it was saved with another ``dim``, ``num`` or ``kind``.
        """
        state = check_state(state_dict, type(self).__name__)
        cfg = dict(state["config"])
        cfg.setdefault("kind", "gaussian")  # snapshots from before structured projections
        current = self._config()
        for f in ("dim", "num", "kind"):
            if cfg.get(f) != current[f]:
                raise ValueError(
                    f"`state_dict` must be saved with {f}={current[f]!r} (this RandomProjection's), "
                    f"got {f}={cfg.get(f)!r}."
                )
        calls = check_int("calls", state["calls"], 0)
        cache = {
            k: (int(e["window"]), draw_from_state(e["draw"], self.kind))
            for k, e in state["entries"].items()
            if e.get("draw") is not None and e.get("window") is not None
        }
        warn_config(type(self).__name__, cfg, current, ("resample_every", "seed", "density"))
        self._calls = calls  # type: ignore[assignment]
        gens = {k: e["generator"] for k, e in state["entries"].items() if e.get("generator")}
        self._gens.load_state_dict(gens if self.kind != "gaussian" else {})  # Gaussian slots are seeded, not streamed
        self._cache = cache
