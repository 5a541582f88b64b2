"""Tests of lightning_comhe.projections.random: RandomProjection (Gaussian streams, resampling, state, checks).

The structured kinds ("sparse", "srht") are tested against their dense equivalents in tests/test_kernels.py; the
typed draws in tests/test_projections_draws.py.
"""

import io
import math
import pickle
import re
import warnings

import pytest
import torch

from lightning_comhe.functional import sketch
from lightning_comhe.projections import AngleProjection, GaussianDraw, RandomProjection, SparseDraw, SRHTDraw, key_seed
from tests.helpers_projections import draw_steps


def _orthonormal_pair(d, theta, gen):
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))
    u, v = q[:, 0], q[:, 1]
    return 1.7 * u, 0.4 * (math.cos(theta) * u + math.sin(theta) * v)


@pytest.mark.parametrize("k, eps", [(30, 0.9), (100, 0.5)])
def test_random_projection_angle_guarantee(k, eps):
    """Algorithm §5: P((c-e)/(1+e) < cos θ(Pw1, Pw2) < (c+e)/(1-e)) >= max(0, 1 - 2 exp(-k e²/8))²."""
    d, thetas = 576, [0.3, math.pi / 2, 2.5]
    gen = torch.Generator().manual_seed(k)
    pairs = torch.stack([torch.stack(_orthonormal_pair(d, t, gen), 1) for t in thetas], 0).float()  # (3, d, 2)
    rp = RandomProjection(dim=k, num=500, seed=123)
    cos = []
    for _ in range(4):  # 4 resamples x 500 projections = 2000 independent draws
        rp.step()
        p = rp.projections("jl", num_sets=1, d=d, device="cpu")[0]  # (500, k, d)
        y = torch.einsum("ckd,tdj->ctkj", p, pairs)  # (500, 3, k, 2)
        cos.append(torch.nn.functional.cosine_similarity(y[..., 0], y[..., 1], dim=-1))
    cos = torch.cat(cos)  # (2000, 3)
    bound = max(0.0, 1 - 2 * math.exp(-k * eps**2 / 8)) ** 2
    assert bound > 0.8  # a non-vacuous regime
    for j, theta in enumerate(thetas):
        c = math.cos(theta)
        inside = ((c - eps) / (1 + eps) < cos[:, j]) & (cos[:, j] < (c + eps) / (1 - eps))
        freq = inside.double().mean().item()
        assert freq >= bound, f"theta={theta}: frequency {freq:.4f} < bound {bound:.4f}"
        # the mean projected angle is (nearly) the original one
        mean_angle = torch.arccos(cos[:, j].clamp(-1, 1)).mean().item()
        assert abs(mean_angle - theta) < 0.02, (theta, mean_angle)


def test_random_projection_shape_and_distribution():
    rp = RandomProjection(dim=40, num=20, seed=0)
    rp.step()
    p = rp.projections("a", num_sets=3, d=50, device=torch.device("cpu"))
    assert p.shape == (3, 20, 40, 50) and p.dtype == torch.float32 and not p.requires_grad
    assert abs(p.mean().item()) < 0.01 and abs(p.std().item() - 1) < 0.01  # N(0, 1), no 1/sqrt(k)
    assert rp.projections("a", num_sets=3, d=50, device="cpu", dtype=torch.float64).dtype == torch.float64


def test_random_projection_same_seed_same_stream_independent_of_key_order():
    a, b = RandomProjection(dim=4, num=3, seed=7), RandomProjection(dim=4, num=3, seed=7)
    for _ in range(3):
        a.step()
        b.step()
        a_x, a_y = a.projections("x", 2, 5, "cpu"), a.projections("y", 2, 5, "cpu")
        b_y, b_x = b.projections("y", 2, 5, "cpu"), b.projections("x", 2, 5, "cpu")
        assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
        assert not torch.equal(a_x, a_y)  # different keys, different draws
    other = RandomProjection(dim=4, num=3, seed=8)
    other.step()
    first = RandomProjection(dim=4, num=3, seed=7)
    first.step()
    assert not torch.equal(other.projections("x", 2, 5, "cpu"), first.projections("x", 2, 5, "cpu"))


def test_random_projection_does_not_touch_global_rng():
    state = torch.get_rng_state()
    rp = RandomProjection(dim=4, num=3, seed=0)
    draw_steps(rp, "a", 3)
    assert torch.equal(state, torch.get_rng_state())


