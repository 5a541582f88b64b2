import doctest
import math
import re
import warnings

import pytest
import torch
from torch import nn

from lightning_comhe import _extractors, _fused, neurons
from lightning_comhe.neurons import extract_neuron_sets, extract_neurons, register_extractor
from tests.helpers_layers import assert_fresh_python_prints_ok, conv_expected, flat_rows, single_set
from tests.helpers_layers import scratch_registry as scratch_registry  # a fixture: the alias keeps it a re-export

timm = pytest.importorskip("timm")
from timm.layers import CondConv2d, MixedConv2d, StdConv2d  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _conv_t_expected(weight, groups):
    """Hand-built sets for a ConvTranspose weight [in, out/G, *k]: output channel j of group g reads in-group rows."""
    in_per = weight.shape[0] // groups
    out_per = weight.shape[1]
    return torch.stack(
        [
            torch.stack([weight[g * in_per : (g + 1) * in_per, j].flatten() for j in range(out_per)])
            for g in range(groups)
        ]
    )


# ------------------------------------------------------------------------------------------------ Linear
@pytest.mark.parametrize("cls", [nn.Linear, timm.layers.Linear])
def test_linear_rows_are_neurons(cls):
    layer = cls(5, 7)
    sets = single_set(layer)
    assert sets.shape == (1, 7, 5)
    torch.testing.assert_close(sets[0], flat_rows(layer.weight), rtol=0, atol=0)
    # a view of the live weight, not a copy
    assert sets.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        layer.weight[3, 2] = 42.0
    assert sets[0, 3, 2].item() == 42.0


