"""The layering, as import-linter contracts (pyproject.toml, [tool.importlinter]): each package
imports only from the layers below it, torch stays out of the data layers, distributed in the
runtime, click in the command line; and no module imports itself through others (no cycle).
``lint-imports`` itself runs as a CI step (.ci/run); these tests show that each contract would
catch a break."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package and pyproject.toml under ``root``."""
    command = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [os.fspath(command), "--no-cache", "--no-logo", "pyproject.toml"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": os.fspath(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("schema.py", "import torch", "torch stays out"),
        ("products/sky_positions.py", "import distributed", "only the runtime"),
        ("storage/paths.py", "import click", "only the command line"),
        ("store/checks.py", "import xpbatch.encode.stage", "the data flows one way"),
        ("products/parquet_export.py", "import xpbatch.cli.main", "the data flows one way"),
    ],
    ids=["torch", "distributed", "click", "upward", "upward-to-cli"],
)
def test_a_broken_layer_is_caught(tmp_path: Path, module: str, line: str, contract: str) -> None:
    shutil.copytree(REPO / "xpbatch", tmp_path / "xpbatch", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    path = tmp_path / "xpbatch" / module
    path.write_text(f"{line}  # a layering violation\n{path.read_text()}")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    broken = [c["name"] for c in CONTRACTS["contracts"] if contract in c["name"]]
    assert f"{broken[0]} BROKEN" in " ".join(result.stdout.split()), result.stdout


# Cycles that a later change removes (none left); each entry is one import edge that closes one.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle between xpbatch's modules (imports inside functions count too)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("xpbatch", exclude_type_checking_imports=True)
    edges = {
        module: {
            imported
            for imported in graph.find_modules_directly_imported_by(module)
            if imported.startswith("xpbatch.") and (module, imported) not in KNOWN_CYCLE_EDGES
        }
        for module in graph.modules
        if module.startswith("xpbatch.")
    }
    packages = {m for m in edges if graph.find_children(m)}
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(edges.get(module, ())):
            if imported in packages:
                continue  # a package's __init__ re-exporting its modules is no cycle
            if state.get(imported) == 1:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_top_level_holds_packages_and_the_foundation() -> None:
    """The folder tree is the architecture: packages, plus the foundation: a few modules and
    the config package."""
    package = REPO / "xpbatch"
    modules = {p.name for p in package.glob("*.py")}
    assert modules == {"__init__.py", "errors.py", "schema.py", "dr3.py"}
    assert (package / "config" / "__init__.py").is_file()
    for sub in sorted(p for p in package.iterdir() if (p / "__init__.py").is_file()):
        text = (sub / "__init__.py").read_text()
        assert text.startswith('"""'), f"{sub.name}/__init__.py: say the package's job first"


def test_no_module_is_over_600_lines() -> None:
    lines = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines())
        for p in REPO.glob("xpbatch/**/*.py")
    }
    long = {name: n for name, n in lines.items() if n > 600}
    assert not long, f"split these modules by job: {long}"
