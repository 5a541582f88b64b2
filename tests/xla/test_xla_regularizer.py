"""``CoMHERegularizer`` on ``xla:0`` equals the same run on the CPU: every variant, look-ahead and projection kind.

Each configuration of ``xla_helpers.CONFIGS`` trains the same tiny model with SGD for 5 steps (8 with lazy
regularization) on XLA and on the CPU, from the same weights and seed. Compared: every step's penalty and per-layer
energies, the first step's gradients, the final weights, and the regularizer's final state (generator states
bit-identical: the same draws were made in the same order). Tolerances: ``xla_helpers``' docstring.
"""

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed: tests/xla runs in its own environment (.ci/run)")

import torch  # noqa: E402
from xla_helpers import CONFIGS, DEVICE, TOL, VARIANT_KWARGS, assert_runs_match, assert_states_match, make_net, runs  # noqa: E402

from lightning_comhe._registry import BUILTIN_VARIANTS, PEER_VARIANTS  # noqa: E402
from lightning_comhe.projections import generator_device  # noqa: E402
from lightning_comhe.regularizer import CoMHERegularizer  # noqa: E402


def test_the_configurations_cover_every_variant_lookahead_and_projection_kind() -> None:
    assert set(VARIANT_KWARGS) == set(BUILTIN_VARIANTS) and set(PEER_VARIANTS) <= set(VARIANT_KWARGS)
    assert {cfg.variant for cfg in CONFIGS.values()} == set(BUILTIN_VARIANTS)
    for variant in ("angle", "adversarial"):
        modes = {cfg.kwargs.get("lookahead", "none") for cfg in CONFIGS.values() if cfg.variant == variant}
        assert modes == {"none", "first", "second"}, (variant, modes)
    kinds = {cfg.kwargs.get("projection_kind", "gaussian") for cfg in CONFIGS.values() if cfg.variant == "random"}
    assert kinds == {"gaussian", "srht", "expected"}  # "sparse": test_sparse_projections_are_refused_on_xla
    assert {cfg.every_n_steps for cfg in CONFIGS.values()} == {1, 2}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_xla_matches_the_cpu(name: str) -> None:
    cfg = CONFIGS[name]
    xla, cpu = runs(name)
    penalized = [p is not None for p in cpu.penalties]
    assert penalized == [step % cfg.every_n_steps == 0 for step in range(cfg.steps)]
    assert_runs_match(xla, cpu)
    assert_states_match(xla.state, cpu.state, atol=TOL.weight)
    assert xla.state["refreshes"] == cpu.state["refreshes"] == sum(penalized)


def test_xla_draws_come_from_the_cpu_stream() -> None:
    """torch_xla has no device ``torch.Generator``: the draws are made on the CPU and moved, so they are the CPU's."""
    with pytest.raises(RuntimeError):
        torch.Generator(device=DEVICE)
    assert generator_device(DEVICE) == torch.device("cpu")
    for name in ("random", "random-srht"):
        xla, cpu = (run.state["projector"]["entries"] for run in runs(name))
        assert xla.keys() == cpu.keys() and len(cpu) == 2, (name, sorted(cpu))  # layers 0 and 3 (d = 18, 54)
        for key, entry in cpu.items():
            assert xla[key]["window"] == entry["window"]
            if name == "random":  # the last window's Gaussian matrices, moved to xla:0 and back: bit-identical
                assert xla[key]["generator"] is entry["generator"] is None  # seeded per matrix: no stream state
                assert torch.equal(xla[key]["draw"].cpu(), entry["draw"]), key
                continue
            assert xla[key]["generator"]["device"] == entry["generator"]["device"] == "cpu"
            assert torch.equal(xla[key]["generator"]["state"], entry["generator"]["state"]), (name, key)


def test_sparse_projections_are_refused_on_xla() -> None:
    """``projection_kind="sparse"`` cannot run on XLA: torch_xla has no sparse-CSR tensors (and the draw's support
    size is data-dependent, a dynamic shape). The regularizer says so, naming the kinds that work."""
    reg = CoMHERegularizer(make_net().to(DEVICE), "random", projection_dim=4, projection_kind="sparse")
    with pytest.raises(ValueError, match=r"kind='sparse'.*'xla'.*kind='gaussian' or kind='srht'"):
        reg.refresh(0.01)
        reg()
    # the reason, torch_xla's: no sparse compressed layout on the device (this fails once torch_xla gains one)
    crow, col, values = torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.tensor([1.0, 2.0])
    with pytest.raises(NotImplementedError, match="new_compressed_tensor"):
        torch.sparse_csr_tensor(crow.to(DEVICE), col.to(DEVICE), values.to(DEVICE), (2, 2))
