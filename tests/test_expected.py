"""Tests of `lightning_comhe.functional.expected`: closed forms, an independent scipy quadrature, Monte Carlo."""

import doctest
import math
import time

import numpy as np
import pytest
import torch

from lightning_comhe.functional import _expected_kernel as kernel_mod
from lightning_comhe.functional import _fisher
from lightning_comhe.functional import expected as expected_mod
from lightning_comhe.functional.energy import hyperspherical_energy, projected_energy
from lightning_comhe.functional.expected import ExpectedKernel, expected_kernel, expected_projected_energy

F64 = torch.float64
scipy_special = pytest.importorskip("scipy.special")
scipy_integrate = pytest.importorskip("scipy.integrate")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are small: one intra-op thread avoids the thread wake-ups that dominate on loaded cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------------------------


def pair_f(r, s, angular, eps=1e-4):
    """The library's pairwise term f(r), written out from the spec (numpy)."""
    if angular:
        a = np.arccos(np.clip(r, -1, 1)) / math.pi + eps
        return -np.log(a) if s == 0 else a ** (-s)
    d = 2 - 2 * r
    return -np.log(d) if s == 0 else d ** (-s / 2)


def scipy_term(c, k, s, angular, eps=1e-4):
    """g_k(c) = E[f(r) + f(-r) | c] from the density of the sample correlation (n = k + 1) with scipy's hyp2f1.

    E[f(r) | c] is integrated over φ = arccos r by QUADPACK, split at fractions of the peak φ ≈ arccos c. On the
    first piece the algebraic weight φ^α0 absorbs the non-integer part of the endpoint behaviour φ^(k-2-s) (the
    density is ∝ sin^(k-2) φ, the chordal term ∝ φ^-s); the chordal s = 0 (a log singularity) is covered by its closed
    form instead. E[f(-r) | c] is E[f(r) | -c].
    """
    n = k + 1
    log_c = math.log(n - 2) + math.lgamma(n - 1) - 0.5 * math.log(2 * math.pi) - math.lgamma(n - 0.5)
    alpha = k - 2 - (0 if angular else s)
    alpha0 = alpha - math.ceil(alpha)  # in (-1, 0]

    def one_sided(rho):
        def integrand(phi, weighted):
            phi = min(max(phi, 1e-300), math.pi - 1e-16)
            r = math.cos(phi)
            log_p = (
                log_c
                + (n - 1) / 2 * math.log1p(-rho * rho)
                + (k - 2) * math.log(math.sin(phi) / phi)  # (1 - r²)^((n-4)/2) sin φ = sin^(k-2) φ
                - (n - 1.5) * math.log1p(-rho * r)
                + math.log(scipy_special.hyp2f1(0.5, 0.5, n - 0.5, (1 + rho * r) / 2))
            )
            if angular:
                term = pair_f(r, s, True, eps)
                power = k - 2
            else:  # (2 - 2r)^(-s/2) = (φ / (2 sin(φ/2)))^s φ^-s
                term = (phi / (2 * math.sin(phi / 2))) ** s
                power = k - 2 - s
            return term * math.exp(log_p) * phi ** (power - (alpha0 if weighted else 0.0))

        theta = math.acos(rho)
        cuts = [0.0, theta / 4, theta / 2, theta, 2 * theta, math.pi]
        cuts = sorted({min(x, math.pi) for x in cuts})
        kw = {"epsabs": 0, "epsrel": 1e-13, "limit": 400}
        total = scipy_integrate.quad(integrand, cuts[0], cuts[1], args=(True,), weight="alg", wvar=(alpha0, 0), **kw)
        total = total[0]
        for lo, hi in zip(cuts[1:-1], cuts[2:], strict=True):
            total += scipy_integrate.quad(integrand, lo, hi, args=(False,), **kw)[0]
        return total

    return one_sided(c) + one_sided(-c)


def force_table(k, s):
    """A chordal kernel evaluated through the quadrature table even where a closed form exists."""
    ker = ExpectedKernel(k, float(s), False, 1e-4)
    ker._closed = False
    ker._table = _fisher.build_table(k, float(s), False, 0.0)
    return ker


