import doctest
import math
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_comhe import neurons
from lightning_comhe.neurons import extract_neuron_sets, extract_neurons, register_extractor

timm = pytest.importorskip("timm")
from timm.layers import (  # noqa: E402
    Attention,
    CondConv2d,
    MixedConv2d,
    ScaledStdConv2d,
    StdConv2d,
    StdConv2dSame,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rows(weight):
    """Hand-built neurons of a weight whose dim 0 is the output axis: one flattened row per output unit."""
    return torch.stack([weight[i].flatten() for i in range(weight.shape[0])])


def _conv_expected(weight, groups):
    """Hand-built (G, out/G, in/G * prod(k)) for a conv weight [out, in/G, *k]."""
    per = weight.shape[0] // groups
    return torch.stack([torch.stack([weight[g * per + j].flatten() for j in range(per)]) for g in range(groups)])


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


def _single(module, **kw):
    sets = extract_neuron_sets(module, **kw)
    assert len(sets) == 1
    return sets[0]


# ------------------------------------------------------------------------------------------------ Linear
@pytest.mark.parametrize("cls", [nn.Linear, timm.layers.Linear])
def test_linear_rows_are_neurons(cls):
    layer = cls(5, 7)
    sets = _single(layer)
    assert sets.shape == (1, 7, 5)
    torch.testing.assert_close(sets[0], _rows(layer.weight), rtol=0, atol=0)
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
    sets = _single(conv)
    k = math.prod(conv.kernel_size)
    assert sets.shape == (groups, out_ch // groups, in_ch // groups * k)
    torch.testing.assert_close(sets, _conv_expected(conv.weight, groups), rtol=0, atol=0)
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
    sets = _single(conv)
    assert sets.shape == (4, 1, 9)
    torch.testing.assert_close(sets, conv.weight.reshape(4, 1, 9), rtol=0, atol=0)
    multiplier = nn.Conv2d(4, 8, 3, groups=4)  # channel multiplier 2 -> 2 neurons per group
    sets = _single(multiplier)
    assert sets.shape == (4, 2, 9)
    torch.testing.assert_close(sets, _conv_expected(multiplier.weight, 4), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ ConvTranspose
@pytest.mark.parametrize(
    ("cls", "kernel"), [(nn.ConvTranspose1d, 3), (nn.ConvTranspose2d, (2, 3)), (nn.ConvTranspose3d, 2)]
)
@pytest.mark.parametrize(("in_ch", "out_ch", "groups"), [(4, 6, 1), (4, 6, 2), (6, 3, 3)])
def test_conv_transpose_sets_match_hand_built_and_forward(cls, kernel, in_ch, out_ch, groups):
    conv = cls(in_ch, out_ch, kernel, groups=groups, bias=False)
    assert conv.weight.shape[:2] == (in_ch, out_ch // groups)
    sets = _single(conv)
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


# ------------------------------------------------------------------------------------------------ split
def test_split_qkv_of_timm_attention_matches_forward():
    attn = Attention(dim=16, num_heads=2)
    sets = _single(attn.qkv, split=3)
    assert sets.shape == (3, 16, 16)
    w = attn.qkv.weight
    for part in range(3):
        torch.testing.assert_close(sets[part], w[16 * part : 16 * (part + 1)], rtol=0, atol=0)
    # the same q / k / v as timm's forward: qkv(x).reshape(B, N, 3, H, D)
    x = torch.randn(2, 5, 16)
    qkv = F.linear(x, w).reshape(2, 5, 3, 2, 8)
    for part in range(3):
        torch.testing.assert_close(qkv[:, :, part].reshape(2, 5, 16), x @ sets[part].T)


def test_split_sizes_list_groups_equal_parts():
    layer = nn.Linear(3, 10)
    w = layer.weight
    big, small = extract_neuron_sets(layer, split=[4, 2, 2, 2])  # ParallelScalingBlock-like [mlp] + [dim] * 3
    assert big.shape == (1, 4, 3) and small.shape == (3, 2, 3)
    torch.testing.assert_close(big[0], w[:4], rtol=0, atol=0)
    for i in range(3):
        torch.testing.assert_close(small[i], w[4 + 2 * i : 6 + 2 * i], rtol=0, atol=0)
    # non-contiguous equal parts are stacked too, ordered by first occurrence of their size
    twos, three = extract_neuron_sets(nn.Linear(3, 7), split=[2, 3, 2])
    assert twos.shape == (2, 2, 3) and three.shape == (1, 3, 3)
    layer = nn.Linear(3, 7)
    twos, three = extract_neuron_sets(layer, split=(2, 3, 2))
    torch.testing.assert_close(twos[0], layer.weight[0:2], rtol=0, atol=0)
    torch.testing.assert_close(twos[1], layer.weight[5:7], rtol=0, atol=0)
    torch.testing.assert_close(three[0], layer.weight[2:5], rtol=0, atol=0)
    # all parts equal -> one stacked tensor
    assert [t.shape for t in extract_neuron_sets(nn.Linear(3, 8), split=[2, 2, 2, 2])] == [(4, 2, 3)]


def test_split_applies_per_group_set_major():
    conv = nn.Conv2d(4, 8, 1, groups=2)
    sets = _single(conv, split=2)
    base = _conv_expected(conv.weight, 2)  # (2, 4, 2)
    assert sets.shape == (4, 2, 2)
    expected = torch.stack([base[0, :2], base[0, 2:], base[1, :2], base[1, 2:]])
    torch.testing.assert_close(sets, expected, rtol=0, atol=0)
    # non-contiguous equal parts with several sets: still set-major
    ones, two = extract_neuron_sets(conv, split=[1, 2, 1])
    assert ones.shape == (4, 1, 2) and two.shape == (2, 2, 2)
    torch.testing.assert_close(ones, torch.stack([base[0, :1], base[0, 3:], base[1, :1], base[1, 3:]]), rtol=0, atol=0)
    torch.testing.assert_close(two, base[:, 1:3], rtol=0, atol=0)


@pytest.mark.parametrize("split", [5, 0, -3, [20, 20], [48, 0], [16, 16, 15], True, "3", 2.0])
def test_bad_split_raises(split):
    with pytest.raises(ValueError, match="split") as err:
        extract_neuron_sets(nn.Linear(16, 48), split=split)
    assert str(split) in str(err.value)
    if not isinstance(split, (bool, str, float)):
        assert "48" in str(err.value)


# ------------------------------------------------------------------------------------------------ StdConv
@pytest.mark.parametrize("cls", [StdConv2d, StdConv2dSame, ScaledStdConv2d])
def test_std_conv_raw_vs_standardized(cls):
    conv = cls(4, 6, 3, groups=2)
    if cls is ScaledStdConv2d:
        with torch.no_grad():
            conv.gain.uniform_(0.5, 2.0)
    raw = _single(conv)
    torch.testing.assert_close(raw, _conv_expected(conv.weight, 2), rtol=0, atol=0)
    assert _single(conv, std_conv="raw").shape == raw.shape
    std = _single(conv, std_conv="standardized")
    assert std.shape == raw.shape == (2, 3, 18)
    # the standardized neurons are the weight the forward convolves with
    x = torch.randn(2, 4, 7, 7)
    effective = std.reshape(conv.weight.shape)
    if cls is StdConv2dSame:
        x_in = timm.layers.padding.pad_same(x, conv.kernel_size, conv.stride, conv.dilation) if conv.same_pad else x
    else:
        x_in = x
    y = F.conv2d(x_in, effective, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    # and hand-built: per-output-channel mean-centred, divided by sqrt(biased var + eps) (times gain * scale)
    rows = conv.weight.detach().reshape(6, -1)
    hand = (rows - rows.mean(1, keepdim=True)) / torch.sqrt(rows.var(1, unbiased=False, keepdim=True) + conv.eps)
    if cls is ScaledStdConv2d:
        hand = hand * (conv.gain.detach().reshape(6, 1) * conv.scale)
    torch.testing.assert_close(std.detach().reshape(6, -1), hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(std, raw)


def test_std_conv_option_ignored_for_plain_layers_and_validated():
    conv = nn.Conv2d(3, 4, 3)
    torch.testing.assert_close(_single(conv, std_conv="standardized"), _single(conv), rtol=0, atol=0)
    with pytest.raises(ValueError, match="std_conv"):
        extract_neuron_sets(conv, std_conv="whitened")


# ------------------------------------------------------------------------------------------------ CondConv2d
@pytest.mark.parametrize("groups", [1, 2])
def test_cond_conv_per_expert_and_group(groups):
    experts, out_ch, in_ch = 3, 6, 4
    conv = CondConv2d(in_ch, out_ch, 3, groups=groups, num_experts=experts)
    sets = _single(conv)
    d = in_ch // groups * 9
    assert sets.shape == (experts * groups, out_ch // groups, d)
    per_expert = conv.weight.view(experts, out_ch, -1)
    per = out_ch // groups
    for e in range(experts):
        for g in range(groups):
            torch.testing.assert_close(sets[e * groups + g], per_expert[e, g * per : (g + 1) * per], rtol=0, atol=0)
    # semantic check: routing entirely to expert e convolves with expert e's kernel
    x = torch.randn(1, in_ch, 5, 5)
    e = 1
    routing = F.one_hot(torch.tensor([e]), experts).float()
    kernel = sets[e * groups : (e + 1) * groups].reshape(out_ch, in_ch // groups, 3, 3)
    expected = F.conv2d(x, kernel, None, conv.stride, conv.padding, conv.dilation, groups)
    torch.testing.assert_close(conv(x, routing), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ MixedConv2d
def test_mixed_conv_one_entry_per_child():
    conv = MixedConv2d(8, 12, [3, 5])
    sets = extract_neuron_sets(conv)
    children = list(conv.values())
    assert [tuple(t.shape) for t in sets] == [(1, 6, 4 * 9), (1, 6, 4 * 25)]
    for t, child in zip(sets, children, strict=True):
        torch.testing.assert_close(t[0], _rows(child.weight), rtol=0, atol=0)
    depthwise = MixedConv2d(8, 8, [3, 5], depthwise=True)
    assert [tuple(t.shape) for t in extract_neuron_sets(depthwise)] == [(4, 1, 9), (4, 1, 25)]
    with pytest.raises(ValueError, match="split"):
        extract_neuron_sets(conv, split=2)


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
    with pytest.raises(TypeError, match="nn.Module"):
        extract_neuron_sets(torch.randn(3, 3))


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
    sets = _single(module, split=split)
    r = torch.randn_like(sets)
    (sets * r).sum().backward()
    assert module.weight.grad is not None
    torch.testing.assert_close(module.weight.grad, expected_grad(r, module.weight))


def test_gradients_through_standardized_weight():
    conv = StdConv2d(3, 4, 3)
    std = _single(conv, std_conv="standardized")
    r = torch.randn_like(std)
    (std * r).sum().backward()
    w = conv.weight.detach().clone().requires_grad_(True)
    rows = w.reshape(4, -1)
    hand = (rows - rows.mean(1, keepdim=True)) / torch.sqrt(rows.var(1, unbiased=False, keepdim=True) + conv.eps)
    (hand * r.reshape(4, -1)).sum().backward()
    torch.testing.assert_close(conv.weight.grad, w.grad, rtol=1e-4, atol=1e-5)


def test_gradients_through_mixed_conv_children():
    conv = MixedConv2d(4, 6, [1, 3])
    sum(t.square().sum() for t in extract_neuron_sets(conv)).backward()
    for child in conv.values():
        torch.testing.assert_close(child.weight.grad, 2 * child.weight.detach())


# ------------------------------------------------------------------------------------------------ registry / misc
class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 5, 3))


def test_register_extractor(monkeypatch):
    monkeypatch.setattr(neurons, "_REGISTRY", dict(neurons._REGISTRY))
    module = _Custom()
    with pytest.raises(TypeError, match="_Custom"):
        extract_neuron_sets(module)
    register_extractor(_Custom, lambda m: m.weight)
    (sets,) = extract_neuron_sets(module)
    assert sets.shape == (2, 5, 3)
    assert [tuple(t.shape) for t in extract_neuron_sets(module, split=[3, 2])] == [(2, 3, 3), (2, 2, 3)]
    sets.sum().backward()
    torch.testing.assert_close(module.weight.grad, torch.ones_like(module.weight))
    assert neurons._neuron_set_shapes(module, split=[3, 2]) == [(2, 3, 3), (2, 2, 3)]

    # overriding a built-in for a subclass only
    class RowPairs(nn.Linear):
        pass

    register_extractor(RowPairs, lambda m: [m.weight[:2], m.weight[2:]])
    assert [tuple(t.shape) for t in extract_neuron_sets(RowPairs(3, 5))] == [(1, 2, 3), (1, 3, 3)]
    assert [tuple(t.shape) for t in extract_neuron_sets(nn.Linear(3, 5))] == [(1, 5, 3)]

    register_extractor(_Custom, lambda m: m.weight.flatten())
    with pytest.raises(ValueError, match="_Custom"):
        extract_neuron_sets(module)
    with pytest.raises(TypeError, match="cls"):
        register_extractor(int, lambda m: m)
    with pytest.raises(TypeError, match="fn"):
        register_extractor(_Custom, "not callable")


def test_extract_neurons_unbinds_sets():
    conv = nn.Conv2d(4, 6, 3, groups=2)
    mats = extract_neurons(conv, split=3)
    sets = _single(conv, split=3)
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
    ]
    for module in modules:
        for split in (None, 3) if not isinstance(module, MixedConv2d) else (None,):
            assert neurons._declared_shapes(module) is not None
            extracted = [tuple(t.shape) for t in extract_neuron_sets(module, split=split)]
            assert neurons._neuron_set_shapes(module, split=split) == extracted


def test_meta_device_extraction():
    layer = nn.Conv2d(4, 6, 3, device="meta")
    assert _single(layer).shape == (1, 6, 36)
    std = StdConv2d(4, 6, 3, device="meta")
    assert _single(std, std_conv="standardized").shape == (1, 6, 36)


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
        sets = _single(layer)
        assert not isinstance(sets, torch.distributed.tensor.DTensor)
        torch.testing.assert_close(sets[0], reference)
        sets.sum().backward()
        assert layer.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_doctests(monkeypatch):
    monkeypatch.setattr(neurons, "_REGISTRY", dict(neurons._REGISTRY))  # the examples register a class
    results = doctest.testmod(neurons, raise_on_error=False)
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
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
