"""Tests of `lightning_comhe.functional.projection`: the batched projection op ``P_g W_gᵀ``."""

import torch

from lightning_comhe import functional
from lightning_comhe.functional import energy
from lightning_comhe.functional.projection import project_sets

F64 = torch.float64


def test_project_sets_equals_einsum_and_is_exported():
    g = torch.Generator().manual_seed(0)
    w, p = torch.randn(3, 5, 8, generator=g, dtype=F64), torch.randn(3, 4, 8, generator=g, dtype=F64)
    out = project_sets(w, p)
    assert out.shape == (3, 4, 5)
    torch.testing.assert_close(out, torch.einsum("gnd,gmd->gmn", w, p), rtol=1e-13, atol=1e-14)
    assert functional.project_sets is project_sets and energy.project_sets is project_sets


def test_project_sets_gradients_twice_in_both_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 4, 3, generator=g, dtype=F64, requires_grad=True)
    p = torch.randn(2, 5, 3, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(project_sets, (w, p))
    assert torch.autograd.gradgradcheck(project_sets, (w, p))


def test_project_sets_needs_only_the_requested_gradients():
    w = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    p = torch.randn(2, 5, 3, dtype=F64)
    (gw,) = torch.autograd.grad(project_sets(w, p).sum(), w)
    torch.testing.assert_close(gw, p.sum(1, keepdim=True).expand(2, 4, 3), rtol=1e-13, atol=1e-14)
