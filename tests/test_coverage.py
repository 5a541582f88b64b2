"""Every linear map of a model is regularized or listed: parametrized weights, attention, recurrent gates, LoRA, d = 1.

The references are written here by hand: the neurons as slices of the parameters, the energy as the mean over the
pairs of ``1 / (2 - 2 c_ij)`` (full-space MHE, ``s = 2``) in float64, its gradient by autograd through that loop.
"""

import copy
import doctest
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader, TensorDataset

from lightning_comhe import CoMHE, _extractors, _parametrized, _parts
from lightning_comhe.discovery import discover_layers, find_heads
from lightning_comhe.neurons import register_extractor
from lightning_comhe.regularizer import CoMHERegularizer
from tests.helpers import cpu_trainer

DIM1 = "neurons of dimension d=1 are all collinear (no energy to minimize)"
LORA = "LoRA adapter (lora_A / lora_B): a low-rank update of another layer, not a layer's neurons"
KNOWN = "only weight_norm with dim=0 or None and spectral_norm keep the row directions of a parameter"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def hand_mhe(rows, eps=1e-4):
    """Full-space MHE with s = 2 of the rows of ``rows``, by a double loop (eps inside each norm)."""
    n = rows.shape[0]
    norms = [torch.sqrt(rows[i] @ rows[i] + eps) for i in range(n)]
    terms = [1 / (2 - 2 * (rows[i] @ rows[j]) / (norms[i] * norms[j])) for i in range(n) for j in range(i + 1, n)]
    return torch.stack(terms).mean()


def linear_maps(model):
    """``{parameter name: layer name}`` of every weight matrix of a Linear, Conv, attention or recurrent module.

    Written from the module types, independently of discovery: the layer name is the module's for Linear / Conv,
    ``<module>.<param>`` for attention projections and recurrent weights; a parametrized weight is named by its
    stored parameters.
    """
    out = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            if hasattr(module, "parametrizations"):
                for pname, _ in module.parametrizations.weight.named_parameters():
                    out[f"{prefix}parametrizations.weight.{pname}"] = mname
            else:
                out[f"{prefix}weight"] = mname
        elif isinstance(module, (nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)):
            for pname, p in module.named_parameters(recurse=False):
                if p.ndim >= 2:
                    out[f"{prefix}{pname}"] = f"{prefix}{pname}"
    return out


def assert_every_linear_map_covered(model, selection):
    """Each weight matrix is in a regularized layer's weights or its layer is skipped; report the regularized ones."""
    names = {id(p): n for n, p in model.named_parameters()}
    regularized = {names[id(t)] for layer in selection for t in layer.weights()}
    skipped = dict(selection.skipped)
    for pname, layer in linear_maps(model).items():
        direction = pname.endswith(".original0")  # a weight norm's magnitude g: covered by its layer, not a neuron
        layer_names = {lay.name for lay in selection}
        assert pname in regularized or layer in skipped or (direction and layer in layer_names), pname
    return regularized


# ------------------------------------------------------------------------------------------------ parametrizations
def test_weight_norm_layers_all_regularized_deterministically():
    for _ in range(20):  # the computed weights are temporaries: their id() was reused, so layers were "shared"
        model = nn.Sequential(*[parametrizations.weight_norm(nn.Linear(8, 8)) for _ in range(5)])
        selection = discover_layers(model, head=None)
        assert selection.names == ["0", "1", "2", "3", "4"] and selection.skipped == []
        for layer, module in zip(selection, model, strict=True):
            assert layer.weights() == [module.parametrizations.weight.original1]


