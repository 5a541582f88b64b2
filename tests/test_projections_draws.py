"""Tests of lightning_comhe.projections.draws: the typed draws and their saved (checkpoint) form."""

import dataclasses
import pickle
import re

import pytest
import torch

from lightning_comhe.functional import sketch
from lightning_comhe.projections.draws import DRAW_TYPES, GaussianDraw, SparseDraw, SRHTDraw, draw_from_state

CPU, META = torch.device("cpu"), torch.device("meta")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _all():
    return {
        "gaussian": GaussianDraw.sample((2, 3, 4, 9), _gen(), CPU),
        "srht": SRHTDraw.sample(2, 12, 9, _gen(), CPU),
        "sparse": SparseDraw.sample(2, 12, 9, 0.3, _gen(), CPU),
    }


def _tensors(draw):
    return {
        f.name: getattr(draw, f.name)
        for f in dataclasses.fields(draw)
        if isinstance(getattr(draw, f.name), torch.Tensor)
    }


def test_samples_are_the_sketch_functions_draws():
    draws = _all()
    assert torch.equal(draws["gaussian"].matrices, torch.randn(2, 3, 4, 9, generator=_gen()))
    srht = sketch.draw_srht(2, 12, 9, _gen(), CPU)
    assert torch.equal(draws["srht"].signs, srht["signs"]) and torch.equal(draws["srht"].index, srht["index"])
    sparse = sketch.draw_sparse(2, 12, 9, 0.3, _gen(), CPU)
    assert torch.equal(draws["sparse"].pos, sparse["pos"]) and torch.equal(draws["sparse"].sign, sparse["sign"])
    for draw in draws.values():
        assert (draw.num_sets, draw.d, draw.device) == (2, 9, CPU)
    assert draws["sparse"].density == 0.3 and draws["gaussian"].shape == (2, 3, 4, 9)
    assert DRAW_TYPES == {"gaussian": GaussianDraw, "sparse": SparseDraw, "srht": SRHTDraw}


