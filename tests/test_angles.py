"""Tests of `lightning_comhe.functional.angles` not in `tests/test_projections.py`: messages, identities and the
closed-form value and gradient of the inner fit."""

import re

import pytest
import torch

from lightning_comhe.functional.angles import angle_objective, angle_target, angle_value_and_grad, eps_cosine

F64 = torch.float64


def test_eps_cosine_diagonal_and_zero_neuron():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=F64)
    c = eps_cosine(w, eps=1e-4)
    torch.testing.assert_close(c.diagonal(), torch.tensor([25 / (25 + 1e-4), 0.0, 1 / (1 + 1e-4)], dtype=F64))
    assert torch.equal(c[1], torch.zeros(3, dtype=F64)) and torch.equal(c, c.T)


def test_angle_objective_shared_projection_equals_per_set():
    g = torch.Generator().manual_seed(0)
    w, p = torch.randn(3, 7, 10, generator=g, dtype=F64), torch.randn(4, 10, generator=g, dtype=F64)
    shared = angle_objective(w, p)
    per_set = angle_objective(w, p.expand(3, 4, 10))
    torch.testing.assert_close(shared, per_set, rtol=1e-13, atol=0)
    assert shared.shape == (3,) and torch.equal(angle_objective(w[0], p), shared[0])


def test_angle_objective_messages_name_argument_bound_and_value():
    w = torch.randn(5, 4)
    with pytest.raises(TypeError, match=r"^`projection` must be a floating-point torch.Tensor, got list\.$"):
        angle_objective(w, [[1.0]])
    expected = re.escape(
        "`projection` must have shape (k, d) or (G, k, d) with k >= 1 and d = 4 (the neuron dimension)"
    )
    with pytest.raises(ValueError, match=rf"^{expected}, got \(3, 6\)\.$"):
        angle_objective(w, torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"^`projection` of shape \(G, k, d\) must come with `neurons` .*, got "):
        angle_objective(w, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"^`eps` must be a finite float > 0, got -1\.0\.$"):
        eps_cosine(w, eps=-1.0)
    with pytest.raises(ValueError, match=r"^`neurons` must have shape \(N, d\) or \(G, N, d\) .*, got shape \(5,\)\.$"):
        eps_cosine(torch.randn(5))


@pytest.mark.parametrize("shape", [(2, 6, 40), (2, 40, 6)])  # d > N: from the Gram; d <= N: normalised rows first
def test_eps_cosine_both_forms_match_the_definition_and_are_symmetric(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g, dtype=F64)
    w[1, 0] = 0.0  # a zero neuron: zero row and column
    n = (w.pow(2).sum(-1, keepdim=True) + 1e-4).sqrt()
    expected = (w @ w.transpose(1, 2)) / (n * n.transpose(1, 2))
    c = eps_cosine(w)
    torch.testing.assert_close(c, expected, rtol=1e-13, atol=1e-15)
    assert torch.equal(c, c.transpose(1, 2)) and torch.equal(c[1, 0], torch.zeros(shape[1], dtype=F64))


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-11), (torch.float32, 2e-4)])
@pytest.mark.parametrize("shape", [(3, 12, 40, 5), (2, 30, 8, 3)])
def test_angle_value_and_grad_equals_the_objective_and_its_autograd_gradient(shape, dtype, tol):
    g, n, d, k = shape
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(g, n, d, generator=gen, dtype=dtype)
    p = torch.randn(g, k, d, generator=gen, dtype=dtype)
    target = angle_target(w)
    torch.testing.assert_close(target, eps_cosine(w), rtol=0, atol=0)
    value, grad = angle_value_and_grad(w, target, p)
    leaf = p.clone().requires_grad_(True)
    ref = angle_objective(w, leaf)
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaf)
    torch.testing.assert_close(value, ref.detach(), rtol=tol, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())
    assert value.shape == (g,) and grad.shape == (g, k, d) and not grad.requires_grad


def test_angle_value_and_grad_of_a_perfect_projection_is_zero():
    w = torch.randn(1, 5, 7, dtype=F64, generator=torch.Generator().manual_seed(3))
    value, grad = angle_value_and_grad(w, angle_target(w), torch.eye(7, dtype=F64)[None])
    assert value.item() < 1e-12 and torch.isfinite(grad).all()
    exact = torch.zeros(1, 3, 3, dtype=F64)
    value, grad = angle_value_and_grad(exact, angle_target(exact), torch.randn(1, 2, 3, dtype=F64))
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))  # zero norm: zero gradient, as autograd
