"""Shared harness: timing, machine description, models and their layer sets, FLOP floors, profiles, result files."""

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
DOC_IMG = REPO_ROOT / "docs" / "img" / "benchmarks"

#: The energy variants of the issue, plus the opt-in structured projections of RP-CoMHE.
VARIANTS: tuple[str, ...] = (
    "mhe",
    "half_mhe",
    "random",
    "random_sparse",
    "random_srht",
    "random_expected",
    "angle",
    "adversarial",
)
VARIANT_LABELS = {
    "mhe": "MHE (full space)",
    "half_mhe": "half-space MHE",
    "random": "RP-CoMHE (Gaussian, official)",
    "random_sparse": "RP-CoMHE, sparse projection",
    "random_srht": "RP-CoMHE, SRHT projection",
    "random_expected": "RP-CoMHE, expected (C → ∞)",
    "angle": "AP-CoMHE",
    "adversarial": "adversarial CoMHE",
}
MODEL_LABELS = {
    "resnet18": "ResNet-18",
    "resnet50": "ResNet-50",
    "vit_small": "ViT-S/4 (32×32)",
    "vit_base": "ViT-B/16",
    "tiny": "tiny CNN (smoke test)",
}


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test): checks the harness only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON / Markdown / PNG results")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU of this process)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
    return parser


def add_thread_counts(parser: argparse.ArgumentParser, default: Sequence[int]) -> None:
    """``--thread-counts``: torch thread counts measured side by side, interleaved in one run (overrides
    ``--threads``)."""
    parser.add_argument(
        "--thread-counts",
        type=int,
        nargs="+",
        default=list(default),
        help="torch thread counts timed side by side in the same run, interleaved (default: %(default)s)",
    )


def thread_key(name: str, threads: int) -> str:
    """The key of a function timed at ``threads`` threads in :func:`interleaved` (``"name@threads"``)."""
    return f"{name}@{threads}"


def setup(args: argparse.Namespace) -> torch.device:
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    args.threads = threads
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but CUDA is not available here.")
    args.out.mkdir(parents=True, exist_ok=True)
    return device


def command_line(module: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", f"benchmarks.{module}", *args]).strip()


# ----------------------------------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(threads: int) -> None:
    """Switch torch's intra-op threads, then wake the new pool (a few small matmuls) so no timing pays for it."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        a = torch.ones(256, 256)
        for _ in range(3):
            torch.mm(a, a)


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | None = None,
    threads: dict[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several functions round-robin (so drift and other tenants of the machine hit them alike).

    Args:
        fns: The functions, by name.
        repeats: Timed rounds; each round calls every function once, in an order rotated from round to round.
        warmup: Untimed rounds first.
        device: Synchronised around each call (CUDA).
        threads: Optional torch thread count per name: set (:func:`set_threads`) before each call of that function,
            so several thread counts are measured interleaved in the same run. Restored afterwards.

    Returns:
        Per name, the median / min wall time, the median process CPU time and every wall time (seconds).
    """
    device = device or torch.device("cpu")
    threads_before = torch.get_num_threads()

    def prepare(name: str) -> None:
        if threads is not None:
            set_threads(threads[name])

    for _ in range(warmup):
        for name, fn in fns.items():
            prepare(name)
            fn()
    sync(device)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position in the round
        for name in order:
            prepare(name)
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    set_threads(threads_before)
    return {
        k: {
            "median_s": statistics.median(wall[k]),
            "min_s": min(wall[k]),
            "cpu_median_s": statistics.median(cpu[k]),
            "times_s": [round(t, 6) for t in wall[k]],
        }
        for k in fns
    }


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 7, dtype: torch.dtype = torch.float32) -> float:
    """Plain fp32 matmul rate (GFLOP/s, median) of this process's threads: the GEMM floor's yardstick."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    res = interleaved({"mm": lambda: torch.mm(a, b, out=out)}, repeats=repeats, warmup=2, device=device)
    return 2 * n**3 / res["mm"]["median_s"] / 1e9


# ----------------------------------------------------------------------------------------------------------------
# models and regularizers
# ----------------------------------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    """A tiny CNN for the smoke test: conv 3->8, conv 8->48 (d = 72 > k), linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 48, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def create_model(name: str, num_classes: int = 100) -> nn.Module:
    """The benchmark models: timm resnet18 / resnet50, ViT-S with patch 4 on 32×32 inputs, or the tiny CNN."""
    if name == "tiny":
        return TinyCNN(num_classes)
    import timm

    if name == "vit_small":
        return timm.create_model("vit_small_patch16_224", patch_size=4, img_size=32, num_classes=num_classes)
    if name == "vit_base":
        return timm.create_model("vit_base_patch16_224", num_classes=num_classes)
    return timm.create_model(name, num_classes=num_classes)