def test_weight_norm_penalty_is_the_energy_of_v():
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(5, 6)), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].parametrizations.weight.original0.mul_(torch.rand(6, 1) * 3)  # g ≠ ‖v‖: W and v rows differ
    reg = CoMHERegularizer(model, "mhe")
    reg.refresh()
    reg().penalty.backward()
    v = model[0].parametrizations.weight.original1
    v64, head64 = (t.detach().double().requires_grad_() for t in (v, model[2].weight))
    ref = hand_mhe(v64) + 10 * hand_mhe(head64)
    ref.backward()
    torch.testing.assert_close(reg().penalty.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(v.grad.double(), v64.grad, rtol=1e-5, atol=1e-7)
    assert model[0].parametrizations.weight.original0.grad is None  # the magnitude g is not regularized


def test_spectral_norm_penalty_has_no_side_effects():
    sn = parametrizations.spectral_norm(nn.Linear(6, 5))
    model = nn.Sequential(nn.Linear(4, 6), sn, nn.Linear(5, 3)).train()
    state = {k: t.clone() for k, t in model.state_dict().items()}
    reg = CoMHERegularizer(model, "mhe")
    for _ in range(3):
        reg.refresh()
        out = reg()
        out.penalty.backward()
    for k, t in model.state_dict().items():  # _u and _v included: the power iteration never ran
        assert torch.equal(t, state[k]), k
    original = sn.parametrizations.weight.original
    w0, orig64, w2 = (t.detach().double().requires_grad_() for t in (model[0].weight, original, model[2].weight))
    ref = hand_mhe(w0) + hand_mhe(orig64) + 10 * hand_mhe(w2)
    ref.backward()
    torch.testing.assert_close(out.penalty.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(original.grad.double() / 3, orig64.grad, rtol=1e-5, atol=1e-7)  # three backwards


def test_hook_based_norms_and_shared_parameters():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        a, b = nn.utils.weight_norm(nn.Linear(4, 6)), nn.utils.weight_norm(nn.Linear(4, 6))
    b.weight_v = a.weight_v  # the same direction parameter: shared, whatever the computed weights are
    c = nn.utils.spectral_norm(nn.Linear(6, 5))
    p, q = parametrizations.weight_norm(nn.Linear(5, 5)), parametrizations.weight_norm(nn.Linear(5, 5))
    q.parametrizations.weight.original1 = p.parametrizations.weight.original1
    model = nn.Sequential(a, b, c, p, q)
    selection = discover_layers(model, head=None)
    assert selection.names == ["0", "2", "3"]
    assert selection.skipped == [("1", "weight shared with 0"), ("4", "weight shared with 3")]
    assert [layer.weights() for layer in selection][:2] == [[a.weight_v], [c.weight_orig]]
    u = c.weight_u.clone()
    CoMHERegularizer(model, "mhe", head=None)().penalty.backward()
    assert torch.equal(c.weight_u, u) and a.weight_v.grad is not None and a.weight_g.grad is None


def test_other_parametrizations_are_skipped_with_a_reason():
    model = nn.Sequential(
        parametrizations.orthogonal(nn.Linear(4, 4)),
        parametrizations.weight_norm(nn.Linear(4, 6), dim=1),
        parametrizations.weight_norm(nn.Linear(6, 6), dim=None),
        nn.Linear(6, 3),
    )
    selection = discover_layers(model)
    assert selection.names == ["2", "3"]
    assert selection.skipped == [
        ("0", f"weight parametrized by _Orthogonal ({KNOWN})"),
        ("1", f"weight_norm over dim=1 rescales columns, not rows ({KNOWN})"),
    ]
    assert_every_linear_map_covered(model, selection)


def test_a_user_extractor_opts_a_parametrized_layer_in():
    layer = parametrizations.orthogonal(nn.Linear(4, 4))
    register_extractor(type(layer), lambda m: m.weight)  # parametrize gives each layer a class of its own
    try:
        model = nn.Sequential(layer, parametrizations.orthogonal(nn.Linear(4, 4)))
        selection = discover_layers(model, head=None)
    finally:
        del _extractors.REGISTRY[type(layer)]
    assert selection.names == ["0"] and [n for n, _ in selection.skipped] == ["1"]
    (sets,) = selection.layers[0].neuron_sets()
    torch.testing.assert_close(sets, layer.weight[None])


# ------------------------------------------------------------------------------------------------ dimension 1
def test_neurons_of_dimension_one_are_skipped():
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Unflatten(1, (8, 1, 1)))
    model.append(nn.Conv2d(8, 16, 1, groups=8))  # one input channel per group, 1×1: d = 1, N = 2
    model.append(nn.Conv2d(16, 4, 1))
    selection = discover_layers(model, head=None)
    assert selection.names == ["2", "5"]
    assert selection.skipped == [("0", DIM1), ("4", DIM1)]
    rnn = discover_layers(nn.LSTM(1, 4), head=None)  # only the input weights have d = 1
    assert rnn.names == ["weight_hh_l0"] and rnn.skipped == [("weight_ih_l0", DIM1)]


def test_standardized_neurons_of_dimension_two_are_skipped():
    timm = pytest.importorskip("timm")
    model = nn.Sequential(timm.layers.StdConv2d(2, 4, 1), nn.Conv2d(4, 4, 1))
    assert discover_layers(model, head=None).names == ["0", "1"]
    selection = discover_layers(model, head=None, std_conv="standardized")
    reason = "standardized neurons of dimension d=2 are all collinear (centring leaves one dimension)"
    assert selection.names == ["1"] and selection.skipped == [("0", reason)]


# ------------------------------------------------------------------------------------------------ attention, RNNs
def test_transformer_encoder_layer():
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    selection = discover_layers(model)
    assert [(layer.name, layer.split, layer.shapes()) for layer in selection] == [
        ("self_attn.in_proj_weight", 3, [(3, 8, 8)]),
        ("self_attn.out_proj", None, [(1, 8, 8)]),
        ("linear1", None, [(1, 16, 8)]),
        ("linear2", None, [(1, 8, 16)]),
    ]
    assert [h.name for h in selection.heads] == ["linear2"]
    assert assert_every_linear_map_covered(model, selection) == {
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    }
    (qkv,) = selection.layers[0].neuron_sets()
    w = model.self_attn.in_proj_weight
    torch.testing.assert_close(qkv, torch.stack([w[:8], w[8:16], w[16:]]), rtol=0, atol=0)
    assert selection.not_regularized == []


def test_multihead_attention_with_other_key_and_value_widths():
    model = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)
    selection = discover_layers(model, head=None)
    assert [(layer.name, layer.shapes()) for layer in selection] == [
        ("q_proj_weight", [(1, 8, 8)]),
        ("k_proj_weight", [(1, 8, 5)]),
        ("v_proj_weight", [(1, 8, 3)]),
        ("out_proj", [(1, 8, 8)]),
    ]
    assert len(assert_every_linear_map_covered(model, selection)) == 4
    biased = discover_layers(nn.MultiheadAttention(8, 2, add_bias_kv=True), head=None)
    assert biased.names == ["in_proj_weight", "out_proj"] and biased.not_regularized == []  # bias_k: (1, 1, 8)