def closed_s2(c, k):
    return (k - 2 + 2 * c * c) / ((k - 3) * (1 - c) * (1 + c))


def random_neurons(n, d, seed, dtype=F64, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if batch is None else (batch, n, d)
    w = torch.randn(shape, generator=g, dtype=dtype)
    w[..., 1, :] = w[..., 0, :] + 0.3 * w[..., 1, :]  # a close pair
    return w


# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------

C_GRID = torch.tensor([-0.95, -0.7, -0.3, 0.0, 0.2, 0.5, 0.9, 0.99], dtype=F64)


@pytest.mark.parametrize("k", [4, 5, 10, 40, 80])
def test_s2_closed_form_and_table_agree(k):
    c = torch.cat([torch.linspace(-0.999999, 0.999999, 1001, dtype=F64), C_GRID])
    ker, tab = expected_kernel(k, 2), force_table(k, 2)
    exact = closed_s2(c, k)
    torch.testing.assert_close(ker.term(c), exact, rtol=1e-13, atol=0)
    torch.testing.assert_close(tab.term(c), exact, rtol=1e-11, atol=0)  # quadrature + table
    torch.testing.assert_close(ker.correction(c), (k - 2 + 2 * c * c) / (k - 3), rtol=1e-14, atol=0)
    torch.testing.assert_close(tab.correction(c), ker.correction(c), rtol=1e-11, atol=0)
    one_m = (1 - c) * (1 + c)
    d_exact = (4 * c / (k - 3)) / one_m + (k - 2 + 2 * c * c) / (k - 3) * 2 * c / one_m**2
    torch.testing.assert_close(ker.derivative(c), d_exact, rtol=1e-11, atol=1e-12)
    scale = exact.abs() / (1 - c.abs())  # the natural scale of g'(c); the table's derivative is good to ~1e-9 of it
    assert ((tab.derivative(c) - d_exact).abs() / scale).max() < 1e-8


@pytest.mark.parametrize("k", [2, 3, 10, 40])
def test_s0_is_half_space_plus_digamma_constant(k):
    c = torch.cat([torch.linspace(-0.999999, 0.999999, 1001, dtype=F64), C_GRID])
    gap = scipy_special.digamma(k / 2) - scipy_special.digamma((k - 1) / 2)
    half = -torch.log(2 - 2 * c) - torch.log(2 + 2 * c)
    torch.testing.assert_close(expected_kernel(k, 0).term(c), half + gap, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(force_table(k, 0).term(c), half + gap, rtol=0, atol=1e-10)
    torch.testing.assert_close(expected_kernel(k, "0").correction(c), torch.full_like(c, gap), rtol=1e-12, atol=0)


CASES = [  # (power, k): k just above s + 1, moderate and official-size k, chordal and angular
    (0.5, 2),
    (1, 3),
    (1.5, 3),
    (3.7, 5),
    (3.7, 40),
    (1.5, 10),
    ("a0", 2),
    ("a1", 3),
    ("a2", 4),
    ("a2", 40),
    ("a1", 10),
]


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize(("power", "k"), CASES)
def test_kernel_matches_independent_scipy_quadrature(power, k):
    ker = expected_kernel(k, power)
    s, angular = ker.s, ker.angular
    ref = torch.tensor([scipy_term(float(c), k, s, angular) for c in C_GRID], dtype=F64)
    torch.testing.assert_close(ker.term(C_GRID), ref, rtol=1e-9, atol=0)


def test_measured_monte_carlo_values():
    # (1 - c²) E[1/(1 - r²)] for s = 2: the Monte Carlo measurements (k = 40: 1.027 -> 1.080; k = 10: 1.14
    # -> 1.43). For s = 2, f(r) + f(-r) = 1/(1 - r²), so this is the correction h_k(c).
    h40, h10 = expected_kernel(40, 2), expected_kernel(10, "2")
    c = torch.tensor([0.0, 0.99], dtype=F64)
    assert h40.correction(c).tolist() == pytest.approx([1.027, 1.080], abs=1e-3)
    assert h10.correction(c).tolist() == pytest.approx([1.14, 1.43], abs=1e-2)
    assert h10.correction(c).tolist() == pytest.approx([8 / 7, (8 + 2 * 0.99**2) / 7], rel=1e-14)
    # our own seeded Monte Carlo of the k = 10 value at c = 0.99 (exact: 1.42289; the 1.43 is within noise)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200_000, 10, generator=g, dtype=F64), torch.randn(200_000, 10, generator=g, dtype=F64)
    x, y = a, 0.99 * a + math.sqrt(1 - 0.99**2) * b
    r = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
    v = (1 - 0.99**2) / (1 - r * r)
    se = v.std().item() / math.sqrt(v.numel())
    assert abs(v.mean().item() - h10.correction(torch.tensor(0.99, dtype=F64)).item()) < 4 * se


@pytest.mark.parametrize("power", [2, 0, 1, 3.7, "a0", "a1", "a2", 0.5])
def test_even_in_c(power):
    ker = expected_kernel(12, power)
    c = torch.linspace(-1, 1, 4001, dtype=F64)
    assert torch.equal(ker.term(c), ker.term(-c))
    assert torch.equal(ker.correction(c), ker.correction(-c))
    torch.testing.assert_close(ker.derivative(c[1:-1]), -ker.derivative(-c[1:-1]), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("power", "k"), [(1.5, 3), (3.7, 5), ("a2", 4), ("a0", 2), ("a1", 40), (2, 10)])
def test_smooth_derivative_matches_finite_differences(power, k):
    ker = expected_kernel(k, power)
    c = torch.cat([torch.linspace(-0.999, 0.999, 777, dtype=F64), torch.tensor([1 - 1e-6, -1 + 1e-7], dtype=F64)])
    h = 1e-3 * (1 - c.abs()).clamp_max(0.01)  # 4th-order central differences
    t = [ker.term(c + j * h) for j in (-2, -1, 1, 2)]
    fd = (t[0] - 8 * t[1] + 8 * t[2] - t[3]) / (12 * h)
    scale = ker.term(c).abs() / (1 - c.abs())  # the natural scale of g'(c)
    rel = (fd - ker.derivative(c)).abs() / scale
    assert rel[:-2].max() < 1e-8 and rel[-2:].max() < 1e-6  # at 1 - |c| <= 1e-6 the differences lose digits
    # the table is C¹: no jump in value or slope at its knots (θ_j = θ(τ_j)), in float64 and in float32
    if not ker._closed:
        tab = ker._table
        knots = torch.as_tensor(_fisher._theta_of_tau(tab.tau0 + tab.dtau * np.arange(1, len(tab.coef)), tab.a, tab.b))
        lo, hi = knots * (1 - 1e-13), knots * (1 + 1e-13)
        (v_lo, d_lo), (v_hi, d_hi) = ker._lookup(lo, math.pi - lo), ker._lookup(hi, math.pi - hi)
        assert ((v_hi - v_lo).abs() / v_lo.abs().clamp_min(1)).max() < 1e-11
        assert ((d_hi - d_lo).abs() / d_lo.abs().max()).max() < 1e-9
    c32 = torch.linspace(-0.99, 0.99, 100_001)
    t32 = ker.term(c32)
    assert t32.dtype == torch.float32 and torch.isfinite(t32).all()
    torch.testing.assert_close(t32.double(), ker.term(c32.double()), rtol=3e-6, atol=0)


@pytest.mark.parametrize("power", [2, 1.5, "a2", 0])
def test_correction_is_bounded_with_finite_limits(power):
    ker = expected_kernel(6, power)
    c = torch.tensor([-1.0, -1 + 1e-12, 0.0, 1 - 1e-12, 1.0], dtype=F64)
    h = ker.correction(c)
    assert torch.isfinite(h).all()
    assert h[3].item() == pytest.approx(h[4].item(), rel=1e-3 if ker.angular else 1e-6)  # angular: eps scale
    if ker.s > 0:
        assert (h >= 1).all() and (h < 3).all()


def test_limit_at_c_one_is_the_chi_ratio_moment():
    # c -> 1: r ≈ 1 - (1 - c) Q/R² with R² ~ χ²_k, Q ~ χ²_{k-1}, so h_k(1) = E[(R²/Q)^(s/2)]
    for s, k in [(1.5, 3), (3.7, 6), (0.5, 10)]:
        lim = math.exp(
            math.lgamma((k + s) / 2) + math.lgamma((k - 1 - s) / 2) - math.lgamma(k / 2) - math.lgamma((k - 1) / 2)
        )
        assert expected_kernel(k, s).correction(torch.tensor(1.0, dtype=F64)).item() == pytest.approx(lim, rel=1e-9)


@pytest.mark.parametrize(
    ("power", "k", "bound"), [(2, 3, "3"), ("2", 2, "3"), (1.5, 2, "2.5"), (0, 1, "1"), ("a2", 3, "3"), ("a0", 1, "1")]
)
def test_divergent_expectation_raises(power, k, bound):
    match = rf"`projection_dim` must be > s \+ 1 = {bound} .*, got {k}\."
    with pytest.raises(ValueError, match=match):
        expected_kernel(k, power)
    with pytest.raises(ValueError, match=match):
        expected_projected_energy(torch.randn(4, 8), k, power)


def test_argument_validation():
    w = torch.randn(4, 8)
    for bad in (0, -3, 4.0, True, "40", None):
        with pytest.raises(ValueError, match=r"`projection_dim` must be an int >= 1, got "):
            expected_projected_energy(w, bad)
    with pytest.raises(ValueError, match="`power` must be"):
        expected_projected_energy(w, 40, "b2")
    with pytest.raises(ValueError, match="`power` must be"):
        expected_kernel(40, -1)
    for bad in (0, -1e-4, float("nan"), True):
        with pytest.raises(ValueError, match="`eps` must be"):
            expected_projected_energy(w, 40, eps=bad)
    with pytest.raises(ValueError, match="`neurons` must hold at least 2"):
        expected_projected_energy(torch.randn(1, 8), 40)
    with pytest.raises(ValueError, match="`neurons` must have shape"):
        expected_projected_energy(torch.randn(8), 40)
    with pytest.raises(TypeError, match="`neurons` must be a floating-point"):
        expected_projected_energy(torch.ones(4, 8, dtype=torch.long), 40)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="`neurons` .*NaN"):
        expected_projected_energy(w, 40)
    assert torch.isnan(expected_projected_energy(w, 40, check_finite=False))


def test_construction_is_fast_and_cached():
    kernel_mod._cached_kernel.cache_clear()
    t0 = time.perf_counter()
    ker = expected_kernel(37, "a1", eps=1e-4)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0  # ~0.05 s on one core
    assert expected_kernel(37, "a1") is ker and expected_kernel(37, 1, angular=True) is ker
    assert expected_kernel(37, 2) is expected_kernel(37, "2")
    assert expected_kernel(37, "a1", eps=1e-6) is not ker  # the angular kernel depends on eps
    assert "projection_dim=37" in repr(ker)


# ---------------------------------------------------------------------------------------------------------------
# The energy
# ---------------------------------------------------------------------------------------------------------------


class _IdentityKernel(ExpectedKernel):
    """H ≡ 1 (s > 0) or 0 (s = 0): the energy must reduce to half-space MHE, up to the self pairs."""

    def __init__(self, s, angular, eps):
        super().__init__(10**6, s, angular, eps)
        self._closed = False
        self._table = _fisher.build_table(4, 0.5, False, 0.0)  # any table; _lookup is replaced

    def _lookup(self, theta, theta_m):
        return torch.full_like(theta, 0.0 if self.s == 0 else 1.0), torch.zeros_like(theta)


@pytest.mark.parametrize("power", [2, 0, 1, 3.7, "a0", "a1", "a2"])
def test_identity_kernel_reduces_to_half_space_mhe(power, monkeypatch):
    eps = 1e-4
    w = random_neurons(9, 6, seed=3)
    w[2] = w[0]  # duplicate: the eps floor binds
    w[3] = -w[4]  # antipodal
    w[5] = 0.0  # zero neuron
    w[6] *= 1e-3  # near-zero
    s, angular = expected_kernel(10**6, power).s, expected_kernel(10**6, power).angular
    ker = _IdentityKernel(s, angular, eps)
    monkeypatch.setattr(expected_mod, "expected_kernel", lambda *args: ker)
    n = w.shape[0]
    mine = expected_projected_energy(w, 10**6, power, eps=eps)
    # replace our self pairs f(-1) by the library's f(-c_ii), c_ii = 1 - q_i
    q = eps / ((w * w).sum(1) + eps)
    d_far = 4 - 2 * q
    if angular:
        a = 2 * torch.atan2(d_far.sqrt(), (2 * q).sqrt()) / math.pi + eps
        diag = -torch.log(a) if s == 0 else a ** (-s)
    else:
        diag = -torch.log(d_far) if s == 0 else d_far ** (-s / 2)
    mine = mine + (diag.sum() - n * ker.self_term()) / (n * (2 * n - 1))
    ref = hyperspherical_energy(w, power, half_space=True, eps=eps)
    torch.testing.assert_close(mine, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("power", [2, 1.5, "a1", 0, "a0"])
def test_gradcheck_float64(power):
    w = random_neurons(5, 7, seed=1).requires_grad_(True)
    fn = lambda x: expected_projected_energy(x, 9, power)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w,), eps=1e-6, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradgradcheck(fn, (w,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_batched_equals_per_set_and_tiles_do_not_matter(monkeypatch):
    w = random_neurons(23, 11, seed=5, batch=3).requires_grad_(True)
    for power in (2, "a2", 1.5):
        batched = expected_projected_energy(w, 12, power)
        per_set = torch.stack([expected_projected_energy(w[g], 12, power) for g in range(3)])
        torch.testing.assert_close(batched, per_set, rtol=1e-13, atol=0)
        grad = torch.autograd.grad(batched.sum(), w)[0]
        with monkeypatch.context() as m:
            m.setattr(expected_mod, "_TILE_ELEMENTS", 50)  # one row per tile
            tiled = expected_projected_energy(w, 12, power)
            torch.testing.assert_close(tiled, batched, rtol=1e-13, atol=0)
            torch.testing.assert_close(torch.autograd.grad(tiled.sum(), w)[0], grad, rtol=1e-11, atol=1e-14)


def test_scale_invariance():
    w = random_neurons(8, 10, seed=7)
    for power in (2, "a1", 0.5):
        e1 = expected_projected_energy(w, 12, power, eps=1e-14)
        torch.testing.assert_close(expected_projected_energy(5.0 * w, 12, power, eps=1e-14), e1, rtol=1e-10, atol=0)
        e2 = expected_projected_energy(w, 12, power)  # the official eps moves it by O(eps/‖w‖²)
        torch.testing.assert_close(expected_projected_energy(5.0 * w, 12, power), e2, rtol=1e-4, atol=0)


def test_dtypes_and_no_grad():
    w = random_neurons(16, 9, seed=2)
    e64 = expected_projected_energy(w, 20, "a2")
    assert e64.dtype == F64 and e64.shape == ()
    e32 = expected_projected_energy(w.float(), 20, "a2")
    assert e32.dtype == torch.float32
    torch.testing.assert_close(e32.double(), e64, rtol=1e-5, atol=0)
    assert expected_projected_energy(w.bfloat16(), 20).dtype == torch.float32
    # gradient requested only after a no_grad forward is impossible; a plain backward works from a leaf
    x = w.float().requires_grad_(True)
    expected_projected_energy(x, 20, 1.5).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_large_n_float32_is_finite_and_close_to_float64():
    w = random_neurons(1500, 24, seed=11)
    w[7] = w[3]  # a duplicate among many
    e64 = expected_projected_energy(w, 40)
    x = w.float().requires_grad_(True)
    e32 = expected_projected_energy(x, 40)
    e32.backward()
    torch.testing.assert_close(e32.double(), e64, rtol=1e-4, atol=0)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("k", [4, 10, 40])
def test_s2_is_exactly_rescaled_half_space_mhe(k):
    # g_k(c) = (k (f(c) + f(-c)) - 2)/(k - 3): the expected energy is k/(k-3) half-space MHE minus a constant (up to
    # the self pairs, constant here and eps-dependent there: eps = 1e-12 makes that difference ~1e-12)
    w = random_neurons(10, 8, seed=9).requires_grad_(True)
    n = w.shape[0]
    e = expected_projected_energy(w, k, 2, eps=1e-12)
    half = hyperspherical_energy(w, 2, half_space=True, eps=1e-12)
    const = (-2 * 2 / (k - 3) * (n * (n - 1) / 2) + n / 4 * (1 - k / (k - 3))) / (n * (2 * n - 1))
    torch.testing.assert_close(e, k / (k - 3) * half + const, rtol=1e-12, atol=0)
    g_e, g_half = (torch.autograd.grad(x, w)[0] for x in (e, half))
    torch.testing.assert_close(g_e, k / (k - 3) * g_half, rtol=1e-10, atol=1e-12)


def test_close_to_half_space_for_large_k_and_above_it_for_small_k():
    w = random_neurons(12, 30, seed=4)
    half = hyperspherical_energy(w, 1.5, half_space=True)
    assert expected_projected_energy(w, 3000, 1.5).item() == pytest.approx(half.item(), rel=1e-3)
    assert expected_projected_energy(w, 5, 1.5) > expected_projected_energy(w, 40, 1.5) > half


MC_CASES = [(12, 2), (6, "a1"), (7, 1), (4, 0), (5, "a0"), (6, 0.5)]  # all k > 2s + 3: finite gradient variance


@pytest.mark.parametrize(("k", "power"), MC_CASES)
def test_matches_monte_carlo_of_projected_energy(k, power):
    n, d, batches, per_batch = 5, 16, 24, 200
    w = random_neurons(n, d, seed=13)
    g = torch.Generator().manual_seed(17)
    values, grads = [], []
    for _ in range(batches):
        p = torch.randn(per_batch, k, d, generator=g, dtype=F64)
        x = w.clone().requires_grad_(True)
        e = projected_energy(x, p, power)
        values.append(e.detach())
        grads.append(torch.autograd.grad(e, x)[0])
    values, grads = torch.stack(values), torch.stack(grads)
    x = w.clone().requires_grad_(True)
    exact = expected_projected_energy(x, k, power)
    exact_grad = torch.autograd.grad(exact, x)[0]
    z_value = (values.mean() - exact) / (values.std() / math.sqrt(batches))
    z_grad = (grads.mean(0) - exact_grad) / (grads.std(0) / math.sqrt(batches))
    assert abs(z_value.item()) < 4
    assert z_grad.abs().max().item() < 4.5
    assert z_grad.pow(2).mean().item() < 2.0  # ≈ 1.1 for unbiased estimates (t with batches - 1 dof)


@pytest.mark.slow
@pytest.mark.parametrize(("k", "power"), [(40, 2), (10, 2), (10, "a2"), (12, 3.7), (20, 1.5)])
def test_matches_monte_carlo_of_projected_energy_official_sizes(k, power):
    n, d, batches, per_batch = 12, 72, 40, 500
    w = random_neurons(n, d, seed=19)
    g = torch.Generator().manual_seed(23)
    values = torch.stack(
        [projected_energy(w, torch.randn(per_batch, k, d, generator=g, dtype=F64), power) for _ in range(batches)]
    )
    exact = expected_projected_energy(w, k, power)
    assert abs(((values.mean() - exact) / (values.std() / math.sqrt(batches))).item()) < 4


def test_doctests():
    assert doctest.testmod(expected_mod, raise_on_error=False).failed == 0