def make_regularizer(model: nn.Module, variant: str, **kwargs: Any):
    """A :class:`CoMHERegularizer` for a benchmark variant name (``random_sparse`` -> projection_kind="sparse")."""
    from lightning_comhe.regularizer import CoMHERegularizer

    if variant.startswith("random_"):
        kwargs["projection_kind"] = variant.split("_", 1)[1]
        variant = "random"
    return CoMHERegularizer(model, variant, **kwargs)


def group_shapes(reg) -> list[dict[str, Any]]:
    """Per group of the regularizer: mode, sets G, neurons N, dimension d."""
    return [
        {"key": g.key, "mode": g.mode, "sets": g.num_sets, "n": g.num_neurons, "d": g.dim, "kappa": g.kappa}
        for g in reg.groups
    ]


def floor_flops(reg) -> dict[str, float]:
    """The unavoidable GEMM FLOPs of one penalty evaluation (forward + backward, plus refresh work).

    * Projections: ``2·N·d·k`` per set and projection forward, as much backward (``4·params·k·C`` in all); for the
      sparse kind ``4·nnz·N`` with ``nnz = C·k·d·ρ``; for the SRHT the fast Walsh–Hadamard transform,
      ``2·R·N·d'·log2 d'`` (forward and backward, ``R = ceil(C·k/d')``).
    * Grams: ``2·N²·k`` forward and as much backward per projected set (``4·ΣN²·k·C``), ``4·N²·d`` per full-space set.
    * Learned projections, per refresh: the angle objective's full-space cosines ``2·N²·d`` once, and per inner step
      ``4·N·d·k + 4·N²·k``; adversarial: ``4·N·d·k + 4·N²·k`` per inner step.
    * The expected kind (``projection_kind="expected"``, the exact C → ∞ mean): no projection, one full-space Gram
      per set, ``4·N²·d`` (forward and backward), as MHE.
    """
    import math

    from lightning_comhe.functional.sketch import default_density, next_pow2

    k, c = reg.projection_dim, reg.num_projections
    kind = getattr(reg, "projection_kind", "gaussian")
    proj = gram = inner = 0.0
    for g in reg.groups:
        sets, n, d = g.num_sets, g.num_neurons, g.dim
        if g.mode in ("plain", "half") or (reg.variant == "random" and kind == "expected"):
            gram += sets * 4.0 * n * n * d
            continue
        gram += sets * 4.0 * n * n * k * c
        if reg.variant == "random" and kind == "sparse":
            proj += sets * 4.0 * n * c * k * d * default_density(d)
        elif reg.variant == "random" and kind == "srht":
            dp = next_pow2(d)
            reps = math.ceil(c * k / dp)
            proj += sets * 2.0 * reps * n * dp * max(1, int(math.log2(dp)))
        else:
            proj += sets * 4.0 * n * d * k * c
        if reg.variant == "angle":
            inner += sets * (2.0 * n * n * d + reg.inner_steps * (4.0 * n * d * k + 4.0 * n * n * k))
        elif reg.variant == "adversarial":
            inner += sets * reg.inner_steps * (4.0 * n * d * k + 4.0 * n * n * k)
    return {"projection": proj, "gram": gram, "inner": inner, "total": proj + gram + inner}


