"""timm's layer types (lightning_comhe._timm_extractors): weight-standardised, conditional and mixed convs."""

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_comhe import _extractors, _fused, _timm_extractors
from lightning_comhe.neurons import extract_neuron_sets
from tests.helpers_layers import assert_fresh_python_prints_ok, conv_expected, flat_rows, single_set

timm = pytest.importorskip("timm")
from timm.layers import CondConv2d, MixedConv2d, ScaledStdConv2d, StdConv2d, StdConv2dSame  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("cls", [StdConv2d, StdConv2dSame, ScaledStdConv2d])
def test_std_conv_raw_vs_standardized(cls):
    conv = cls(4, 6, 3, groups=2)
    if cls is ScaledStdConv2d:
        with torch.no_grad():
            conv.gain.uniform_(0.5, 2.0)
    raw = single_set(conv)
    torch.testing.assert_close(raw, conv_expected(conv.weight, 2), rtol=0, atol=0)
    assert single_set(conv, std_conv="raw").shape == raw.shape
    std = single_set(conv, std_conv="standardized")
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


@pytest.mark.parametrize("groups", [1, 2])
def test_cond_conv_per_expert_and_group(groups):
    experts, out_ch, in_ch = 3, 6, 4
    conv = CondConv2d(in_ch, out_ch, 3, groups=groups, num_experts=experts)
    sets = single_set(conv)
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


def test_mixed_conv_one_entry_per_child():
    conv = MixedConv2d(8, 12, [3, 5])
    sets = extract_neuron_sets(conv)
    children = list(conv.values())
    assert [tuple(t.shape) for t in sets] == [(1, 6, 4 * 9), (1, 6, 4 * 25)]
    for t, child in zip(sets, children, strict=True):
        torch.testing.assert_close(t[0], flat_rows(child.weight), rtol=0, atol=0)
    depthwise = MixedConv2d(8, 8, [3, 5], depthwise=True)
    assert [tuple(t.shape) for t in extract_neuron_sets(depthwise)] == [(4, 1, 9), (4, 1, 25)]
    with pytest.raises(ValueError, match=r"`split` must be None for MixedConv2d .*got 2\."):
        extract_neuron_sets(conv, split=2)
    with pytest.raises(ValueError, match=r"`split` must be None for MixedConv2d .*got 2\."):
        _fused.neuron_set_shapes(conv, split=2)


def test_gradients_through_standardized_weight():
    conv = StdConv2d(3, 4, 3)
    std = single_set(conv, std_conv="standardized")
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


def test_timm_is_never_imported_and_its_types_register_lazily():
    code = """
import sys
import torch
from torch import nn
from lightning_comhe.neurons import extract_neuron_sets, register_extractor
from lightning_comhe.discovery import discover_layers, find_heads
assert [tuple(t.shape) for t in extract_neuron_sets(nn.Conv2d(4, 6, 3, groups=2))] == [(2, 3, 18)]
assert find_heads(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))) == ["1"]
discover_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 3)))
try:
    extract_neuron_sets(nn.Embedding(3, 4))
except TypeError as err:
    assert "timm CondConv2d / MixedConv2d / StdConv2d (when timm is imported)" in str(err), err
assert "timm" not in sys.modules, "lightning_comhe imported timm"
import timm.layers
# registered before the first lookup after `import timm`: the user's extractor wins over the built-in timm one
register_extractor(timm.layers.CondConv2d, lambda m: m.weight)
cond = timm.layers.CondConv2d(4, 6, 3, num_experts=2)
assert [tuple(t.shape) for t in extract_neuron_sets(cond)] == [(1, 2, 216)]
mixed = timm.layers.MixedConv2d(8, 12, [3, 5])
assert [tuple(t.shape) for t in extract_neuron_sets(mixed)] == [(1, 6, 36), (1, 6, 100)]
std = timm.layers.ScaledStdConv2d(4, 6, 3)
assert [tuple(t.shape) for t in extract_neuron_sets(std, std_conv="standardized")] == [(1, 6, 36)]
try:
    extract_neuron_sets(nn.Embedding(3, 4))
except TypeError as err:
    assert "when timm is imported" not in str(err) and "MixedConv2d" in str(err) and "StdConv2d" in str(err), err
print("ok")
"""
    assert_fresh_python_prints_ok(code)


@pytest.mark.parametrize("cls", [StdConv2d, StdConv2dSame, ScaledStdConv2d, timm.layers.ScaledStdConv2dSame])
def test_std_conv_types_have_their_own_extractor(cls):
    entry = _extractors.lookup(cls(4, 6, 3))
    assert entry is _extractors.REGISTRY[cls] and entry is not _extractors.REGISTRY[nn.Conv2d]

    class Sub(cls):  # a subclass gets its parent's rule
        pass

    conv = Sub(4, 6, 3, groups=2)
    assert _extractors.lookup(conv) is entry
    std = single_set(conv, std_conv="standardized")
    rows = conv.weight.detach().reshape(6, -1)
    hand = (rows - rows.mean(1, keepdim=True)) / torch.sqrt(rows.var(1, unbiased=False, keepdim=True) + conv.eps)
    if "Scaled" in cls.__name__:
        hand = hand * (conv.gain.detach().reshape(6, 1) * conv.scale)
    torch.testing.assert_close(std.detach().reshape(6, -1), hand, rtol=1e-5, atol=1e-6)


def test_timm_classes_and_layers():
    assert _timm_extractors.timm_layers() is timm.layers
    assert _timm_extractors.timm_classes("StdConv2d", "NoSuchLayer", "to_2tuple") == (StdConv2d,)  # classes only
    assert _timm_extractors.register_timm_extractors() is True
    for cls in (StdConv2d, StdConv2dSame, ScaledStdConv2d, CondConv2d, MixedConv2d):
        assert cls in _extractors.REGISTRY
    assert _extractors.REGISTRY[MixedConv2d].owns_children and not _extractors.REGISTRY[CondConv2d].owns_children


def test_doctests():
    results = doctest.testmod(_timm_extractors, raise_on_error=False)
    assert results.attempted > 0 and results.failed == 0
