"""Tests of `lightning_comhe.functional._pairwise`: the in-place tile formulas against the reference formula.

`tests/test_energy.py` checks the public functions against brute force; here every internal shortcut of the pairwise
terms is checked against the reference formula it replaces, so that a regression is located precisely.
"""

import pytest
import torch

from lightning_comhe.functional import _pairwise as P

F64 = torch.float64
POWERS = (0.0, 0.5, 1.0, 2.0, 3.7)
VARIANTS = [(s, angular, half) for s in POWERS for angular in (False, True) for half in (False, True)]
VARIANT_IDS = [f"s{s}-{'ang' if a else 'chord'}-{'half' if h else 'plain'}" for s, a, h in VARIANTS]


def tile(seed, shape=(3, 5, 9), bound=0.95, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    c = (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * bound
    qr = torch.rand(shape[0], shape[1], 1, generator=g, dtype=dtype) * 1e-3
    qc = torch.rand(shape[0], 1, shape[2], generator=g, dtype=dtype) * 1e-3
    return c, qr, qc


@pytest.mark.parametrize("s,angular,half_space", VARIANTS, ids=VARIANT_IDS)
def test_fast_tile_formulas_match_reference(s, angular, half_space):
    c, qr, qc = tile(0)
    b = qr + qc
    lazy = P.LazyBound(qr, qc)
    assert not P.floor_may_bind(c, lazy, half_space or angular)  # so the fast formulas are the ones under test
    ref_value = P.reference_terms(c, b, s, angular, half_space, 1e-4)
    _, ref_grad = P.reference_terms_and_grad(c, b, s, angular, half_space, 1e-4, False)
    scratch = P.Scratch(c)

    value = P.pair_terms(c.clone(), lazy, s, angular, half_space, 1e-4, inplace=True, scratch=scratch)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0)
    none, grad = P.pair_terms_and_grad(c.clone(), lazy, s, angular, half_space, 1e-4, False, inplace=True)
    assert none is None
    torch.testing.assert_close(grad, ref_grad, rtol=1e-11, atol=1e-300)
    value2, grad2 = P.pair_terms_and_grad(
        c.clone(), lazy, s, angular, half_space, 1e-4, True, inplace=True, scratch=scratch
    )
    torch.testing.assert_close(value2, ref_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad2, ref_grad, rtol=1e-11, atol=1e-300)


@pytest.mark.parametrize("s,angular,half_space", VARIANTS, ids=VARIANT_IDS)
def test_fast_tile_formulas_float32(s, angular, half_space):
    c, qr, qc = tile(1, dtype=torch.float32)
    lazy = P.LazyBound(qr, qc)
    ref_value = P.reference_terms(c.double(), (qr + qc).double(), s, angular, half_space, 1e-4)
    _, ref_grad = P.reference_terms_and_grad(c.double(), (qr + qc).double(), s, angular, half_space, 1e-4, False)
    value, grad = P.pair_terms_and_grad(c.clone(), lazy, s, angular, half_space, 1e-4, True, inplace=True)
    # log terms pass through 0, so the tolerance has an absolute part relative to the largest term
    torch.testing.assert_close(value.double(), ref_value, rtol=2e-5, atol=2e-6 * ref_value.abs().max().item())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-4, atol=1e-6 * ref_grad.abs().max().item())


@pytest.mark.parametrize("half_space", [False, True])
def test_floor_binding_tile_takes_the_reference_path(half_space):
    """A tile where 2 - 2c falls below its bound (a duplicate pair) gives exactly the reference values."""
    c, qr, qc = tile(2)
    c[1, 2, 3] = 1 - 0.4 * (qr[1, 2, 0] + qc[1, 0, 3]).item()  # 2 - 2c < b: the floor binds
    if half_space:
        c[0, 1, 1] = -1.0 + 1e-12  # and 2 + 2c < b
    lazy = P.LazyBound(qr, qc)
    assert P.floor_may_bind(c, lazy, True)
    for s, angular in ((2.0, False), (0.0, True), (1.0, False)):
        ref = P.reference_terms(c, qr + qc, s, angular, half_space, 1e-4)
        _, ref_grad = P.reference_terms_and_grad(c, qr + qc, s, angular, half_space, 1e-4, False)
        out = P.pair_terms(c.clone(), lazy, s, angular, half_space, 1e-4, inplace=True)
        _, grad = P.pair_terms_and_grad(c.clone(), lazy, s, angular, half_space, 1e-4, False, inplace=True)
        assert torch.equal(out, ref) and torch.equal(grad, ref_grad)


