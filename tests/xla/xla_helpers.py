"""Shared pieces of the XLA tests: the device, a tiny model, a regularizer loop, torch_xla's metrics, tolerances.

Imported by the test modules of this folder after their ``pytest.importorskip("torch_xla")``. Self-contained like
``tests/light``: the installed package is tested, and the ``tests`` package is not imported.

Tolerances (float32 throughout; unit roundoff ``u = 6e-8``): :data:`TOL`. XLA fuses the energy's ops and sums in
another order than ATen's kernels, so the same float32 computation differs by a few ulps per reduction, more in one
layer's energy than in the penalty (a sum dominated by the well-conditioned head). Each bound is about 4 to 5 times
the worst case seen over all configurations (``benchmarks/results/xla_compilation.md`` has the figures, the date and
the command): penalty ``1e-6`` relative (seen: 2.4e-7), per-layer energies ``2e-6`` (seen: 4.0e-7), first gradients
``3e-5`` (seen: 6.8e-6, SRHT, whose fast Walsh-Hadamard transform sums in yet another order), weights after the run
and learned projection state ``1e-6`` absolute (seen: 2.7e-7, SRIP's power-iteration vectors; weights 6e-8).

Projections go to ``k = 8`` dimensions (``d = 18`` and ``54`` stay projected). At ``k = 4`` the projected
neurons of layer 0 sometimes nearly coincide (its energy jumped from 0.97 to 6.56 at one step of a 12-step run),
and the energy's ``1/r^(s+2)`` terms then amplify the float32 rounding differences of any two backends to 1e-4 in
the weights (1e-2 with C = 20 projections): conditioning, not XLA. The draws themselves are bit-identical to the
CPU's (the generator lives on the CPU, ``test_xla_regularizer.py``), so a wrong or missed draw fails by orders of
magnitude: between two seeds, the first penalty differs by 2e-4 to 6e-3 here and a projected layer's energy by 2e-3
to 1e-1, at least 200 times the bounds.
"""

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch_xla
import torch_xla.debug.metrics as met
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_comhe.regularizer import CoMHERegularizer

DEVICE = torch.device("xla", 0)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Tolerance:
    """Bounds of an XLA-vs-CPU comparison (see the module docstring)."""

    penalty: float
    energy: float
    grad: float
    weight: float


#: The bounds of every XLA-vs-CPU comparison (see the module docstring).
TOL = Tolerance(penalty=1e-6, energy=2e-6, grad=3e-5, weight=1e-6)

#: Small settings per variant: ``k = 8`` projects every hidden set of :func:`make_net` (d = 18 and 54).
VARIANT_KWARGS: dict[str, dict[str, Any]] = {
    "mhe": {},
    "half_mhe": {},
    "random": {"projection_dim": 8, "num_projections": 3},
    "angle": {"projection_dim": 8},
    "adversarial": {"projection_dim": 8, "inner_steps": 2},
    "orthogonal": {},
    "orthonormal": {},
    "srip": {"srip_iterations": 2},
}
#: The regularized layers of :func:`make_net`.
LAYERS = {"0", "3", "5"}


@dataclass(frozen=True)
class Config:
    """One regularizer configuration run on XLA and on the CPU.

    Attributes:
        variant: The energy family.
        kwargs: The other keyword arguments of ``CoMHERegularizer``.
        steps: Optimizer steps.
        every_n_steps: Lazy regularization's ``m`` (``lazy_penalty``); with ``m > 1`` a task loss runs every step.
    """

    variant: str
    kwargs: dict[str, Any]
    steps: int = 5
    every_n_steps: int = 1

    @property
    def warm_up(self) -> int:
        """Steps after which no XLA graph may be compiled any more.

        Two: the first step's graph differs from the next ones (its inputs are freshly uploaded, a learned
        projection is initialized); under lazy regularization two of each kind of step.
        """
        return 2 * self.every_n_steps


def _configs() -> dict[str, Config]:
    configs = {variant: Config(variant, kwargs) for variant, kwargs in VARIANT_KWARGS.items()}
    for variant in ("angle", "adversarial"):  # the three look-ahead modes: "none" is the default, above
        for lookahead in ("first", "second"):
            configs[f"{variant}-{lookahead}"] = Config(variant, {**VARIANT_KWARGS[variant], "lookahead": lookahead})
    # the projection kinds XLA runs ("gaussian" is `random` above; "sparse" cannot run there, see the tests)
    configs["random-srht"] = Config("random", {**VARIANT_KWARGS["random"], "projection_kind": "srht"})
    configs["random-expected"] = Config("random", {"projection_dim": 8, "projection_kind": "expected"})  # no C
    # lazy regularization: penalized and plain steps alternate (a task loss on every step)
    for variant in ("random", "angle"):
        configs[f"{variant}-every2"] = Config(variant, VARIANT_KWARGS[variant], steps=8, every_n_steps=2)
    return configs


#: Every configuration run on XLA and on the CPU, by test id.
CONFIGS = _configs()


def sync() -> None:
    """Cut and run the pending XLA graph (``torch_xla.sync()``, formerly ``xm.mark_step()``)."""
    torch_xla.sync()


# --------------------------------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------------------------------
def make_net(seed: int = 0) -> nn.Sequential:
    """``Conv2d(2, 6, 3) -> ReLU -> Flatten -> Linear(54, 12) -> Tanh -> Linear(12, 3)`` on the CPU.

    Inputs ``(B, 2, 5, 5)``. Layers ``0`` (6 neurons, d = 18), ``3`` (12 neurons, d = 54) and the head ``5``
    (3 neurons, d = 12).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(54, 12), nn.Tanh(), nn.Linear(12, 3)
        )


def make_dataset(n: int = 32, seed: int = 0) -> TensorDataset:
    """``n`` fixed regression samples: ``x`` ``(n, 2, 5, 5)``, ``y`` ``(n, 3)``."""
    g = torch.Generator().manual_seed(1000 + seed)
    return TensorDataset(torch.randn(n, 2, 5, 5, generator=g), torch.randn(n, 3, generator=g))


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict, detached, on the CPU."""
    return {k: v.detach().to(CPU).clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------------
# torch_xla's metrics
# --------------------------------------------------------------------------------------------------------------------
FREXP = "aten::frexp.Tensor_out"


def xla_counts() -> dict[str, int]:
    """Cumulative torch_xla figures: graph compilations, device-to-host transfers, CPU fallbacks.

    * ``compiles``: samples of the ``CompileTime`` metric, one per XLA graph compiled (a graph found in the
      compilation cache is not compiled again);
    * ``from_device``: samples of ``TransferFromDeviceTime``, one per copy of device data to the host, whatever asked
      for it (``.item()``, ``.cpu()``, ``bool()`` of a tensor, a CPU fallback's inputs);
    * ``fallbacks``: the sum of the ``aten::*`` counters: ATen ops that torch_xla has no lowering for and runs on
      the CPU (``aten::_local_scalar_dense`` is ``.item()``);
    * ``frexp``: the ``aten::frexp.Tensor_out`` counter among them.
    """
    compile_time = met.metric_data("CompileTime")
    from_device = met.metric_data("TransferFromDeviceTime")
    fallbacks = {name: met.counter_value(name) or 0 for name in met.counter_names() if name.startswith("aten::")}
    return {
        "compiles": int(compile_time[0]) if compile_time else 0,
        "from_device": int(from_device[0]) if from_device else 0,
        "fallbacks": int(sum(fallbacks.values())),
        "frexp": int(fallbacks.get(FREXP, 0)),
    }


def fallback_ops() -> dict[str, int]:
    """The ``aten::*`` counters (ATen ops torch_xla ran on the CPU) and their values."""
    return {name: met.counter_value(name) for name in met.counter_names() if name.startswith("aten::")}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """``after - before``, per figure."""
    return {k: after[k] - before[k] for k in before}


# --------------------------------------------------------------------------------------------------------------------
# a hand-written loop
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What :func:`regularizer_run` records (tensors on the CPU; the XLA figures of an XLA run only)."""

    penalties: list[Tensor | None] = field(default_factory=list)
    energies: list[dict[str, Tensor] | None] = field(default_factory=list)
    first_grads: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    #: ``xla_counts()`` before the first step.
    start: dict[str, int] = field(default_factory=dict)
    #: ``xla_counts()`` after each step's sync.
    counts: list[dict[str, int]] = field(default_factory=list)
    #: Per step: the ``xla_counts()`` growth over the penalty path (``lazy_penalty`` and the backward pass).
    penalty_path: list[dict[str, int]] = field(default_factory=list)
    #: The regularizer's ``state_dict()`` at the end.
    state: dict[str, Any] = field(default_factory=dict)


def regularizer_run(
    device: torch.device,
    variant: str,
    *,
    steps: int = 3,
    lr: float = 0.01,
    every_n_steps: int = 1,
    seed: int = 1,
    model: nn.Module | None = None,
    before_step: Callable[[int, CoMHERegularizer], None] | None = None,
    **kwargs: Any,
) -> Run:
    """Train :func:`make_net` (or ``model``) on ``device`` with SGD and the regularizer's lazy penalty.

    Each step: ``zero_grad``; with ``every_n_steps > 1``, the MSE of one fixed batch (a step without penalty still
    trains); ``lazy_penalty(step, every_n_steps, lr)`` (refresh and penalty, or nothing) and the penalty's backward
    pass, then the task loss's (together, the backward of their sum); ``step``; on XLA, ``torch_xla.sync()``, then
    the metrics. The recorded tensors stay on the device until the loop is over (no host copy inside it).

    Python's cyclic garbage collector runs (``gc.collect()``) before each sync: which tensors are alive at a sync
    decides which outputs the XLA graph has, and a penalty step leaves reference cycles behind (see
    ``test_xla_compile.py``), so a collection at an arbitrary moment would change the graph.
    """
    on_xla = device.type == "xla"
    model = (make_net() if model is None else model).to(device)
    task = every_n_steps > 1
    batch = tuple(t.to(device) for t in make_dataset(8)[:]) if task else ()
    if on_xla:
        sync()
    reg = CoMHERegularizer(model, variant=variant, seed=seed, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    run = Run(start=xla_counts() if on_xla else {})
    kept: list[tuple[Tensor | None, dict[str, Tensor] | None]] = []
    grads: dict[str, Tensor] = {}
    for step in range(steps):
        if before_step is not None:
            before_step(step, reg)
        opt.zero_grad()
        task_loss = F.mse_loss(model(batch[0]), batch[1]) if task else None
        before = xla_counts() if on_xla else {}
        out = reg.lazy_penalty(step, every_n_steps, lr)
        if out is not None:
            out.penalty.backward()
            if on_xla:
                run.penalty_path.append(delta(before, xla_counts()))
        if task_loss is not None:
            task_loss.backward()  # the gradients add up: the backward of task loss + penalty
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        kept.append((None, None) if out is None else (out.penalty.detach(), dict(out.energies)))
        if on_xla:
            gc.collect()
            sync()
            run.counts.append(xla_counts())
    for penalty, energies in kept:
        run.penalties.append(None if penalty is None else penalty.to(CPU))
        run.energies.append(None if energies is None else {k: v.to(CPU) for k, v in energies.items()})
    run.first_grads = {n: g.to(CPU) for n, g in grads.items()}
    run.weights = cpu_state(model)
    run.state = reg.state_dict()
    return run


_RUNS: dict[str, tuple[Run, Run]] = {}


def runs(name: str) -> tuple[Run, Run]:
    """``(XLA run, CPU run)`` of ``CONFIGS[name]``, computed once per session (several tests read them)."""
    if name not in _RUNS:
        cfg = CONFIGS[name]
        common = {"steps": cfg.steps, "every_n_steps": cfg.every_n_steps, **cfg.kwargs}
        _RUNS[name] = (regularizer_run(DEVICE, cfg.variant, **common), regularizer_run(CPU, cfg.variant, **common))
    return _RUNS[name]


# --------------------------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------------------------
def rel_err(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|`` in float64 (the absolute difference where ``b`` is all zeros)."""
    a, b = a.detach().to(CPU).double(), b.detach().to(CPU).double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b if b[k].numel())


def assert_runs_match(xla: Run, cpu: Run, tol: Tolerance = TOL) -> None:
    """The XLA run's penalties, energies, first gradients and final weights match the CPU run's within ``tol``."""
    assert len(xla.penalties) == len(cpu.penalties)
    for step, (p, q) in enumerate(zip(xla.penalties, cpu.penalties, strict=True)):
        assert (p is None) == (q is None), step
        if p is None or q is None:
            continue
        assert p.shape == () and torch.isfinite(p), (step, p)
        err = rel_err(p, q)
        assert err <= tol.penalty, f"step {step}: penalty {p.item()} on XLA, {q.item()} on the CPU ({err:.3g})"
        e, f = xla.energies[step], cpu.energies[step]
        assert e is not None and f is not None and e.keys() == f.keys() == LAYERS, (step, e, f)
        for layer in e:
            assert rel_err(e[layer], f[layer]) <= tol.energy, (step, layer, e[layer].item(), f[layer].item())
    assert xla.first_grads.keys() == cpu.first_grads.keys() and cpu.first_grads
    for name in cpu.first_grads:
        err = rel_err(xla.first_grads[name], cpu.first_grads[name])
        assert err <= tol.grad, f"gradient of {name}: relative error {err:.3g} > {tol.grad}"
    err = max_abs_diff(xla.weights, cpu.weights)
    assert err <= tol.weight, f"XLA and CPU weights differ by {err:.3g} > {tol.weight}"


def assert_states_match(xla: Any, cpu: Any, atol: float, path: str = "state") -> None:
    """Two regularizer ``state_dict()`` s agree.

    The same structure and Python values, bit-identical integer tensors (generator states: the same draws were
    made), floating-point tensors (learned projections, power-iteration vectors) within ``atol``.
    """
    if isinstance(cpu, Tensor):
        assert isinstance(xla, Tensor) and xla.dtype == cpu.dtype and xla.shape == cpu.shape, (path, xla, cpu)
        a = xla.detach().to(CPU)
        if cpu.is_floating_point():
            err = (a - cpu).abs().max().item() if cpu.numel() else 0.0
            assert err <= atol, f"{path}: differs by {err:.3g}"
        else:
            assert torch.equal(a, cpu), f"{path}: differs"
    elif isinstance(cpu, dict):
        assert isinstance(xla, dict) and xla.keys() == cpu.keys(), (path, sorted(xla), sorted(cpu))
        for k in cpu:
            assert_states_match(xla[k], cpu[k], atol, f"{path}[{k!r}]")
    elif isinstance(cpu, (list, tuple)):
        assert isinstance(xla, (list, tuple)) and len(xla) == len(cpu), (path, xla, cpu)
        for i, (a, b) in enumerate(zip(xla, cpu, strict=True)):
            assert_states_match(a, b, atol, f"{path}[{i}]")
    else:
        assert xla == cpu, f"{path}: {xla!r} on XLA, {cpu!r} on the CPU"
