"""Tests of `lightning_comhe.functional.energy` against independent float64 references and the official fixtures."""

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_comhe.functional import _tiled
from lightning_comhe.functional.energy import (
    OFFICIAL_POWERS,
    hyperspherical_energy,
    parse_power,
    projected_energy,
)

F64 = torch.float64
BACKENDS = ("fused", "autograd")
POWERS = (0, 1, 2, 0.5, 3.7, "0", "1", "2", "a0", "a1", "a2")
# The official strings, written out here independently of the implementation's table.
STRING_POWERS = {
    "0": (0.0, False),
    "1": (1.0, False),
    "2": (2.0, False),
    "a0": (0.0, True),
    "a1": (1.0, True),
    "a2": (2.0, True),
}
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


# ---------------------------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------------------------


def effective_power(power, angular):
    """(s, angular) as the spec defines them, independent of `parse_power`."""
    if isinstance(power, str):
        s, forced = STRING_POWERS[power]
        return s, forced or angular
    return float(power), angular


def brute_energy(w, power=2, *, half_space=False, angular=False, eps=1e-4):
    """Mean over pairs i<j of the (2N if half_space) neurons, by a double Python loop. Differentiable."""
    s, angular = effective_power(power, angular)
    x = torch.cat([w, -w], dim=0) if half_space else w
    n = x.shape[0]
    norms = [torch.sqrt((x[i] * x[i]).sum() + eps) for i in range(n)]
    terms = []
    for i in range(n):
        for j in range(i + 1, n):
            c = (x[i] * x[j]).sum() / (norms[i] * norms[j])
            if angular:
                a = torch.acos(c) / math.pi + eps
                terms.append(-torch.log(a) if s == 0 else a ** (-s))
            else:
                d = 2 - 2 * c
                terms.append(-torch.log(d) if s == 0 else d ** (-s / 2))
    assert len(terms) == n * (n - 1) // 2
    return torch.stack(terms).mean()


def brute_projected(w, p, power=2, *, half_space=True, angular=False, eps=1e-4):
    """Mean over the C projections P_c (k, d) of the brute-force energy of W P_cᵀ."""
    return torch.stack(
        [brute_energy(w @ p[c].T, power, half_space=half_space, angular=angular, eps=eps) for c in range(p.shape[0])]
    ).mean()


def value_and_grad(fn, *inputs):
    """Evaluate ``fn`` on float64 leaf copies of ``inputs``; return the value and the gradients."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    return out.detach(), [g.detach() for g in grads]


def assert_grad_close(actual, expected, rel):
    """|actual - expected| <= rel * max|expected| elementwise (tolerance relative to the largest entry)."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().clamp_min(1e-300)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rel, f"max error {err:.3e} relative to the largest entry exceeds {rel:.1e}"


def cosine(a, b):
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return (a @ b / (a.norm() * b.norm())).item()


def random_neurons(seed, n=None, d=None, degenerate=False):
    g = torch.Generator().manual_seed(seed)
    if n is None:
        n = int(torch.randint(2, 10, (1,), generator=g))
    if d is None:
        d = int(torch.randint(1, 8, (1,), generator=g))
    w = torch.randn(n, d, generator=g, dtype=F64)
    if degenerate:  # exact duplicate, antipodal pair, zero neuron, parallel neuron of another norm
        w[1] = w[0]
        w[2] = -w[0]
        w[3] = 0.0
        w[4] = 3.0 * w[0]
    return w


# ---------------------------------------------------------------------------------------------------------------
# 1. Brute-force references, all variants
# ---------------------------------------------------------------------------------------------------------------

SHAPE_CASES = [
    pytest.param(dict(seed=0), id="rand0"),
    pytest.param(dict(seed=1), id="rand1"),
    pytest.param(dict(seed=2, n=9, d=7), id="9x7"),
    pytest.param(dict(seed=3, n=2, d=1), id="2x1"),
    pytest.param(dict(seed=4, n=6, d=3, degenerate=True), id="degenerate6x3"),
    pytest.param(dict(seed=5, n=5, d=1, degenerate=True), id="degenerate5x1"),
]


@pytest.mark.parametrize("half_space", [False, True], ids=["plain", "half"])
@pytest.mark.parametrize("angular", [False, True], ids=["chord", "angular"])
@pytest.mark.parametrize("power", POWERS, ids=[repr(p) for p in POWERS])
def test_matches_brute_force(power, angular, half_space):
    for case in SHAPE_CASES:
        w = random_neurons(**case.values[0])
        kw = dict(half_space=half_space, angular=angular)
        ref, (ref_grad,) = value_and_grad(partial(brute_energy, power=power, **kw), w)
        assert torch.isfinite(ref) and torch.isfinite(ref_grad).all()
        for backend in BACKENDS:
            val, (grad,) = value_and_grad(partial(hyperspherical_energy, power=power, backend=backend, **kw), w)
            assert val.dtype == F64 and val.shape == ()
            torch.testing.assert_close(val, ref, rtol=1e-10, atol=0, msg=f"{case.id} {backend}")
            assert_grad_close(grad, ref_grad, 1e-8)


@pytest.mark.parametrize("power", [0, 2, 3.7, "a0", "a2"])
@pytest.mark.parametrize("half_space", [False, True], ids=["plain", "half"])
def test_projected_matches_brute_force(power, half_space):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(7, 5, generator=g, dtype=F64)
    for k in (2, 5, 8):  # k < d, k = d and k > d
        p = torch.randn(3, k, 5, generator=g, dtype=F64)
        ref, ref_grads = value_and_grad(lambda x, q: brute_projected(x, q, power, half_space=half_space), w, p)
        for backend in BACKENDS:
            fn = partial(projected_energy, power=power, half_space=half_space, backend=backend)
            val, grads = value_and_grad(fn, w, p)
            torch.testing.assert_close(val, ref, rtol=1e-10, atol=0)
            for a, b in zip(grads, ref_grads, strict=True):
                assert_grad_close(a, b, 1e-8)


