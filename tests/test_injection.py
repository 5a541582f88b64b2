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
