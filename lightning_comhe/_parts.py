"""Modules with several weight matrices: ``nn.MultiheadAttention`` and the recurrent layers.

Pure PyTorch. Their weights are not one ``weight``, so each weight matrix (a :class:`~lightning_comhe._extractors.Part`)
is a layer of its own for discovery, named ``<module>.<param>``, and its rows are cut into the independent sets of
the maps stacked in it:

* ``nn.MultiheadAttention``: ``in_proj_weight`` ``[3E, E]`` (q, k, v stacked) is three sets ``(3, E, E)``, as a
  timm fused ``qkv``; with ``kdim`` or ``vdim`` different from ``embed_dim`` the separate ``q_proj_weight``
  ``[E, E]``, ``k_proj_weight`` ``[E, kdim]`` and ``v_proj_weight`` ``[E, vdim]`` are one set each. Its
  ``out_proj`` is an ``nn.Linear`` and so an ordinary layer.
* ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``: every ``weight_ih_l{k}`` and ``weight_hh_l{k}`` (and ``_reverse``) stacks
  the gates in dim 0 (LSTM: input, forget, cell, output; GRU: reset, update, new), so it is one set per gate,
  ``(gates, hidden_size, d)``; an LSTM's ``weight_hr_l{k}`` (``proj_size > 0``) is one set.
* ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell``: ``weight_ih`` and ``weight_hh``, one set per gate.

Parametrized weights (weight norm, spectral norm) are read through their direction parameter
(:mod:`lightning_comhe._parametrized`).

Example::

    >>> from torch import nn
    >>> lstm = nn.LSTM(3, 5, bidirectional=True)
    >>> parts_of(lstm)[:2]
    [Part(param='weight_ih_l0', split=4), Part(param='weight_hh_l0', split=4)]
    >>> part_shapes(lstm, "weight_hh_l0_reverse", 4), part_shapes(nn.MultiheadAttention(8, 2), "in_proj_weight", 3)
    ([(4, 5, 5)], [(3, 8, 8)])
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_comhe._extractors import REGISTRY, Extractor, Part, Shape, lookup, module_weight, prod
from lightning_comhe._fused import apply_split, split_shapes
from lightning_comhe._parametrized import weight_direction

__all__ = ["gates_of", "part_sets", "part_shapes", "parts_of"]


def gates_of(module: nn.Module) -> int:
    """The number of gates stacked in dim 0 of a recurrent layer's ``weight_ih`` / ``weight_hh`` (LSTM 4, GRU 3)."""
    mode = getattr(module, "mode", None)  # nn.RNNBase: "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    if mode == "LSTM" or isinstance(module, nn.LSTMCell):
        return 4
    if mode == "GRU" or isinstance(module, nn.GRUCell):
        return 3
    return 1


def _mha_parts(module: nn.Module) -> list[Part]:
    if getattr(module, "_qkv_same_embed_dim", True):
        return [Part("in_proj_weight", 3)]
    return [Part("q_proj_weight"), Part("k_proj_weight"), Part("v_proj_weight")]


def _rnn_parts(module: nn.Module) -> list[Part]:
    gates = gates_of(module)
    split = gates if gates > 1 else None
    names = getattr(module, "_flat_weights_names", None) or ["weight_ih", "weight_hh"]  # cells have no flat names
    return [Part(n, None if n.startswith("weight_hr") else split) for n in names if n.startswith("weight_")]


def parts_of(module: nn.Module) -> list[Part]:
    """The weight matrices of a module registered with parts (``[]`` for any other module)."""
    entry = lookup(module)
    return entry.parts(module) if entry is not None and entry.parts is not None else []


def part_sets(module: nn.Module, param: str, split: int | None) -> list[Tensor]:
    """The ``(S, N, d)`` sets of the weight ``param`` of ``module``: its rows, cut by ``split``."""
    weight = module_weight(module, param)
    return apply_split(weight.reshape(1, weight.shape[0], -1), split, module)


def part_shapes(module: nn.Module, param: str, split: int | None) -> list[Shape]:
    """The shapes :func:`part_sets` gives, from the (global) shape of the weight, without reading its values."""
    tensor = weight_direction(module, param).tensor
    if tensor is None:  # another parametrization: only its computed weight has a shape
        tensor = getattr(module, param)
    shape = tuple(tensor.shape)
    return split_shapes([(1, int(shape[0]), prod(shape[1:]))], split, module)


def _all_sets(module: nn.Module, std_conv: str) -> list[Tensor]:
    return [t for part in parts_of(module) for t in part_sets(module, part.param, part.split)]


def _all_shapes(module: nn.Module) -> list[Shape]:
    return [s for part in parts_of(module) for s in part_shapes(module, part.param, part.split)]


REGISTRY[nn.MultiheadAttention] = Extractor(_all_sets, _all_shapes, parts=_mha_parts)
for _cls in (nn.RNNBase, nn.RNNCellBase):
    REGISTRY[_cls] = Extractor(_all_sets, _all_shapes, parts=_rnn_parts)
