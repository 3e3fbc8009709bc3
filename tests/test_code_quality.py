"""Code-quality properties that the linters cannot see (ruff, mypy and import-linter run as
their own CI step, .ci/run)."""

from __future__ import annotations

import subprocess
import sys


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