def test_closed_form_orthonormal():
    """Orthonormal neurons: c_ij = 0 off the diagonal, c(w, -w) = -1/(1+eps)."""
    eps, n = 1e-4, 4
    w = torch.eye(n, dtype=F64)
    npairs = n * (n - 1) // 2
    for s in (0.0, 1.0, 2.0, 3.7):
        for angular in (False, True):

            def f(c, s=s, angular=angular):
                if angular:
                    a = math.acos(c) / math.pi + eps
                    return -math.log(a) if s == 0 else a ** (-s)
                return -math.log(2 - 2 * c) if s == 0 else (2 - 2 * c) ** (-s / 2)

            plain = hyperspherical_energy(w, s, angular=angular).item()
            assert plain == pytest.approx(f(0.0), rel=1e-12)
            half = hyperspherical_energy(w, s, angular=angular, half_space=True).item()
            expected = (4 * npairs * f(0.0) + n * f(-1 / (1 + eps))) / (n * (2 * n - 1))
            assert half == pytest.approx(expected, rel=1e-12)
    assert hyperspherical_energy(torch.eye(3)).item() == pytest.approx(0.5, rel=1e-6)  # the docstring example


# ---------------------------------------------------------------------------------------------------------------
# 2. Batching, tiling and the two backends
# ---------------------------------------------------------------------------------------------------------------

VARIANTS = [(s, angular, half) for s in (0, 1, 2, 3.7) for angular in (False, True) for half in (False, True)]


@pytest.mark.parametrize("s,angular,half_space", VARIANTS)
def test_batched_tiled_and_backends_agree(s, angular, half_space):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 11, 4, generator=g, dtype=F64)
    w[1, 5] = w[1, 2]  # a duplicate inside one set
    kw = dict(half_space=half_space, angular=angular)

    ref, (ref_grad,) = value_and_grad(lambda x: hyperspherical_energy(x, s, backend="autograd", **kw), w)
    assert ref.shape == (3,)
    stacked, (stacked_grad,) = value_and_grad(
        lambda x: torch.stack([hyperspherical_energy(x[b], s, backend="autograd", **kw) for b in range(3)]), w
    )
    torch.testing.assert_close(ref, stacked, rtol=1e-12, atol=0)
    assert_grad_close(ref_grad, stacked_grad, 1e-12)
    for tile in (1, 2, 3, 5, 10, 11, 64, None):
        for backend in ("fused", "auto"):
            fn = partial(hyperspherical_energy, power=s, backend=backend, tile_size=tile, **kw)
            val, (grad,) = value_and_grad(fn, w)
            # 1e-10: the duplicate pair's term is ~1/eps, and the summation order (BLAS kernel, tiling) differs
            torch.testing.assert_close(val, ref, rtol=1e-10, atol=0, msg=f"tile={tile}")
            assert_grad_close(grad, ref_grad, 1e-9)


