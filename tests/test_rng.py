"""Tests of lightning_comhe.projections._rng: key seeds, keyed generators, their device and their re-seeding."""

import pickle
import zlib

import pytest
import torch

from lightning_comhe.projections import generator_device, key_seed
from lightning_comhe.projections._rng import KeyedGenerators, normalize_device, randn, reseed_value

CPU = torch.device("cpu")


def test_key_seed_is_deterministic_and_63_bit():
    assert key_seed(0, "a") == key_seed(0, "a")
    assert key_seed(0, "a") != key_seed(0, "b") and key_seed(0, "a") != key_seed(1, "a")
    for s in (-5, 0, 2**70):
        assert 0 <= key_seed(s, "layer") < 2**63


def test_key_seed_formula_is_stable():
    """The formula is part of the checkpoint contract: these values must never change."""
    for seed, key in [(0, "a"), (7, "layer1.0.conv1"), (3, "g:64x576"), (2**40, "é")]:
        assert key_seed(seed, key) == (seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % 2**63
    assert key_seed(0, "a") == 3904355907


def test_reseed_value_is_deterministic_salted_and_63_bit():
    assert reseed_value(1, "a", 0) == reseed_value(1, "a", 0)
    assert len({reseed_value(1, "a", s) for s in range(5)}) == 5
    assert reseed_value(1, "a", 0) != reseed_value(1, "b", 0) != key_seed(1, "b")
    assert all(0 <= reseed_value(s, "k", 9) < 2**63 for s in (0, 2**70))


def test_normalize_and_generator_device():
    assert normalize_device("cpu") == CPU and normalize_device(torch.device("meta")).type == "meta"
    assert generator_device("cpu") == CPU
    assert generator_device(torch.device("meta")) == CPU  # no meta generator: the CPU stream is used


def test_randn_draws_on_the_generator_device_and_moves():
    gen = torch.Generator().manual_seed(3)
    out = randn((2, 3), gen, torch.device("meta"), torch.float64)
    assert out.device.type == "meta" and out.dtype == torch.float64 and out.shape == (2, 3)
    a = randn((4,), torch.Generator().manual_seed(3), CPU, torch.float32)
    assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(3)))


def test_keyed_generators_seed_lazily_and_independently_of_order():
    one, two = KeyedGenerators("T", seed=5), KeyedGenerators("T", seed=5)
    assert one.keys() == set() and one.state_dict() == {}
    a1, b1 = one.get("a", CPU), one.get("b", CPU)
    b2, a2 = two.get("b", CPU), two.get("a", CPU)
    assert a1.initial_seed() == key_seed(5, "a") and b1.initial_seed() == key_seed(5, "b")
    assert torch.equal(a1.get_state(), a2.get_state()) and torch.equal(b1.get_state(), b2.get_state())
    assert one.get("a", CPU) is a1  # cached
    assert one.keys() == {"a", "b"}


def test_keyed_generators_state_round_trip_continues_the_stream():
    gens = KeyedGenerators("T", seed=2)
    torch.rand(3, generator=gens.get("a", CPU))
    state = pickle.loads(pickle.dumps(gens.state_dict()))
    assert set(state) == {"a"} and state["a"]["device"] == "cpu" and state["a"]["state"].dtype == torch.uint8
    want = torch.rand(4, generator=gens.get("a", CPU))
    fresh = KeyedGenerators("T", seed=2)
    fresh.load_state_dict(state)
    assert fresh.keys() == {"a"} and not fresh.gens  # restored lazily, at the next use
    assert torch.equal(fresh.state_dict()["a"]["state"], state["a"]["state"])  # pending states are saved too
    assert torch.equal(torch.rand(4, generator=fresh.get("a", CPU)), want)


def test_keyed_generators_state_is_a_copy():
    gens = KeyedGenerators("T", seed=0)
    gen = gens.get("a", CPU)
    state = gens.state_dict()
    saved = state["a"]["state"].clone()
    torch.rand(5, generator=gen)
    assert torch.equal(state["a"]["state"], saved)


def test_foreign_device_state_warns_and_reseeds_deterministically():
    state = {"a": {"device": "cuda", "state": torch.Generator().get_state()}}
    outs = []
    for _ in range(2):
        gens = KeyedGenerators("Owner", seed=4)
        gens.load_state_dict(state)
        with pytest.warns(
            UserWarning, match=r"^Owner: the generator of key 'a' was saved on a 'cuda' device .*re-seeded"
        ):
            gen = gens.get("a", CPU, salt=3)
        assert gen.initial_seed() == reseed_value(4, "a", 3)
        outs.append(torch.rand(3, generator=gen))
    assert torch.equal(outs[0], outs[1])
