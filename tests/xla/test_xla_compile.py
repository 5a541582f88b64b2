"""On XLA the penalty compiles once and stays on the device: torch_xla's metrics over the runs of ``CONFIGS``.

* **Compilations**: after the warm-up (two steps, two of each kind under ``every_n_steps=2``), no step compiles a new
  XLA graph: the ``CompileTime`` metric stays flat. A Python number that changes from step to step inside the graph
  (a step counter, a learning rate read as a constant) would compile a new graph on every step.
* **Host transfers**: the penalty path (``lazy_penalty`` and the penalty's backward pass, which only trace the lazy
  graph) reads nothing back from the device: no op of it falls back to the CPU (``torch.frexp`` did, in the
  overflow-safe normalization, until it was replaced by ``log2`` / ``exp2``).
* **Reference cycles**: a penalty step leaves none behind (``_EpsNormalize`` used to keep its own output on its
  autograd context), so which tensors a graph outputs does not depend on when Python's cyclic collector runs.
"""

import gc

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed: tests/xla runs in its own environment (.ci/run)")

from xla_helpers import CONFIGS, DEVICE, VARIANT_KWARGS, make_net, runs  # noqa: E402

from lightning_comhe.regularizer import CoMHERegularizer  # noqa: E402


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compilation_count_is_flat_after_warm_up(name: str) -> None:
    cfg = CONFIGS[name]
    xla, _ = runs(name)
    compiles = [xla.start["compiles"]] + [c["compiles"] for c in xla.counts]
    assert len(compiles) == cfg.steps + 1
    warm = compiles[cfg.warm_up]
    assert compiles[cfg.warm_up :] == [warm] * (cfg.steps + 1 - cfg.warm_up), f"recompiled after warm-up: {compiles}"
    assert warm > compiles[0], compiles  # the metric counts: this configuration's graphs were compiled here


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_penalty_path_reads_nothing_back_from_the_device(name: str) -> None:
    xla, _ = runs(name)
    assert [d["from_device"] for d in xla.penalty_path] == [0] * len(xla.penalty_path)
    assert [d["fallbacks"] for d in xla.penalty_path] == [0] * len(xla.penalty_path)


@pytest.mark.parametrize("variant", list(VARIANT_KWARGS))
def test_a_penalty_step_leaves_no_reference_cycle(variant: str) -> None:
    model = make_net().to(DEVICE)
    reg = CoMHERegularizer(model, variant, seed=1, **VARIANT_KWARGS[variant])
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):  # the second step runs through fitted state
            reg.refresh(0.01)
            reg().penalty.backward()
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0, f"{unreachable} objects in reference cycles after two penalty steps"
