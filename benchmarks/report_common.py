"""Shared pieces of the report (:mod:`benchmarks.report`): loading results, provenance, profile tables."""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import common

DOC = common.REPO_ROOT / "docs" / "benchmarks.md"


def load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def md(results: Path, name: str) -> str:
    path = results / f"{name}.md"
    return path.read_text().strip() if path.is_file() else "_Not run._"


def img(name: str, doc: Path, results: Path) -> str:
    """A Markdown image link to the plot (from docs/img/benchmarks when the doc is the repository's)."""
    src = common.DOC_IMG / f"{name}.png" if doc.resolve() == DOC.resolve() else results / f"{name}.png"
    if not src.is_file():
        return ""
    rel = os.path.relpath(src, doc.parent)
    return f"![{name}]({rel})\n"


def strip_out(command: str) -> str:
    """The recorded command without its ``--out DIR`` (results go to ``benchmarks/results/`` by default)."""
    words = command.split()
    keep = [w for i, w in enumerate(words) if w != "--out" and (i == 0 or words[i - 1] != "--out")]
    return " ".join(keep)


def same_run(result: dict[str, Any] | None, machine: dict[str, Any]) -> bool:
    m = (result or {}).get("machine", {})
    return m.get("date") == machine.get("date") and m.get("cpu") == machine.get("cpu")


def provenance(result: dict[str, Any] | None, machine: dict[str, Any]) -> str:
    """A note under a section whose results come from another run (another date or machine) than the page's."""
    if not result or same_run(result, machine):
        return ""
    m = result.get("machine", {})
    return (
        f"_These results come from another run than the rest of this page ({m.get('date', '?')}, "
        f"{m.get('cpu', '?')}, `nproc` = {m.get('nproc', '?')}, {m.get('torch_threads', '?')} thread(s)): the "
        "section was measured on its own, on that machine. Compare ratios within this section only._\n"
    )


def met(flag: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "–"}[flag]


def profiles(result: dict[str, Any] | None, headline: Callable[[dict[str, Any]], str]) -> list[str]:
    """Markdown for every record of ``result`` that carries a profile: a bold ``model, variant: headline`` line and
    the profile table."""
    parts = []
    for rec in (result or {}).get("records", []):
        if "profile" in rec:
            label = (
                f"{common.MODEL_LABELS.get(rec['model'], rec['model'])}, {common.VARIANT_LABELS.get(rec['variant'])}"
            )
            parts += [f"**{label}: {headline(rec)}\n", profile_table(rec["profile"]) + "\n"]
    return parts


def profile_table(profile: dict[str, Any]) -> str:
    rows = [[k, f"{v:.1f} %"] for k, v in profile["categories_pct"].items()]
    top = ", ".join(f"`{k}` {v:.0f} %" for k, v in list(profile["top_ops_pct"].items())[:6])
    return (
        common.md_table(["where the time goes (self CPU, torch.profiler)", "share"], rows)
        + f"\n\nTop operators: {top}."
    )


def record_of(res, name, model, variant, threads=None):
    """The record of ``model`` / ``variant`` in result ``name``: at ``threads`` threads, else the first one."""
    return next(
        (
            r
            for r in (res.get(name) or {}).get("records", [])
            if r["model"] == model and r["variant"] == variant and (threads is None or r.get("threads") == threads)
        ),
        None,
    )


def profiled(res, name, model, variant):
    """The record of ``model`` / ``variant`` that carries a profile, else the first one."""
    recs = [r for r in (res.get(name) or {}).get("records", []) if r["model"] == model and r["variant"] == variant]
    return next((r for r in recs if "profile" in r), recs[0] if recs else None)


def rate_of(rec: dict[str, Any]) -> float:
    """The matmul rate (GFLOP/s) of a floor record: one number, or (older files) a before / after pair."""
    rate = rec["matmul_gflops"]
    return sum(rate) / len(rate) if isinstance(rate, list) else float(rate)


def threads_label(rec: dict[str, Any]) -> str:
    t = rec.get("threads")
    return "" if t is None else f", {t} thread" + ("s" if t > 1 else "")


def result_block(
    results: Path, doc: Path, result: dict[str, Any] | None, machine: dict[str, Any], name: str
) -> list[str]:
    """A benchmark's table, its provenance line and its plot, as report lines."""
    return [md(results, name) + "\n", provenance(result, machine), img(name, doc, results)]
