r"""Neuron extraction: from a module's weight to stacked ``(S, N, d)`` neuron sets.

This module is pure PyTorch; timm is optional. A *neuron* is the weight vector of one output unit. MHE / CoMHE
(Liu et al., NeurIPS 2018; Lin et al., CVPR 2020) take the energy of the neurons of a layer, so every supported layer
type is mapped to ``S`` independent *neuron sets* of ``N`` neurons of dimension ``d``, returned as one ``(S, N, d)``
tensor (or several tensors when the sets of one module differ in ``N`` or ``d``):

* :class:`torch.nn.Linear` (and subclasses such as ``timm.layers.Linear``), weight ``[out, in]``: the rows,
  :math:`W \in \mathbb{R}^{1 \times out \times in}`.
* :class:`torch.nn.Conv1d` / ``Conv2d`` / ``Conv3d`` (and subclasses such as timm's ``Conv2dSame``), weight
  ``[out, in/G, *k]``: one set per group, ``(G, out/G, in/G · ∏k)``. Neurons of different groups read disjoint
  input channels, so they are never compared with each other; a depthwise conv has ``N = out/in`` (usually 1).
* :class:`torch.nn.ConvTranspose1d` / ``2d`` / ``3d``, weight ``[in, out/G, *k]``: the output channels are dimension
  1, so the neuron of output channel ``j`` of group ``g`` is ``weight[g·in/G:(g+1)·in/G, j].flatten()``, giving
  ``(G, out/G, in/G · ∏k)``.
* timm ``StdConv2d`` / ``StdConv2dSame`` / ``ScaledStdConv2d`` / ``ScaledStdConv2dSame`` (weight standardisation):
  ``std_conv="raw"`` (the default) uses the stored weight, ``std_conv="standardized"`` the weight the forward pass
  convolves with, :math:`\hat w_i = (w_i - \bar w_i) / \sqrt{\operatorname{var}(w_i) + \epsilon}` (times
  ``gain_i · scale`` for the scaled variants), computed with the same ``F.batch_norm`` call as timm.
* timm ``CondConv2d``, weight ``[E, out · in/G · k_h · k_w]``: one set per expert and group, ``(E·G, out/G,
  in/G · k_h · k_w)``.
* timm ``MixedConv2d`` (a ``ModuleDict`` of convs with different kernel sizes): the sets of each child, in order.
* :class:`torch.nn.MultiheadAttention`: ``in_proj_weight`` ``[3E, E]`` as three sets ``(3, E, E)`` (q, k, v), or
  the separate ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` (``kdim`` / ``vdim`` ≠ ``embed_dim``), one
  set each; its ``out_proj`` is an ``nn.Linear`` of its own.
* :class:`torch.nn.RNN` / ``LSTM`` / ``GRU`` (and the cells): one tensor per weight matrix (``weight_ih_l{k}``,
  ``weight_hh_l{k}``, ``_reverse``, an LSTM's ``weight_hr_l{k}``), one set per gate: ``(gates, hidden, d)``.
  Layer discovery takes each weight matrix of these two as a layer of its own (:mod:`lightning_comhe._parts`).

Weight-normed and spectral-normed weights (:mod:`torch.nn.utils.parametrizations` or the older hooks) are read
through their direction parameter, ``v`` or the unnormalized weight, whose rows have the directions of the
effective weight's rows, without evaluating the parametrization (a spectral norm's power iteration is never run);
other parametrizations give the computed weight (:mod:`lightning_comhe._parametrized`).

Fused weights (``split``): a fused ``qkv`` projection is three layers in one weight, so ``split=3`` cuts the neuron
axis into ``q``, ``k``, ``v`` parts that are regularised separately. Other layer types can be added with
:func:`register_extractor`.

This module is the public API; the registry and the PyTorch extractors are in :mod:`lightning_comhe._extractors`,
timm's (registered once timm is imported; timm itself is never imported) in :mod:`lightning_comhe._timm_extractors`,
and ``split`` in :mod:`lightning_comhe._fused`.

All results are differentiable functions (views where the memory layout allows) of the live weight, so a loss on
them back-propagates into ``module.weight``. FSDP2 ``DTensor`` weights are gathered with ``full_tensor()``
(differentiable, collective: call it on every rank).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

# imported to register their extractors: nn.MultiheadAttention and the recurrent layers; timm's types (lazily)
from lightning_comhe import _parts, _timm_extractors  # noqa: F401
from lightning_comhe._extractors import REGISTRY, Extractor, check_module, full, type_name
from lightning_comhe._fused import Split, split_sets
from lightning_comhe._validation import check_choice
from lightning_comhe.config import STD_CONV_MODES
from lightning_comhe.config import StdConv as StdConvMode

__all__ = ["STD_CONV_MODES", "Split", "StdConvMode", "extract_neuron_sets", "extract_neurons", "register_extractor"]


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def register_extractor(
    cls: type[nn.Module], fn: Callable[[nn.Module], Tensor | Sequence[Tensor]], *, owns_children: bool = False
) -> None:
    """Register (or override) the neuron extractor of a module type.

    The most derived registered class in ``type(module).__mro__`` wins, so registering a subclass of
    :class:`torch.nn.Linear` overrides the built-in rule for that subclass only.

    Args:
        cls: The module class.
        fn: ``fn(module)`` returning one tensor or a sequence of tensors, each an ``(N, d)`` matrix (one set, rows
            are neurons) or ``(S, N, d)`` stacked sets. It should be a differentiable function of the module's
            parameters; ``DTensor`` results are gathered with ``full_tensor()``.
        owns_children: Set it when ``fn`` already covers the weights of the submodules of ``cls`` (a container), so
            that :func:`lightning_comhe.discovery.discover_layers` does not also take the submodules.

    Raises:
        TypeError: If ``cls`` is not an ``nn.Module`` subclass or ``fn`` is not callable.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> class Bilinear2(nn.Bilinear):
        ...     pass
        >>> register_extractor(Bilinear2, lambda m: m.weight.flatten(1))  # [out, in1, in2] -> (out, in1 * in2)
        >>> [tuple(t.shape) for t in extract_neuron_sets(Bilinear2(3, 4, 5))]
        [(1, 5, 12)]
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"`cls` must be an nn.Module subclass, got {cls!r}.")
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type_name(fn)}.")

    def _user(module: nn.Module, std_conv: str) -> list[Tensor]:
        result = fn(module)
        tensors = [result] if isinstance(result, Tensor) else list(result)
        out: list[Tensor] = []
        for t in tensors:
            if not isinstance(t, Tensor) or t.ndim not in (2, 3):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type_name(t)
                raise ValueError(
                    f"The extractor registered for {cls.__name__} must return (N, d) or (S, N, d) tensors, "
                    f"but returned {shape}."
                )
            t = full(t)
            out.append(t.unsqueeze(0) if t.ndim == 2 else t)
        return out

    REGISTRY[cls] = Extractor(_user, None, owns_children=owns_children, user=True)


