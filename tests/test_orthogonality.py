"""Peer regularizers (soft orthogonality, orthonormality, SRIP): brute-force references, gradients, state, errors."""

import copy
import itertools
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_comhe import CoMHE, orthonormality, soft_orthogonality, srip, srip_power_iteration
from lightning_comhe.functional.orthogonality import gram_residual, gram_side
from lightning_comhe.regularizer import PEER_DEFAULT_WEIGHTS, CoMHERegularizer
from tests.helpers import TinyMLP, assert_nested_equal, assert_params_equal, cpu_trainer, make_loader

SHAPES = [(3, 7), (5, 5), (9, 4), (1, 6), (6, 1)]


# --------------------------------------------------------------------------------------------------------------------
# brute-force references: plain float64 Python loops
# --------------------------------------------------------------------------------------------------------------------
def _loop_rows(w: Tensor, normalize: bool, eps: float) -> list[list[float]]:
    rows = w.double().tolist()
    if normalize:
        rows = [[x / (sum(y * y for y in r) + eps) ** 0.5 for x in r] for r in rows]
    return rows


def _loop_residual(w: Tensor, normalize: bool = False, eps: float = 1e-4) -> list[list[float]]:
    """``G - I`` of the smaller Gram, with explicit sums."""
    rows = _loop_rows(w, normalize, eps)
    n, d = len(rows), len(rows[0])
    if n <= d:
        return [[sum(rows[i][k] * rows[j][k] for k in range(d)) - (i == j) for j in range(n)] for i in range(n)]
    return [[sum(rows[k][i] * rows[k][j] for k in range(n)) - (i == j) for j in range(d)] for i in range(d)]


def _loop_so(w: Tensor, normalize: bool = False, eps: float = 1e-4) -> float:
    return sum(x * x for row in _loop_residual(w, normalize, eps) for x in row)


def _loop_neuron_gram_so(w: Tensor) -> float:
    """``‖W Wᵀ − I_N‖²_F`` on the neuron Gram whatever the shape (for the constant-offset identity)."""
    rows = w.double().tolist()
    n, d = len(rows), len(rows[0])
    return sum((sum(rows[i][k] * rows[j][k] for k in range(d)) - (i == j)) ** 2 for i in range(n) for j in range(n))


def _spectral_norm(w: Tensor, normalize: bool = False, eps: float = 1e-4) -> float:
    """Brute force: ``torch.linalg.matrix_norm(M, ord=2)`` of the loop-built residual."""
    return float(torch.linalg.matrix_norm(torch.tensor(_loop_residual(w, normalize, eps), dtype=torch.float64), ord=2))