@pytest.mark.parametrize(
    "s,angular,half_space", [(2, False, True), (0, True, False), (1, True, True), (3.7, False, False)]
)
def test_double_backward_backends_agree(s, angular, half_space):
    """Hessian-vector products of the fused kernel (tiled) equal those of the plain-autograd backend."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2, 7, 3, generator=g, dtype=F64)
    v = torch.randn(2, 7, 3, generator=g, dtype=F64)
    hvps = []
    for backend, tile in (("autograd", None), ("fused", 2), ("fused", None)):
        x = w.clone().requires_grad_(True)
        e = hyperspherical_energy(x, s, half_space=half_space, angular=angular, backend=backend, tile_size=tile)
        (gx,) = torch.autograd.grad(e.sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad((gx * v).sum(), x)
        hvps.append(hv)
    assert hvps[0].abs().max() > 0
    for hv in hvps[1:]:
        assert_grad_close(hv, hvps[0], 1e-10)


def test_auto_backend_uses_fused_kernel(monkeypatch):
    calls = []
    original = _tiled._FusedPairEnergy.apply

    def counting_apply(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(_tiled._FusedPairEnergy, "apply", counting_apply)
    w = torch.randn(6, 3)
    hyperspherical_energy(w)
    hyperspherical_energy(w, backend="fused")
    assert len(calls) == 2
    hyperspherical_energy(w, backend="autograd")
    assert len(calls) == 2


def test_projected_batched_and_shared_projections():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(3, 6, 5, generator=g, dtype=F64)
    shared = torch.randn(4, 2, 5, generator=g, dtype=F64)
    per_group = torch.randn(3, 4, 2, 5, generator=g, dtype=F64)
    for backend in BACKENDS:
        for p, pick in ((shared, lambda b: shared), (per_group, lambda b: per_group[b])):
            out, grads = value_and_grad(partial(projected_energy, backend=backend), w, p)
            assert out.shape == (3,)
            ref, ref_grads = value_and_grad(
                lambda x, q, backend=backend: torch.stack(
                    [projected_energy(x[b], q if q.ndim == 3 else q[b], backend=backend) for b in range(3)]
                ),
                w,
                p,
            )
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=0)
            for a, b in zip(grads, ref_grads, strict=True):
                assert_grad_close(a, b, 1e-10)
            # the energy of one group is the mean over projections of the unprojected function
            e0 = torch.stack([hyperspherical_energy(w[0] @ pick(0)[c].T, half_space=True) for c in range(4)]).mean()
            torch.testing.assert_close(out[0], e0, rtol=1e-10, atol=0)  # batched vs per-projection summation order


# ---------------------------------------------------------------------------------------------------------------
# 3. The official fixtures (rmlin/CoMHE, TF float32)
# ---------------------------------------------------------------------------------------------------------------

LAYERS = ("first_3x3x3x16", "mid_3x3x16x32", "fc_1x1x64x10", "dup_3x3x8x12", "nearzero_3x3x8x12", "zero_1x1x24x6")
QUANTITIES = (
    "half_space_energy",
    "final_energy_x10",
    "plain_energy",
    "random_energy",
    "angle_energy_lr0",
    "adversarial_energy_lr0",
)
PROJECTED = ("random_energy", "angle_energy_lr0", "adversarial_energy_lr0")
DUP_ROWS = (2, 5)  # the identical neurons of `dup_3x3x8x12`


@pytest.fixture(scope="module")
def official():
    with np.load(FIXTURES / "official_energies.npz") as z:
        return {k: z[k] for k in z.files}


def official_quantity(name, weight, fx, layer, backend="auto"):
    """Our computation of the official quantity `name` for the weight tensor [out, in, kh, kw]."""
    neurons = weight.reshape(weight.shape[0], -1)
    dtype = weight.dtype
    if name == "half_space_energy":
        return hyperspherical_energy(neurons, 2, half_space=True, backend=backend)
    if name == "final_energy_x10":
        return 10 * hyperspherical_energy(neurons, 2, backend=backend)
    if name == "plain_energy":
        return hyperspherical_energy(neurons, "2", backend=backend)
    if name == "random_energy":
        p = torch.tensor(fx[f"{layer}/P_random"], dtype=dtype)
        return projected_energy(neurons, p, 2, half_space=True, backend=backend)
    if name in ("angle_energy_lr0", "adversarial_energy_lr0"):
        p = torch.tensor(fx[f"{layer}/P_learned"], dtype=dtype)[None]
        return projected_energy(neurons, p, 2, half_space=True, backend=backend)
    raise AssertionError(name)


def compute_official(fx, layer, name, dtype, backend):
    weight = torch.tensor(fx[f"{layer}/weight"], dtype=dtype)
    val, (grad,) = value_and_grad(lambda x: official_quantity(name, x, fx, layer, backend), weight)
    ref = torch.tensor(fx[f"{layer}/{name}"], dtype=F64)
    ref_grad = torch.tensor(fx[f"{layer}/{name}_grad"], dtype=F64)
    assert ref_grad.shape == weight.shape
    return val.double(), grad.double(), ref, ref_grad


@pytest.mark.parametrize("name", QUANTITIES)
@pytest.mark.parametrize("layer", [x for x in LAYERS if not x.startswith("dup")])
def test_official_fixtures(official, layer, name):
    # Measured: values within 2e-7 relative, gradients within 3e-5 of the largest entry (float64 and float32).
    for dtype in (F64, torch.float32):
        for backend in BACKENDS:
            val, grad, ref, ref_grad = compute_official(official, layer, name, dtype, backend)
            torch.testing.assert_close(val, ref, rtol=1e-4, atol=0, msg=f"{dtype} {backend}")
            assert_grad_close(grad, ref_grad, 1e-4)


@pytest.mark.parametrize("name", QUANTITIES)
def test_official_fixtures_dup_layer(official, name):
    """`dup_3x3x8x12`: neurons 2 and 5 are identical, and the official float32 run is dominated by cancellation.

    For the duplicate pair the true squared chord is exactly the eps bound 2·eps/n² (about 1.2e-4 in full space,
    about 1e-6..1e-5 after a projection, since ‖Pw‖² ≈ k‖w‖²), so a float32 Gram has a relative error of
    ~1e-3 (full space) to several percent (projected) on it, and the gradient, ∝ 1/D², twice that. The tolerances:

    * values: 5e-2 relative, the README's "a few percent" (measured in float64: 7e-5 full space, 5e-3 projected);
    * gradient rows other than 2 and 5 do not see the duplicate pair: the ordinary 1e-4 of their largest entry
      (measured 3e-7);
    * whole gradient, relative to the largest entry: 1e-2 in full space (measured 2e-3) and 1e-1 for the projected
      quantities (measured 2.4e-2 random, 5.5e-2 angle/adversarial: the official float32 noise, not ours);
    * direction: cosine similarity > 0.999 with the official gradient (measured 1 - cos <= 4e-4).

    Before the straight-through floor fix, pairs whose rounded 2 - 2c fell below the eps bound lost their gradient:
    in float32 the full-space duplicate gradient was 0 (100% error), and in float64 about half of the 20 random
    projections dropped it (51% error on random_energy). These tolerances catch both.
    """
    other = [i for i in range(12) if i not in DUP_ROWS]
    for backend in BACKENDS:
        val, grad, ref, ref_grad = compute_official(official, "dup_3x3x8x12", name, F64, backend)
        torch.testing.assert_close(val, ref, rtol=5e-2, atol=0)
        assert_grad_close(grad[other], ref_grad[other], 1e-4)
        assert_grad_close(grad, ref_grad, 1e-1 if name in PROJECTED else 1e-2)
        assert cosine(grad, ref_grad) > 0.999
        # the duplicate rows carry by far the largest gradient (it is what pushes them apart in norm)
        assert grad[list(DUP_ROWS)].norm() > 100 * grad[other].norm()


@pytest.mark.parametrize("name", QUANTITIES)
def test_official_fixtures_dup_layer_float32(official, name):
    """Our default float32 computation on the duplicate layer stays close to the official float32 one.

    Full space: 1e-2 on values and gradients (measured 7e-5 and 4e-3). Projected: float32 rounding dominates
    and differs between BLAS kernels, so only finiteness and direction are asserted (measured 1 - cos <= 4e-4).
    """
    for backend in BACKENDS:
        val, grad, ref, ref_grad = compute_official(official, "dup_3x3x8x12", name, torch.float32, backend)
        assert torch.isfinite(val) and torch.isfinite(grad).all()
        if name in PROJECTED:
            torch.testing.assert_close(val, ref, rtol=2e-1, atol=0)
            assert cosine(grad, ref_grad) > 0.99
        else:
            torch.testing.assert_close(val, ref, rtol=1e-2, atol=0)
            assert_grad_close(grad, ref_grad, 1e-2)


@pytest.mark.parametrize("filename", ["official_energies.npz", "README.md"])
def test_fixtures_identical_to_shared(filename):
    if not SHARED_FIXTURES.is_dir():
        pytest.skip("../shared/fixtures is not present (a plain clone of the repository)")
    assert (FIXTURES / filename).read_bytes() == (SHARED_FIXTURES / filename).read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# 4. gradcheck / gradgradcheck
# ---------------------------------------------------------------------------------------------------------------

GRADCHECK_VARIANTS = [(s, a, h) for s in (0, 1, 2) for a in (False, True) for h in (False, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s,angular,half_space", GRADCHECK_VARIANTS)
def test_gradcheck(s, angular, half_space, backend):
    g = torch.Generator().manual_seed(21)
    w = torch.randn(2, 5, 3, generator=g, dtype=F64, requires_grad=True)
    kw = dict(half_space=half_space, angular=angular, backend=backend, tile_size=2)
    assert torch.autograd.gradcheck(lambda x: hyperspherical_energy(x, s, **kw), (w,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("power,half_space", [(2, True), ("a1", False), (0, True)])
def test_gradcheck_projected(power, half_space, backend):
    g = torch.Generator().manual_seed(22)
    w = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    p = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    kw = dict(half_space=half_space, backend=backend)
    fixed_p, fixed_w = p.detach(), w.detach()
    assert torch.autograd.gradcheck(lambda x: projected_energy(x, fixed_p, power, **kw), (w,))
    assert torch.autograd.gradcheck(lambda q: projected_energy(fixed_w, q, power, **kw), (p,))
    assert torch.autograd.gradgradcheck(lambda x, q: projected_energy(x, q, power, **kw), (w, p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("power,half_space", [(2, True), ("a2", False), ("a0", True), (0, False)])
def test_gradgradcheck(power, half_space, backend):
    g = torch.Generator().manual_seed(23)
    w = torch.randn(5, 3, generator=g, dtype=F64, requires_grad=True)
    kw = dict(half_space=half_space, backend=backend, tile_size=2)
    assert torch.autograd.gradgradcheck(lambda x: hyperspherical_energy(x, power, **kw), (w,))


# ---------------------------------------------------------------------------------------------------------------
# 5. Invariances
# ---------------------------------------------------------------------------------------------------------------

INVARIANCE_VARIANTS = [(p, h) for p in (0, 2, 3.7, "a0", "a2") for h in (False, True)]


@pytest.mark.parametrize("power,half_space", INVARIANCE_VARIANTS)
def test_invariances(power, half_space):
    g = torch.Generator().manual_seed(31)
    n, d = 8, 5
    w = torch.randn(n, d, generator=g, dtype=F64)
    for backend in BACKENDS:

        def e(x, eps=1e-4, backend=backend):
            return hyperspherical_energy(x, power, half_space=half_space, eps=eps, backend=backend)

        base = e(w)
        # common rotation: exact even with eps (norms and inner products are preserved)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
        torch.testing.assert_close(e(w @ q), base, rtol=1e-10, atol=0)
        # permutation of the neurons: exact
        torch.testing.assert_close(e(w[torch.randperm(n, generator=g)]), base, rtol=1e-12, atol=0)
        # positive scaling of any neuron: exact only as eps -> 0
        scale = torch.rand(n, 1, generator=g, dtype=F64) * 10 + 0.1
        # (eps = 1e-24: the angular (w, -w) pairs of half-space MHE move by ~sqrt(eps) with the norm)
        torch.testing.assert_close(e(w * scale, eps=1e-24), e(w, eps=1e-24), rtol=1e-9, atol=0)
        # ... and with the default eps it does change (the eps semantics are really in force)
        assert not torch.allclose(e(w * 1e-2), base, rtol=1e-6, atol=0)
        # half-space energy of W is the plain energy of [W; -W] (exact identity, default eps), values and grads
        if half_space:
            for angular_flag in (False, True):
                kw = dict(angular=angular_flag, backend=backend)
                a, (ga,) = value_and_grad(partial(hyperspherical_energy, power=power, half_space=True, **kw), w)
                b, (gb,) = value_and_grad(lambda x, kw=kw: hyperspherical_energy(torch.cat([x, -x]), power, **kw), w)
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
                assert_grad_close(ga, gb, 1e-11)


@pytest.mark.parametrize("power", [2, "a0"])
def test_projected_invariances(power):
    g = torch.Generator().manual_seed(32)
    w = torch.randn(7, 6, generator=g, dtype=F64)
    p = torch.randn(4, 3, 6, generator=g, dtype=F64)
    for backend in BACKENDS:

        def e(q, eps=1e-4, backend=backend):
            return projected_energy(w, q, power, eps=eps, backend=backend)

        # scaling each projection by its own positive factor (eps -> 0)
        alpha = torch.tensor([0.1, 1.0, 3.0, 50.0], dtype=F64)[:, None, None]
        torch.testing.assert_close(e(p * alpha, eps=1e-24), e(p, eps=1e-24), rtol=1e-9, atol=0)
        # rotating each projected space (exact with eps) and permuting the projections
        r, _ = torch.linalg.qr(torch.randn(4, 3, 3, generator=g, dtype=F64))
        torch.testing.assert_close(e(r @ p), e(p), rtol=1e-10, atol=0)
        torch.testing.assert_close(e(p.flip(0)), e(p), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 6. Edge cases and validation
# ---------------------------------------------------------------------------------------------------------------


def all_variants():
    return [(p, h) for p in POWERS for h in (False, True)]


def test_single_neuron_raises():
    for x in (torch.randn(1, 4), torch.randn(3, 1, 4)):
        with pytest.raises(ValueError, match="at least 2 neurons"):
            hyperspherical_energy(x)
    with pytest.raises(ValueError, match="at least 2 neurons"):
        projected_energy(torch.randn(1, 4), torch.randn(2, 3, 4))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_degenerate_neurons_finite(dtype):
    """Duplicates, antipodal pairs, zero and near-zero neurons: finite values and gradients in every variant."""
    g = torch.Generator().manual_seed(41)
    w = torch.randn(7, 4, generator=g, dtype=dtype)
    w[1] = w[0]  # duplicate
    w[2] = -w[0]  # antipodal
    w[3] = 0.0  # zero
    w[4] = 1e-6 * w[5]  # near zero
    w[6] = 1e3 * w[5]  # large, parallel
    p = torch.randn(3, 2, 4, generator=g, dtype=dtype)
    for power, half_space in all_variants():
        for backend in BACKENDS:
            kw = dict(power=power, half_space=half_space, backend=backend)
            for fn in (partial(hyperspherical_energy, **kw), partial(projected_energy, projections=p, **kw)):
                val, (grad,) = value_and_grad(fn, w)
                assert torch.isfinite(val), (power, half_space, backend)
                assert torch.isfinite(grad).all(), (power, half_space, backend)
                assert grad.abs().max() > 0


def test_duplicates_keep_their_gradient():
    """An exact duplicate pair has a nonzero (radial) gradient f'(c)·eps·w/n⁴ per neuron, in float32 too.

    Regression: the floor of 2 - 2c at its eps bound used to zero the gradient whenever rounding landed below it.
    """
    g = torch.Generator().manual_seed(42)
    base = torch.randn(6, 5, generator=g, dtype=F64)
    w = torch.cat([base, base])  # six duplicate pairs
    for half_space in (False, True):
        ref, (ref_grad,) = value_and_grad(partial(brute_energy, power=2, half_space=half_space), w)
        for dtype, rel in ((F64, 1e-8), (torch.float32, 2e-2)):
            for backend in BACKENDS:
                kw = dict(half_space=half_space, backend=backend)
                val, (grad,) = value_and_grad(partial(hyperspherical_energy, power=2, **kw), w.to(dtype))
                torch.testing.assert_close(val.double(), ref, rtol=rel, atol=0)
                assert_grad_close(grad.double(), ref_grad, rel)


def test_antipodal_angular_finite_gradient():
    w = torch.tensor([[1.0, 2.0, -0.5], [-1.0, -2.0, 0.5], [0.3, -0.1, 0.7]], dtype=F64)
    for half_space in (False, True):
        ref, (ref_grad,) = value_and_grad(partial(brute_energy, power="a2", half_space=half_space), w)
        for backend in BACKENDS:
            fn = partial(hyperspherical_energy, power="a2", half_space=half_space, backend=backend)
            val, (grad,) = value_and_grad(fn, w)
            assert torch.isfinite(grad).all()
            torch.testing.assert_close(val, ref, rtol=1e-10, atol=0)
            assert_grad_close(grad, ref_grad, 1e-8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bad):
    w = torch.randn(4, 3)
    w[2, 1] = bad
    with pytest.raises(ValueError, match="NaN"):
        hyperspherical_energy(w)
    with pytest.raises(ValueError, match="NaN"):
        projected_energy(w, torch.randn(2, 2, 3))
    p = torch.randn(2, 2, 3)
    p[0, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN"):
        projected_energy(torch.randn(4, 3), p)
    # check_finite=False skips the check; the non-finite input propagates as NaN instead of a plausible number
    for half_space in (False, True):
        for backend in BACKENDS:
            out = hyperspherical_energy(w, half_space=half_space, check_finite=False, backend=backend)
            assert torch.isnan(out)
            assert torch.isnan(projected_energy(w, torch.randn(2, 2, 3), check_finite=False, backend=backend))


def test_projection_dim_at_least_d():
    g = torch.Generator().manual_seed(43)
    w = torch.randn(5, 3, generator=g, dtype=F64)
    for k in (3, 4, 10):
        p = torch.randn(2, k, 3, generator=g, dtype=F64)
        torch.testing.assert_close(projected_energy(w, p), brute_projected(w, p), rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_upcast(dtype):
    g = torch.Generator().manual_seed(44)
    w = torch.randn(9, 6, generator=g).to(dtype)
    p = torch.randn(3, 4, 6, generator=g).to(dtype)
    for power, half_space in (("2", True), ("a0", False), (0, True)):
        for backend in BACKENDS:
            out = hyperspherical_energy(w, power, half_space=half_space, backend=backend)
            assert out.dtype == torch.float32
            ref = hyperspherical_energy(w.float(), power, half_space=half_space, backend=backend)
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
            pout = projected_energy(w, p, power, half_space=half_space, backend=backend)
            assert pout.dtype == torch.float32
            pref = projected_energy(w.float(), p.float(), power, half_space=half_space, backend=backend)
            torch.testing.assert_close(pout, pref, rtol=1e-6, atol=0)
            x = w.clone().requires_grad_(True)
            hyperspherical_energy(x, power, half_space=half_space, backend=backend).backward()
            assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_autocast_computes_in_float32():
    g = torch.Generator().manual_seed(45)
    w = torch.randn(10, 7, generator=g)
    p = torch.randn(4, 3, 7, generator=g)
    for backend in BACKENDS:
        plain = hyperspherical_energy(w, half_space=True, backend=backend)
        pplain = projected_energy(w, p, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = hyperspherical_energy(w, half_space=True, backend=backend)
            pout = projected_energy(w, p, backend=backend)
        assert out.dtype == torch.float32 and pout.dtype == torch.float32
        torch.testing.assert_close(out, plain, rtol=1e-6, atol=0)
        torch.testing.assert_close(pout, pplain, rtol=1e-6, atol=0)


def test_dtypes():
    w = torch.randn(4, 3, dtype=F64)
    assert hyperspherical_energy(w).dtype == F64
    assert projected_energy(w, torch.randn(2, 2, 3, dtype=F64)).dtype == F64
    assert hyperspherical_energy(w.float()).dtype == torch.float32
    for bad in (torch.arange(12).reshape(4, 3), torch.ones(4, 3, dtype=torch.bool)):
        with pytest.raises(TypeError):
            hyperspherical_energy(bad)
    with pytest.raises(TypeError):
        hyperspherical_energy(np.ones((4, 3)))
    with pytest.raises(TypeError):
        projected_energy(torch.randn(4, 3), torch.ones(2, 2, 3, dtype=torch.int64))


def test_bad_shapes():
    for shape in ((5,), (2, 2, 3, 3), (), (4, 0)):
        with pytest.raises(ValueError):
            hyperspherical_energy(torch.randn(shape))


@pytest.mark.parametrize("power", [-1, -0.5, "b2", "", "-1", "inf", float("nan"), float("inf"), True, False, None])
def test_bad_power(power):
    with pytest.raises(ValueError, match="`power`"):
        hyperspherical_energy(torch.randn(4, 3), power)
    with pytest.raises(ValueError, match="`power`"):
        parse_power(power)


@pytest.mark.parametrize("eps", [0, 0.0, -1e-4, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="`eps`"):
        hyperspherical_energy(torch.randn(4, 3), eps=eps)
    with pytest.raises(ValueError, match="`eps`"):
        projected_energy(torch.randn(4, 3), torch.randn(2, 2, 3), eps=eps)


def test_bad_backend_and_tile_size():
    w = torch.randn(4, 3)
    for backend in ("cuda", "triton", "", None):
        with pytest.raises(ValueError, match="`backend`"):
            hyperspherical_energy(w, backend=backend)
    for tile in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`tile_size`"):
            hyperspherical_energy(w, tile_size=tile)


def test_messages_name_argument_bound_and_value():
    """One style in the functional core: `` `name` must be …, got … ``."""
    w = torch.randn(4, 3)
    with pytest.raises(
        ValueError, match=r"^`backend` must be one of 'auto', 'fused', 'autograd', 'compiled', got 'x'\.$"
    ):
        hyperspherical_energy(w, backend="x")
    with pytest.raises(ValueError, match=r"^`tile_size` must be None or an int >= 1, got 0\.$"):
        hyperspherical_energy(w, tile_size=0)
    with pytest.raises(ValueError, match=r"^`power` must be 0, a float > 0, or one of .*, got -1\.$"):
        hyperspherical_energy(w, -1)
    with pytest.raises(ValueError, match=r"^`power` must be .*, got None of type NoneType\.$"):
        parse_power(None)
    with pytest.raises(ValueError, match=r"^`eps` must be a finite float > 0, got 0\.$"):
        hyperspherical_energy(w, eps=0)
    with pytest.raises(ValueError, match=r"^`neurons` must hold at least 2 neurons \(rows\) per set .*, got shape"):
        hyperspherical_energy(w[:1])
    with pytest.raises(ValueError, match=r"^`neurons` must be finite, got NaN or Inf values"):
        hyperspherical_energy(torch.full((4, 3), float("nan")))
    with pytest.raises(TypeError, match=r"^`projections` must be a floating-point torch.Tensor, got list\.$"):
        projected_energy(w, [1.0])
    with pytest.raises(ValueError, match=r"^`projections` must have shape .* k >= 1 and d = 3 .*, got \(2, 4\)\.$"):
        projected_energy(w, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"^`projections` of shape \(G, C, k, d\) must come with .*, got projections"):
        projected_energy(w, torch.randn(2, 3, 2, 3))


def test_energy_module_keeps_its_public_names():
    """Every name imported from `functional.energy` anywhere in the repository still resolves there."""
    from lightning_comhe.functional import _power, energy, projection

    assert energy.parse_power is _power.parse_power and energy.OFFICIAL_POWERS is _power.OFFICIAL_POWERS
    assert energy.PowerLike is _power.PowerLike and energy.project_sets is projection.project_sets
    assert set(energy.Backend.__args__) == {"auto", "fused", "autograd", "compiled"}
    for name in energy.__all__:
        assert getattr(energy, name) is not None


def test_bad_projection_shapes():
    w, wg = torch.randn(5, 4), torch.randn(2, 5, 4)
    cases = [
        (w, torch.randn(3, 2, 5)),  # wrong d
        (w, torch.randn(2, 4)),  # missing C
        (w, torch.randn(1, 2, 2, 2, 4)),  # too many dims
        (w, torch.randn(2, 3, 2, 4)),  # per-group projections for unbatched neurons
        (wg, torch.randn(3, 3, 2, 4)),  # G mismatch
    ]
    for neurons, p in cases:
        with pytest.raises(ValueError, match="`projections`"):
            projected_energy(neurons, p)


# ---------------------------------------------------------------------------------------------------------------
# 7. Memory: the fused path keeps no N×N tensor
# ---------------------------------------------------------------------------------------------------------------


def saved_tensors_of_graph(out):
    """Every tensor the autograd graph of ``out`` saved for backward."""
    seen, stack, saved = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_") or attr == "saved_tensors":
                try:
                    value = getattr(node, attr)
                except RuntimeError:
                    continue
                values = value if isinstance(value, (tuple, list)) else (value,)
                saved.extend((type(node).__name__, v) for v in values if isinstance(v, torch.Tensor))
        stack.extend(fn for fn, _ in node.next_functions)
    return saved


def test_fused_saves_no_quadratic_tensor():
    n, k = 3000, 8
    g = torch.Generator().manual_seed(51)
    w = torch.randn(n, k, generator=g)
    results = {}
    for backend in BACKENDS:
        for half_space in (False, True):
            x = w.clone().requires_grad_(True)
            out = hyperspherical_energy(x, 2, half_space=half_space, backend=backend)
            saved = saved_tensors_of_graph(out)
            largest = max(t.numel() for _, t in saved)
            if backend == "fused":
                assert any("FusedPairEnergy" in name for name, _ in saved)
                assert largest <= 2 * n * k, f"a saved tensor has {largest} elements"
                assert sum(t.numel() for _, t in saved) < 10 * n * k
            else:
                assert largest >= n * n  # the detector sees N² tensors when they exist
            out.backward()
            results[backend, half_space] = (out.detach(), x.grad)
    for half_space in (False, True):
        (a, ga), (b, gb) = results["fused", half_space], results["autograd", half_space]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
        assert_grad_close(ga, gb, 1e-4)


def test_fused_tiles_bound_temporaries(monkeypatch):
    """With the default tile size no per-pair temporary of the forward or backward reaches N² elements."""
    n, k = 4096, 8
    sizes = []
    for fn_name in ("pair_terms", "pair_terms_and_grad"):
        original = getattr(_tiled, fn_name)

        def recording(c, *args, _original=original, **kwargs):
            sizes.append(c.numel())
            return _original(c, *args, **kwargs)

        monkeypatch.setattr(_tiled, fn_name, recording)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(52), requires_grad=True)
    hyperspherical_energy(x, 2, half_space=True).backward()
    assert torch.isfinite(x.grad).all()
    assert len(sizes) > 2 and max(sizes) <= _tiled._TILE_ELEMENTS < n * n


@pytest.mark.slow
def test_fused_large_n():
    n, k = 8192, 8
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(53), requires_grad=True)
    out = hyperspherical_energy(x, 2, half_space=True)
    assert max(t.numel() for _, t in saved_tensors_of_graph(out)) <= 2 * n * k
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    # random neurons in 8 dimensions: the energy is close to its value for independent uniform directions
    assert 0.3 < out.item() < 3.0


# ---------------------------------------------------------------------------------------------------------------
# 8. parse_power
# ---------------------------------------------------------------------------------------------------------------


def test_parse_power_official_strings():
    assert OFFICIAL_POWERS == STRING_POWERS
    for key, expected in STRING_POWERS.items():
        assert parse_power(key) == expected
        assert parse_power(key, angular=True) == (expected[0], True)
        assert parse_power(f"  {key.upper()} ") == expected
    assert parse_power("A2 ") == (2.0, True)


@pytest.mark.parametrize(
    "power,angular,expected",
    [
        (0, False, (0.0, False)),
        (2, False, (2.0, False)),
        (0.5, False, (0.5, False)),
        (3.7, True, (3.7, True)),
        ("1.5", False, (1.5, False)),
        (" 2.5 ", True, (2.5, True)),
        ("1e0", False, (1.0, False)),
        (np.float64(1.25), False, (1.25, False)),
    ],
)
def test_parse_power_numbers(power, angular, expected):
    s, ang = parse_power(power, angular)
    assert (s, ang) == expected
    assert isinstance(s, float) and isinstance(ang, bool)


def test_parse_power_bad_type():
    for bad in (None, [2], b"2", 2j):
        with pytest.raises(ValueError, match="`power`"):
            parse_power(bad)


# ---------------------------------------------------------------------------------------------------------------
# Extreme magnitudes: float32 rows whose squared norm overflows are normalized exactly, not treated as zero
# ---------------------------------------------------------------------------------------------------------------

SCALES = (1e-10, 1e-3, 1.0, 1e3, 1e10, 3e19, 1e25, 1e30)
MAGNITUDE_VARIANTS = [(2, False), (0, False), (2, True), ("a2", True), ("a0", False)]


@pytest.mark.parametrize("power,half_space", MAGNITUDE_VARIANTS)
def test_extreme_magnitudes_float32(power, half_space):
    g = torch.Generator().manual_seed(41)
    w = torch.randn(6, 5, generator=g, dtype=F64)
    values = {}
    for scale in SCALES:
        x = (scale * w).float()
        got, (grad,) = value_and_grad(partial(hyperspherical_energy, power=power, half_space=half_space), x)
        assert got.dtype == torch.float32 and torch.isfinite(got) and torch.isfinite(grad).all(), scale
        # the reference: the eps semantics in float64 (no overflow up to ~1e150), by the materialized autograd
        # formula (the double loop's arccos of the (w, -w) pairs is NaN once c rounds below -1)
        kw = dict(power=power, half_space=half_space, backend="autograd")
        ref, (ref_grad,) = value_and_grad(partial(hyperspherical_energy, **kw), x.double())
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=0, msg=f"scale {scale:g}")
        assert cosine(grad, ref_grad) > 1 - 1e-6, scale  # the gradient direction
        values[scale] = got.item()
    # where eps is negligible (‖w‖² ≫ eps) the energy is scale invariant: 3e19 · w gave 0.5 (all zero) before
    big = [values[s] for s in SCALES if s >= 1e3]
    assert max(big) - min(big) <= 1e-5 * abs(big[0])
    assert abs(values[1e30] - values[1e-10]) > 1e-3  # ... and at 1e-10 the eps semantics rule (c_ij ≈ 0)


def test_extreme_magnitudes_mixed_rows_and_expected_energy():
    from lightning_comhe.functional.expected import expected_projected_energy

    g = torch.Generator().manual_seed(42)
    w = torch.randn(7, 6, generator=g, dtype=F64)
    w[2] *= 1e30  # one huge row among ordinary ones (and one tiny one)
    w[5] *= 1e-12
    x = w.float()
    for fn in (
        hyperspherical_energy,
        partial(hyperspherical_energy, half_space=True),
        partial(expected_projected_energy, projection_dim=12),
    ):
        got, (grad,) = value_and_grad(fn, x)
        ref, (ref_grad,) = value_and_grad(fn, x.double())  # float64 does not overflow here
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=0)
        assert torch.isfinite(grad).all()
        # row by row (their gradients differ by 40 orders of magnitude); the tiny row is eps-dominated, where
        # float32 cannot resolve its (half-space: second-order) gradient, overflow or not
        for i in (0, 1, 2, 3, 4, 6):
            assert cosine(grad[i], ref_grad[i]) > 1 - 1e-5, i


def test_overflow_rescaling_keeps_ordinary_rows_bit_for_bit():
    g = torch.Generator().manual_seed(43)
    v = torch.randn(2, 9, 576, generator=g)
    scale = _tiled.overflow_scale(v)
    assert torch.equal(scale, torch.ones_like(scale))  # ordinary rows: factor exactly 1
    plain = _tiled.eps_normalize(v, 1e-4)
    assert plain[2] == 1e-4  # CPU: the plain path, eps untouched
    # the accelerator path always applies the factors; for ordinary rows that is the plain path bit for bit
    u, nrm2 = _tiled._normalize(v * scale[..., None], scale.square().mul_(1e-4), False)
    assert torch.equal(u, plain[0]) and torch.equal(nrm2, plain[1])
    v[1, 3] *= 1e25
    scale = _tiled.overflow_scale(v)
    assert scale[1, 3] == 2.0 ** -torch.frexp(v[1, 3].abs().max()).exponent and (scale == 1).sum() == 17


# ----------------------------------------------------------------------------------------------------------------
# Row blocks (one set's penalty split across ranks): fused tiles against the reference formula and brute force
# ----------------------------------------------------------------------------------------------------------------
def brute_rows(w, start, stop, power=2, *, half_space=False, angular=False, eps=1e-4):
    """The rows [start, stop) of the upper triangle, by a double Python loop, with the whole energy's normalization.

    Half-space: each pair (i, j) of W holds its four pairs of [W; -W], and each row i its antipodal pair (w_i, -w_i).
    """
    s, angular = effective_power(power, angular)
    n = w.shape[0]

    def term(x, y):
        c = (x * y).sum() / (torch.sqrt((x * x).sum() + eps) * torch.sqrt((y * y).sum() + eps))
        if angular:
            a = torch.acos(c) / math.pi + eps
            return -torch.log(a) if s == 0 else a ** (-s)
        d = 2 - 2 * c
        return -torch.log(d) if s == 0 else d ** (-s / 2)

    total = w.new_zeros(())
    for i in range(start, stop):
        for j in range(i + 1, n):
            total = total + (2 * term(w[i], w[j]) + 2 * term(w[i], -w[j]) if half_space else term(w[i], w[j]))
        if half_space:
            total = total + term(w[i], -w[i])
    return total / (n * (2 * n - 1) if half_space else n * (n - 1) / 2)


@pytest.mark.parametrize("power", [2, 0, 1, "a0", "a2"])
@pytest.mark.parametrize("half_space", [False, True])
def test_row_blocks_on_the_fused_tiles_equal_the_reference_and_brute_force(power, half_space) -> None:
    torch.manual_seed(3)
    w = torch.randn(2, 70, 7, dtype=torch.float64, requires_grad=True)
    blocks = [(0, 4), (4, 60), (60, 70)]  # a partition; tiles of 18 rows: the middle block spans four
    fused = hyperspherical_energy(w, power=power, half_space=half_space, rows=blocks)
    ref = hyperspherical_energy(w, power=power, half_space=half_space, rows=blocks, backend="autograd")
    assert fused.shape == (2, 3)
    for b, (start, stop) in enumerate(blocks):
        brute = brute_rows(w[1].detach(), start, stop, power, half_space=half_space)
        torch.testing.assert_close(fused[1, b], brute, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(fused, ref, atol=1e-13, rtol=1e-11)
    whole = hyperspherical_energy(w, power=power, half_space=half_space)
    torch.testing.assert_close(fused.sum(-1), whole, atol=1e-13, rtol=1e-11)  # the blocks sum to the energy
    weights = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, 3.0]], dtype=torch.float64)
    (g_fused,) = torch.autograd.grad((fused * weights).sum(), w)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), w)
    torch.testing.assert_close(g_fused, g_ref, atol=1e-13, rtol=1e-10)


def test_a_row_block_on_the_fused_tiles_is_twice_differentiable() -> None:
    torch.manual_seed(4)
    w = torch.randn(1, 9, 4, dtype=torch.float64, requires_grad=True)
    for half_space in (False, True):

        def fn(x, half_space=half_space):
            return hyperspherical_energy(x, rows=(2, 6), half_space=half_space, power="a1")

        assert torch.autograd.gradcheck(fn, (w,))
        assert torch.autograd.gradgradcheck(fn, (w,))
    with torch.no_grad():  # no gradient recorded in the forward: the backward recomputes the tiles
        plain = hyperspherical_energy(w, rows=(2, 6))
    torch.testing.assert_close(plain, hyperspherical_energy(w, rows=(2, 6), backend="autograd").detach())
