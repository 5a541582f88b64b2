"""Tests of `lightning_comhe.functional._compiled`: the optional torch.compile tiles and their fallbacks.

Whether ``torch.compile`` works here is found out lazily (the first test that needs it), never at collection time.
"""

import functools
import math
import warnings
from functools import partial

import pytest
import torch

from lightning_comhe.functional import _compiled
from lightning_comhe.functional.energy import hyperspherical_energy, projected_energy
from tests.helpers_energy import degenerate_batch, value_and_grad

F64 = torch.float64
DYNAMO_LIMITS = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")


@functools.cache
def compile_works() -> bool:
    try:
        return torch.compile(lambda x: x + 1)(torch.ones(2)).sum().item() == 4
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="session")
def needs_compile() -> None:
    if not compile_works():
        pytest.skip("torch.compile is unavailable here")


def dynamo_limits() -> dict[str, int]:
    import torch._dynamo as dynamo

    return {name: getattr(dynamo.config, name) for name in DYNAMO_LIMITS if hasattr(dynamo.config, name)}


def check_compiled_equals_eager(power, half_space, angular=False, dtype=F64):
    # float64: degenerate sets too; float32: a duplicate pair's gradient is cancellation noise (test_energy.py), and
    # the compiled Gram may round differently, so random sets only
    w = degenerate_batch(seed=8, b=5, n=37, d=5) if dtype == F64 else torch.randn(5, 37, 5)
    w = w.to(dtype)
    kw = dict(power=power, half_space=half_space, angular=angular, tile_size=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback would not test the compiled path
        val, grad = value_and_grad(partial(hyperspherical_energy, backend="compiled", **kw), w)
    ref, ref_grad = value_and_grad(partial(hyperspherical_energy, backend="fused", **kw), w)
    rtol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(val, ref, rtol=rtol, atol=0)
    assert ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item() < rtol * 100
    with torch.no_grad():
        torch.testing.assert_close(hyperspherical_energy(w, backend="compiled", **kw), ref, rtol=rtol, atol=0)


def test_compiled_path_equals_eager_official_default(needs_compile):
    assert _compiled.compile_failed() is None
    check_compiled_equals_eager(2, True)
    check_compiled_equals_eager(2, True, dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("power,half_space,angular", [(0, False, True), (1, False, False), (3.7, True, True)])
def test_compiled_path_equals_eager_other_variants(needs_compile, power, half_space, angular):
    check_compiled_equals_eager(power, half_space, angular)


def test_compiled_backend_leaves_global_dynamo_config_unchanged(needs_compile):
    import torch._dynamo as dynamo

    before, config_before = dynamo_limits(), dynamo.config.get_config_copy()
    w = torch.randn(3, 11, 4, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the compiled path itself, not the eager fallback
        hyperspherical_energy(w, half_space=True, backend="compiled").sum().backward()
        with torch.no_grad():
            hyperspherical_energy(w, half_space=True, backend="compiled")
    assert _compiled.compile_failed() is None
    assert dynamo_limits() == before
    assert dynamo.config.get_config_copy() == config_before


def test_recompile_limit_is_scoped_to_the_compiled_tiles(monkeypatch):
    """Where torch.compile has no per-call limit, the raised limit holds only while the compiled tiles run."""
    import torch._dynamo as dynamo

    # Dynamo's config is changed here through its own `patch` only: pytest's monkeypatch breaks its attributes
    name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(_compiled, "_PER_CALL_LIMITS", False)
    monkeypatch.setattr(_compiled, "_FAILED", [])
    seen = []

    def recording(*args):
        seen.append(getattr(dynamo.config, name))
        raise RuntimeError("stop after recording")

    monkeypatch.setattr(_compiled, "compiled_tile_fns", lambda *a: (recording, recording))
    w = torch.randn(2, 6, 4, dtype=F64)
    with dynamo.config.patch(**{name: 8}):
        with pytest.warns(RuntimeWarning, match="stop after recording"):
            hyperspherical_energy(w, backend="compiled")
        assert seen == [_compiled._RECOMPILE_LIMIT]
        assert getattr(dynamo.config, name) == 8
    # a higher limit set by the user is left alone
    with dynamo.config.patch(**{name: 1000}), _compiled.recompile_limit_scope():
        assert getattr(dynamo.config, name) == 1000
    # with a per-call limit nothing global is patched
    monkeypatch.setattr(_compiled, "_PER_CALL_LIMITS", True)
    with dynamo.config.patch(**{name: 8}), _compiled.recompile_limit_scope():
        assert getattr(dynamo.config, name) == 8


def test_per_call_limits_are_passed_to_torch_compile(monkeypatch):
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(_compiled, "_FAILED", [])
    monkeypatch.setattr(_compiled, "_CACHE", {})
    monkeypatch.setattr(torch, "compile", fake_compile)
    for per_call in (True, False):
        monkeypatch.setattr(_compiled, "_PER_CALL_LIMITS", per_call)
        _compiled._CACHE.clear()
        fns = _compiled.compiled_tile_fns(2.0, False, True, 1e-4)
        assert fns is not None and len(calls) == 2
        expected = {"dynamic": True, "fullgraph": True}
        if per_call:
            expected |= {"recompile_limit": _compiled._RECOMPILE_LIMIT, "isolate_recompiles": True}
        assert calls == [expected, expected]
        calls.clear()
    # the eager-compiled (fake) tiles are the reference formulas: the kernel runs through them
    w = torch.randn(2, 9, 4, dtype=F64, requires_grad=True)
    out = hyperspherical_energy(w, half_space=True, backend="compiled", tile_size=3)
    ref = hyperspherical_energy(w.detach(), half_space=True, backend="fused", tile_size=3)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-12, atol=0)
    assert _compiled.compile_failed() is None


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_compiled, "_FAILED", [])
    monkeypatch.setattr(_compiled, "_CACHE", {})

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    w = torch.randn(2, 6, 4, dtype=F64)
    with pytest.warns(RuntimeWarning, match="falling back to the eager kernel"):
        out = hyperspherical_energy(w, half_space=True, backend="compiled")
    torch.testing.assert_close(out, hyperspherical_energy(w, half_space=True), rtol=1e-14, atol=0)
    assert "no compiler here" in _compiled.compile_failed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hyperspherical_energy(w, half_space=True, backend="compiled")  # no second warning


def test_compiled_call_failure_falls_back(monkeypatch):
    """A failure at the first call (where torch.compile really compiles) also falls back to the eager kernel."""
    monkeypatch.setattr(_compiled, "_FAILED", [])

    def failing(*args):
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(_compiled, "compiled_tile_fns", lambda *a: (failing, failing))
    w = torch.randn(2, 6, 4, dtype=F64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="inductor failed"):
        out = hyperspherical_energy(w, backend="compiled")
    ref = hyperspherical_energy(w.detach(), backend="fused")
    torch.testing.assert_close(out.detach(), ref, rtol=1e-14, atol=0)
    out.sum().backward()
    assert torch.isfinite(w.grad).all()


def test_environment_variable_selects_the_compiled_path(monkeypatch):
    calls = []

    def spy(*key):
        calls.append(key)
        return None  # behave as if unavailable: the eager kernel runs

    monkeypatch.setattr(_compiled, "compiled_tile_fns", spy)
    w = torch.randn(5, 3, dtype=F64)
    monkeypatch.delenv("LIGHTNING_COMHE_COMPILE", raising=False)
    hyperspherical_energy(w)
    assert calls == []
    monkeypatch.setenv("LIGHTNING_COMHE_COMPILE", "1")
    hyperspherical_energy(w, power="a1")
    projected_energy(w, torch.randn(2, 2, 3, dtype=F64))
    assert calls[0] == (1.0, True, False, 1e-4) and len(calls) == 2
    hyperspherical_energy(w, backend="fused")
    assert len(calls) == 2


def test_compiled_is_an_accepted_backend():
    w = torch.randn(4, 3)
    assert math.isfinite(hyperspherical_energy(w, backend="compiled" if compile_works() else "fused").item())
    with pytest.raises(ValueError, match="`backend`"):
        hyperspherical_energy(w, backend="triton")