@pytest.mark.parametrize("kind", ["gaussian", "srht", "sparse"])
def test_draws_are_immutable(kind):
    draw = _all()[kind]
    name = next(iter(_tensors(draw)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(draw, name, None)


@pytest.mark.parametrize("kind", ["gaussian", "srht", "sparse"])
def test_clone_is_an_independent_copy(kind):
    draw = _all()[kind]
    copy = draw.clone()
    assert type(copy) is type(draw) and copy is not draw
    for name, t in _tensors(draw).items():
        c = getattr(copy, name)
        assert torch.equal(c, t) and c.data_ptr() != t.data_ptr() and c.dtype == t.dtype
    assert (copy.num_sets, copy.d, copy.device) == (draw.num_sets, draw.d, draw.device)


@pytest.mark.parametrize("kind", ["gaussian", "srht", "sparse"])
def test_to_moves_every_tensor_and_the_device(kind):
    draw = _all()[kind]
    moved = draw.to(META)
    assert moved.device == META and all(t.device == META for t in _tensors(moved).values())
    assert draw.device == CPU and all(t.device == CPU for t in _tensors(draw).values())  # the original is kept
    assert draw.to(CPU).device == CPU


@pytest.mark.parametrize(
    "kind, keys",
    [
        ("gaussian", None),
        ("srht", ["num_sets", "d", "signs", "index"]),
        ("sparse", ["num_sets", "d", "density", "pos", "sign"]),
    ],
)
def test_saved_form_is_the_old_plain_format_and_round_trips(kind, keys):
    draw = _all()[kind]
    state = pickle.loads(pickle.dumps(draw.to_state()))
    if keys is None:
        assert type(state) is torch.Tensor and torch.equal(state, draw.matrices)
    else:
        assert type(state) is dict and list(state) == keys and "device" not in state
        assert state["num_sets"] == 2 and state["d"] == 9
    back = type(draw).from_state(state)
    same = draw_from_state(state, kind)
    for loaded in (back, same):
        assert type(loaded) is type(draw) and (loaded.num_sets, loaded.d, loaded.device) == (2, 9, CPU)
        for name, t in _tensors(draw).items():
            assert torch.equal(getattr(loaded, name), t)
    assert draw_from_state(state).__class__ is type(draw)
    # loading shares the saved tensors' storage (no copy); saving copies
    saved = [state] if keys is None else [state[k] for k in keys if isinstance(state[k], torch.Tensor)]
    assert [t.data_ptr() for t in _tensors(back).values()] == [t.data_ptr() for t in saved]
    fresh = draw.to_state()
    copies = [fresh] if keys is None else [fresh[k] for k in keys if isinstance(fresh[k], torch.Tensor)]
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(_tensors(draw).values(), copies, strict=True))


def test_loaded_device_is_the_tensors():
    state = SRHTDraw.sample(1, 4, 5, _gen(), CPU).to(META).to_state()
    assert draw_from_state(state).device == META


def test_sparse_matrices_are_built_once_per_dtype_and_not_saved():
    draw = _all()["sparse"]
    p32 = draw.matrices(12, torch.float32)
    assert draw.matrices(12, torch.float32) is p32
    want = sketch.sparse_matrices(draw.pos, draw.sign, 2, 12, 9, 0.3, torch.float64)
    p64 = draw.matrices(12, torch.float64)
    assert p64 is not p32 and all(torch.equal(a.to_dense(), b.to_dense()) for a, b in zip(p64, want, strict=True))
    assert "_csr" not in draw.to_state() and draw.clone().matrices(12, torch.float64) is not p64
    assert draw.to(CPU).matrices(12, torch.float64) is not p64  # a moved draw builds its own


@pytest.mark.parametrize("kind", ["srht", "sparse"])
def test_structured_project_is_the_sketch_function(kind):
    draw = _all()[kind]
    w = torch.randn(2, 5, 9, dtype=torch.float64)
    out = draw.project(w, 3, 4)
    if kind == "srht":
        want = sketch.srht_project(w, draw.signs, draw.index, 3, 4)
    else:
        p, pt = sketch.sparse_matrices(draw.pos, draw.sign, 2, 12, 9, 0.3, torch.float64)
        want = sketch.sparse_project(w, p, pt, 3, 4)
    assert out.shape == (2, 3, 5, 4) and torch.equal(out, want)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: draw_from_state(None),
            "`draw` must be a saved draw (a tensor, or a dict with 'index' or 'pos'), got NoneType.",
        ),
        (
            lambda: draw_from_state({"a": 1}),
            "`draw` must be a saved draw (a tensor, or a dict with 'index' or 'pos'), got dict with keys ['a'].",
        ),
        (lambda: draw_from_state(torch.zeros(1), "srht"), "`draw` must be a saved 'srht' draw, got a 'gaussian' one."),
        (
            lambda: GaussianDraw.from_state({"pos": 1}),
            "`draw` of a saved GaussianDraw must be a torch.Tensor, got dict.",
        ),
        (lambda: SRHTDraw.from_state(torch.zeros(1)), "`draw` of a saved SRHTDraw must be a dict, got Tensor."),
        (lambda: SparseDraw.from_state([]), "`draw` of a saved SparseDraw must be a dict, got list."),
        (
            lambda: SRHTDraw.from_state({"signs": torch.zeros(1), "index": 3}),
            "`index` of a saved SRHTDraw must be a torch.Tensor, got int.",
        ),
        (
            lambda: SparseDraw.from_state({"pos": torch.zeros(1), "sign": torch.zeros(1), "num_sets": 1, "d": 2}),
            "`density` of a saved SparseDraw must be present, got keys ['d', 'num_sets', 'pos', 'sign'].",
        ),
    ],
)
def test_bad_saved_draws_are_refused(call, match):
    with pytest.raises(ValueError, match=f"^{re.escape(match)}$"):
        call()