def penalty_step(reg, lr: float = 0.1) -> Callable[[], None]:
    """One optimizer step's worth of regularizer work: refresh (resample / fit), penalty forward and backward."""

    def step() -> None:
        reg.refresh(lr)
        reg().penalty.backward()

    return step


# ----------------------------------------------------------------------------------------------------------------
# profiles
# ----------------------------------------------------------------------------------------------------------------
_CATEGORIES = (
    ("dense matmuls (bmm: projections, Grams, gradient tiles)", ("aten::bmm", "aten::baddbmm")),
    (
        "other matmuls (mm / addmm: sparse CSR projections, Hadamard blocks)",
        ("aten::mm", "aten::addmm", "aten::matmul"),
    ),
    ("random draws", ("aten::normal_", "aten::randn", "aten::random_", "aten::geometric_", "aten::uniform_")),
    ("copies / layout (copy_, cat, clone)", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous")),
)


def profile_breakdown(fn: Callable[[], Any], runs: int = 2, top: int = 12) -> dict[str, Any]:
    """Self CPU time of ``fn`` by operator (torch.profiler), with coarse categories, in percent of the total."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    by_op: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        by_op[evt.key] += evt.self_cpu_time_total
    total = sum(by_op.values()) or 1.0
    cats: dict[str, float] = defaultdict(float)
    for op, t in by_op.items():
        for label, names in _CATEGORIES:
            if op in names:
                cats[label] += t
                break
        else:
            if op.startswith("aten::") and op not in ("aten::empty", "aten::empty_strided", "aten::as_strided"):
                cats["elementwise / reductions (other aten ops)"] += t
            else:
                cats["Python, autograd engine and framework overhead"] += t
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {
        "categories_pct": {k: round(100 * v / total, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_ops_pct": {k: round(100 * v / total, 1) for k, v in ops},
        "total_ms_per_run": round(total / 1000 / runs, 2),
    }


# ----------------------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``).

    ``ru_maxrss`` is not used on Linux: it survives ``fork`` + ``exec``, so a child spawned by a large parent reports
    the parent's peak. ``VmHWM`` belongs to the process's own address space (and :func:`reset_peak_rss` resets it).
    """
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover - not Linux
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    rss = _status_bytes("VmRSS")
    return rss if rss is not None else peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux ``/proc/self/clear_refs``); ``False`` where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def save(name: str, out: Path, payload: dict[str, Any], markdown: str) -> dict[str, Path]:
    """Write ``<name>.json`` and ``<name>.md`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return paths


def payload(name: str, device: Any, argv: Sequence[str] | None, **fields: Any) -> dict[str, Any]:
    """The JSON payload of a benchmark: its name, the machine, the command line, then ``fields``."""
    return {"benchmark": name, "machine": machine_info(device), "command": command_line(name, argv), **fields}


def model_panels(
    records: list[dict[str, Any]], ylabel: str, keep: Callable[[dict[str, Any]], bool] | None = None
) -> tuple[Any, list[tuple[Any, list[dict[str, Any]]]]]:
    """One bar-chart panel per model: the figure and ``(axes, that model's records)`` pairs, axes titled/labelled.

    ``keep`` filters the records of each panel. The caller draws the bars (x positions ``range(len(records))``);
    the x tick labels are the records' variants.
    """
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(1, len(models), figsize=(3.5 * len(models), 3.0), squeeze=False)
    panels = []
    for ax, model in zip(axes[0], models, strict=True):
        recs = [r for r in records if r["model"] == model and (keep is None or keep(r))]
        ax.set_xticks(range(len(recs)), [r["variant"] for r in recs], rotation=60, fontsize=7)
        ax.set_title(MODEL_LABELS.get(model, model), fontsize=9)
        ax.set_ylabel(ylabel)
        panels.append((ax, recs))
    return fig, panels


def savefig(fig: Any, name: str, out: Path) -> Path:
    """Save a matplotlib figure as ``<name>.png`` (small: 100 dpi) and close it; copy it to the docs when ``out`` is
    the default."""
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    if out.resolve() == RESULTS.resolve():
        DOC_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOC_IMG / path.name)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log(msg: str) -> None:
    print(msg, flush=True)