# ------------------------------------------------------------------------------------------------ Conv
@pytest.mark.parametrize(
    ("cls", "kernel", "spatial"),
    [(nn.Conv1d, 3, (5,)), (nn.Conv2d, (3, 2), (5, 4)), (nn.Conv3d, 2, (3, 3, 3))],
)
@pytest.mark.parametrize(("in_ch", "out_ch", "groups"), [(4, 6, 1), (4, 6, 2), (6, 6, 3)])
def test_conv_sets_match_hand_built_and_forward(cls, kernel, spatial, in_ch, out_ch, groups):
    conv = cls(in_ch, out_ch, kernel, groups=groups, bias=False)
    sets = single_set(conv)
    k = math.prod(conv.kernel_size)
    assert sets.shape == (groups, out_ch // groups, in_ch // groups * k)
    torch.testing.assert_close(sets, conv_expected(conv.weight, groups), rtol=0, atol=0)
    # semantic check: with an input exactly the kernel's size, output channel c = <neuron_c, input of its group>
    x = torch.randn(1, in_ch, *conv.kernel_size)
    y = conv(x).flatten()
    in_per, out_per = in_ch // groups, out_ch // groups
    for c in range(out_ch):
        g, j = divmod(c, out_per)
        expected = sets[g, j] @ x[0, g * in_per : (g + 1) * in_per].flatten()
        torch.testing.assert_close(y[c], expected)


def test_depthwise_conv_one_neuron_per_group():
    conv = nn.Conv2d(4, 4, 3, groups=4)
    sets = single_set(conv)
    assert sets.shape == (4, 1, 9)
    torch.testing.assert_close(sets, conv.weight.reshape(4, 1, 9), rtol=0, atol=0)
    multiplier = nn.Conv2d(4, 8, 3, groups=4)  # channel multiplier 2 -> 2 neurons per group
    sets = single_set(multiplier)
    assert sets.shape == (4, 2, 9)
    torch.testing.assert_close(sets, conv_expected(multiplier.weight, 4), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ ConvTranspose
@pytest.mark.parametrize(
    ("cls", "kernel"), [(nn.ConvTranspose1d, 3), (nn.ConvTranspose2d, (2, 3)), (nn.ConvTranspose3d, 2)]
)
@pytest.mark.parametrize(("in_ch", "out_ch", "groups"), [(4, 6, 1), (4, 6, 2), (6, 3, 3)])
def test_conv_transpose_sets_match_hand_built_and_forward(cls, kernel, in_ch, out_ch, groups):
    conv = cls(in_ch, out_ch, kernel, groups=groups, bias=False)
    assert conv.weight.shape[:2] == (in_ch, out_ch // groups)
    sets = single_set(conv)
    k = math.prod(conv.kernel_size)
    in_per, out_per = in_ch // groups, out_ch // groups
    assert sets.shape == (groups, out_per, in_per * k)
    torch.testing.assert_close(sets, _conv_t_expected(conv.weight, groups), rtol=0, atol=0)
    # semantic check: a 1-pixel input gives output channel c = neuron_c viewed (in/G, prod k), transposed, @ x_g
    x = torch.randn(1, in_ch, *([1] * len(conv.kernel_size)))
    y = conv(x)[0]
    for c in range(out_ch):
        g, j = divmod(c, out_per)
        expected = sets[g, j].view(in_per, k).T @ x[0, g * in_per : (g + 1) * in_per].flatten()
        torch.testing.assert_close(y[c].flatten(), expected)


# ------------------------------------------------------------------------------------------------ std_conv
def test_std_conv_option_ignored_for_plain_layers_and_validated():
    conv = nn.Conv2d(3, 4, 3)
    torch.testing.assert_close(single_set(conv, std_conv="standardized"), single_set(conv), rtol=0, atol=0)
    with pytest.raises(ValueError, match=re.escape("`std_conv` must be one of 'raw', 'standardized', got 'whitened'.")):
        extract_neuron_sets(conv, std_conv="whitened")
    with pytest.raises(ValueError, match=re.escape("`std_conv` must be one of 'raw', 'standardized', got 'whitened'.")):
        _fused.neuron_set_shapes(conv, std_conv="whitened")


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("module", [nn.Embedding(5, 3), nn.LayerNorm(4), nn.ReLU(), nn.BatchNorm2d(3)])
def test_unsupported_module_raises_type_error(module):
    with pytest.raises(TypeError, match=type(module).__name__) as err:
        extract_neuron_sets(module)
    assert "register_extractor" in str(err.value)
    assert "Linear" in str(err.value) and "Conv2d" in str(err.value)


def test_weight_validation():
    layer = nn.Linear(3, 4)
    del layer.weight
    layer.weight = torch.randn(4)
    with pytest.raises(ValueError, match="ndim >= 2"):
        extract_neuron_sets(layer)
    layer.weight = None
    with pytest.raises(ValueError, match="weight"):
        extract_neuron_sets(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Lazy modules are a new feature ..."
        lazy = nn.LazyLinear(4)
    with pytest.raises(ValueError, match="lazy"):
        extract_neuron_sets(lazy)
    with pytest.raises(TypeError, match=re.escape("`module` must be an nn.Module, got Tensor.")):
        extract_neuron_sets(torch.randn(3, 3))
    with pytest.raises(TypeError, match=re.escape("`module` must be an nn.Module, got Tensor.")):
        _fused.neuron_set_shapes(torch.randn(3, 3))


# ------------------------------------------------------------------------------------------------ gradients
def _grad_cases():
    return [
        ("linear", nn.Linear(5, 6), None, lambda r, w: r[0]),
        ("linear_split", nn.Linear(5, 6), 3, lambda r, w: r.reshape(6, 5)),
        ("conv_grouped", nn.Conv2d(4, 6, 3, groups=2), None, lambda r, w: r.reshape(w.shape)),
        (
            "conv_transpose_grouped",
            nn.ConvTranspose2d(4, 6, 3, groups=2),
            None,
            # r[g, j, i * 9 + k] is the gradient of weight[g * 2 + i, j, k]
            lambda r, w: r.reshape(2, 3, 2, 9).permute(0, 2, 1, 3).reshape(w.shape),
        ),
        ("cond_conv", CondConv2d(4, 6, 3, groups=2, num_experts=3), None, lambda r, w: r.reshape(w.shape)),
        ("std_conv_raw", StdConv2d(4, 6, 3), None, lambda r, w: r.reshape(w.shape)),
    ]


@pytest.mark.parametrize(
    ("module", "split", "expected_grad"), [c[1:] for c in _grad_cases()], ids=[c[0] for c in _grad_cases()]
)
def test_gradients_flow_to_weight(module, split, expected_grad):
    sets = single_set(module, split=split)
    r = torch.randn_like(sets)
    (sets * r).sum().backward()
    assert module.weight.grad is not None
    torch.testing.assert_close(module.weight.grad, expected_grad(r, module.weight))


# ------------------------------------------------------------------------------------------------ registry / misc
class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 5, 3))


def test_register_extractor(scratch_registry):
    module = _Custom()
    with pytest.raises(TypeError, match="_Custom"):
        extract_neuron_sets(module)
    register_extractor(_Custom, lambda m: m.weight)
    (sets,) = extract_neuron_sets(module)
    assert sets.shape == (2, 5, 3)
    assert [tuple(t.shape) for t in extract_neuron_sets(module, split=[3, 2])] == [(2, 3, 3), (2, 2, 3)]
    sets.sum().backward()
    torch.testing.assert_close(module.weight.grad, torch.ones_like(module.weight))
    assert _fused.neuron_set_shapes(module, split=[3, 2]) == [(2, 3, 3), (2, 2, 3)]

    # overriding a built-in for a subclass only
    class RowPairs(nn.Linear):
        pass

    register_extractor(RowPairs, lambda m: [m.weight[:2], m.weight[2:]])
    assert [tuple(t.shape) for t in extract_neuron_sets(RowPairs(3, 5))] == [(1, 2, 3), (1, 3, 3)]
    assert [tuple(t.shape) for t in extract_neuron_sets(nn.Linear(3, 5))] == [(1, 5, 3)]

    register_extractor(_Custom, lambda m: m.weight.flatten())
    with pytest.raises(ValueError, match="_Custom"):
        extract_neuron_sets(module)
    with pytest.raises(TypeError, match=re.escape("`cls` must be an nn.Module subclass, got <class 'int'>.")):
        register_extractor(int, lambda m: m)
    with pytest.raises(TypeError, match=re.escape("`fn` must be callable, got str.")):
        register_extractor(_Custom, "not callable")


def test_extract_neurons_unbinds_sets():
    conv = nn.Conv2d(4, 6, 3, groups=2)
    mats = extract_neurons(conv, split=3)
    sets = single_set(conv, split=3)
    assert len(mats) == 6 and all(m.shape == (1, 18) for m in mats)
    for i, m in enumerate(mats):
        torch.testing.assert_close(m, sets[i], rtol=0, atol=0)


def test_declared_shapes_match_extraction():
    modules = [
        nn.Linear(5, 6),
        nn.Conv3d(4, 6, (1, 2, 3), groups=2),
        nn.ConvTranspose2d(6, 9, 3, groups=3),
        CondConv2d(4, 6, 3, groups=2, num_experts=3),
        MixedConv2d(8, 12, [3, 5]),
        StdConv2d(4, 6, 3),
        nn.MultiheadAttention(8, 2),
        nn.MultiheadAttention(8, 2, kdim=5, vdim=3),
        nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2),
        nn.GRUCell(3, 4),
        nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 6, 3)),
    ]
    for module in modules:
        whole = isinstance(module, (MixedConv2d, nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase))
        for split in (None, 3) if not whole else (None,):
            assert _extractors.declared_shapes(module) is not None
            extracted = [tuple(t.shape) for t in extract_neuron_sets(module, split=split)]
            assert _fused.neuron_set_shapes(module, split=split) == extracted


