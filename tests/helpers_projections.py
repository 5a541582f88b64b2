"""Shared pieces of the projection tests (tests/test_projections*.py): random neuron sets, a stream of draws.

Usable from any test module as ``from tests.helpers_projections import ...``.
"""

import torch


def random_sets(seed=0, g=2, n=32, d=72, dtype=torch.float32):
    """``g`` seeded Gaussian sets of ``n`` neurons in ``R^d``, shape ``(g, n, d)``."""
    return torch.randn(g, n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def draw_steps(rp, key, steps, num_sets=2, d=7):
    """``steps`` times: ``rp.step()``, then a clone of the key's CPU projections; the list of them."""
    out = []
    for _ in range(steps):
        rp.step()
        out.append(rp.projections(key, num_sets=num_sets, d=d, device="cpu").clone())
    return out
