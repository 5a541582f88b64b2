"""Fused weights (lightning_comhe._fused): cutting the neuron axis (``split``) and detecting fused projections."""

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_comhe import _fused
from lightning_comhe._fused import fused_split
from lightning_comhe.discovery import discover_layers
from lightning_comhe.neurons import extract_neuron_sets
from tests.helpers_layers import conv_expected, single_set

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------ split
def test_split_qkv_of_timm_attention_matches_forward():
    attn = Attention(dim=16, num_heads=2)
    sets = single_set(attn.qkv, split=3)
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
    sets = single_set(conv, split=2)
    base = conv_expected(conv.weight, 2)  # (2, 4, 2)
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
    allowed = (
        "be an int or a list of ints",
        "divide the 48 neurons per set of Linear into equal parts",
        "be positive sizes summing to the 48 neurons per set of Linear",
    )
    with pytest.raises(ValueError, match=rf"^`split` must ({'|'.join(allowed)}), got ") as err:
        extract_neuron_sets(nn.Linear(16, 48), split=split)
    assert str(split) in str(err.value)
    if not isinstance(split, (bool, str, float)):
        assert "48" in str(err.value)


# ------------------------------------------------------------------------------------------------ fused projections
def test_timm_fused_projections_detected():
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

    small = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 5}
    parallel = VisionTransformer(block_fn=ParallelScalingBlock, **small)
    layer = next(layer for layer in discover_layers(parallel) if layer.name == "blocks.0.in_proj")
    assert layer.split == [128, 32, 32, 32]
    assert layer.shapes() == [(1, 128, 32), (3, 32, 32)]

    glu = VisionTransformer(mlp_layer=SwiGLUPacked, mlp_ratio=4, **small)
    sel = discover_layers(glu)
    assert {layer.name: layer.split for layer in sel}["blocks.0.mlp.fc1"] == 2
    assert {layer.name: layer.split for layer in sel}["blocks.0.attn.qkv"] == 3
    assert {layer.name: layer.split for layer in sel}["blocks.0.mlp.fc2"] is None


def test_timm_asymmetric_qkv_not_split():
    model = timm.create_model("efficientformer_l1", pretrained=False, num_classes=7, device="meta")
    qkv = [layer for layer in discover_layers(model) if layer.name.endswith(".qkv")]
    assert qkv and all(layer.split is None for layer in qkv)


def _parent(attr, child, **attrs):
    parent = nn.Module()
    setattr(parent, attr, child)
    for key, value in attrs.items():
        setattr(parent, key, value)
    return parent


def _detect(parent, attr):
    child = getattr(parent, attr)
    modules = {"block": parent, f"block.{attr}": child}
    return fused_split(modules, f"block.{attr}", child, _fused.neuron_set_shapes(child)[0][1])


def test_fused_split_rules_without_timm_classes():
    assert _detect(_parent("qkv", nn.Linear(8, 24), num_heads=2, head_dim=4), "qkv") == 3
    assert _detect(_parent("qkv", nn.Linear(8, 24)), "qkv") == 3  # no head sizes declared
    assert _detect(_parent("qkv", nn.Linear(8, 24), num_heads=2, head_dim=3), "qkv") is None  # 3 * 2 * 3 != 24
    assert _detect(_parent("qkv", nn.Linear(8, 25)), "qkv") is None
    for attr in _fused.ASYMMETRIC_QKV_ATTRS:
        assert _detect(_parent("qkv", nn.Linear(8, 24), **{attr: 4}), "qkv") is None, attr
    assert _detect(_parent("in_proj", nn.Linear(8, 20), in_split=[8, 4, 4, 4]), "in_proj") == [8, 4, 4, 4]
    assert _detect(_parent("in_proj", nn.Linear(8, 20), in_split=[8, 4, 4]), "in_proj") is None  # sums to 16
    # a GluMlp by its attributes (value and gate halves along the channel axis)
    assert _detect(_parent("fc1", nn.Linear(8, 16), gate_last=True, chunk_dim=-1), "fc1") == 2
    assert _detect(_parent("fc1", nn.Conv2d(8, 16, 1), gate_last=True, chunk_dim=1), "fc1") == 2
    assert _detect(_parent("fc1", nn.Linear(8, 16), gate_last=True, chunk_dim=0), "fc1") is None
    assert _detect(_parent("fc1", nn.Linear(8, 15), gate_last=True, chunk_dim=-1), "fc1") is None
    assert _detect(_parent("fc1", nn.Linear(8, 16)), "fc1") is None  # a plain MLP
    # not the parent's attribute of that name, or the root: never fused
    qkv = nn.Linear(8, 24)
    assert fused_split({"block": _parent("qkv", nn.Linear(8, 24)), "block.qkv": qkv}, "block.qkv", qkv, 24) is None
    assert fused_split({"": qkv}, "", qkv, 24) is None


def test_split_shapes_agree_with_apply_split():
    for shape, split in [((2, 12, 5), 3), ((1, 10, 4), [4, 2, 2, 2]), ((3, 7, 2), [2, 3, 2]), ((2, 6, 3), None)]:
        sets = torch.randn(shape)
        parts = _fused.apply_split(sets, split, nn.Linear(1, 1))
        assert [tuple(t.shape) for t in parts] == _fused.split_shapes([shape], split, nn.Linear(1, 1))


def test_doctests():
    results = doctest.testmod(_fused, raise_on_error=False)
    assert results.attempted > 0 and results.failed == 0
