"""A model whose layers live on two devices, the CPU and ``xla:0``, given to one ``CoMHERegularizer`` (issue #10).

The penalty, the per-layer energies and the gradients (each on its own layer's device) must equal those of the same
model with every layer on the CPU.

* ``separate``: :func:`xla_helpers.make_net` with layer ``3`` on ``xla:0`` and layers ``0`` and ``5`` on the CPU.
  Every layer has its own shape, so the regularizer's groups (sets of equal shape, computed together) are the same
  as on one device, and so are the projections' keys and draws: every variant must match, the drawn and learned
  projections included.
* ``shared``: two hidden layers of equal shape, ``12 x 12``, one on each device, which one device would stack into
  one group. Deterministic variants only (the unprojected energies, the expected kernel, the orthogonality peers): a
  group split by device draws under other keys, so a drawn projection, or SRIP's random power-iteration start
  vectors (two iterations), need not match the one-device draw.
"""

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed: tests/xla runs in its own environment (.ci/run)")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from xla_helpers import CONFIGS, CPU, DEVICE, TOL, VARIANT_KWARGS, make_net, rel_err, sync  # noqa: E402

from lightning_comhe.regularizer import CoMHERegularizer  # noqa: E402


def _shared_net() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
        )


#: model name -> (builder, names of the layers moved to xla:0, the variants checked)
MODELS = {
    "separate": (make_net, ("3",), list(VARIANT_KWARGS) + ["random-expected"]),
    "shared": (_shared_net, ("2",), ["mhe", "half_mhe", "random-expected", "orthogonal", "orthonormal"]),
}
CASES = [(model, variant) for model, (_, _, variants) in MODELS.items() for variant in variants]


def _kwargs(name: str) -> tuple[str, dict]:
    cfg = CONFIGS[name]
    return cfg.variant, cfg.kwargs


def _step(model: nn.Module, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two refresh + penalty + backward steps; the second step's penalty, energies and gradients, on the CPU."""
    variant, kwargs = _kwargs(name)
    reg = CoMHERegularizer(model, variant, seed=1, **kwargs)
    for _ in range(2):  # the second step runs through fitted state
        model.zero_grad()
        reg.refresh(0.01)
        out = reg()
        out.penalty.backward()
    devices = {n: p.device for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(g.device == devices[n] for n, g in grads.items()), {n: g.device for n, g in grads.items()}
    sync()
    return (
        out.penalty.detach().to(CPU),
        {k: v.to(CPU) for k, v in out.energies.items()},
        {n: g.to(CPU) for n, g in grads.items()},
    )


@pytest.mark.parametrize(("model", "name"), CASES)
def test_layers_on_the_cpu_and_xla_match_the_all_cpu_model(model: str, name: str) -> None:
    build, on_xla, _ = MODELS[model]
    mixed = build()
    for layer in on_xla:
        mixed.get_submodule(layer).to(DEVICE)
    assert {p.device.type for p in mixed.parameters()} == {"cpu", "xla"}
    penalty, energies, grads = _step(mixed, name)
    ref_penalty, ref_energies, ref_grads = _step(build(), name)
    assert torch.isfinite(penalty) and rel_err(penalty, ref_penalty) <= TOL.penalty, (penalty, ref_penalty)
    assert energies.keys() == ref_energies.keys() and len(energies) >= 3
    for layer in energies:
        assert rel_err(energies[layer], ref_energies[layer]) <= TOL.energy, layer
    assert grads.keys() == ref_grads.keys() and grads
    for param in grads:
        assert rel_err(grads[param], ref_grads[param]) <= TOL.grad, param