def test_random_projection_resample_every():
    draws = draw_steps(RandomProjection(dim=3, num=2, resample_every=1, seed=0), "a", 3)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    draws = draw_steps(RandomProjection(dim=3, num=2, resample_every=3, seed=0), "a", 7)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[1], draws[2])
    assert not torch.equal(draws[2], draws[3])
    assert torch.equal(draws[3], draws[4]) and torch.equal(draws[4], draws[5])
    assert not torch.equal(draws[5], draws[6])
    # the stream is the generator's: window w of resample_every=3 is draw w of resample_every=1
    every = draw_steps(RandomProjection(dim=3, num=2, resample_every=1, seed=0), "a", 3)
    assert torch.equal(draws[0], every[0]) and torch.equal(draws[3], every[1]) and torch.equal(draws[6], every[2])
    # a key first used late in a window draws once and keeps it for the rest of the window
    rp = RandomProjection(dim=3, num=2, resample_every=3, seed=0)
    rp.step()
    rp.step()
    late = rp.projections("b", 1, 4, "cpu")
    rp.step()
    assert torch.equal(late, rp.projections("b", 1, 4, "cpu"))
    rp.step()
    assert not torch.equal(late, rp.projections("b", 1, 4, "cpu"))


@pytest.mark.parametrize("stop", [3, 4, 5])
def test_random_projection_state_round_trip_is_bit_exact(stop):
    reference = draw_steps(RandomProjection(dim=3, num=2, resample_every=3, seed=5), "a", 9)
    rp = RandomProjection(dim=3, num=2, resample_every=3, seed=5)
    head = draw_steps(rp, "a", stop)
    state = pickle.loads(pickle.dumps(rp.state_dict()))  # plain picklable
    draw_steps(rp, "a", 2)  # advancing the original after the snapshot must not affect the snapshot
    fresh = RandomProjection(dim=3, num=2, resample_every=3, seed=5)
    fresh.load_state_dict(state)
    assert fresh.calls == stop
    tail = draw_steps(fresh, "a", 9 - stop)
    for got, want in zip(head + tail, reference, strict=True):
        assert torch.equal(got, want)


def test_random_projection_foreign_device_state_warns_and_reseeds():
    """Structured kinds stream from a key's generator: a state saved on another device type is re-seeded."""
    rp = RandomProjection(dim=3, num=2, seed=1, kind="srht")
    w = torch.randn(1, 4, 8)
    for _ in range(2):
        rp.step()
        rp.project("a", w)
    state = rp.state_dict()
    state["entries"]["a"]["generator"]["device"] = "cuda"  # as if saved by a GPU run
    state["entries"]["a"]["draw"] = None  # force a fresh draw at the next window
    outs = []
    for _ in range(2):
        fresh = RandomProjection(dim=3, num=2, seed=1, kind="srht")
        fresh.load_state_dict(state)
        fresh.step()
        with pytest.warns(UserWarning, match="re-seeded"):
            outs.append(fresh.project("a", w))
    assert torch.equal(outs[0], outs[1])  # deterministic re-seed


def test_gaussian_slots_are_seeded_so_any_share_draws_the_same_matrices():
    """Each Gaussian matrix has its own seed: drawn alone, in parts, in any order, or after a resume, it is equal."""
    kw = {"dim": 3, "num": 4, "resample_every": 2, "seed": 7}
    whole = RandomProjection(**kw)
    rank0, rank1 = RandomProjection(**kw), RandomProjection(**kw)
    last = None
    for step in range(5):
        for rp in (whole, rank0, rank1):
            rp.step()
        ref = whole.projections("g", 3, 6, "cpu")
        a = rank0.projections("g", 3, 6, "cpu", parts=[(0, 0, 4), (1, 0, 1)])
        b = rank1.projections("g", 3, 6, "cpu", parts=[(2, 1, 4), (1, 1, 4), (2, 0, 1)])
        assert torch.equal(a[0], ref[0]) and torch.equal(a[1, :1], ref[1, :1])
        assert torch.equal(b[1:, 1:], ref[1:, 1:]) and torch.equal(b[2, :1], ref[2, :1])
        if step % 2 == 0:  # the first call of a window: only the share is drawn
            assert not a[2].any() and not b[0].any()  # undrawn matrices are zeros
            assert not rank0.draw("g").complete and whole.draw("g").complete
            grown = rank0.projections("g", 3, 6, "cpu")  # the rest drawn on demand: a new tensor, `a` unchanged
            assert torch.equal(grown, ref) and grown is not a and not a[2].any()
            if last is not None:  # new matrices, each different from the last window's
                assert all(not torch.equal(ref[i, c], last[i, c]) for i in range(3) for c in range(4))
        last = ref
    state = pickle.loads(pickle.dumps(rank1.state_dict()))
    assert state["entries"]["g"]["draw"] is None and state["entries"]["g"]["generator"] is None  # recomputed
    resumed = RandomProjection(**kw)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.projections("g", 3, 6, "cpu"), last)  # mid-window: the same matrices
    with pytest.raises(ValueError, match=r"^`parts` must name sets in \[0, 3\) and projections in \[0, 4\)"):
        resumed.projections("g", 3, 6, "cpu", parts=[(0, 3, 5)])


