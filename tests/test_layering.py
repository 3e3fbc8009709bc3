"""The layering of README "Where is what", as import-linter contracts (pyproject.toml,
[tool.importlinter]): torch out of the data modules, distributed only in the executor modules,
click only in the command line, no stage importing a sibling stage."""

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


def test_every_layering_contract_is_kept() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    report = " ".join(result.stdout.split())
    for contract in CONTRACTS["contracts"]:
        assert f"{contract['name']} KEPT" in report, contract["name"]


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("schema.py", "import torch", "torch stays out"),
        ("sky.py", "import distributed", "only the executor"),
        ("info.py", "import click", "only the command line"),
        ("export.py", "import xpbatch.pipeline", "no stage imports"),
    ],
    ids=["torch", "distributed", "click", "sibling-stage"],
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
