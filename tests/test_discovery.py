import dataclasses
import doctest
import inspect
import re

import pytest
import torch
from torch import nn

from lightning_comhe import _fused, _heads, _walk, discovery, neurons
from lightning_comhe.config import SelectionConfig
from lightning_comhe.discovery import LayerSelection, NeuronLayer, discover_layers, find_heads
from tests.helpers_layers import scratch_registry as scratch_registry  # a fixture: the alias keeps it a re-export

timm = pytest.importorskip("timm")
from timm.layers import MixedConv2d  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, groups=4)
        self.emb = nn.Embedding(10, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 5)


def _names(selection):
    return [layer.name for layer in selection.layers]


# ------------------------------------------------------------------------------------------------ plain models
def test_plain_sequential_last_linear_is_head():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    sel = discover_layers(model)
    assert isinstance(sel, LayerSelection)
    assert [(layer.name, layer.role) for layer in sel] == [("0", "hidden"), ("4", "hidden"), ("6", "head")]
    assert all(layer.split is None and layer.std_conv == "raw" for layer in sel)
    assert sel.skipped == []
    assert len(sel) == 3 and sel.names == ["0", "4", "6"] and [h.name for h in sel.heads] == ["6"]


def test_small_cnn_roles_and_skips():
    model = SmallCNN()
    sel = discover_layers(model)
    assert _names(sel) == ["stem", "pw", "grouped", "fc1", "fc2"]
    assert sel.skipped == [("dw", "1 neuron per set (depthwise conv)")]
    roles = {layer.name: layer.role for layer in sel}
    assert roles["fc2"] == "head" and sum(r == "head" for r in roles.values()) == 1
    grouped = next(layer for layer in sel if layer.name == "grouped")
    assert grouped.shapes() == [(4, 4, 36)]


def test_grouped_skip_policy():
    sel = discover_layers(SmallCNN(), grouped="skip")
    assert _names(sel) == ["stem", "pw", "fc1", "fc2"]
    assert dict(sel.skipped) == {
        "dw": "depthwise conv (groups=8), grouped='skip'",
        "grouped": "grouped conv (groups=4), grouped='skip'",
    }
    with pytest.raises(ValueError, match=re.escape("`grouped` must be one of 'per_group', 'skip', got 'flatten'.")):
        discover_layers(SmallCNN(), grouped="flatten")
    with pytest.raises(ValueError, match=re.escape("`std_conv` must be one of 'raw', 'standardized', got 'whiten'.")):
        discover_layers(SmallCNN(), std_conv="whiten")


def test_include_exclude_regexes():
    model = SmallCNN()
    assert _names(discover_layers(model, include=r"^fc")) == ["fc1", "fc2"]
    assert _names(discover_layers(model, include=[r"^stem$", r"fc2"])) == ["stem", "fc2"]
    assert _names(discover_layers(model, exclude=r"fc|grouped")) == ["stem", "pw"]
    assert _names(discover_layers(model, include="fc", exclude=["2$"])) == ["fc1"]
    # filters apply to the head too: an excluded head is simply not selected
    sel = discover_layers(model, exclude="fc2")
    assert "fc2" not in _names(sel) and sel.heads == []
    # filtered-out layers are not reported as skipped
    assert discover_layers(model, include="fc").skipped == []


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_bad_regex_raises(arg):
    with pytest.raises(ValueError, match=re.escape(f"`{arg}` must hold valid regular expressions, got 'fc(' (")):
        discover_layers(SmallCNN(), **{arg: ["ok", "fc("]})
    allowed = "a regex string, a list of regex strings or None"
    with pytest.raises(ValueError, match=re.escape(f"`{arg}` must be {allowed}, got [3].")):
        discover_layers(SmallCNN(), **{arg: [3]})