# ------------------------------------------------------------------------------------------------ several weights
def test_multihead_attention_q_k_v_sets():
    mha = nn.MultiheadAttention(8, 2)
    w = mha.in_proj_weight  # [q; k; v] stacked in dim 0
    (sets,) = extract_neuron_sets(mha)
    torch.testing.assert_close(sets, torch.stack([w[:8], w[8:16], w[16:]]), rtol=0, atol=0)
    sets.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))
    assert mha.out_proj.weight.grad is None  # the out_proj is a Linear of its own
    separate = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)
    q, k, v = extract_neuron_sets(separate)
    for got, param in ((q, separate.q_proj_weight), (k, separate.k_proj_weight), (v, separate.v_proj_weight)):
        torch.testing.assert_close(got, param[None], rtol=0, atol=0)
    with pytest.raises(ValueError, match=re.escape("`split` must be None for MultiheadAttention (its weight")):
        extract_neuron_sets(mha, split=3)


@pytest.mark.parametrize(
    ("rnn", "gates"),
    [
        (nn.LSTM(3, 5, num_layers=2, bidirectional=True), 4),
        (nn.GRU(3, 5), 3),
        (nn.RNN(3, 5, nonlinearity="relu"), 1),
        (nn.LSTMCell(3, 5), 4),
        (nn.GRUCell(3, 5), 3),
    ],
    ids=["lstm", "gru", "rnn", "lstm_cell", "gru_cell"],
)
def test_recurrent_layers_one_set_per_gate(rnn, gates):
    names = [n for n, _ in rnn.named_parameters() if n.startswith("weight")]
    sets = extract_neuron_sets(rnn)
    assert len(sets) == len(names)
    for got, name in zip(sets, names, strict=True):
        w = getattr(rnn, name)
        hand = torch.stack([w[g * 5 : (g + 1) * 5] for g in range(gates)])  # gate g: rows g·H … (g+1)·H
        torch.testing.assert_close(got, hand, rtol=0, atol=0)
    lstm = nn.LSTM(3, 5, proj_size=2)
    assert [tuple(t.shape) for t in extract_neuron_sets(lstm)] == [(4, 5, 3), (4, 5, 2), (1, 2, 5)]