def test_gaussian_state_with_a_foreign_generator_loads_without_warning():
    """Gaussian matrices do not depend on a generator state: one saved on another device type is not needed."""
    rp = RandomProjection(dim=3, num=2, seed=1)
    draw_steps(rp, "a", 2)
    state = rp.state_dict()
    state["entries"]["a"]["generator"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}
    state["entries"]["a"]["draw"] = None
    fresh = RandomProjection(dim=3, num=2, seed=1)
    fresh.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fresh.projections("a", 1, 4, "cpu"), rp.projections("a", 1, 4, "cpu"))


def test_random_projection_load_state_config_checks():
    rp = RandomProjection(dim=3, num=2, seed=1)
    draw_steps(rp, "a", 1)
    with pytest.raises(ValueError, match="dim"):
        RandomProjection(dim=4, num=2, seed=1).load_state_dict(rp.state_dict())
    with pytest.raises(ValueError, match="num"):
        RandomProjection(dim=3, num=3, seed=1).load_state_dict(rp.state_dict())
    with pytest.warns(UserWarning, match="seed"):
        RandomProjection(dim=3, num=2, seed=2).load_state_dict(rp.state_dict())
    with pytest.raises(ValueError, match="RandomProjection"):
        RandomProjection().load_state_dict(AngleProjection().state_dict())


def _message(name, bound, value):
    """The shared message style: `` `name` must be <kind> <bound>..., got <value>. ``"""
    return rf"^`{re.escape(name)}` must be .*{re.escape(bound)}.*, got {re.escape(repr(value))}\.$"


@pytest.mark.parametrize(
    "kwargs, bound",
    [
        ({"dim": 0}, "an int >= 1"),
        ({"dim": True}, "an int >= 1"),
        ({"dim": 2.0}, "an int >= 1"),
        ({"num": 0}, "an int >= 1"),
        ({"num": "3"}, "an int >= 1"),
        ({"resample_every": 0}, "an int >= 1"),
        ({"resample_every": False}, "an int >= 1"),
        ({"seed": 1.5}, "an int >= 0"),
        ({"seed": True}, "an int >= 0"),
        ({"seed": -1}, "an int >= 0"),  # negative seeds were accepted before; the learned ones refused them
        ({"kind": "hadamard"}, "one of 'gaussian', 'sparse', 'srht'"),
        ({"kind": True}, "one of 'gaussian', 'sparse', 'srht'"),
    ],
)
def test_random_projection_bad_arguments(kwargs, bound):
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=_message(name, bound, value)):
        RandomProjection(**kwargs)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1"])
def test_random_projection_bad_density(density):
    with pytest.raises(ValueError, match=_message("density", "in (0, 1] or None", density)):
        RandomProjection(kind="sparse", density=density)
    with pytest.raises(
        ValueError, match=r"^`density` must be None unless kind='sparse', got density=0\.5 with kind='srht'\.$"
    ):
        RandomProjection(kind="srht", density=0.5)
    assert RandomProjection(kind="sparse", density=1.0).density == 1.0


