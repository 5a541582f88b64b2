"""What the scarce-data experiments share: the recipe, the rows, the run specs and the energy curves.

The three scarce-data experiments (:mod:`experiments.lowdata`, :mod:`experiments.noise`, :mod:`experiments.lazy`)
train the poster's CNN-9 at twice the widths of the full-data tables (32 / 64 / 128 filters) on digits at its
native 8×8 resolution, with a seeded stratified subset of ``n`` training images per class (the run's seed draws the
subset, the initialization and the batch order, so rows run with one seed are paired). Validation and test splits
are the whole held-out splits of the full-data tables. The budget is a fixed number of SGD steps per size
(:data:`SIZE_STEPS`), chosen once on the baseline's validation error.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from experiments.cli import Setup, resolve_setup
from experiments.publishing import mean_std
from experiments.runner import RunSpec

#: Training images per class of the low-data table.
SIZES: tuple[int, ...] = (10, 30, 100)
#: Optimizer steps per size (batch 16): 100 steps is ~16 epochs of 10 images per class; 100 images per class needs
#: more (the baseline's validation error: 5.6 % after 100 steps, 2.6 % after 150; learning rate 0.05 diverges).
SIZE_STEPS: dict[int, int] = {10: 100, 30: 100, 100: 150}
#: The scarce-data recipe (``--image-size``, ``--batch-size``, ``--lr``, ``--width`` override it).
SCARCE_DEFAULTS: dict[str, Any] = {"image_size": 8, "batch_size": 16, "lr": 0.02, "width": 32, "epochs": 1}
#: ``--quick``: a pipeline check only (tiny evaluation splits; the steps are cut by :func:`steps_for`).
SCARCE_QUICK: dict[str, Any] = {"max_eval_samples": 60}
QUICK_STEPS = 3
#: Tuning and reported seeds are disjoint.
DEFAULT_SEEDS: tuple[int, ...] = tuple(range(20))
DEFAULT_TUNE_SEEDS: tuple[int, ...] = (100, 101, 102, 103, 104)
#: κ multipliers tried on the validation split (× the variant's default).
DEFAULT_GRID: tuple[float, ...] = (0.25, 1.0, 4.0)
ARCH = "cnn9"


@dataclass(frozen=True)
class Row:
    """A row of a table: a ``CoMHE`` variant and its extra arguments (``"baseline"``: no callback).

    Attributes:
        name: Identifier (command line, JSON).
        label: Name in the tables.
        variant: ``RunSpec.variant``.
        comhe: Extra ``CoMHE`` arguments, ``(name, value)`` pairs; the defaults are left out, so equal runs of two
            experiments have equal specs and run once (:func:`experiments.runner.run_cached`).
    """

    name: str
    label: str
    variant: str
    comhe: tuple[tuple[str, Any], ...] = ()


def _rows(*rows: Row) -> dict[str, Row]:
    return {row.name: row for row in rows}


#: Every row of the scarce-data experiments, by name.
ROWS: dict[str, Row] = _rows(
    Row("baseline", "Baseline", "baseline"),
    Row("orthogonal", "Orthogonal (SO)", "orthogonal"),
    Row("srip", "SRIP", "srip"),
    Row("mhe", "MHE", "mhe"),
    Row("half_mhe", "Half-space MHE", "half_mhe"),
    Row("random", "RP-CoMHE (official: k 40, C 20)", "random"),
    Row("angle", "AP-CoMHE", "angle"),
    Row("adversarial", "Adversarial CoMHE", "adversarial"),
    Row("expected", "Expected RP (C → ∞)", "random", (("projection_kind", "expected"),)),
    Row("random_every8", "RP, every_n_steps = 8", "random", (("every_n_steps", 8),)),
    Row("random_c1", "RP, C = 1", "random", (("num_projections", 1),)),
    Row("random_c4", "RP, C = 4", "random", (("num_projections", 4),)),
    *(Row(f"random_every{m}", f"RP, every_n_steps = {m}", "random", (("every_n_steps", m),)) for m in (2, 4, 16)),
)


def setup_from(args: Any, module: str, argv: Sequence[str]) -> Setup:
    """The resolved common arguments with the scarce-data defaults."""
    return resolve_setup(args, module, argv, DEFAULT_SEEDS, SCARCE_DEFAULTS, SCARCE_QUICK)


def add_scarce_args(parser: Any, sizes: Sequence[int]) -> None:
    """``--sizes`` and ``--steps`` (added to the common arguments of :func:`experiments.cli.experiment_parser`)."""
    parser.add_argument("--sizes", type=int, nargs="+", default=list(sizes), help="training images per class")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of every size (default per size)")


def steps_for(setup: Setup, size: int, steps: int | None) -> int:
    """The step budget of a size: ``--steps``, else :data:`SIZE_STEPS` (``--quick``: :data:`QUICK_STEPS`)."""
    if steps is not None:
        return steps
    if setup.quick:
        return QUICK_STEPS
    return SIZE_STEPS.get(size, max(SIZE_STEPS.values()))


def spec(
    setup: Setup,
    row: Row,
    size: int,
    seed: int,
    steps: int,
    kappa_mult: float = 1.0,
    energy_every: int | None = None,
) -> RunSpec:
    """The run of ``row`` with ``size`` images per class and ``seed`` (κ × ``kappa_mult``)."""
    return RunSpec(
        arch=ARCH,
        variant=row.variant,
        seed=seed,
        kappa_mult=1.0 if row.variant == "baseline" else kappa_mult,
        data=replace(setup.data, per_class=size),
        train=replace(setup.train, steps=steps),
        comhe=row.comhe,
        energy_every=energy_every,
        threads=setup.threads,
        accelerator=setup.accelerator,
    )


def describe(setup: Setup, steps: dict[str, int]) -> str:
    """The data and training sentence of a scarce-data block (``steps``: the step budget of each size)."""
    d, t = setup.data, setup.train
    budget = ", ".join(f"{n} steps at {size} / class" for size, n in steps.items())
    return (
        f"Data: digits ({d.image_size}×{d.image_size}), n training images per class (a seeded stratified subset of "
        f"the training split per seed), the whole validation and test splits. Model: CNN-9 with widths "
        f"{t.width}/{2 * t.width}/{4 * t.width}. Training: batch {d.batch_size}, SGD (momentum {t.momentum}, weight "
        f"decay {t.weight_decay}) with learning rate {t.lr} and a per-step cosine decay to 0, {budget}; the final "
        "weights are evaluated (no early stopping)."
    )


def publish_study(setup: Setup, stem: str, results: dict[str, Any], plot: Any, intro: str, text: str, alt: str) -> None:
    """:func:`~experiments.publishing.publish` for a one-size study (``results`` has its size, steps, seconds)."""
    from experiments.publishing import publish

    describe_text = describe(setup, {str(results["size"]): results["steps"]})
    publish(setup, stem, results, plot, intro, text, results["seconds"], alt, describe=describe_text)


def mean_curve(record: dict[str, Any], key: str = "energy") -> tuple[list[int], list[float]]:
    """The mean over layers of a run's recorded energy (``"energy"`` or ``"energy_half"``): steps and values."""
    layers = list(record[key].values())
    n = min(len(points) for points in layers)
    steps = [int(layers[0][i][0]) for i in range(n)]
    values = [sum(points[i][1] for points in layers) / len(layers) for i in range(n)]
    return steps, values


def compact(record: dict[str, Any]) -> dict[str, Any]:
    """A record with its per-layer energy curves replaced by their layer means (6 significant digits).

    Keeps the result files small; ``energy_mean`` / ``energy_half_mean`` are ``[[step, value], ...]``.
    """
    out = {k: v for k, v in record.items() if k not in ("energy", "energy_half")}
    for key in ("energy", "energy_half"):
        if key in record:
            steps, values = mean_curve(record, key)
            out[f"{key}_mean"] = [[s, float(f"{v:.6g}")] for s, v in zip(steps, values, strict=True)]
    return out


def errors(records: Sequence[dict[str, Any]]) -> list[float]:
    """The test errors of ``records`` (in their order)."""
    return [r["test_error"] for r in records]


def fmt(values: Sequence[float], digits: int = 2) -> str:
    """``"m ± s"`` of ``values``."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_p(p: float) -> str:
    """A p-value for a table (``–`` when undefined)."""
    if p != p:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
