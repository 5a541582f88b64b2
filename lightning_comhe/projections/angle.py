r"""Learned angle-preserving projections of AP-CoMHE (Lin et al., CVPR 2020, algorithm §3). Pure PyTorch."""

from typing import Any

from torch import Tensor

from lightning_comhe.functional.angles import angle_objective, angle_target, angle_value_and_grad
from lightning_comhe.projections.learned import LearnedProjection

__all__ = ["AngleProjection"]


class AngleProjection(LearnedProjection):
    r"""Learned angle-preserving projections of AP-CoMHE.

    One learnable :math:`P \in \mathbb{R}^{k \times d}` (``k = dim``) per neuron set, initialised with
    :math:`\mathcal{N}(0, 1)` entries from the key's own generator, and fitted by a side optimizer
    ``torch.optim.SGD([P], lr=lr, weight_decay=weight_decay)`` (plain SGD, no momentum: the official optimizer with
    the decay ``1e-3 · 5e-4 = 5e-7``) to minimise the angle-preservation objective
    (:func:`~lightning_comhe.functional.angles.angle_objective`)

    .. math::

        L(W, P) = \big\| C(W P^\top) - C(W) \big\|_F

    summed over the sets of a group. Per optimizer step the official loop runs ``steps`` SGD steps (:meth:`fit`,
    with the model's current learning rate), then the regularizer uses the half-space energy of
    :math:`W \tilde P^\top` with the look-ahead :math:`\tilde P = P - \eta \nabla_P L(W, P)` (:meth:`projections`,
    ``lookahead="second"`` being the official, differentiated-through variant). ``P`` is never updated by the
    model's optimizer.

    Args:
        dim: ``k``, the dimension of the projected space (official: 30).
        steps: SGD steps per :meth:`fit` call (official, and ``None``: 1). ``0`` keeps the initial Gaussian ``P``.
        lr: The side optimizer's learning rate ``> 0`` (and the look-ahead step), unless a call passes ``lr``.
        weight_decay: The side optimizer's L2 decay on ``P`` (official: ``5e-7``).
        lookahead: ``"none"`` (use ``P``), ``"first"`` (look-ahead, no gradient to ``W`` through it) or
            ``"second"`` (look-ahead differentiated with respect to ``W``, as the official code).
        seed: Seed ``>= 0`` of the per-key generators that initialise ``P``.

    Raises:
        ValueError: If an argument is out of its allowed range.

    Example::

        >>> import torch
        >>> from lightning_comhe.functional import projected_energy
        >>> ap = AngleProjection(dim=30, steps=1, lookahead="second", seed=0)
        >>> w = torch.randn(1, 32, 72, requires_grad=True)  # one set of 32 neurons in R^72
        >>> before = ap.fit("layer1", w, lr=0.1)  # angle objective per set, before the step
        >>> p = ap.projections("layer1", w, lr=0.1)
        >>> p.shape, before.shape
        (torch.Size([1, 1, 30, 72]), torch.Size([1]))
        >>> projected_energy(w, p, half_space=True).sum().backward()
        >>> w.grad.shape
        torch.Size([1, 32, 72])
    """

    _maximize = False
    _default_steps = 1

    def _objective(self, neurons: Tensor, p: Tensor) -> Tensor:
        return angle_objective(neurons, p)

    def _fit_context(self, neurons: Tensor) -> Tensor:
        return angle_target(neurons)  # C(W): once per fit, not once per inner step

    def _value_and_grad(self, neurons: Tensor, context: Any, p: Tensor) -> tuple[Tensor, Tensor]:
        return angle_value_and_grad(neurons, context, p)