def extract_neuron_sets(module: nn.Module, *, split: Split = None, std_conv: StdConvMode = "raw") -> list[Tensor]:
    r"""Return the neurons of ``module`` as stacked neuron sets.

    Each returned tensor has shape ``(S, N, d)``: ``S`` independent sets of ``N`` neurons of dimension ``d``, whose
    energies are computed separately. For a layer with weight :math:`W` and ``G`` groups,

    .. math::

        \text{Linear } [out, in] &\to (1, out, in), \\
        \text{Conv } [out, in/G, \textstyle\prod k] &\to (G, out/G, in/G \cdot \textstyle\prod k), \\
        \text{ConvTranspose } [in, out/G, \textstyle\prod k] &\to (G, out/G, in/G \cdot \textstyle\prod k), \\
        \text{CondConv2d } [E, out \cdot in/G \cdot k_h k_w] &\to (E G, out/G, in/G \cdot k_h k_w),

    and ``MixedConv2d`` gives the sets of each child in order. With ``split`` the neuron axis of every set is cut
    into parts (``N → N_1 + N_2 + …``) that become independent sets; parts of equal size are stacked into one
    tensor (set-major order: set ``s`` part ``p`` is entry ``s · parts + p``), parts of different sizes give separate
    tensors, ordered by the first occurrence of their size.

    Weight-standardised convs (timm ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d``, ``ScaledStdConv2dSame``)
    convolve with :math:`\hat w_i = (w_i - \bar w_i)/\sqrt{\operatorname{var}(w_i) + \epsilon}` (times
    ``gain_i · scale`` for the scaled ones). ``std_conv="raw"`` (default) regularises the stored weight :math:`w`,
    the parameter the optimizer updates, which is what the official MHE code would do; ``"standardized"``
    regularises :math:`\hat w`, the neurons the network actually uses. Note that centring makes the ``N`` neurons
    lie in a ``d - 1`` dimensional subspace and fixes their norm, so the two energies differ. The option is
    ignored for other layer types.

    Args:
        module: A supported module (see the module docstring) or a type added with :func:`register_extractor`.
        split: ``None`` (no split), an ``int`` number of equal parts (``3`` for a fused ``qkv`` projection), or a
            list of part sizes summing to the number of neurons per set (timm ``ParallelScalingBlock.in_proj``:
            ``[mlp_hidden] + [dim] * 3``).
        std_conv: ``"raw"`` or ``"standardized"``, see above.

    Returns:
        A list of ``(S, N, d)`` tensors, differentiable functions (views where possible) of the live weight.

    Raises:
        TypeError: If there is no extractor for ``type(module)``.
        ValueError: If ``module`` has no weight with ``ndim >= 2``, ``split`` does not fit the number of neurons, or
            ``std_conv`` is invalid.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> [tuple(t.shape) for t in extract_neuron_sets(nn.Linear(16, 48), split=3)]  # fused qkv
        [(3, 16, 16)]
        >>> [tuple(t.shape) for t in extract_neuron_sets(nn.Conv2d(8, 12, 3, groups=4))]
        [(4, 3, 18)]
        >>> [tuple(t.shape) for t in extract_neuron_sets(nn.Linear(4, 10), split=[4, 2, 2, 2])]
        [(1, 4, 4), (3, 2, 4)]
    """
    check_choice("std_conv", std_conv, STD_CONV_MODES)
    check_module("module", module)
    return split_sets(module, split, std_conv)


def extract_neurons(module: nn.Module, **kwargs: Any) -> list[Tensor]:
    """Return the neuron sets of ``module`` unbound into ``(N, d)`` matrices.

    The same as :func:`extract_neuron_sets` (which takes the same keyword arguments), with every ``(S, N, d)``
    tensor unbound along ``S``.

    Args:
        module: A supported module.
        **kwargs: ``split`` and ``std_conv``, see :func:`extract_neuron_sets`.

    Returns:
        A list of ``(N, d)`` tensors, one per neuron set.

    Example::

        >>> from torch import nn
        >>> [tuple(m.shape) for m in extract_neurons(nn.Conv1d(4, 6, 3, groups=2))]
        [(3, 6), (3, 6)]
    """
    return [matrix for sets in extract_neuron_sets(module, **kwargs) for matrix in sets.unbind(0)]
