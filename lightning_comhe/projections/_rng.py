r"""Keyed generators: one seeded :class:`torch.Generator` per key, on the neurons' device, never the global RNG.

A key's generator is seeded with :func:`key_seed` ``(seed, key)``, so the values an entry sees do not depend on the
order in which keys are used. It lives on :func:`generator_device` of the neurons' device (the device itself, or the
CPU for device types without a generator) and is created lazily at the key's first use. A restored generator state
that cannot be set on the current device type is replaced by a deterministic re-seed (:func:`reseed_value`), with a
warning.
"""

import warnings
import zlib
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "KeyedGenerators",
    "generator_device",
    "key_seed",
    "normalize_device",
    "randn",
    "reseed_value",
    "slot_seed",
]

_MASK63 = (1 << 63) - 1

# Device types on which ``torch.Generator(device=...)`` failed (e.g. XLA without generator support, meta); their
# keys use a CPU generator whose draws are moved to the device (see :func:`generator_device`).
_HOST_GENERATOR_TYPES: set[str] = {"meta"}


def key_seed(seed: int, key: str) -> int:
    r"""Seed of the generator of one key: :math:`(s \cdot 1000003 + \mathrm{crc32}(\mathrm{key})) \bmod 2^{63}`.

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


def reseed_value(seed: int, key: str, salt: int) -> int:
    """A deterministic seed for a key whose saved generator cannot be restored on the current device.

    Example::

        >>> reseed_value(0, "a", 3) == reseed_value(0, "a", 3) != reseed_value(0, "a", 4)
        True
    """
    return (key_seed(seed, key) * 6364136223846793005 + 1442695040888963407 * (int(salt) + 1)) & _MASK63


def _mix64(h: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit words that spreads every input bit over the output."""
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h ^ (h >> 31)


def slot_seed(seed: int, key: str, window: int, set_index: int, projection: int) -> int:
    r"""The seed of one Gaussian projection: a hash of ``(seed, key, window, set, projection)``, 63-bit.

    Each projection :math:`P_{s,c}` of a resampling window is drawn from its own stream, so one of them can be drawn
    without the others: a data-parallel rank draws only the projections it owns
    (:mod:`lightning_comhe.sharding`), and the values are the same whichever ranks draw them, in whatever order.

    Example::

        >>> slot_seed(0, "a", 1, 0, 0) == slot_seed(0, "a", 1, 0, 0) != slot_seed(0, "a", 1, 0, 1)
        True
    """
    h = key_seed(seed, key)
    for value in (window, set_index, projection):
        h = _mix64(h ^ _mix64(int(value) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF))
    return h & _MASK63


def normalize_device(device: torch.device | str) -> torch.device:
    """``torch.device`` with an explicit index for CUDA (``"cuda"`` -> ``cuda:<current>``), so comparisons hold.

    Example::

        >>> normalize_device("cpu")
        device(type='cpu')
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def generator_device(device: torch.device | str) -> torch.device:
    """The device a key's generator lives on for neurons on ``device``.

    The neurons' own device when ``torch.Generator`` supports it (CPU, CUDA, MPS, XPU, ...), else the CPU: for
    device types without a device generator (e.g. XLA builds without one) the values are drawn on the CPU from the
    same seeded stream and moved to the device, so they are identical to a CPU run's draws.

    Example::

        >>> generator_device("cpu"), generator_device("meta")
        (device(type='cpu'), device(type='cpu'))
    """
    device = normalize_device(device)
    if device.type == "cpu" or device.type in _HOST_GENERATOR_TYPES:
        return torch.device("cpu")
    try:
        torch.Generator(device=device)
    except RuntimeError:
        _HOST_GENERATOR_TYPES.add(device.type)
        return torch.device("cpu")
    return device


def randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal draws from ``generator`` (on its own device), placed on ``device``.

    Example::

        >>> randn((2, 3), torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32).shape
        torch.Size([2, 3])
    """
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


class KeyedGenerators:
    """Per-key ``torch.Generator`` objects with lazily restored (possibly device-foreign) states.

    Args:
        owner: Named in warnings (the class that owns the generators).
        seed: The seed of every key's stream (:func:`key_seed`).

    Attributes:
        gens: The live generators, by key.
        pending: States restored by :meth:`load_state_dict` and not used yet: key -> ``(device type, state)``.

    Example::

        >>> gens = KeyedGenerators("Demo", seed=0)
        >>> g = gens.get("layer1", torch.device("cpu"))
        >>> g.initial_seed() == key_seed(0, "layer1")
        True
        >>> other = KeyedGenerators("Demo", seed=0)
        >>> other.load_state_dict(gens.state_dict())
        >>> torch.equal(other.get("layer1", torch.device("cpu")).get_state(), g.get_state())
        True
    """

    def __init__(self, owner: str, seed: int = 0) -> None:
        self.owner = owner
        self.seed = seed
        self.gens: dict[str, torch.Generator] = {}
        self.pending: dict[str, tuple[str, Tensor]] = {}

    def keys(self) -> set[str]:
        """The keys with a live or a restored generator."""
        return set(self.gens) | set(self.pending)

    def get(self, key: str, device: torch.device, salt: int = 0) -> torch.Generator:
        """The generator of ``key`` for neurons on ``device``: created, restored or moved as needed.

        Args:
            key: The entry's key.
            device: The neurons' device.
            salt: Mixed into the deterministic re-seed of a state saved on another device type.

        Returns:
            The key's generator, on :func:`generator_device` ``(device)``.
        """
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
            new.manual_seed(reseed_value(self.seed, key, salt))
        self.gens[key] = new
        return new

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """``{key: {"device": device type, "state": ByteTensor}}``, cloned."""
        out: dict[str, dict[str, Any]] = {}
        for key, (dev, state) in self.pending.items():
            out[key] = {"device": dev, "state": state.clone()}
        for key, gen in self.gens.items():
            out[key] = {"device": gen.device.type, "state": gen.get_state().clone()}
        return out

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        """Restore :meth:`state_dict`; each state is set lazily, on the device of the key's next use."""
        self.gens = {}
        self.pending = {key: (str(s["device"]), s["state"].detach().cpu()) for key, s in states.items()}