def test_nothing_selected_raises_with_candidates():
    with pytest.raises(ValueError, match="include='nomatch'") as err:
        discover_layers(SmallCNN(), include="nomatch")
    message = str(err.value)
    assert "exclude=None" in message
    for name in ["stem", "dw", "pw", "grouped", "fc1", "fc2"]:
        assert name in message
    many = nn.Sequential(*[nn.Linear(4, 4) for _ in range(15)])
    with pytest.raises(ValueError, match=r"15 candidate layers: 0, 1, .*9, … and 5 more"):
        discover_layers(many, exclude=".")
    with pytest.raises(ValueError, match="no Linear"):
        discover_layers(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        discover_layers(frozen)


def test_head_by_name_and_none():
    model = SmallCNN()
    sel = discover_layers(model, head="fc1")
    assert {layer.name: layer.role for layer in sel}["fc1"] == "head"
    assert {layer.name: layer.role for layer in sel}["fc2"] == "hidden"
    sel = discover_layers(model, head=["fc1", "fc2"])
    assert [h.name for h in sel.heads] == ["fc1", "fc2"]
    sel = discover_layers(model, head=None)
    assert all(layer.role == "hidden" for layer in sel) and _names(sel)[-1] == "fc2"
    with pytest.raises(
        ValueError, match=r"^`head` must name a module of the model, got 'fc3'\. Close names: (fc1, fc2|fc2, fc1)\.$"
    ):
        discover_layers(model, head="fc3")
    with pytest.raises(ValueError, match=r"^`head` must name a module of the model, got 'zzz'\.$"):
        discover_layers(model, head=["fc1", "zzz"])
    no_weight = "`head` must name a module with a weight matrix CoMHE can regularize, got 'norm' (LayerNorm)."
    with pytest.raises(ValueError, match=re.escape(no_weight)):
        discover_layers(model, head="norm")  # exists, but no weight matrix
    allowed = "'auto', a module name, a list of module names or None"
    for bad in ([3], 3, ["fc1", 2]):
        with pytest.raises(ValueError, match=re.escape(f"`head` must be {allowed}, got {bad!r}.")):
            discover_layers(model, head=bad)
    assert discover_layers(model, head=[]).heads == []  # an empty list names no head, as None does
    # a container resolves to the last candidate inside it
    container = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 6)))
    assert [h.name for h in discover_layers(container, head="1").heads] == ["1.1"]


def test_frozen_shared_and_one_output_head_are_skipped():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    model[2].weight = model[1].weight  # tied weight
    sel = discover_layers(model)
    assert _names(sel) == ["1"]
    assert sel.skipped == [
        ("0", "frozen weight (requires_grad=False)"),
        ("2", "weight shared with 1"),
        ("3", "1 neuron per set (1-output head)"),
    ]
    assert sel.heads == []


def test_mixed_conv_taken_once():
    model = nn.Sequential(MixedConv2d(8, 12, [3, 5]), MixedConv2d(12, 12, [3, 5], depthwise=True))
    sel = discover_layers(model, head=None)
    assert _names(sel) == ["0"]
    assert sel.layers[0].shapes() == [(1, 6, 36), (1, 6, 100)]
    assert sel.skipped == [("1", "1 neuron per set (depthwise conv)")]
    assert _names(discover_layers(model, head=None, grouped="skip")) == ["0"]


def test_neuron_layer_api():
    lin = nn.Linear(4, 12)
    layer = NeuronLayer("qkv", lin, "hidden", split=3)
    assert layer.shapes() == [(3, 4, 4)]
    (sets,) = layer.neuron_sets()
    torch.testing.assert_close(sets, lin.weight.view(3, 4, 4), rtol=0, atol=0)
    assert layer.num_neurons == 12 and layer.num_sets == 3
    assert "qkv" in repr(layer) and "Linear(" not in repr(layer)


def test_summary_counts_and_truncation():
    sel = discover_layers(SmallCNN())
    expected_neurons = sum(t.shape[0] * t.shape[1] for layer in sel for t in layer.neuron_sets())
    expected_sets = sum(t.shape[0] for layer in sel for t in layer.neuron_sets())
    assert sel.summary() == (
        f"CoMHE regularizes 5 layers ({expected_neurons} neurons in {expected_sets} sets); head: fc2; "
        "skipped 1: dw (1 neuron per set (depthwise conv)); not regularized 1: emb.weight (embedding table)"
    )
    assert sel.not_regularized == [("emb.weight", "embedding table")]
    assert expected_neurons == 8 + 16 + 16 + 32 + 5 and expected_sets == 1 + 1 + 4 + 1 + 1
    many = nn.Sequential(*[nn.Conv2d(4, 4, 1, groups=4) for _ in range(8)], nn.Linear(4, 4), nn.Linear(4, 4))
    text = discover_layers(many).summary()
    assert "skipped 8: 0 (1 neuron per set (depthwise conv)), " in text
    assert text.endswith(", … and 3 more") and "\n" not in text
    big = discover_layers(nn.Sequential(nn.Linear(4, 1200), nn.Linear(1200, 3000)), head=None).summary()
    assert big.startswith("CoMHE regularizes 2 layers (4,200 neurons in 2 sets); head: none; skipped 0")


