"""The linters and the type checker that CI and contributors run, as tests."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "cmd",
    [
        pytest.param(("ruff", "check", "xpbatch", "tests"), id="ruff-check"),
        pytest.param(("ruff", "format", "--check", "xpbatch", "tests"), id="ruff-format"),
        pytest.param(("mypy",), id="mypy"),
    ],
)
def test_code_passes(cmd):
    exe = shutil.which(cmd[0], path=str(REPO / ".venv" / "bin")) or shutil.which(cmd[0])
    if exe is None:
        pytest.skip(f"{cmd[0]} is not installed; install the test extra: pip install -e '.[test]'")
    result = _run(exe, *cmd[1:])
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_is_fast_and_does_not_import_torch():
    """`xpbatch --help` must not pull in torch, dask or zarr (STYLE: the CLI only translates)."""
    code = (
        "import sys; from xpbatch.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'dask', 'zarr', 'distributed') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
