"""The docs stay true: their Python examples run, the API reference covers `__all__`, the site builds offline."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_comhe

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
_RUNNABLE = ["README.md", "docs/pytorch-and-fabric.md", "docs/quickstart.md"]


def _blocks(path: Path) -> list[str]:
    return _BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", _RUNNABLE)
def test_python_examples_in_docs_run(doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks(ROOT / doc)
    assert blocks, f"{doc} has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for code in blocks:
        exec(compile(code, f"{doc}:example", "exec"), namespace)  # noqa: S102 - our own documentation


def test_api_reference_lists_every_public_name() -> None:
    text = (ROOT / "docs/api.md").read_text(encoding="utf-8")
    missing = [name for name in lightning_comhe.__all__ if name != "__version__" and f"`{name}" not in text]
    assert not missing, f"docs/api.md does not document: {missing}"
    for name in lightning_comhe.__all__:
        assert getattr(lightning_comhe, name) is not None


def test_every_nav_page_exists() -> None:
    nav = re.findall(r":\s*([\w\-/]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.MULTILINE)
    assert nav
    missing = [page for page in nav if not (ROOT / "docs" / page).is_file()]
    assert not missing, missing


def test_site_builds_offline(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    mkdocs = shutil.which("mkdocs") or f"{sys.executable} -m mkdocs"
    cmd = [*mkdocs.split(), "build", "--strict", "--site-dir", str(tmp_path / "site")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").is_file()