def test_model_type_error():
    with pytest.raises(TypeError, match=re.escape("`model` must be an nn.Module, got str.")):
        discover_layers("resnet18")
    with pytest.raises(TypeError, match=re.escape("`model` must be an nn.Module, got str.")):
        find_heads("resnet18")


def test_user_registered_container(scratch_registry):

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 6) for _ in range(3)])

    neurons.register_extractor(Experts, lambda m: torch.stack([e.weight for e in m.experts]), owns_children=True)
    model = nn.Sequential(Experts(), nn.Linear(6, 3))
    sel = discover_layers(model)
    assert _names(sel) == ["0", "1"]
    assert sel.layers[0].shapes() == [(3, 6, 4)]


@pytest.mark.parametrize("module", [discovery, _walk, _heads], ids=lambda m: m.__name__)
def test_doctests(module):
    results = doctest.testmod(module, raise_on_error=False)
    assert results.attempted > 0 and results.failed == 0


# ------------------------------------------------------------------------------------------------ timm models
TIMM_MODELS = {
    "resnet18": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "mobilenetv3_small_050": {},
    "efficientnet_b0": {},
    "mixnet_s": {},
    "efficientnet_cc_b0_4e": {},
    "resnext26ts": {},
    "convnext_atto": {},
    "mixer_s16_224": {"img_size": 32},
    "swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 1, 1)},
    "resnetv2_50x1_bit": {},
    "regnetx_002": {},
    "densenet121": {},
}

_NON_NEURON = re.compile(
    r"(^|\.)(norm|bn|ln|gn)\d*(\.|$)|pos_embed|cls_token|reg_token|embed\.weight|\bgamma\b|\bbias\b"
)


def _covered_params(model, selection):
    """Names of the parameters whose values enter the selection's neuron sets."""
    names = {id(p): n for n, p in model.named_parameters()}
    covered = []
    for layer in selection:
        params = [layer.module.weight] if hasattr(layer.module, "weight") else list(layer.module.parameters())
        covered.extend(names[id(p)] for p in params)
    return covered


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_models(name):
    model = timm.create_model(name, pretrained=False, num_classes=7, **TIMM_MODELS[name])
    sel = discover_layers(model)
    modules = dict(model.named_modules())

    # the head is get_classifier()
    heads = sel.heads
    assert len(heads) == 1 and heads[0].module is model.get_classifier()
    assert find_heads(model) == [heads[0].name]
    assert heads[0].shapes()[0][:2] == (1, 7)

    # only weight matrices of Linear / Conv-like layers; no norms, embeddings, tokens, biases
    covered = _covered_params(model, sel)
    assert covered, name
    for pname in covered:
        assert not _NON_NEURON.search(pname), pname
        assert model.get_parameter(pname).ndim >= 2
    for layer in sel:
        assert not isinstance(layer.module, (nn.LayerNorm, nn.BatchNorm2d, nn.Embedding))

    # shapes() agrees with the extraction, sets have >= 2 neurons, order is named_modules() order
    order = {n: i for i, n in enumerate(modules)}
    assert [order[layer.name] for layer in sel] == sorted(order[layer.name] for layer in sel)
    for layer in sel:
        sets = layer.neuron_sets()
        assert [tuple(t.shape) for t in sets] == layer.shapes(), layer.name
        assert all(t.shape[1] >= 2 for t in sets)

    # depthwise convs are skipped with a reason, every skip names a candidate
    for skipped_name, reason in sel.skipped:
        assert skipped_name in modules and reason
        module = modules[skipped_name]
        if "depthwise" in reason:
            groups = getattr(module, "groups", None)
            assert groups is None or groups == module.in_channels  # MixedConv2d has no `groups`

    # summary mentions the counts
    summary = sel.summary()
    neurons_total = sum(t.shape[0] * t.shape[1] for layer in sel for t in layer.neuron_sets())
    assert summary.startswith(f"CoMHE regularizes {len(sel.layers):,} layers ({neurons_total:,} neurons in ")
    assert f"head: {heads[0].name}" in summary and f"skipped {len(sel.skipped)}" in summary


