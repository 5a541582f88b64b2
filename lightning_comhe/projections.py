r"""Projection state for CoMHE: random, angle-preserving and adversarial projections.

This module is pure PyTorch (no Lightning import). Each class is a small stateful object that keeps one entry per
string ``key``; the regularizer passes one key per group of equally shaped neuron sets (e.g. ``"layer1.0.conv1"`` or
``"g:64x576"``). Every key has its own :class:`torch.Generator`, seeded with a deterministic function of
``(seed, key)`` (:func:`key_seed`), so the values an entry sees do not depend on the order in which keys are used,
and the global RNG is never touched. Generators are created lazily on the device of the neurons (a CUDA run draws on
the GPU).

* :class:`RandomProjection` (RP-CoMHE, algorithm §2): ``C`` Gaussian ``k × d`` matrices per neuron set, redrawn
  every ``resample_every`` optimizer steps (the official code redraws at every step); opt-in structured kinds
  (``"sparse"``, ``"srht"``) cut the projection cost (see :mod:`lightning_comhe.functional.sketch`).
* :class:`AngleProjection` (AP-CoMHE, §3): one learnable ``k × d`` matrix per set, fitted by plain SGD (decay
  ``5e-7``) to minimise the angle-preservation objective :math:`\|C(W P^\top) - C(W)\|_F`, optionally with the
  official one-step look-ahead :math:`\tilde P = P - \eta \nabla_P L`.
* :class:`AdversarialProjection` (§4): the same, but SGD *ascends* the full-space projected energy and the
  look-ahead is :math:`\tilde P = P + \eta \nabla_P E_\text{full}`.

All three expose ``state_dict()`` / ``load_state_dict()`` (plain picklable dicts whose tensors are restored to the
neurons' device lazily, at next use), so a resumed run continues bit-exactly.
"""

import copy
import math
import warnings
import zlib
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_comhe.functional import sketch
from lightning_comhe.functional._device import autocast_off
from lightning_comhe.functional.angles import angle_objective
from lightning_comhe.functional.energy import _compute_dtype, project_sets, projected_energy

__all__ = [
    "PROJECTION_KINDS",
    "AdversarialProjection",
    "AngleProjection",
    "Lookahead",
    "ProjectionKind",
    "RandomProjection",
    "generator_device",
    "key_seed",
]

Lookahead = Literal["none", "first", "second"]
ProjectionKind = Literal["gaussian", "sparse", "srht"]
#: The kinds of :class:`RandomProjection`: the official Gaussian, and two opt-in structured sketches.
PROJECTION_KINDS: tuple[str, ...] = ("gaussian", "sparse", "srht")

_MASK63 = (1 << 63) - 1
_STATE_VERSION = 1


def key_seed(seed: int, key: str) -> int:
    """Seed of the generator of one key: ``(seed * 1_000_003 + crc32(key)) mod 2**63``.

    Args:
        seed: The object's seed.
        key: The entry's key.

    Returns:
        A non-negative 63-bit integer.

    Example::

        >>> key_seed(0, "layer1") == key_seed(0, "layer1") != key_seed(1, "layer1")
        True
    """
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) & _MASK63


def _reseed_value(seed: int, key: str, salt: int) -> int:
    """A deterministic seed for a key whose saved generator cannot be restored on the current device."""
    return (key_seed(seed, key) * 6364136223846793005 + 1442695040888963407 * (int(salt) + 1)) & _MASK63


# ---------------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}.")
    return int(value)


def _check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`seed` must be an int; got {value!r}.")
    return int(value)


def _check_float(name: str, value: Any, *, positive: bool = False) -> float:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite float {bound}; got {value!r}.")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"`{name}` must be a finite float {bound}; got {value!r}.")
    return float(value)


def _check_lookahead(value: Any) -> str:
    if value not in ("none", "first", "second"):
        raise ValueError(f"`lookahead` must be one of 'none', 'first', 'second'; got {value!r}.")
    return value


def _check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise ValueError(f"`key` must be a str; got {key!r} of type {type(key).__name__}.")
    return key


