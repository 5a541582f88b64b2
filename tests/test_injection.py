"""GradientInjection: a gradient it cannot deliver is an error that says why, not a silent shape mismatch."""

import pytest
import torch

from lightning_comhe._injection import GradientInjection


def test_an_undeliverable_gradient_of_a_placeholder_is_a_clear_error() -> None:
    """A parameter whose storage lives elsewhere (a ZeRO-3 placeholder) and that the backward never reached."""
    w = torch.zeros(0, requires_grad=True)  # what a ZeRO-3 parameter looks like outside its forward
    other = torch.ones(3, requires_grad=True)
    loss = other.sum()
    inj = GradientInjection()
    inj.arm_gradients(loss, [(w, torch.ones(2, 3))])
    loss.backward()
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\) could not be delivered.*shape \(0,\).*HINT"):
        inj.finish()
    assert not inj.armed and w.grad is None


def test_a_delivery_function_places_its_addend_in_the_backward_and_is_refused_after_it() -> None:
    """A gradient given as a function of the incoming gradient (a ZeRO-3 partition's slice, placed ×W)."""
    from lightning_comhe._gathered import ZeroPartitionGradient

    w = torch.arange(5.0, requires_grad=True)
    loss = (w * w).sum()
    inj = GradientInjection()
    # rank 1 of 2, partitions of 3 elements: its slice covers elements 3..4 (and one pad)
    inj.arm_gradients(loss, [(w, ZeroPartitionGradient(torch.tensor([1.0, 2.0, 9.0]), 1, 2, w.shape))])
    loss.backward()
    inj.finish()
    assert torch.equal(w.grad, 2 * w.detach() + torch.tensor([0.0, 0.0, 0.0, 2.0, 4.0]))
    unused = torch.ones(2, requires_grad=True)
    inj.arm_gradients(
        loss.detach().requires_grad_(), [(unused, ZeroPartitionGradient(torch.ones(1), 0, 2, unused.shape))]
    )
    with pytest.raises(RuntimeError, match=r"could not be delivered.*not reached.*HINT"):
        inj.finish()
