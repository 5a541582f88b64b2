"""Shared pieces of the energy-kernel tests (tests/test_tiled.py, tests/test_compiled.py): gradients, degenerate sets.

Usable from any test module as ``from tests.helpers_energy import ...``.
"""

import torch

F64 = torch.float64


def value_and_grad(fn, x):
    """``fn(x)`` (detached) and the gradient of its sum with respect to a fresh leaf copy of ``x``."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


def degenerate_batch(seed=4, b=5, n=13, d=6):
    """``b`` float64 sets of ``n`` neurons in ``R^d``; sets 1-4 hold a duplicate, antipodal, zero, near-zero neuron."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(b, n, d, generator=g, dtype=F64)
    w[1, 7] = w[1, 2]  # duplicate: the floor binds in the tiles holding it
    w[2, 4] = -w[2, 9]  # antipodal
    w[3, 0] = 0.0  # zero neuron: large bound q = 1
    w[4, 5] = 1e-5 * w[4, 6]  # near zero
    return w