def _check_sets(neurons: Any) -> None:
    if not isinstance(neurons, Tensor) or not neurons.is_floating_point():
        raise ValueError(f"`neurons` must be a floating-point torch.Tensor; got {type(neurons).__name__}.")
    if neurons.ndim != 3 or neurons.shape[1] < 2 or neurons.shape[2] < 1:
        raise ValueError(
            "`neurons` must have shape (G, N, d): G equally shaped sets of N >= 2 neurons (rows) of dimension "
            f"d >= 1; got shape {tuple(neurons.shape)}."
        )


def _check_state(state: Any, kind: str) -> dict:
    if not isinstance(state, dict) or "config" not in state or "entries" not in state:
        raise ValueError(f"`state_dict` is not a {kind} state dict (expected keys 'config' and 'entries').")
    if state.get("type", kind) != kind:
        raise ValueError(f"`state_dict` was saved by {state.get('type')!r}, not by {kind!r}.")
    return state


def _normalize_device(device: torch.device | str) -> torch.device:
    """``torch.device`` with an explicit index for CUDA (``"cuda"`` -> ``cuda:<current>``), so comparisons hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ---------------------------------------------------------------------------------------------------------------
# Per-key generators
# ---------------------------------------------------------------------------------------------------------------


# Device types on which ``torch.Generator(device=...)`` failed (e.g. XLA without generator support, meta); their
# keys use a CPU generator whose draws are moved to the device (see :func:`generator_device`).
_HOST_GENERATOR_TYPES: set[str] = {"meta"}


_SPARSE_DEVICE_TYPES = ("cpu", "cuda")


def generator_device(device: torch.device | str) -> torch.device:
    """The device a key's generator lives on for neurons on ``device``.

    The neurons' own device when ``torch.Generator`` supports it (CPU, CUDA, MPS, XPU, ...), else the CPU: for
    device types without a device generator (e.g. XLA builds without one) the values are drawn on the CPU from the
    same seeded stream and moved to the device, so they are identical to a CPU run's draws.

    Example::

        >>> generator_device("cpu"), generator_device("meta")
        (device(type='cpu'), device(type='cpu'))
    """
    device = _normalize_device(device)
    if device.type == "cpu" or device.type in _HOST_GENERATOR_TYPES:
        return torch.device("cpu")
    try:
        torch.Generator(device=device)
    except RuntimeError:
        _HOST_GENERATOR_TYPES.add(device.type)
        return torch.device("cpu")
    return device


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal draws from ``generator`` (on its own device), placed on ``device``."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


class _KeyedGenerators:
    """Per-key ``torch.Generator`` objects with lazily restored (possibly device-foreign) states.

    A key's generator lives on :func:`generator_device` of the neurons' device (the device itself, or the CPU where
    the device type has no generator).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.seed = 0
        self.gens: dict[str, torch.Generator] = {}
        self.pending: dict[str, tuple[str, Tensor]] = {}  # key -> (device type, state), from load_state_dict

    def get(self, key: str, device: torch.device, salt: int = 0) -> torch.Generator:
        device = generator_device(device)
        gen = self.gens.get(key)
        if gen is not None and gen.device == device:
            return gen
        new = torch.Generator(device=device)
        if gen is not None:  # the neurons moved since the last use
            state: tuple[str, Tensor] | None = (gen.device.type, gen.get_state())
        else:
            state = self.pending.pop(key, None)
        if state is None:
            new.manual_seed(key_seed(self.seed, key))
        elif state[0] == device.type:
            new.set_state(state[1])
        else:
            warnings.warn(
                f"{self.owner}: the generator of key {key!r} was saved on a {state[0]!r} device and cannot be "
                f"restored on {device.type!r}; it is re-seeded deterministically, so its future draws differ from an "
                "uninterrupted run.",
                stacklevel=4,
            )
            new.manual_seed(_reseed_value(self.seed, key, salt))
        self.gens[key] = new
        return new

    def state_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for key, (dev, state) in self.pending.items():
            out[key] = {"device": dev, "state": state.clone()}
        for key, gen in self.gens.items():
            out[key] = {"device": gen.device.type, "state": gen.get_state().clone()}
        return out

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        self.gens = {}
        self.pending = {key: (str(s["device"]), s["state"].detach().cpu()) for key, s in states.items()}


