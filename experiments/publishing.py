"""Turning results into files: statistics for the tables, the environment, JSON / Markdown / PNG, the doc blocks.

:func:`publish` writes a script's ``<stem>.{json,png,md}`` under its result folder and refreshes the matching
generated block of ``docs/results.md``.
"""

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from experiments.cli import Setup

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "experiments" / "results"
DEFAULT_DOC = REPO_ROOT / "docs" / "results.md"


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = list(values)
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt_mean_std(values: Iterable[float], digits: int = 2) -> str:
    """``"m ± s"``."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def environment() -> dict[str, Any]:
    """Software versions, hardware and date of this run."""
    import lightning
    import numpy
    import sklearn
    import timm

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
    }


def environment_markdown(env: dict[str, Any], command: str, seconds: float, threads: int, jobs: int) -> str:
    """A short Markdown paragraph: command, wall time, versions and hardware."""
    return (
        f"Command: `{command}` ({seconds / 60:.1f} min wall time, {jobs} worker process(es) × {threads} thread(s), "
        f"{env['date']}).  \n"
        f"Software: Python {env['python']}, torch {env['torch']}, lightning {env['lightning']}, timm {env['timm']}, "
        f"scikit-learn {env['scikit-learn']}.  \n"
        f"Hardware: {env['cpu']}, {env['cpu_count']} logical CPU(s), no GPU ({env['platform']})."
    )


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def update_doc_block(doc: Path, name: str, content: str) -> None:
    """Replace the generated block ``name`` of a Markdown file (appended at the end when absent).

    A block is the text between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``.
    """
    begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{content.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(doc, text)


def doc_figure(png: Path, doc: Path) -> str:
    """Copy a figure next to a Markdown page (``<page dir>/figures/``) and return its relative link.

    MkDocs only serves files under ``docs/``, so the pages link copies, not ``experiments/results/``.
    """
    target = doc.parent / "figures" / png.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, target)
    return f"figures/{png.name}"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported lazily: plotting is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (PNG, 110 dpi; parent folders created) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def publish_sweep(setup: "Setup", stem: str, total: float, header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """Write a sweep's summary (command, date, total time, machine, one row per script) and its doc block.

    Args:
        setup: The sweep's resolved command line.
        stem: File stem under ``setup.out`` and name of the generated doc block.
        total: Wall time of the sweep (seconds).
        header: Column names of the per-script table.
        rows: Its rows.

    Returns:
        The Markdown written.
    """
    env = environment()
    cols = list(header)
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    table += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    text = (
        f"Command: `{setup.command}`, {env['date']}, total {total / 60:.1f} min "
        f"({setup.jobs} worker process(es) × {setup.threads} thread(s); {env['cpu']}, {env['cpu_count']} logical "
        f"CPU(s); torch {env['torch']}, lightning {env['lightning']}, timm {env['timm']}).\n\n{table}"
    )
    write_text(setup.out / f"{stem}.md", text)
    if setup.doc is not None:
        update_doc_block(setup.doc, stem, text)
    print(text)
    return text


def setup_markdown(setup: "Setup") -> str:
    """The data set and training budget, as one Markdown sentence."""
    d, t = setup.data, setup.train
    extra = f", first {d.max_train_samples} training samples" if d.max_train_samples else ""
    return (
        f"Data: {d.label} ({d.image_size}×{d.image_size}{extra}). Training: {t.epochs} epochs, batch {d.batch_size}, "
        f"SGD (momentum {t.momentum}, weight decay {t.weight_decay}) with learning rate {t.lr} and a per-step cosine "
        f"decay to 0, base width {t.width}; the final weights are evaluated (no early stopping)."
    )


def publish(
    setup: "Setup",
    stem: str,
    results: dict[str, Any],
    plot_fn: Callable[[dict[str, Any], Path], None],
    intro: str,
    text: str,
    seconds: float,
    alt: str,
    describe: str | None = None,
) -> None:
    """Write ``<stem>.{json,png,md}`` under ``setup.out``, refresh the ``docs/results.md`` block, print ``text``.

    Args:
        setup: The script's resolved command line (result folder, doc page, command, workers).
        stem: File stem, also the name of the generated doc block.
        results: The JSON-friendly results (with an ``"environment"`` entry from :func:`environment`).
        plot_fn: Draws ``results`` into the PNG path it is given.
        intro: Sentence(s) after the data and training description.
        text: The Markdown tables.
        seconds: Wall time of the script.
        alt: Alt text of the figure.
        describe: The data and training sentence (default :func:`setup_markdown`).
    """
    write_json(setup.out / f"{stem}.json", results)
    png = setup.out / f"{stem}.png"
    plot_fn(results, png)
    env = environment_markdown(results["environment"], setup.command, seconds, setup.threads, setup.jobs)

    def body(link: str) -> str:
        return f"{describe or setup_markdown(setup)} {intro}\n\n{text}\n![{alt}]({link})\n\n{env}\n"

    write_text(setup.out / f"{stem}.md", body(png.name))
    if setup.doc is not None:
        update_doc_block(setup.doc, stem, body(doc_figure(png, setup.doc)))
    print(text)