def test_bidirectional_stacked_lstm_and_gru():
    lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    selection = discover_layers(lstm, head=None)
    expected = [f"weight_{m}_l{k}{r}" for k in (0, 1) for r in ("", "_reverse") for m in ("ih", "hh")]
    assert selection.names == expected and selection.skipped == []
    assert [layer.shapes() for layer in selection][:4] == [[(4, 5, 3)], [(4, 5, 5)]] * 2
    assert [layer.shapes() for layer in selection][4] == [(4, 5, 10)]  # layer 1 reads both directions
    assert len(assert_every_linear_map_covered(lstm, selection)) == 8
    for layer in selection:
        (sets,) = layer.neuron_sets()
        w = getattr(lstm, layer.param)
        torch.testing.assert_close(sets, torch.stack(w.chunk(4)), rtol=0, atol=0)  # input, forget, cell, output
    model = nn.Sequential()
    model.add_module("gru", nn.GRU(4, 6))
    model.add_module("cell", nn.LSTMCell(6, 2))
    selection = discover_layers(model, head=None)
    assert [(layer.name, layer.shapes()) for layer in selection] == [
        ("gru.weight_ih_l0", [(3, 6, 4)]),
        ("gru.weight_hh_l0", [(3, 6, 6)]),
        ("cell.weight_ih", [(4, 2, 6)]),
        ("cell.weight_hh", [(4, 2, 2)]),
    ]
    with pytest.raises(ValueError, match="No layer selected"):
        discover_layers(nn.GRU(4, 1), head=None)  # one neuron per gate
    lone = discover_layers(nn.Sequential(nn.GRU(4, 1), nn.Linear(4, 4)), head=None)
    assert lone.skipped == [
        ("0.weight_ih_l0", "1 neuron per set (1 output)"),
        ("0.weight_hh_l0", "1 neuron per set (1 output)"),
    ]