def _warn_config(owner: str, saved: dict, current: dict, fields: tuple[str, ...]) -> None:
    diff = [f"{f}={saved[f]!r} (now {current[f]!r})" for f in fields if f in saved and saved[f] != current[f]]
    if diff:
        warnings.warn(
            f"{owner}.load_state_dict: the state was saved with {', '.join(diff)}; the current configuration is kept.",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------------
# Random projections
# ---------------------------------------------------------------------------------------------------------------


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
    from its own generator at its next :meth:`projections` call. The official code redraws at every step
    (``resample_every=1``). The generator of a key is seeded with :func:`key_seed` ``(seed, key)`` and advances
    with every draw, so the same seed gives the same stream in every process.

    Args:
        dim: ``k``, the dimension of the projected space (official: 40).
        num: ``C``, the number of projections per neuron set (official: 20).
        resample_every: Redraw every this many :meth:`step` calls.
        seed: Seed of the per-key generators.
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
        kind: ProjectionKind = "gaussian",
        density: float | None = None,
    ) -> None:
        self.dim = _check_int("dim", dim, 1)
        self.num = _check_int("num", num, 1)
        self.resample_every = _check_int("resample_every", resample_every, 1)
        self.seed = _check_seed(seed)
        if kind not in PROJECTION_KINDS:
            raise ValueError(f"`kind` must be one of {', '.join(map(repr, PROJECTION_KINDS))}; got {kind!r}.")
        self.kind: ProjectionKind = kind
        if density is not None:
            if kind != "sparse":
                raise ValueError(
                    f"`density` applies to kind='sparse' only; got density={density!r} with kind={kind!r}."
                )
            density = _check_float("density", density, positive=True)
            if density > 1:
                raise ValueError(f"`density` must be a float in (0, 1] or None; got {density!r}.")
        self.density = density
        self._calls = 0
        self._gens = _KeyedGenerators(type(self).__name__)
        self._gens.seed = self.seed
        self._cache: dict[str, tuple[int, Any]] = {}  # key -> (window, draw): a Tensor (gaussian) or a dict
        self._mats: dict[str, tuple[int, Any, torch.dtype, tuple[Tensor, Tensor]]] = {}  # sparse CSR, derived

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
        return sorted(set(self._cache) | set(self._gens.gens) | set(self._gens.pending))

    def step(self) -> None:
        """Advance the step counter; call once per optimizer step, before :meth:`projections`."""
        self._calls += 1

    def projections(
        self, key: str, num_sets: int, d: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The current projections of a key, drawn lazily when missing or stale.

        Args:
            key: The neuron-set group.
            num_sets: ``G``, the number of neuron sets of the group (each gets its own ``num`` projections).
            d: The neuron dimension.
            device: The device of the neurons; the key's generator lives (and draws) there.
            dtype: The returned dtype. Draws are made in float64 if ``dtype`` is float64, else in float32, and cast.

        Returns:
            ``(num_sets, num, dim, d)`` matrices, without gradient: standard Gaussian entries (the cached draw: do not
            modify it in place), or for a structured ``kind`` their dense equivalent (materialised on each call, for
            inspection: training uses :meth:`project`). A cached draw of another shape (the group changed) is
            replaced by a fresh one.

        Raises:
            ValueError: For a bad ``key``, ``num_sets`` or ``d``.
        """
        _check_key(key)
        num_sets = _check_int("num_sets", num_sets, 1)
        d = _check_int("d", d, 1)
        device = _normalize_device(device)
        if self.kind != "gaussian":
            draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            eye = torch.eye(d, dtype=draw_dtype, device=device).expand(num_sets, d, d)
            with torch.no_grad():
                dense = self._apply(key, eye)  # (G, C, d, k) = (I P_cᵀ)
            return dense.transpose(-1, -2).contiguous().to(dtype)
        shape = (num_sets, self.num, self.dim, d)
        window = self.window
        cached = self._cache.get(key)
        if cached is not None and cached[0] == window and tuple(cached[1].shape) == shape:
            draw = cached[1]
            if draw.device != device:
                draw = draw.to(device)
                self._cache[key] = (window, draw)
        else:
            gen = self._gens.get(key, device, salt=self._calls)
            draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            draw = _randn(shape, gen, device, draw_dtype)
            self._cache[key] = (window, draw)
        return draw if draw.dtype == dtype else draw.to(dtype)

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
        _check_key(key)
        _check_sets(neurons)
        return self._apply(key, neurons)

    def _apply(self, key: str, neurons: Tensor) -> Tensor:
        dtype = _compute_dtype(neurons)
        g, n, d = neurons.shape
        device = _normalize_device(neurons.device)
        if self.kind == "sparse" and device.type not in _SPARSE_DEVICE_TYPES:
            raise ValueError(
                f"RandomProjection(kind='sparse') needs neurons on one of {_SPARSE_DEVICE_TYPES} (it uses sparse CSR "
                f"matmuls); got neurons on {device.type!r}. Use kind='gaussian' or kind='srht' there."
            )
        with autocast_off(neurons.device):
            w = neurons.to(dtype)
            if self.kind == "gaussian":
                p = self.projections(key, g, d, device, dtype)
                vt = project_sets(w, p.reshape(g, self.num * self.dim, d))  # (G, C·k, N)
                return vt.reshape(g, self.num, self.dim, n).transpose(2, 3)
            draw = self._structured_draw(key, g, d, device)
            if self.kind == "srht":
                return sketch.srht_project(w, draw["signs"], draw["index"], self.num, self.dim)
            p, pt = self._sparse_mats(key, draw, dtype)
            return sketch.sparse_project(w, p, pt, self.num, self.dim)

    def _structured_draw(self, key: str, num_sets: int, d: int, device: torch.device) -> dict[str, Any]:
        window = self.window
        cached = self._cache.get(key)
        if cached is not None and cached[0] == window and (cached[1]["num_sets"], cached[1]["d"]) == (num_sets, d):
            draw = cached[1]
            if draw["device"] != device:
                draw = _draw_to(draw, device)
                self._cache[key] = (window, draw)
            return draw
        gen = self._gens.get(key, device, salt=self._calls)
        rows = self.num * self.dim
        if self.kind == "srht":
            parts = sketch.draw_srht(num_sets, rows, d, gen, device)
            draw = {"num_sets": num_sets, "d": d, **parts}
        else:
            density = self.density if self.density is not None else sketch.default_density(d)
            draw = {
                "num_sets": num_sets,
                "d": d,
                "density": density,
                **sketch.draw_sparse(num_sets, rows, d, density, gen, device),
            }
        draw["device"] = device
        self._cache[key] = (window, draw)
        return draw

    def _sparse_mats(self, key: str, draw: dict[str, Any], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cached = self._mats.get(key)
        if cached is not None and cached[1] is draw and cached[2] == dtype:
            return cached[3]
        mats = sketch.sparse_matrices(
            draw["pos"], draw["sign"], draw["num_sets"], self.num * self.dim, draw["d"], draw["density"], dtype
        )
        self._mats[key] = (self.window, draw, dtype, mats)
        return mats

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
            ``{"type", "version", "config", "calls", "entries"}``; tensors are clones on their current device. A
            structured draw is a dict of tensors (the sparse support and signs, or the SRHT signs and rows).
        """
        gens = self._gens.state_dict()
        entries: dict[str, dict[str, Any]] = {}
        for key in self.keys():
            window, draw = self._cache.get(key, (None, None))
            entries[key] = {"generator": gens.get(key), "window": window, "draw": _draw_clone(draw)}
        return {
            "type": type(self).__name__,
            "version": _STATE_VERSION,
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
        state = _check_state(state_dict, type(self).__name__)
        cfg = dict(state["config"])
        cfg.setdefault("kind", "gaussian")  # snapshots from before structured projections
        current = self._config()
        for f in ("dim", "num", "kind"):
            if cfg.get(f) != current[f]:
                raise ValueError(
                    f"`state_dict` was saved with {f}={cfg.get(f)!r}, but this RandomProjection has {f}={current[f]!r}."
                )
        _warn_config(type(self).__name__, cfg, current, ("resample_every", "seed", "density"))
        self._calls = _check_int("calls", state["calls"], 0)
        self._gens.load_state_dict({k: e["generator"] for k, e in state["entries"].items() if e.get("generator")})
        self._cache = {
            k: (int(e["window"]), _draw_loaded(e["draw"]))
            for k, e in state["entries"].items()
            if e.get("draw") is not None and e.get("window") is not None
        }
        self._mats = {}


def _draw_clone(draw: Any) -> Any:
    if draw is None:
        return None
    if isinstance(draw, Tensor):
        return draw.detach().clone()
    return {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in draw.items() if k != "device"}


def _draw_loaded(draw: Any) -> Any:
    if isinstance(draw, Tensor):
        return draw.detach()
    out = dict(draw)
    tensors = [v for v in out.values() if isinstance(v, Tensor)]
    out["device"] = _normalize_device(tensors[0].device) if tensors else torch.device("cpu")
    return out


def _draw_to(draw: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in draw.items()}
    out["device"] = device
    return out


# ---------------------------------------------------------------------------------------------------------------
# Learned projections (angle-preserving, adversarial)
# ---------------------------------------------------------------------------------------------------------------


class _LearnedProjection:
    """One learnable ``P`` (G, dim, d) per key, fitted by its own SGD; subclasses define the inner objective."""

    _maximize = False

    def __init__(self, dim: int, steps: int, lr: float, weight_decay: float, lookahead: Lookahead, seed: int) -> None:
        self.dim = _check_int("dim", dim, 1)
        self.steps = _check_int("steps", steps, 0)
        self.lr = _check_float("lr", lr)
        self.weight_decay = _check_float("weight_decay", weight_decay)
        self.lookahead: Lookahead = _check_lookahead(lookahead)  # type: ignore[assignment]
        self.seed = _check_seed(seed)
        self._gens = _KeyedGenerators(type(self).__name__)
        self._gens.seed = self.seed
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
        _check_key(key)
        _check_sets(neurons)
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
            init = _randn((g, self.dim, d), gen, device, _compute_dtype(neurons))
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
                f"{type(self).__name__}: key {key!r} holds projections of shape {tuple(p.shape)} = (G, dim, d), but "
                f"`neurons` of shape {tuple(neurons.shape)} need {(g, self.dim, d)}; use one key per group of "
                "equally shaped neuron sets."
            )
        return p, self._optims[key]

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
        _check_key(key)
        if not isinstance(projection, Tensor) or not projection.is_floating_point():
            raise ValueError(f"`projection` must be a floating-point torch.Tensor; got {type(projection).__name__}.")
        if projection.ndim != 3 or projection.shape[1] != self.dim or projection.shape[0] < 1:
            raise ValueError(
                f"`projection` must have shape (G, dim, d) with dim = {self.dim}; got {tuple(projection.shape)}."
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
        _check_key(key)
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

    def fit(self, key: str, neurons: Tensor, lr: float | None = None) -> Tensor:
        """Run ``steps`` side-optimizer steps on the key's ``P`` against the (detached) neurons.

        Args:
            key: The neuron-set group.
            neurons: ``(G, N, d)``; detached inside, so the model gets no gradient from fitting.
            lr: Learning rate for this call only (the official code uses the model's current learning rate); the
                configured ``lr`` when ``None``.

        Returns:
            The inner objective per set ``(G,)``, detached, measured **before** the steps (at the ``P`` the call
            started from), like the official training loop's logged value.

        Raises:
            ValueError: For bad ``neurons``, ``key`` or ``lr``.
        """
        lr_now = self.lr if lr is None else _check_float("lr", lr)
        p, opt = self._entry(key, neurons)
        w = neurons.detach()
        if self.steps == 0:
            with torch.no_grad():
                return self._objective(w, p.detach())
        saved_lr = [group["lr"] for group in opt.param_groups]
        for group in opt.param_groups:
            group["lr"] = lr_now
        before: Tensor | None = None
        try:
            for _ in range(self.steps):
                with torch.enable_grad():
                    obj = self._objective(w, p)
                    (grad,) = torch.autograd.grad(obj.sum(), p)
                if before is None:
                    before = obj.detach()
                p.grad = grad.to(p.dtype)
                opt.step()
                p.grad = None
        finally:
            for group, value in zip(opt.param_groups, saved_lr, strict=True):
                group["lr"] = value
        assert before is not None
        return before

    def projections(self, key: str, neurons: Tensor, lr: float | None = None) -> Tensor:
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
            lr: The look-ahead step :math:`\eta` (official: the model's current learning rate); the configured ``lr``
                when ``None``.

        Returns:
            ``(G, 1, dim, d)``.

        Raises:
            ValueError: For bad ``neurons``, ``key`` or ``lr``.
        """
        eta = self.lr if lr is None else _check_float("lr", lr)
        p, _ = self._entry(key, neurons)
        base = p.detach().clone()
        if self.lookahead == "none" or eta == 0.0:
            return base[:, None]
        sign = 1.0 if self._maximize else -1.0
        second = self.lookahead == "second"
        w = neurons if second else neurons.detach()
        with torch.enable_grad():
            leaf = base.clone().requires_grad_(True)
            obj = self._objective(w, leaf).sum()
            (grad,) = torch.autograd.grad(obj, leaf, create_graph=second and w.requires_grad)
        if not second:
            grad = grad.detach()
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
        return {"type": type(self).__name__, "version": _STATE_VERSION, "config": self._config(), "entries": entries}

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
        state = _check_state(state_dict, name)
        cfg, current = state["config"], self._config()
        if cfg.get("dim") != self.dim:
            raise ValueError(f"`state_dict` was saved with dim={cfg.get('dim')!r}, but this {name} has dim={self.dim}.")
        _warn_config(name, cfg, current, ("steps", "lr", "weight_decay", "lookahead", "seed"))
        entries = state["entries"]
        self._params, self._optims = {}, {}
        self._pending = {
            k: (e["projection"].detach(), e.get("optimizer"))
            for k, e in entries.items()
            if e.get("projection") is not None
        }
        self._gens.load_state_dict({k: e["generator"] for k, e in entries.items() if e.get("generator")})


class AngleProjection(_LearnedProjection):
    r"""Learned angle-preserving projections of AP-CoMHE.

    One learnable :math:`P \in \mathbb{R}^{k \times d}` (``k = dim``) per neuron set, initialised with
    :math:`\mathcal{N}(0, 1)` entries from the key's own generator, and fitted by a side optimizer
    ``torch.optim.SGD([P], lr=lr, weight_decay=weight_decay)`` (plain SGD, no momentum: the official optimizer with
    the decay ``1e-3 · 5e-4 = 5e-7``) to minimise the angle-preservation objective
    (:func:`~lightning_comhe.functional.angles.angle_objective`)

    .. math::

        L(W, P) = \big\| C(W P^\top) - C(W) \big\|_F

    summed over the sets of a group. Per optimizer step the official loop runs ``steps`` SGD steps (:meth:`fit`,
    with the model's current learning rate), then the regularizer uses the half-space energy of
    :math:`W \tilde P^\top` with the look-ahead :math:`\tilde P = P - \eta \nabla_P L(W, P)` (:meth:`projections`,
    ``lookahead="second"`` being the official, differentiated-through variant). ``P`` is never updated by the
    model's optimizer.

    Args:
        dim: ``k``, the dimension of the projected space (official: 30).
        steps: SGD steps per :meth:`fit` call (official: 1). ``0`` keeps the initial Gaussian ``P``.
        lr: The side optimizer's learning rate (and the look-ahead step), unless a call passes ``lr``.
        weight_decay: The side optimizer's L2 decay on ``P`` (official: ``5e-7``).
        lookahead: ``"none"`` (use ``P``), ``"first"`` (look-ahead, no gradient to ``W`` through it) or
            ``"second"`` (look-ahead differentiated with respect to ``W``, as the official code).
        seed: Seed of the per-key generators that initialise ``P``.

    Raises:
        ValueError: If an argument is out of its allowed range.

    Example::

        >>> import torch
        >>> from lightning_comhe.functional import projected_energy
        >>> ap = AngleProjection(dim=30, steps=1, lookahead="second", seed=0)
        >>> w = torch.randn(1, 32, 72, requires_grad=True)  # one set of 32 neurons in R^72
        >>> before = ap.fit("layer1", w, lr=0.1)  # angle objective per set, before the step
        >>> p = ap.projections("layer1", w, lr=0.1)
        >>> p.shape, before.shape
        (torch.Size([1, 1, 30, 72]), torch.Size([1]))
        >>> projected_energy(w, p, half_space=True).sum().backward()
        >>> w.grad.shape
        torch.Size([1, 32, 72])
    """

    _maximize = False

    def __init__(
        self,
        dim: int = 30,
        steps: int = 1,
        lr: float = 0.1,
        weight_decay: float = 5e-7,
        lookahead: Lookahead = "none",
        seed: int = 0,
    ) -> None:
        super().__init__(dim, steps, lr, weight_decay, lookahead, seed)

    def _objective(self, neurons: Tensor, p: Tensor) -> Tensor:
        return angle_objective(neurons, p)


class AdversarialProjection(_LearnedProjection):
    r"""Learned adversarial projections of adversarial-projection CoMHE.

    One learnable :math:`P \in \mathbb{R}^{k \times d}` per neuron set (:math:`\mathcal{N}(0, 1)` init from the key's
    generator), fitted by gradient **ascent** on the full-space projected energy

    .. math::

        E_\text{full}(W, P) = E\big(W P^\top\big) \quad (\text{plain } s = 2 \text{ MHE, } N \text{ neurons})

    with ``torch.optim.SGD([P], lr, weight_decay=weight_decay, maximize=True)``. PyTorch negates the gradient before
    adding the decay term, so one step is :math:`P \leftarrow P + \eta(\nabla_P E_\text{full} - \lambda P)`: the
    decay still shrinks ``P``, as the official loss :math:`-E_\text{full} + \tfrac{\lambda}{2}\|P\|^2`
    (:math:`\lambda = 5\cdot 10^{-7}`). The regularizer then uses the **half-space** energy of
    :math:`W \tilde P^\top` with the ascent look-ahead :math:`\tilde P = P + \eta \nabla_P E_\text{full}(W, P)`.

    Args:
        dim: ``k``, the dimension of the projected space (official: 30).
        steps: Ascent steps per :meth:`fit` call (official: 10). ``0`` keeps the initial Gaussian ``P``.
        lr: The side optimizer's learning rate (and the look-ahead step), unless a call passes ``lr``.
        weight_decay: The side optimizer's L2 decay on ``P`` (official: ``5e-7``).
        lookahead: ``"none"``, ``"first"`` or ``"second"``, as in :class:`AngleProjection`.
        seed: Seed of the per-key generators that initialise ``P``.

    Raises:
        ValueError: If an argument is out of its allowed range.

    Example::

        >>> import torch
        >>> adv = AdversarialProjection(dim=30, steps=10, seed=0)
        >>> w = torch.randn(2, 32, 72)
        >>> before = adv.fit("layer1", w, lr=0.5)
        >>> bool((adv.objective("layer1", w) >= before).all())  # ascent raised the projected energy
        True
        >>> adv.projections("layer1", w).shape
        torch.Size([2, 1, 30, 72])
    """

    _maximize = True

    def __init__(
        self,
        dim: int = 30,
        steps: int = 10,
        lr: float = 0.1,
        weight_decay: float = 5e-7,
        lookahead: Lookahead = "none",
        seed: int = 0,
    ) -> None:
        super().__init__(dim, steps, lr, weight_decay, lookahead, seed)

    def _objective(self, neurons: Tensor, p: Tensor) -> Tensor:
        return projected_energy(neurons, p[:, None], half_space=False, check_finite=False)