def test_parametrized_weights_read_their_direction_parameter():
    wn = nn.utils.parametrizations.weight_norm(nn.Linear(4, 6))
    v = wn.parametrizations.weight.original1
    torch.testing.assert_close(single_set(wn), v[None], rtol=0, atol=0)  # the rows of v, not g·v/‖v‖
    sn = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3)).train()
    u = sn.parametrizations.weight[0]._u.clone()
    sets = single_set(sn)
    torch.testing.assert_close(sets, sn.parametrizations.weight.original.reshape(1, 4, 27), rtol=0, atol=0)
    assert torch.equal(sn.parametrizations.weight[0]._u, u)  # no power iteration ran
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        old = nn.utils.weight_norm(nn.Linear(4, 6))
    torch.testing.assert_close(single_set(old), old.weight_v[None], rtol=0, atol=0)
    old_sn = nn.utils.spectral_norm(nn.Linear(4, 6))
    torch.testing.assert_close(single_set(old_sn), old_sn.weight_orig[None], rtol=0, atol=0)
    # another parametrization: the computed weight (discovery skips such layers, see tests/test_coverage.py)
    ortho = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))
    torch.testing.assert_close(single_set(ortho), ortho.weight[None])


def test_meta_device_extraction():
    layer = nn.Conv2d(4, 6, 3, device="meta")
    assert single_set(layer).shape == (1, 6, 36)
    std = StdConv2d(4, 6, 3, device="meta")
    assert single_set(std, std_conv="standardized").shape == (1, 6, 36)


def test_dtensor_weight_is_gathered(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no active process group")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        layer = nn.Linear(5, 6)
        reference = layer.weight.detach().clone()
        mesh = init_device_mesh("cpu", (1,))
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
        sets = single_set(layer)
        assert not isinstance(sets, torch.distributed.tensor.DTensor)
        torch.testing.assert_close(sets[0], reference)
        sets.sum().backward()
        assert layer.weight.grad is not None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("module", [neurons, _extractors], ids=lambda m: m.__name__)
def test_doctests(module, scratch_registry):  # the examples of `neurons` register a class
    results = doctest.testmod(module, raise_on_error=False)
    assert results.attempted > 0
    assert results.failed == 0


def test_core_works_without_timm_and_lightning():
    code = """
import sys
sys.modules["timm"] = None  # import timm -> ImportError
sys.modules["lightning"] = None
sys.modules["pytorch_lightning"] = None
import torch
from torch import nn
from lightning_comhe.neurons import extract_neuron_sets
from lightning_comhe.discovery import discover_layers
assert [tuple(t.shape) for t in extract_neuron_sets(nn.Conv2d(4, 6, 3, groups=2))] == [(2, 3, 18)]
sel = discover_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 3)))
assert [(layer.name, layer.role) for layer in sel] == [("0", "hidden"), ("2", "head")]
try:
    extract_neuron_sets(nn.Embedding(3, 4))
except TypeError as err:
    assert "CondConv2d" in str(err), err
assert not any(m == "lightning" or m.startswith(("lightning.", "timm")) for m in sys.modules if sys.modules[m])
print("ok")
"""
    assert_fresh_python_prints_ok(code)