def test_random_projection_bad_call_arguments():
    rp = RandomProjection(dim=3, num=2)
    rp.step()
    with pytest.raises(ValueError, match=_message("num_sets", "an int >= 1", 0)):
        rp.projections("a", 0, 4, "cpu")
    with pytest.raises(ValueError, match=_message("d", "an int >= 1", 0)):
        rp.projections("a", 1, 0, "cpu")
    with pytest.raises(ValueError, match=r"^`key` must be a str, got 3 of type int\.$"):
        rp.projections(3, 1, 4, "cpu")
    with pytest.raises(ValueError, match=r"^`neurons` must be a floating-point torch\.Tensor, got Tensor\.$"):
        rp.project("a", torch.ones(1, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^`neurons` must have shape \(G, N, d\).*, got shape \(1, 1, 4\)\.$"):
        rp.project("a", torch.ones(1, 1, 4))
    with pytest.raises(ValueError, match=r"^`key` must be a str"):
        rp.draw(None)


# ---------------------------------------------------------------------------------------------------------------
# Typed draws inside RandomProjection, and checkpoints written before them
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, cls", [("gaussian", GaussianDraw), ("sparse", SparseDraw), ("srht", SRHTDraw)])
def test_cached_draw_is_typed_and_saved_in_the_old_format(kind, cls):
    rp = RandomProjection(dim=3, num=2, seed=4, kind=kind)
    assert rp.draw("a") is None
    rp.step()
    rp.project("a", torch.randn(2, 5, 9))
    draw = rp.draw("a")
    assert isinstance(draw, cls) and (draw.num_sets, draw.d) == (2, 9)
    saved = rp.state_dict()["entries"]["a"]
    assert set(saved) == {"generator", "window", "draw"} and saved["window"] == 1
    if kind == "gaussian":  # a plain tensor
        assert type(saved["draw"]) is torch.Tensor and saved["draw"].shape == (2, 2, 3, 9)
        assert torch.equal(saved["draw"], draw.matrices) and saved["draw"] is not draw.matrices
    else:  # a plain dict of tensors and numbers, without the device
        assert type(saved["draw"]) is dict
        keys = ["num_sets", "d", "signs", "index"] if kind == "srht" else ["num_sets", "d", "density", "pos", "sign"]
        assert list(saved["draw"]) == keys
        assert saved["draw"]["num_sets"] == 2 and saved["draw"]["d"] == 9
        if kind == "sparse":
            assert saved["draw"]["density"] == sketch.default_density(9)
        for name in keys[-2:]:
            assert torch.equal(saved["draw"][name], getattr(draw, name))
            assert saved["draw"][name] is not getattr(draw, name)  # copies: the snapshot is independent


def _gen(seed, key):
    return torch.Generator().manual_seed(key_seed(seed, key))


@pytest.mark.parametrize("kind", ["gaussian", "sparse", "srht"])
def test_checkpoint_written_before_typed_draws_loads(kind):
    """A state dict as the module wrote it before the typed draws (hand-built, plain dicts) loads and continues."""
    g, rows, d, cpu = 2, 6, 9, torch.device("cpu")
    density = 0.4 if kind == "sparse" else None
    gen = _gen(3, "a")
    if kind == "gaussian":
        draw = torch.randn(g, 2, 3, d, generator=gen)
    elif kind == "srht":
        draw = {"num_sets": g, "d": d, **sketch.draw_srht(g, rows, d, gen, cpu)}
    else:
        draw = {"num_sets": g, "d": d, "density": density, **sketch.draw_sparse(g, rows, d, density, gen, cpu)}
    config = {"dim": 3, "num": 2, "resample_every": 2, "seed": 3}
    if kind != "gaussian":  # snapshots from before the structured kinds have neither "kind" nor "density"
        config.update(kind=kind, density=density)
    state = {
        "type": "RandomProjection",
        "version": 1,
        "config": config,
        "calls": 1,
        "entries": {"a": {"generator": {"device": "cpu", "state": gen.get_state()}, "window": 1, "draw": draw}},
    }
    kwargs = {"dim": 3, "num": 2, "resample_every": 2, "seed": 3, "kind": kind, "density": density}
    rp = RandomProjection(**kwargs)
    rp.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert rp.calls == 1 and rp.keys() == ["a"]
    w = torch.randn(g, 4, d, dtype=torch.float64)
    dense = rp.projections("a", g, d, "cpu", torch.float64)  # window 1: the saved draw
    if kind == "gaussian":
        assert torch.equal(dense, draw.double())
    torch.testing.assert_close(rp.project("a", w), torch.einsum("gnd,gckd->gcnk", w, dense), rtol=1e-12, atol=1e-12)
    assert type(rp.state_dict()["entries"]["a"]["draw"]) is type(draw)
    # a structured kind: an uninterrupted run drew exactly this, and both continue with the same stream; the
    # Gaussian kind now seeds every matrix (the old stream is gone): the next windows are a fresh run's
    ref = RandomProjection(**kwargs)
    ref.step()
    ref.projections("a", g, d, "cpu")  # first used in float32, like the hand-built draw
    if kind != "gaussian":
        assert torch.equal(ref.projections("a", g, d, "cpu", torch.float64), dense)
        assert torch.equal(ref.project("a", w), rp.project("a", w))
    for _ in range(2):
        for obj in (rp, ref):
            obj.step()
        if kind != "gaussian" or rp.window > 1:  # the Gaussian kind keeps the restored draw in its window
            assert torch.equal(rp.projections("a", g, d, "cpu"), ref.projections("a", g, d, "cpu"))
    assert rp.window == ref.window == 2
    got, want = rp.state_dict()["entries"]["a"], ref.state_dict()["entries"]["a"]
    if kind != "gaussian":
        assert torch.equal(got["generator"]["state"], want["generator"]["state"])
    else:
        assert got["generator"] is None and want["generator"] is None


@pytest.mark.parametrize(
    "kind, draw, match",
    [
        ("gaussian", {"pos": torch.zeros(1)}, r"^`draw` must be a saved 'gaussian' draw, got a 'sparse' one\.$"),
        ("srht", torch.zeros(1, 2, 3, 4), r"^`draw` must be a saved 'srht' draw, got a 'gaussian' one\.$"),
        (
            "srht",
            {"index": torch.zeros(1), "d": 4},
            r"^`signs` of a saved SRHTDraw must be a torch\.Tensor, got NoneType",
        ),
        ("sparse", [1, 2], r"^`draw` must be a saved draw \(a tensor, or a dict with 'index' or 'pos'\), got list\.$"),
    ],
)
def test_malformed_saved_draw_is_refused_without_changing_the_object(kind, draw, match):
    rp = RandomProjection(dim=3, num=2, seed=0, kind=kind)
    rp.step()
    rp.projections("b", 1, 4, "cpu")
    before = rp.state_dict()
    state = {**before, "calls": 7, "entries": {"a": {"generator": None, "window": 1, "draw": draw}}}
    with pytest.raises(ValueError, match=match):
        rp.load_state_dict(state)
    assert rp.calls == 1 and rp.keys() == ["b"]  # validated before anything is restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generators_draw_on_device_and_cpu_resume_warns():
    """Gaussian matrices are drawn on the device from their slot seeds; a CPU resume draws CPU values, silently."""
    rp = RandomProjection(dim=3, num=2, seed=0)
    rp.step()
    p = rp.projections("a", 1, 4, "cuda")
    assert p.is_cuda and rp._scratch["cuda"].device.type == "cuda"
    assert rp.projections("a", 1, 4, torch.device("cuda", torch.cuda.current_device())) is p
    reference = draw_steps(RandomProjection(dim=3, num=2, seed=0), "a", 2, num_sets=1, d=4)  # CPU values differ
    assert not torch.equal(p.cpu(), reference[0])
    state = rp.state_dict()
    resumed = RandomProjection(dim=3, num=2, seed=0)
    resumed.load_state_dict(state)
    resumed.step()
    rp.step()
    assert torch.equal(resumed.projections("a", 1, 4, "cuda"), rp.projections("a", 1, 4, "cuda"))
    on_cpu = RandomProjection(dim=3, num=2, seed=0)
    on_cpu.load_state_dict(state)
    on_cpu.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(on_cpu.projections("a", 1, 4, "cpu"), reference[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["sparse", "srht"])
def test_cuda_structured_draws_live_on_the_device_and_resume_from_a_cpu_checkpoint(kind):
    rp = RandomProjection(dim=3, num=2, seed=0, kind=kind)
    rp.step()
    w = torch.randn(2, 5, 9, device="cuda")
    out = rp.project("a", w)
    draw = rp.draw("a")
    assert out.is_cuda and draw.device == torch.device("cuda", torch.cuda.current_device())
    state = torch.load(_saved(rp.state_dict()), map_location="cpu", weights_only=False)
    resumed = RandomProjection(dim=3, num=2, seed=0, kind=kind)
    resumed.load_state_dict(state)
    assert resumed.draw("a").device.type == "cpu"
    assert torch.equal(resumed.project("a", w), out) and resumed.draw("a").device == draw.device


def _saved(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf
