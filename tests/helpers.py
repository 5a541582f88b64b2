"""Shared pieces for the CoMHE callback tests: tiny models, deterministic data, and hand-written reference loops.

Everything here is small enough for a 2-core CPU. The reference loops reproduce what Lightning does around the
optimizer step (zero_grad at the start of each accumulation window, the task loss divided by
``accumulate_grad_batches`` in every window, ragged last window included, gradient clipping by norm, SGD), but take
the penalty from an explicit ``penalty_fn(step, lr)`` so a test decides independently how the penalty should count.

Usable from any test module as ``from tests.helpers import ...`` (DDP / FSDP2 / CLI tests reuse them).
"""

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_comhe.functional import hyperspherical_energy
from lightning_comhe.regularizer import CoMHERegularizer

IN_DIM = 6
HIDDEN = 8
OUT_DIM = 3
BATCH_SIZE = 4

Batch = tuple[Tensor, Tensor]
PenaltyFn = Callable[[int, float], Tensor]


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------
def make_dataset(
    num_batches: int = 4, batch_size: int = BATCH_SIZE, seed: int = 0, image: bool = False
) -> TensorDataset:
    """A fixed regression data set: ``x`` is ``(n, IN_DIM)`` (or ``(n, 2, 5, 5)`` images), ``y`` is ``(n, OUT_DIM)``."""
    g = torch.Generator().manual_seed(1000 + seed)
    n = num_batches * batch_size
    x = torch.randn(n, 2, 5, 5, generator=g) if image else torch.randn(n, IN_DIM, generator=g)
    y = torch.randn(n, OUT_DIM, generator=g)
    return TensorDataset(x, y)


def make_loader(num_batches: int = 4, batch_size: int = BATCH_SIZE, seed: int = 0, image: bool = False) -> DataLoader:
    """An unshuffled loader over :func:`make_dataset`."""
    return DataLoader(make_dataset(num_batches, batch_size, seed, image), batch_size=batch_size, shuffle=False)


def loader_batches(loader: DataLoader) -> list[Batch]:
    """The batches of a loader, in order, as a list."""
    return [tuple(b) for b in loader]  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------------
def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class TinyMLP(LightningModule):
    r"""``Linear(6, 8) -> Tanh -> Linear(8, 8) -> Tanh -> Linear(8, 3)`` with MSE loss and plain SGD.

    Layer names: ``net.0``, ``net.2`` (hidden) and ``net.4`` (the head under ``head="auto"``). With
    ``compile_backend`` the ``net`` submodule is ``torch.compile``\ d with that backend.
    """

    def __init__(
        self,
        lr: float = 0.05,
        momentum: float = 0.0,
        seed: int = 0,
        out_dim: int = OUT_DIM,
        compile_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        self.net = self.build_net(seed, out_dim)
        if compile_backend is not None:  # a compiled submodule: its layers are named net._orig_mod.*
            self.net = torch.compile(self.net, backend=compile_backend, dynamic=False)  # type: ignore[assignment]

    def build_net(self, seed: int, out_dim: int) -> nn.Module:
        return _seeded(
            seed,
            lambda: nn.Sequential(
                nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, out_dim)
            ),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def task_loss(self, batch: Sequence[Tensor]) -> Tensor:
        x, y = batch
        out = self(x)
        return F.mse_loss(out, y[:, : out.shape[1]].to(out.dtype))

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        return self.task_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class TinyCNN(TinyMLP):
    """``Conv2d(2, 4, 3) -> ReLU -> Conv2d(4, 6, 3) -> Flatten -> Linear(6, 3)`` on ``(B, 2, 5, 5)`` images."""

    def build_net(self, seed: int, out_dim: int) -> nn.Module:
        return _seeded(
            seed,
            lambda: nn.Sequential(
                nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6, out_dim)
            ),
        )


class ManualMLP(TinyMLP):
    """:class:`TinyMLP` with manual optimization: ``chunks`` ``manual_backward`` calls per optimizer step.

    Each chunk's loss is the MSE of that part of the batch divided by ``chunks``. ``seen`` records, per call, the value
    of the tensor passed to ``manual_backward`` before and after the call (the callback must leave it unchanged).
    """

    def __init__(self, chunks: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.chunks = chunks
        self.seen: list[tuple[Tensor, Tensor]] = []

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        for part in manual_chunks(batch, self.chunks):
            loss = self.task_loss(part) / self.chunks
            before = loss.detach().clone()
            self.manual_backward(loss)
            self.seen.append((before, loss.detach().clone()))
        opt.step()


def manual_chunks(batch: Sequence[Tensor], chunks: int) -> list[Batch]:
    """Split a batch into ``chunks`` equal parts along the batch dimension."""
    x, y = batch
    return list(zip(x.chunk(chunks), y.chunk(chunks), strict=True))


class NoWeights(LightningModule):
    """A LightningModule without any neuron-carrying layer (a single scalar parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return ((self.scale * x).mean() - y.mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


# --------------------------------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------------------------------
def cpu_trainer(**kwargs: Any) -> Trainer:
    """A quiet single-device CPU trainer; ``kwargs`` override the defaults."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 3,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return Trainer(**defaults)


# --------------------------------------------------------------------------------------------------------------------
# penalties
# --------------------------------------------------------------------------------------------------------------------
def regularizer_penalty(*regularizers: CoMHERegularizer) -> PenaltyFn:
    """``penalty_fn`` that refreshes each regularizer once per call (one call per optimizer step) and sums them."""

    def fn(step: int, lr: float) -> Tensor:
        total = None
        for reg in regularizers:
            reg.refresh(lr)
            p = reg().penalty
            total = p if total is None else total + p
        assert total is not None
        return total

    return fn


def functional_mhe_penalty(
    model: nn.Module,
    hidden: Sequence[str],
    head: str | None,
    *,
    weight: float,
    head_weight: float,
    half_space: bool,
    power: float | str = 2,
) -> PenaltyFn:
    """``penalty_fn`` for the ``"mhe"`` / ``"half_mhe"`` variants from the functional API alone.

    ``hidden``/``head`` name modules (``model.get_submodule``) whose ``weight.flatten(1)`` rows are the neurons.
    """

    def neurons(name: str) -> Tensor:
        return model.get_submodule(name).weight.flatten(1)

    def fn(step: int, lr: float) -> Tensor:
        total = torch.zeros((), dtype=torch.float32)
        for name in hidden:
            total = total + weight * hyperspherical_energy(neurons(name), power, half_space=half_space)
        if head is not None:
            total = total + head_weight * hyperspherical_energy(neurons(head), power, half_space=False)
        return total

    return fn


# --------------------------------------------------------------------------------------------------------------------
# reference loops
# --------------------------------------------------------------------------------------------------------------------
def _windows(num_batches: int, accumulate: int) -> Iterator[range]:
    for start in range(0, num_batches, accumulate):
        yield range(start, min(start + accumulate, num_batches))


def reference_fit(
    model: TinyMLP,
    batches: Sequence[Batch],
    *,
    max_steps: int,
    penalty_fn: PenaltyFn | None = None,
    penalty_scale: float | Callable[[int], float] = 1.0,
    accumulate: int = 1,
    gradient_clip_val: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    input_dtype: torch.dtype | None = None,
) -> TinyMLP:
    """Train ``model`` in place the way Lightning's automatic optimization should, with the penalty once per step.

    Per optimizer step (window of ``r <= accumulate`` consecutive batches of an epoch): ``zero_grad``; for each
    batch, backward of ``task / accumulate`` (under ``autocast_dtype`` if given, inputs cast to ``input_dtype``);
    then one backward of ``penalty_scale * penalty_fn(step, lr)``; clip the total gradient norm; ``step``.
    ``penalty_scale`` may be a function of the window's length ``r`` (to model wrong schemes in ragged windows).
    """
    opt = model.configure_optimizers()
    step = 0
    while step < max_steps:
        for window in _windows(len(batches), accumulate):
            opt.zero_grad()
            for i in window:
                batch = batches[i]
                if input_dtype is not None:
                    batch = tuple(t.to(input_dtype) for t in batch)  # type: ignore[assignment]
                ctx = (
                    torch.autocast("cpu", dtype=autocast_dtype)
                    if autocast_dtype is not None
                    else contextlib.nullcontext()
                )
                with ctx:
                    loss = model.task_loss(batch)
                (loss / accumulate).backward()
            if penalty_fn is not None:
                scale = penalty_scale(len(window)) if callable(penalty_scale) else penalty_scale
                (scale * penalty_fn(step, opt.param_groups[0]["lr"])).backward()
            if gradient_clip_val is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), gradient_clip_val)
            opt.step()
            step += 1
            if step >= max_steps:
                break
    return model


def reference_fit_manual(
    model: ManualMLP,
    batches: Sequence[Batch],
    *,
    max_steps: int,
    refresh: Callable[[float], None],
    penalty: Callable[[], Tensor],
) -> ManualMLP:
    """Reference for :class:`ManualMLP`: ``refresh(lr)`` once per optimizer step, ``penalty()`` added in full to the
    loss of the first ``manual_backward`` call of each step (of ``model.chunks``)."""
    opt = model.configure_optimizers()
    step = 0
    while step < max_steps:
        for batch in batches:
            opt.zero_grad()
            refresh(opt.param_groups[0]["lr"])
            for i, part in enumerate(manual_chunks(batch, model.chunks)):
                (model.task_loss(part) / model.chunks + (penalty() if i == 0 else 0.0)).backward()
            opt.step()
            step += 1
            if step >= max_steps:
                break
    return model


# --------------------------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------------------------
def clone_model(model: nn.Module) -> Any:
    """A deep copy of a (not yet trained) module, for the reference run."""
    return copy.deepcopy(model)


def params_of(model: nn.Module) -> dict[str, Tensor]:
    """Detached float32 copies of the parameters, keyed by name (``_orig_mod.`` removed for compiled modules)."""
    return {n.replace("_orig_mod.", ""): p.detach().float().clone() for n, p in model.named_parameters()}


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    """The largest absolute parameter difference between two models with the same parameter names."""
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys(), (pa.keys(), pb.keys())
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


def assert_params_close(a: nn.Module, b: nn.Module, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Assert that two models' parameters match within tolerance."""
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys(), (pa.keys(), pb.keys())
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    """Assert that two models' parameters are bit-identical."""
    pa = dict(a.named_parameters())
    pb = dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"{k} differs by {(pa[k] - pb[k]).abs().max().item()}"


def assert_nested_equal(a: Any, b: Any, path: str = "state") -> None:
    """Assert that two nested dict/list/tuple/tensor structures are equal (tensors bit-identical, same dtype)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a.cpu(), b.cpu()), f"{path}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (
            f"{path}: keys {list(a)} vs {list(b) if isinstance(b, dict) else b}"
        )
        for k in a:
            assert_nested_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
