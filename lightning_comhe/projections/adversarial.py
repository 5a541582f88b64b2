r"""Learned adversarial projections of adversarial-projection CoMHE (algorithm §4). Pure PyTorch."""

from typing import Any

import torch
from torch import Tensor

from lightning_comhe.functional._device import autocast_off
from lightning_comhe.functional.energy import hyperspherical_energy, projected_energy
from lightning_comhe.functional.projection import project_sets
from lightning_comhe.projections.learned import LearnedProjection

__all__ = ["AdversarialProjection"]


class AdversarialProjection(LearnedProjection):
    r"""Learned adversarial projections of adversarial-projection CoMHE.

    One learnable :math:`P \in \mathbb{R}^{k \times d}` per neuron set (:math:`\mathcal{N}(0, 1)` init from the key's
    generator), fitted by gradient **ascent** on the full-space projected energy

    .. math::

        E_\text{full}(W, P) = E\big(W P^\top\big) \quad (\text{plain } s = 2 \text{ MHE, } N \text{ neurons})

    with ``torch.optim.SGD([P], lr, weight_decay=weight_decay, maximize=True)``. PyTorch negates the gradient before
    adding the decay term, so one step is :math:`P \leftarrow P + \eta(\nabla_P E_\text{full} - \lambda P)`: the
    decay still shrinks ``P``, as the official loss :math:`-E_\text{full} + \tfrac{\lambda}{2}\|P\|^2`
    (:math:`\lambda = 5\cdot 10^{-7}`). The regularizer then uses the **half-space** energy of
    :math:`W \tilde P^\top` with the ascent look-ahead :math:`\tilde P = P + \eta \nabla_P E_\text{full}(W, P)`.

    Args:
        dim: ``k``, the dimension of the projected space (official: 30).
        steps: Ascent steps per :meth:`fit` call (official, and ``None``: 10). ``0`` keeps the initial Gaussian ``P``.
        lr: The side optimizer's learning rate ``> 0`` (and the look-ahead step), unless a call passes ``lr``.
        weight_decay: The side optimizer's L2 decay on ``P`` (official: ``5e-7``).
        lookahead: ``"none"``, ``"first"`` or ``"second"``, as in :class:`AngleProjection`.
        seed: Seed ``>= 0`` of the per-key generators that initialise ``P``.

    Raises:
        ValueError: If an argument is out of its allowed range.

    Example::

        >>> import torch
        >>> adv = AdversarialProjection(dim=30, steps=10, seed=0)
        >>> w = torch.randn(2, 32, 72)
        >>> before = adv.fit("layer1", w, lr=0.5)
        >>> bool((adv.objective("layer1", w) >= before).all())  # ascent raised the projected energy
        True
        >>> adv.projections("layer1", w).shape
        torch.Size([2, 1, 30, 72])
    """

    _maximize = True
    _default_steps = 10

    def _objective(self, neurons: Tensor, p: Tensor) -> Tensor:
        return projected_energy(neurons, p[:, None], half_space=False, check_finite=False)

    def _value_and_grad(self, neurons: Tensor, context: Any, p: Tensor) -> tuple[Tensor, Tensor]:
        # the energy's own backward to V = W Pᵀ only, then ∇_P E = (∇_V E)ᵀ W: no graph through the projection
        with autocast_off(neurons.device):
            with torch.no_grad():
                v = project_sets(neurons, p).transpose(1, 2).contiguous()  # (G, N, k), P·Wᵀ orientation
            with torch.enable_grad():
                v.requires_grad_(True)
                energy = hyperspherical_energy(v, 2, half_space=False, check_finite=False, backend=_energy_backend(v))
                (g_v,) = torch.autograd.grad(energy.sum(), v)
            with torch.no_grad():
                return energy.detach(), torch.bmm(g_v.transpose(1, 2), neurons)


#: Up to this many Gram entries (sets × N × N) the inner energy of the adversarial fit uses the plain-autograd
#: backend of :func:`hyperspherical_energy` (same semantics): for small sets its fixed cost is below the tiled kernel's.
_SMALL_GRAM = 1 << 15


def _energy_backend(v: Tensor) -> str:
    g, n, _ = v.shape
    return "autograd" if g * n * n <= _SMALL_GRAM else "auto"
