"""Every ``Examples`` block of the package runs as a doctest (examples that need data not in
the repository, e.g. a DR3 store, are marked ``+SKIP``)."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

import xpbatch

ROOT = Path(xpbatch.__file__).parent


def _module(path: Path) -> str:
    """``xpbatch/model/files.py`` -> ``xpbatch.model.files`` (a package: its name)."""
    parts = ("xpbatch", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts).removesuffix(".__init__")


MODULES = sorted(_module(path) for path in ROOT.rglob("*.py") if ">>>" in path.read_text())
_HEADING = re.compile(r"^\s*Examples\n\s*-{8,}\n", re.MULTILINE)


def test_modules_with_examples_are_found() -> None:
    assert "xpbatch.model.files" in MODULES and len(MODULES) > 10
    for path in ROOT.rglob("*.py"):
        if _HEADING.search(path.read_text()):
            assert _module(path) in MODULES, f"{path}: an Examples section without >>>"


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # an example that writes a relative path writes here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    tests = [t for t in finder.find(module, name) if t.examples]
    headings = len(_HEADING.findall(Path(module.__file__ or "").read_text()))
    assert len(tests) >= headings, f"{name}: {headings} Examples sections, {len(tests)} doctests"
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
