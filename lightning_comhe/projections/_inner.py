"""The inner steps of a learned projection's fit: ``steps`` SGD steps on ``P`` against fixed neurons. Pure PyTorch.

Two paths with the same result (up to float reassociation):

* :func:`sgd_steps`: for the side optimizer the library creates (``torch.optim.SGD`` on ``P`` alone, no momentum),
  ``torch.optim.SGD``'s update applied in place, op for op, with the objective's value and ``∇_P`` from a closed
  form (no autograd graph through the projection). The optimizer keeps no state, so its ``state_dict`` is unchanged.
* :func:`optimizer_steps`: any other (restored) optimizer steps itself, with the gradient from autograd.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["is_plain_sgd", "optimizer_steps", "sgd_steps"]

#: ``value_and_grad(neurons, context, P) -> (objective per set, ∇_P objective)``.
ValueAndGrad = Callable[[Tensor, Any, Tensor], tuple[Tensor, Tensor]]


def is_plain_sgd(opt: torch.optim.Optimizer, p: Tensor) -> bool:
    """Whether ``opt`` is the library's side optimizer: one group holding ``p``, SGD without momentum."""
    if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
        return False
    group = opt.param_groups[0]
    params = group["params"]
    return len(params) == 1 and params[0] is p and group["momentum"] == 0 and not group.get("differentiable", False)


def sgd_steps(
    p: Tensor, w: Tensor, context: Any, value_and_grad: ValueAndGrad, opt: torch.optim.SGD, steps: int, lr: float
) -> Tensor:
    """``steps`` in-place SGD updates of ``p`` (``steps >= 1``); returns the objective per set before the first."""
    (group,) = opt.param_groups
    wd, maximize = float(group["weight_decay"]), bool(group["maximize"])
    before: Tensor | None = None
    with torch.no_grad():
        for _ in range(steps):
            value, grad = value_and_grad(w, context, p.detach().to(w.dtype))
            if before is None:
                before = value
            grad = grad.to(p.dtype)
            # torch.optim.SGD's update without momentum: g <- -g (maximize), g <- g + wd·P, P <- P - lr·g
            if maximize:
                grad.neg_()
            if wd != 0:
                grad.add_(p, alpha=wd)
            p.add_(grad, alpha=-lr)
    assert before is not None
    return before


def optimizer_steps(
    p: Tensor,
    w: Tensor,
    objective: Callable[[Tensor, Tensor], Tensor],
    opt: torch.optim.Optimizer,
    steps: int,
    lr: float,
) -> Tensor:
    """``steps`` calls of ``opt.step()`` at learning rate ``lr`` (restored afterwards); the objective before them."""
    saved_lr = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = lr
    before: Tensor | None = None
    try:
        for _ in range(steps):
            with torch.enable_grad():
                obj = objective(w, p)
                (grad,) = torch.autograd.grad(obj.sum(), p)
            if before is None:
                before = obj.detach()
            p.grad = grad.to(p.dtype)
            opt.step()
            p.grad = None
    finally:
        for group, value in zip(opt.param_groups, saved_lr, strict=True):
            group["lr"] = value
    assert before is not None
    return before