def test_timm_specific_layer_handling():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, patch_size=4)
    sel = discover_layers(vit)
    qkv = [layer for layer in sel if layer.name.endswith("attn.qkv")]
    assert len(qkv) == 12 and all(layer.split == 3 for layer in qkv)
    assert qkv[0].shapes() == [(3, 192, 192)]
    assert all(layer.split is None for layer in sel if not layer.name.endswith("qkv"))
    assert "patch_embed.proj" in _names(sel)

    for name in ("mobilenetv3_small_050", "efficientnet_b0", "convnext_atto", "mixnet_s"):
        model = timm.create_model(name, pretrained=False, num_classes=7)
        skipped = dict(discover_layers(model).skipped)
        dw = [n for n in skipped if n.endswith("conv_dw")]
        assert dw and all(skipped[n] == "1 neuron per set (depthwise conv)" for n in dw), name

    mixnet = discover_layers(timm.create_model("mixnet_s", pretrained=False, num_classes=7))
    mixed = [layer for layer in mixnet if isinstance(layer.module, MixedConv2d)]
    assert mixed and all(len(layer.shapes()) > 1 for layer in mixed)
    assert not any(n.startswith(layer.name + ".") for layer in mixed for n in mixnet.names)

    cc = discover_layers(timm.create_model("efficientnet_cc_b0_4e", pretrained=False, num_classes=7))
    cond = [layer for layer in cc if type(layer.module).__name__ == "CondConv2d"]
    assert cond and all(layer.shapes()[0][0] == 4 * layer.module.groups for layer in cond)

    resnext = discover_layers(timm.create_model("resnext26ts", pretrained=False, num_classes=7))
    grouped = [layer for layer in resnext if getattr(layer.module, "groups", 1) > 1]
    assert grouped and all(layer.shapes()[0][0] == layer.module.groups for layer in grouped)

    bit = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=7)
    std = discover_layers(bit, std_conv="standardized")
    conv = next(layer for layer in std if type(layer.module).__name__ == "StdConv2d")
    assert conv.std_conv == "standardized"
    (sets,) = conv.neuron_sets()
    torch.testing.assert_close(sets.mean(-1), torch.zeros_like(sets.mean(-1)), atol=1e-5, rtol=0)


def test_timm_headless_wrapped_and_distilled():
    headless = timm.create_model("resnet18", pretrained=False, num_classes=0)
    sel = discover_layers(headless)
    assert sel.heads == [] and "head: none" in sel.summary() and find_heads(headless) == []
    assert _names(sel)[-1] != "fc"

    class Wrapper(nn.Module):  # e.g. a LightningModule holding a timm model
        def __init__(self):
            super().__init__()
            self.net = timm.create_model("resnet18", pretrained=False, num_classes=7)
            self.aux = nn.Linear(7, 3)

    sel = discover_layers(Wrapper())
    assert [h.name for h in sel.heads] == ["net.fc"]
    assert {layer.name: layer.role for layer in sel}["aux"] == "hidden"

    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=7, device="meta")
    assert [h.name for h in discover_layers(deit).heads] == ["head", "head_dist"]
    levit = timm.create_model("levit_128s", pretrained=False, num_classes=7, device="meta")
    assert [h.name for h in discover_layers(levit).heads] == ["head.linear", "head_dist.linear"]