def test_floor_check_is_exact_and_conservative():
    c = torch.tensor([[[0.5, 0.875]]], dtype=F64)  # dyadic values: every quantity below is exact
    qr, qc = torch.tensor([[[0.125]]], dtype=F64), torch.tensor([[[0.0625, 0.125]]], dtype=F64)
    # max b = 0.25 and 2 - 2·0.875 = 0.25: the floor cannot change anything (max(x, b) = x at equality)
    assert not P.floor_may_bind(c, P.LazyBound(qr, qc), False)
    assert not P.floor_may_bind(c, P.LazyBound(qr, qc, 0.25), False)
    assert P.floor_may_bind(c, P.LazyBound(qr, qc, 0.25 + 2**-40), False)
    assert P.floor_may_bind(c, qr + qc + 2**-40, False)
    # the minus side: 2 + 2c must clear the bound too
    assert P.floor_may_bind(-c, P.LazyBound(qr, qc, 0.25 + 2**-40), True)
    assert not P.floor_may_bind(-c, P.LazyBound(qr, qc, 0.25), True)
    # NaN never takes the fast path; off the CPU the exact floor is always applied (no host synchronisation)
    assert P.floor_may_bind(torch.full((1, 1, 2), float("nan"), dtype=F64), P.LazyBound(qr, qc), True)
    assert P.floor_may_bind(torch.zeros(1, 1, 2, device="meta"), P.LazyBound(qr, qc), True)


def test_scratch_buffers_are_reused():
    scratch = P.Scratch(torch.zeros(1))
    a = scratch.get(0, (2, 3, 4))
    b = scratch.get(0, (1, 2, 3))
    assert a.is_contiguous() and b.is_contiguous() and a.data_ptr() == b.data_ptr()
    assert scratch.get(1, (2, 2)).data_ptr() != a.data_ptr()


def test_straight_through_floor_keeps_the_unclamped_derivative():
    x = torch.tensor([0.5, 1e-9, 2.0], dtype=F64, requires_grad=True)
    b = torch.tensor([1e-3, 1e-3, 1e-3], dtype=F64)
    y = P.straight_through_floor(x, b)
    assert torch.equal(y.detach(), torch.maximum(x.detach(), b))
    (g,) = torch.autograd.grad((y * torch.tensor([1.0, 2.0, 3.0], dtype=F64)).sum(), x)
    assert torch.equal(g, torch.tensor([1.0, 2.0, 3.0], dtype=F64))  # the clamped entry keeps its gradient
    assert torch.isnan(P.straight_through_floor(torch.tensor([float("nan")]), torch.tensor([1.0]))).all()


def test_lazy_bound_materialises_to_the_sum():
    _, qr, qc = tile(3)
    assert torch.equal(P.bound_tensor(P.LazyBound(qr, qc)), qr + qc)
    dense = qr + qc
    assert P.bound_tensor(dense) is dense


@pytest.mark.parametrize("s", POWERS)
def test_term_derivatives_match_autograd(s):
    x = torch.linspace(0.05, 3.5, 17, dtype=F64, requires_grad=True)
    for term, dterm in ((P.chord_term, P.chord_dterm), (P.angle_term, P.angle_dterm)):
        (g,) = torch.autograd.grad(term(x, s).sum(), x)
        torch.testing.assert_close(dterm(x.detach(), s), g, rtol=1e-13, atol=0)
