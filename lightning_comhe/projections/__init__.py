r"""Projection state for CoMHE: random, angle-preserving and adversarial projections.

This package is pure PyTorch (no Lightning import). Each class is a small stateful object that keeps one entry per
string ``key``; the regularizer passes one key per group of equally shaped neuron sets (e.g. ``"layer1.0.conv1"`` or
``"g:64x576"``). Every key has its own :class:`torch.Generator`, seeded with a deterministic function of
``(seed, key)`` (:func:`key_seed`), so the values an entry sees do not depend on the order in which keys are used,
and the global RNG is never touched. Generators are created lazily on the device of the neurons (a CUDA run draws on
the GPU; see :func:`generator_device`).

* :class:`RandomProjection` (RP-CoMHE, algorithm §2, :mod:`~lightning_comhe.projections.random`): ``C`` Gaussian
  ``k × d`` matrices per neuron set, redrawn every ``resample_every`` optimizer steps (the official code redraws at
  every step); opt-in structured kinds (``"sparse"``, ``"srht"``) cut the projection cost (see
  :mod:`lightning_comhe.functional.sketch`). The randomness of one key and window is a typed draw
  (:mod:`~lightning_comhe.projections.draws`: :class:`GaussianDraw`, :class:`SRHTDraw`, :class:`SparseDraw`).
* :class:`AngleProjection` (AP-CoMHE, §3, :mod:`~lightning_comhe.projections.angle`, on the shared base
  :mod:`~lightning_comhe.projections.learned`): one learnable ``k × d``
  matrix per set, fitted by plain SGD (decay ``5e-7``) to minimise the angle-preservation objective
  :math:`\|C(W P^\top) - C(W)\|_F`, optionally with the official one-step look-ahead
  :math:`\tilde P = P - \eta \nabla_P L`.
* :class:`AdversarialProjection` (§4, :mod:`~lightning_comhe.projections.adversarial`): the same, but SGD
  *ascends* the full-space projected energy and the look-ahead is :math:`\tilde P = P + \eta \nabla_P E_\text{full}`.

All three expose ``state_dict()`` / ``load_state_dict()`` (plain picklable dicts whose tensors are restored to the
neurons' device lazily, at next use), so a resumed run continues bit-exactly.

Example::

    >>> import torch
    >>> rp = RandomProjection(dim=4, num=2, seed=0)
    >>> rp.step()
    >>> rp.projections("layer1", num_sets=1, d=6, device="cpu").shape
    torch.Size([1, 2, 4, 6])
    >>> type(rp.draw("layer1")).__name__
    'GaussianDraw'
"""

from lightning_comhe.config import PROJECTION_KINDS, Lookahead, ProjectionKind
from lightning_comhe.projections._rng import generator_device, key_seed
from lightning_comhe.projections.adversarial import AdversarialProjection
from lightning_comhe.projections.angle import AngleProjection
from lightning_comhe.projections.draws import Draw, GaussianDraw, SparseDraw, SRHTDraw
from lightning_comhe.projections.learned import LearnedProjection
from lightning_comhe.projections.random import RandomProjection

__all__ = [
    "PROJECTION_KINDS",
    "AdversarialProjection",
    "AngleProjection",
    "Draw",
    "GaussianDraw",
    "LearnedProjection",
    "Lookahead",
    "ProjectionKind",
    "RandomProjection",
    "SRHTDraw",
    "SparseDraw",
    "generator_device",
    "key_seed",
]