# ------------------------------------------------------------------------------------------------ head rule
class _TimmStyle(nn.Module):
    """A tiny timm-style model: ``get_classifier()`` returns its head."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.fc = nn.Linear(8, num_classes)

    def get_classifier(self):
        return self.fc


def test_find_heads_plain_models():
    assert find_heads(SmallCNN()) == ["fc2"]
    assert find_heads(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())) == []
    # a container head resolves to the last candidate inside it; no filters or skip rules apply
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    assert find_heads(model) == ["1"]
    assert (
        discover_layers(model).heads == []
        and ("1", "1 neuron per set (1-output head)") in discover_layers(model).skipped
    )


def test_find_heads_every_outermost_root_side_by_side():
    class Pair(nn.Module):  # e.g. a LightningModule holding a student and a teacher
        def __init__(self):
            super().__init__()
            self.student = _TimmStyle()
            self.teacher = _TimmStyle(num_classes=5)
            self.fuse = nn.Linear(8, 8)

    model = Pair()
    assert find_heads(model) == ["student.fc", "teacher.fc"]
    sel = discover_layers(model)
    assert [h.name for h in sel.heads] == ["student.fc", "teacher.fc"]
    assert {layer.name: layer.role for layer in sel} == {
        "student.body": "hidden",
        "student.fc": "head",
        "teacher.body": "hidden",
        "teacher.fc": "head",
        "fuse": "hidden",
    }
    # the head filter still applies per layer
    assert [h.name for h in discover_layers(model, exclude="teacher").heads] == ["student.fc"]


def test_find_heads_two_real_timm_models_side_by_side():
    class Ensemble(nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = timm.create_model("resnet18", pretrained=False, num_classes=7, device="meta")
            self.vit = timm.create_model(
                "vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, patch_size=4, device="meta"
            )

    model = Ensemble()
    assert find_heads(model) == ["cnn.fc", "vit.head"]
    sel = discover_layers(model)
    assert [h.name for h in sel.heads] == ["cnn.fc", "vit.head"]
    assert [h.module for h in sel.heads] == [model.cnn.get_classifier(), model.vit.get_classifier()]


def test_find_heads_only_outermost_roots_and_cfg_fallback():
    class Outer(_TimmStyle):  # a timm-style model holding another one: only the outer classifier is the head
        def __init__(self):
            super().__init__()
            self.inner = _TimmStyle()

    assert find_heads(Outer()) == ["fc"]

    class Broken(_TimmStyle):  # get_classifier() fails: the pretrained_cfg names the classifier
        pretrained_cfg = {"classifier": "body"}

        def get_classifier(self):
            raise NotImplementedError

    assert find_heads(Broken()) == ["body"]
    wrapped = nn.Sequential(Broken())
    assert find_heads(wrapped) == ["0.body"]
    Broken.pretrained_cfg = {"classifier": ["fc", "missing"]}
    assert find_heads(Broken()) == ["fc"]
    Broken.pretrained_cfg = {}
    assert find_heads(Broken()) == []


def test_find_heads_is_what_auto_selects():
    for model in (SmallCNN(), timm.create_model("resnet18", pretrained=False, num_classes=7, device="meta")):
        assert find_heads(model) == [h.name for h in discover_layers(model).heads]
        assert find_heads(model) == _heads.auto_heads(model, _walk.candidates(model))


# ------------------------------------------------------------------------------------------------ config
def test_config_is_an_alternative_to_the_keywords():
    model = SmallCNN()
    kwargs = {"include": [r"^fc", "grouped"], "exclude": "2$", "head": "fc1", "grouped": "skip", "std_conv": "raw"}
    by_keywords = discover_layers(model, **kwargs)
    by_config = discover_layers(model, config=SelectionConfig(**kwargs))
    assert by_config.names == by_keywords.names == ["fc1"]
    assert by_config.skipped == by_keywords.skipped == [("grouped", "grouped conv (groups=4), grouped='skip'")]
    assert [h.name for h in by_config.heads] == ["fc1"]
    # keywords at their defaults may come with a config
    assert discover_layers(model, head="auto", grouped="per_group", config=SelectionConfig(head=None)).heads == []
    with pytest.raises(ValueError, match="include='nomatch', exclude=None, grouped='skip'"):
        discover_layers(model, config=SelectionConfig(include="nomatch", grouped="skip"))


def test_config_and_keywords_together_raise():
    config = SelectionConfig(include="fc")
    with pytest.raises(ValueError, match=r"^`config` must be the only selection argument .* got config=.*and ") as err:
        discover_layers(SmallCNN(), exclude="2$", grouped="skip", config=config)
    assert "SelectionConfig(include='fc'" in str(err.value) and str(err.value).endswith("exclude='2$', grouped='skip'.")
    with pytest.raises(TypeError, match=re.escape("`config` must be a SelectionConfig or None, got dict.")):
        discover_layers(SmallCNN(), config={"include": "fc"})


def test_keyword_defaults_are_the_config_defaults():
    params = inspect.signature(discover_layers).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(SelectionConfig)}
    assert {name: params[name].default for name in defaults} == defaults
    assert params["config"].default is None


def test_names_importable_from_the_public_modules():
    for name in [*discovery.__all__, "STD_CONV_MODES", "Split", "StdConvMode", "extract_neuron_sets"]:
        assert getattr(discovery, name) is not None  # the names importable from `discovery` before the split
    for name in neurons.__all__:
        assert getattr(neurons, name) is not None
    assert discovery.extract_neuron_sets is neurons.extract_neuron_sets
    assert discovery.Split is neurons.Split is _fused.Split
    assert neurons.STD_CONV_MODES == ("raw", "standardized")