def test_torchvision_vision_transformer():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    selection = discover_layers(model)
    regularized = assert_every_linear_map_covered(model, selection)
    assert len(regularized) == 10 and selection.skipped == []  # conv_proj, 2 × (in_proj, out_proj, mlp 0 / 3), head
    assert [h.name for h in selection.heads] == ["heads.head"]
    assert selection.not_regularized == [
        ("class_token", "token or position table"),
        ("encoder.pos_embedding", "token or position table"),
    ]
    summary = selection.summary()
    assert summary.endswith(
        "skipped 0; not regularized 2: class_token (token or position table), encoder.pos_embedding "
        "(token or position table)"
    )


def test_not_regularized_lists_embeddings_tokens_and_unsupported_weights():
    model = nn.Module()
    model.emb = nn.Embedding(10, 4)
    model.bilinear = nn.Bilinear(4, 4, 3)
    model.scale = nn.Parameter(torch.ones(4, 1, 1))  # a per-channel scale: not worth listing
    model.table = nn.Parameter(torch.zeros(3, 3))
    model.fc = nn.Linear(4, 3)
    model.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
    selection = discover_layers(model)
    assert selection.names == ["fc"]
    assert selection.not_regularized == [
        ("table", "Module parameter without a neuron extractor"),
        ("emb.weight", "embedding table"),
        ("bilinear.weight", "Bilinear parameter without a neuron extractor"),
    ]
    # filtered-out layers are the user's choice: neither skipped nor "not regularized"
    model.extra = nn.Linear(3, 3)
    assert discover_layers(model, exclude="extra").not_regularized == selection.not_regularized