def _rand(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------------
# soft orthogonality / orthonormality
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "normalize"), list(itertools.product(SHAPES, (False, True))))
def test_soft_orthogonality_matches_loops(shape: tuple[int, int], normalize: bool) -> None:
    w = _rand(*shape, seed=sum(shape))
    got = soft_orthogonality(w, normalize=normalize)
    assert got.dtype == torch.float64 and got.shape == ()
    assert got.item() == pytest.approx(_loop_so(w, normalize), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_smaller_gram_differs_from_neuron_gram_by_the_constant_n_minus_d(shape: tuple[int, int]) -> None:
    w = _rand(*shape, seed=3)
    n, d = shape
    assert soft_orthogonality(w).item() + (n - d if n > d else 0) == pytest.approx(_loop_neuron_gram_so(w), rel=1e-12)
    assert gram_residual(w).shape == (min(n, d), min(n, d))
    assert gram_side(n, d) == ("neurons" if n <= d else "features")


def test_batched_equals_per_set_and_orthonormality_is_normalized_so() -> None:
    w = _rand(4, 6, 10, seed=1)
    batched = soft_orthogonality(w)
    assert batched.shape == (4,)
    for b in range(4):
        torch.testing.assert_close(batched[b], soft_orthogonality(w[b]), rtol=1e-14, atol=0)
    torch.testing.assert_close(orthonormality(w), soft_orthogonality(w, normalize=True), rtol=0, atol=0)


def test_orthonormality_is_scale_invariant_and_zero_on_orthogonal_rows() -> None:
    w = _rand(5, 12, seed=2)
    scales = torch.tensor([0.1, 3.0, 7.0, 0.5, 2.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(orthonormality(w * scales, eps=1e-14), orthonormality(w, eps=1e-14), rtol=1e-9, atol=0)
    q, _ = torch.linalg.qr(_rand(12, 5, seed=4))  # 5 orthonormal columns
    assert orthonormality(q.T * 4.0, eps=1e-14).item() < 1e-20
    assert soft_orthogonality(q.T).item() < 1e-24
    assert soft_orthogonality(q.T * 4.0).item() == pytest.approx(5 * (16 - 1) ** 2)  # raw SO also pulls norms to 1


def test_tight_frame_reaches_zero_when_n_exceeds_d() -> None:
    q, _ = torch.linalg.qr(_rand(9, 4, seed=5))  # 9 neurons in R^4 with orthonormal columns: W^T W = I_4
    assert soft_orthogonality(q).item() < 1e-24


@pytest.mark.parametrize(("shape", "normalize"), [((4, 7), False), ((4, 7), True), ((7, 3), False), ((7, 3), True)])
def test_soft_orthogonality_gradcheck(shape: tuple[int, int], normalize: bool) -> None:
    w = _rand(*shape, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: soft_orthogonality(x, normalize=normalize), (w,))
    assert torch.autograd.gradgradcheck(lambda x: soft_orthogonality(x, normalize=normalize), (w,))


def test_low_precision_input_is_computed_in_float32() -> None:
    w = _rand(6, 9, seed=7)
    out = soft_orthogonality(w.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(_loop_so(w.to(torch.bfloat16).double()), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert soft_orthogonality(w.float()).dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------------
# SRIP
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "normalize"), list(itertools.product([(3, 7), (5, 5), (9, 4)], (False, True))))
def test_srip_power_iteration_converges_to_brute_force_spectral_norm(shape: tuple[int, int], normalize: bool) -> None:
    w = _rand(*shape, seed=11)
    g = torch.Generator().manual_seed(0)
    v = srip_power_iteration(w, None, 500, normalize=normalize, generator=g)
    assert v.shape == (min(shape),) and v.norm().item() == pytest.approx(1.0)
    assert srip(w, v, normalize=normalize).item() == pytest.approx(_spectral_norm(w, normalize), rel=1e-8)
    assert srip(w, v, normalize=normalize, squared=True).item() == pytest.approx(
        _spectral_norm(w, normalize) ** 2, rel=1e-8
    )


def test_srip_gradient_at_convergence_is_the_spectral_norm_gradient() -> None:
    w = _rand(4, 9, seed=12)
    v = srip_power_iteration(w, None, 1000, generator=torch.Generator().manual_seed(1))
    a = w.clone().requires_grad_()
    srip(a, v).backward()
    b = w.clone().requires_grad_()
    torch.linalg.matrix_norm(b @ b.T - torch.eye(4, dtype=torch.float64), ord=2).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-9)


def test_srip_batched_and_persistent_vector_warm_start() -> None:
    w = _rand(3, 5, 8, seed=13)
    g = torch.Generator().manual_seed(2)
    v0 = srip_power_iteration(w, None, 0, generator=g)
    assert v0.shape == (3, 5)
    torch.testing.assert_close(v0.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    v = v0
    for _ in range(300):  # one step at a time from the persistent vector == 300 steps at once
        v = srip_power_iteration(w, v, 1)
    torch.testing.assert_close(v, srip_power_iteration(w, v0, 300), rtol=1e-10, atol=1e-12)
    expected = torch.tensor([_spectral_norm(w[b]) for b in range(3)], dtype=torch.float64)
    torch.testing.assert_close(srip(w, v), expected, rtol=1e-8, atol=0)
    for b in range(3):
        torch.testing.assert_close(srip(w, v)[b], srip(w[b], v[b]), rtol=1e-14, atol=0)


def test_srip_gradcheck_with_fixed_vector() -> None:
    w = _rand(5, 3, seed=14)
    v = srip_power_iteration(w, None, 3, generator=torch.Generator().manual_seed(3))
    for normalize, squared in itertools.product((False, True), (False, True)):
        fn = lambda x, n=normalize, s=squared: srip(x, v, normalize=n, squared=s)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (w.clone().requires_grad_(),))


def test_srip_is_finite_with_zero_gradient_on_orthonormal_rows() -> None:
    q, _ = torch.linalg.qr(_rand(8, 3, seed=15))
    w = q.T.clone().requires_grad_()
    v = srip_power_iteration(w, None, 2, generator=torch.Generator().manual_seed(0))
    out = srip(w, v)
    out.backward()
    assert out.item() < 1e-12 and torch.isfinite(w.grad).all()


# --------------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------------
def test_functional_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="shape"):
        soft_orthogonality(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point"):
        soft_orthogonality(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        soft_orthogonality([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        soft_orthogonality(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="eps"):
        orthonormality(torch.randn(2, 3), eps=0.0)
    with pytest.raises(ValueError, match=r"`vectors` must have shape \(3,\)"):
        srip(torch.randn(3, 5), torch.randn(5))
    with pytest.raises(ValueError, match="iterations"):
        srip_power_iteration(torch.randn(3, 5), None, -1)
    with pytest.raises(ValueError, match="NaN"):
        srip(torch.tensor([[1.0, float("inf")]]), torch.ones(1))


def test_functional_messages_name_argument_bound_and_value() -> None:
    """One style: `` `name` must be …, got … ``."""
    with pytest.raises(ValueError, match=r"^`iterations` must be an int >= 0, got -1\.$"):
        srip_power_iteration(torch.randn(3, 5), None, -1)
    with pytest.raises(ValueError, match=r"^`vectors` must have shape \(3,\) .*, got \(5,\)\.$"):
        srip(torch.randn(3, 5), torch.randn(5))
    with pytest.raises(TypeError, match=r"^`vectors` must be a floating-point torch.Tensor, got list\.$"):
        srip(torch.randn(3, 5), [1.0, 0.0, 0.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^`eps` must be a finite float > 0, got 0\.0\.$"):
        orthonormality(torch.randn(2, 3), eps=0.0)
    with pytest.raises(TypeError, match=r"^`neurons` must be a floating-point tensor, got dtype torch.int64\.$"):
        soft_orthogonality(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^`neurons` must be finite, got NaN or Inf values \(shape \(1, 2\)\)"):
        soft_orthogonality(torch.tensor([[1.0, float("nan")]]))


# --------------------------------------------------------------------------------------------------------------------
# the regularizer
# --------------------------------------------------------------------------------------------------------------------
def _cnn() -> nn.Module:
    torch.manual_seed(0)
    # conv1 (16 x 27, neuron Gram), conv2 (64 x 16, feature Gram), conv3 / conv4 share (64, 576) -> one stacked group.
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 64, 1),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).double()


def _rows(m: nn.Module) -> Tensor:
    return m.weight.reshape(m.weight.shape[0], -1)


@pytest.mark.parametrize("variant", ["orthogonal", "orthonormal"])
def test_regularizer_frobenius_peers_equal_hand_sum(variant: str) -> None:
    model = _cnn()
    reg = CoMHERegularizer(model, variant)
    reg.refresh(0.1)
    out = reg()
    kappa = PEER_DEFAULT_WEIGHTS[variant]
    assert reg.weight == reg.head_weight == kappa
    layers = [model[0], model[2], model[3], model[4], model[7]]  # the head gets the same penalty and weight
    normalize = variant == "orthonormal"
    expected = kappa * sum(soft_orthogonality(_rows(m), normalize=normalize) for m in layers)
    torch.testing.assert_close(out.penalty, expected, rtol=1e-12, atol=0)
    assert set(out.energies) == {"0", "2", "3", "4", "7"}
    out.penalty.backward()
    for m in layers:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0 and m.bias.grad is None


def test_regularizer_ortho_normalize_and_custom_weights() -> None:
    model = _cnn()
    out = CoMHERegularizer(model, "orthogonal", ortho_normalize=True, weight=2.0, head_weight=3.0)()
    hidden = [model[0], model[2], model[3], model[4]]
    expected = 2.0 * sum(orthonormality(_rows(m)) for m in hidden) + 3.0 * orthonormality(_rows(model[7]))
    torch.testing.assert_close(out.penalty, expected, rtol=1e-12, atol=0)


def test_regularizer_srip_tracks_spectral_norms_and_equals_functional() -> None:
    model = _cnn()
    reg = CoMHERegularizer(model, "srip", srip_iterations=500, weight=1.0, head_weight=1.0)
    for _ in range(10):  # the spectrum edge of a random 64 x 576 matrix has tiny gaps: many steps are needed
        reg.refresh(0.1)
    out = reg()
    layers = {"0": model[0], "2": model[2], "3": model[3], "4": model[4], "7": model[7]}
    for name, m in layers.items():
        assert out.energies[name].item() == pytest.approx(_spectral_norm(_rows(m).detach()), rel=1e-6), name
    torch.testing.assert_close(out.penalty, sum(out.energies.values()), rtol=1e-12, atol=0)
    state = reg.state_dict()["srip_vectors"]
    assert sorted(state) == ["head:srip:10x64", "hidden:srip:16x27", "hidden:srip:64x16", "hidden:srip:64x576"]
    assert state["hidden:srip:64x576"].shape == (2, 64) and state["hidden:srip:64x16"].shape == (1, 16)


def test_regularizer_srip_without_refresh_still_works_and_squared_option() -> None:
    model = _cnn()
    plain = CoMHERegularizer(model, "srip", seed=1)()
    squared = CoMHERegularizer(model, "srip", seed=1, srip_squared=True)()
    for name in plain.energies:
        torch.testing.assert_close(squared.energies[name], plain.energies[name] ** 2, rtol=1e-12, atol=0)


def test_regularizer_srip_state_resumes_bit_exactly() -> None:
    model = _cnn()
    straight = CoMHERegularizer(model, "srip", seed=7)
    for _ in range(4):
        straight.refresh(0.1)
    first = CoMHERegularizer(model, "srip", seed=7)
    for _ in range(2):
        first.refresh(0.1)
    resumed = CoMHERegularizer(copy.deepcopy(model), "srip", seed=7)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for _ in range(2):
        resumed.refresh(0.1)
    assert torch.equal(resumed().penalty, straight().penalty)
    fresh = CoMHERegularizer(model, "srip", seed=8)  # another seed: other vectors, other (unconverged) values
    for _ in range(2):
        fresh.refresh(0.1)
    assert not torch.equal(fresh().penalty, straight().penalty)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "srip", "srip_iterations": -1}, "srip_iterations"),
        ({"variant": "orthogonal", "ortho_normalize": "yes"}, "ortho_normalize"),
        ({"variant": "srip", "srip_squared": 1}, "srip_squared"),
    ],
)
def test_regularizer_peer_arguments_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoMHERegularizer(_cnn(), **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------------------------------------
def test_callback_accepts_peer_variants_and_validates_their_arguments() -> None:
    for variant in ("orthogonal", "orthonormal", "srip"):
        assert CoMHE(variant=variant).regularizer_kwargs()["variant"] == variant
    with pytest.raises(MisconfigurationException, match="srip_iterations"):
        CoMHE(variant="srip", srip_iterations=-2)
    with pytest.raises(MisconfigurationException, match="ortho_normalize"):
        CoMHE(variant="orthogonal", ortho_normalize=None)  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="variant"):
        CoMHE(variant="orthogonality")  # type: ignore[arg-type]


def test_callback_srip_resume_is_bit_exact(tmp_path: Path) -> None:
    k = 3
    kwargs = {"variant": "srip", "weight": 0.5, "head_weight": 0.5, "seed": 3}
    straight_cb = CoMHE(**kwargs)
    straight = TinyMLP(momentum=0.9)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    trainer = cpu_trainer(max_steps=2 * k, enable_checkpointing=True, callbacks=[straight_cb, ckpt_cb])
    trainer.fit(straight, make_loader(k))
    ckpt = tmp_path / f"step={k}.ckpt"
    saved = torch.load(ckpt, weights_only=False)["callbacks"][straight_cb.state_key]
    assert saved["regularizer"]["srip_vectors"], "the power-iteration vectors must be checkpointed"

    resumed_cb = CoMHE(**kwargs)
    resumed = TinyMLP(momentum=0.9, seed=123)
    cpu_trainer(max_steps=2 * k, callbacks=[resumed_cb]).fit(resumed, make_loader(k), ckpt_path=ckpt)
    assert_params_equal(resumed, straight)
    assert_nested_equal(resumed_cb.state_dict(), straight_cb.state_dict())
