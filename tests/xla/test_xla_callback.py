"""The ``CoMHE`` callback under Lightning's ``SingleDeviceXLAStrategy`` on ``xla:0``: CPU equality, resume, graphs.

Each case fits :class:`xla_lightning.XLANet` for 12 steps (3 epochs of 4) on XLA, checkpointing every 4 steps, and
on the CPU. Checked: the XLA weights and last penalty equal the CPU's (tolerances of ``xla_helpers``); a run resumed
from the step-4 checkpoint ends with the weights and the callback state of the uninterrupted run; after the warm-up
(the first epoch and one step) no step compiles a new graph, with ``every_n_steps=2`` too; and neither the
callback's penalty path nor the whole training step reads anything back from the device (``test_xla_compile.py``).
"""

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed: tests/xla runs in its own environment (.ci/run)")

import torch  # noqa: E402
from xla_helpers import (  # noqa: E402
    DEVICE,
    TOL,
    VARIANT_KWARGS,
    assert_states_match,
    delta,
    max_abs_diff,
)
from xla_lightning import STEPS_PER_EPOCH, WARM_UP, FitRun, fit  # noqa: E402

#: case -> (variant, every_n_steps, resumed from a checkpoint too)
CASES: dict[str, tuple[str, int, bool]] = {
    **{v: (v, 1, v in ("random", "angle", "adversarial", "srip")) for v in VARIANT_KWARGS},
    "random-every2": ("random", 2, True),
    "angle-every2": ("angle", 2, False),
}
# the resumed run writes into the directory of the interrupted one, as a restarted job does
pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
RESUMED = [name for name, (_, _, resume) in CASES.items() if resume]
STEPS = 3 * STEPS_PER_EPOCH


class _Fits:
    """The runs of each case, made once per session: XLA (with checkpoints), CPU, and XLA resumed from step 4."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, dict[str, FitRun]] = {}

    def __call__(self, name: str) -> dict[str, FitRun]:
        if name not in self.done:
            variant, every, resume = CASES[name]
            kwargs: dict[str, Any] = dict(VARIANT_KWARGS[variant])
            tmp = self.root / name
            runs = {
                "xla": fit(True, variant, kwargs, tmp, steps=STEPS, every_n_steps=every, save_every=4),
                "cpu": fit(False, variant, kwargs, tmp, steps=STEPS, every_n_steps=every),
            }
            if resume:
                # resume as after a crash past step 4: in the same directory, which holds the step-4 checkpoint only
                ckpt = runs["xla"].checkpoints[STEPS_PER_EPOCH]
                for step, path in runs["xla"].checkpoints.items():
                    if step != STEPS_PER_EPOCH:
                        path.unlink()
                runs["resumed"] = fit(
                    True,
                    variant,
                    kwargs,
                    tmp,
                    steps=STEPS,
                    every_n_steps=every,
                    save_every=4,
                    ckpt_path=ckpt,
                )
            self.done[name] = runs
        return self.done[name]


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> _Fits:
    return _Fits(tmp_path_factory.mktemp("fits"))


@pytest.mark.parametrize("name", list(CASES))
def test_the_callback_on_xla_matches_the_cpu(fits: _Fits, name: str) -> None:
    runs = fits(name)
    xla, cpu = runs["xla"], runs["cpu"]
    assert xla.strategy == "SingleDeviceXLAStrategy" and xla.device == DEVICE, (xla.strategy, xla.device)
    assert cpu.strategy == "SingleDeviceStrategy" and cpu.device == torch.device("cpu")
    err = max_abs_diff(xla.weights, cpu.weights)
    assert err <= TOL.weight, f"weights after {STEPS} steps: XLA and CPU differ by {err:.3g}"
    assert abs(xla.penalty - cpu.penalty) <= TOL.penalty * abs(cpu.penalty), (xla.penalty, cpu.penalty)
    assert sorted(xla.checkpoints) == [4, 8, 12]
    assert xla.comhe_state["last_refresh_step"] == cpu.comhe_state["last_refresh_step"]
    assert_states_match(xla.comhe_state["regularizer"], cpu.comhe_state["regularizer"], atol=TOL.weight)


@pytest.mark.parametrize("name", RESUMED)
def test_a_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(fits: _Fits, name: str) -> None:
    every = CASES[name][1]
    runs = fits(name)
    resumed, whole = runs["resumed"], runs["xla"]
    assert len(resumed.counts) == STEPS - STEPS_PER_EPOCH  # the resumed run took the last 8 steps only
    assert sorted(resumed.checkpoints) == [4, 8, 12]  # step 4: the interrupted run's; 8 and 12 written again
    # bit-exact: the same graphs on the same inputs (the callback state restores generators and learned projections)
    err = max_abs_diff(resumed.weights, whole.weights)
    assert err == 0.0, f"resumed and uninterrupted weights differ by {err:.3g}"
    assert resumed.penalty == whole.penalty
    assert (
        resumed.comhe_state["last_refresh_step"]
        == whole.comhe_state["last_refresh_step"]
        == (STEPS - 1) // every * every
    )
    assert_states_match(resumed.comhe_state["regularizer"], whole.comhe_state["regularizer"], atol=0.0)


@pytest.mark.parametrize("name", list(CASES))
def test_the_callback_compiles_nothing_after_warm_up(fits: _Fits, name: str) -> None:
    counts = [c["compiles"] for c in fits(name)["xla"].counts]
    assert len(counts) == STEPS
    warm = counts[WARM_UP - 1]
    assert counts[WARM_UP - 1 :] == [warm] * (STEPS - WARM_UP + 1), f"recompiled after warm-up: {counts}"


@pytest.mark.parametrize("name", list(CASES))
def test_the_callback_penalty_path_reads_nothing_back_from_the_device(fits: _Fits, name: str) -> None:
    path = fits(name)["xla"].penalty_path
    assert len(path) == STEPS  # one on_before_backward per step; nothing is computed on the plain lazy steps
    for step, d in enumerate(path):
        assert d == dict.fromkeys(d, 0), (step, d)
    # the whole training step (the backward pass with the callback's gradient hooks, on_after_backward, the
    # optimizer step, Lightning's own work) reads back nothing either; the steps that follow a checkpoint are left
    # out (saving copies the weights to the host)
    run = fits(name)["xla"]
    counts = [run.start, *run.counts]
    for step in range(STEPS):
        if step % STEPS_PER_EPOCH or step == 0:
            d = delta(counts[step], counts[step + 1])
            assert d["from_device"] == d["frexp"] == 0, (step, d)