# ------------------------------------------------------------------------------------------------ LoRA
class _PeftLinear(nn.Module):
    """peft's LoRA ``Linear``: the frozen-or-not ``base_layer`` plus ModuleDicts ``lora_A`` / ``lora_B``."""

    def __init__(self, base, r=2, adapter="default"):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({adapter: nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({adapter: nn.Linear(r, base.out_features, bias=False)})

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class _LoraLinear(nn.Linear):
    """loralib style: a Linear whose ``lora_A`` / ``lora_B`` are parameters."""

    def __init__(self, i, o, r=2):
        super().__init__(i, o)
        self.lora_A = nn.Parameter(torch.randn(r, i))
        self.lora_B = nn.Parameter(torch.zeros(o, r))


def test_lora_adapters_are_skipped_and_never_the_head():
    model = nn.Sequential(_PeftLinear(nn.Linear(4, 8)), nn.ReLU(), _PeftLinear(nn.Linear(8, 3)))
    model[0].base_layer.requires_grad_(False)
    assert find_heads(model) == ["2.base_layer"]  # the last nn.Linear was 2.lora_B.default
    selection = discover_layers(model)
    assert [(layer.name, layer.role) for layer in selection] == [("2.base_layer", "head")]
    assert selection.skipped == [
        ("0.base_layer", "frozen weight (requires_grad=False)"),
        ("0.lora_A.default", LORA),
        ("0.lora_B.default", LORA),
        ("2.lora_A.default", LORA),
        ("2.lora_B.default", LORA),
    ]
    with pytest.raises(ValueError, match=r"`head` must not name a LoRA adapter \(lora_A / lora_B\), got '2\.lora_B"):
        discover_layers(model, head="2.lora_B.default")
    assert [h.name for h in discover_layers(model, head="2").heads] == ["2.base_layer"]
    # a Linear held directly as `lora_B`, and loralib-style parameters
    direct = nn.Sequential(nn.Linear(4, 8), nn.Module())
    direct[1].lora_A, direct[1].lora_B = nn.Linear(8, 2), nn.Linear(2, 8)
    assert find_heads(direct) == ["0"]
    params = discover_layers(nn.Sequential(_LoraLinear(4, 8), nn.Linear(8, 3)))
    assert params.names == ["0", "1"]
    assert params.not_regularized == [("0.lora_A", "LoRA adapter"), ("0.lora_B", "LoRA adapter")]


def test_lora_wrapped_timm_style_classifier_resolves_to_the_base_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.fc = _PeftLinear(nn.Linear(8, 3))

        def get_classifier(self):
            return self.fc

    assert find_heads(Net()) == ["fc.base_layer"]


# ------------------------------------------------------------------------------------------------ a real Trainer
class _Net(LightningModule):
    """Attention, cross attention with other key / value widths, a GRU, weight and spectral norm, then the head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.cross = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=True)
        self.rnn = nn.GRU(8, 4, batch_first=True)
        self.wn = parametrizations.weight_norm(nn.Linear(4, 6))
        self.sn = parametrizations.spectral_norm(nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.enc(x)
        h = h + self.cross(h, x[..., :5], x[..., :6], need_weights=False)[0]
        out, _ = self.rnn(h)
        return self.head(self.sn(torch.tanh(self.wn(out[:, -1]))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.0 * F.mse_loss(self(x), y)  # the gradients are the penalty's alone

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _GradCapture(Callback):
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()}


def test_trainer_step_gradients_equal_the_hand_computed_energy_gradient():
    model = _Net()
    initial = copy.deepcopy(model)
    capture = _GradCapture()
    comhe = CoMHE(variant="mhe")
    data = TensorDataset(torch.randn(4, 3, 8), torch.randn(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu_trainer(max_steps=1, callbacks=[comhe, capture]).fit(model, DataLoader(data, batch_size=4))

    params = {n: p.detach().double().requires_grad_() for n, p in initial.named_parameters()}
    a = params["enc.self_attn.in_proj_weight"]
    hidden = [a[:8], a[8:16], a[16:]]  # q, k, v of the self attention
    hidden += [params[f"cross.{m}_proj_weight"] for m in "qkv"]
    hidden += [params[n] for n in ("enc.self_attn.out_proj.weight", "cross.out_proj.weight")]
    hidden += [params[n] for n in ("enc.linear1.weight", "enc.linear2.weight")]
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l0"):
        hidden += list(params[name].chunk(3))  # reset, update, new gates
    hidden += [params["wn.parametrizations.weight.original1"], params["sn.parametrizations.weight.original"]]
    reference = sum(hand_mhe(w) for w in hidden) + 10 * hand_mhe(params["head.weight"])
    reference.backward()

    selection = comhe.regularizer.selection
    assert len(selection) == 13 and selection.skipped == [] and selection.not_regularized == []
    nonzero = set()
    for name, p in params.items():
        got = capture.grads[name]
        if p.grad is None or not p.grad.any():
            assert got is None or not got.any(), name
            continue
        nonzero.add(name)
        torch.testing.assert_close(got.double(), p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert {"enc.self_attn.in_proj_weight", "cross.q_proj_weight", "cross.k_proj_weight"} <= nonzero
    assert {"cross.v_proj_weight", "rnn.weight_hh_l0", "wn.parametrizations.weight.original1"} <= nonzero
    assert len(nonzero) == 13  # every regularized weight matrix; g, biases and norms get nothing


@pytest.mark.parametrize("module", [_parametrized, _parts], ids=lambda m: m.__name__)
def test_doctests(module):
    results = doctest.testmod(module, raise_on_error=False)
    assert results.attempted > 0 and results.failed == 0
