"""The README's flow prints none of the stray warnings a first session met: distributed's
"Sizeof calculation ... failed" (a performance report gathering the workers' profiles), hats'
"Looking for catalog - found collection." (export-hats), nor any Python warning; opening the
export with LSDB neither. (lsdb's ``to_hats`` deprecation came from notebook 05:
tests/test_notebooks.py checks that no notebook cell prints a warning.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

STRAY = re.compile(r"distributed\.sizeof|found collection|\w+Warning\b")
"""What none of the commands may print: the two messages, and any Python warning (``...Warning``;
distributed's own log lines say ``WARNING``)."""


def _run(args: list[str], cwd: Path) -> str:
    """Run ``args`` as a user would, in its own process; its stderr, after checking it ended
    well and printed nothing stray."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    stray = STRAY.findall(done.stderr)
    command = " ".join(a for a in args[3:] if not a.startswith("-"))[:60] or args[-1][:60]
    assert not stray, f"{command}: {stray}\n{done.stderr[-4000:]}"
    return done.stderr


@pytest.mark.slow  # three commands with their own clusters, hats-import among them
def test_encode_with_a_report_export_hats_and_lsdb_print_no_stray_warning(
    tmp_path: Path,
) -> None:
    from xpbatch.mock import write_mock_store
    from xpbatch.model.files import save_model
    from xpbatch.model.trained import TrainedModel

    write_mock_store(tmp_path / "mock.zarr", 2000, seed=3, chunk_rows=1000)
    save_model(TrainedModel.untrained(), tmp_path / "model.safetensors")
    cli = [sys.executable, "-c", "from xpbatch.cli.main import main; main()"]
    local = ["--n-workers", "1", "--dashboard-address", "127.0.0.1:0"]
    _run(
        [
            *cli,
            "encode-catalog",
            "mock.zarr",
            "-m",
            "model.safetensors",
            "-o",
            "catalog.zarr",
            "--skip-fit-check",  # an untrained model: what is tested is the run, not the fit
            "--no-progress-bar",
            "--performance-report",
            "report.html",
            *local,
        ],
        tmp_path,
    )
    assert (tmp_path / "report.html").stat().st_size > 10_000
    export = ["export-hats", "catalog.zarr", "-o", "hats", "--highest-order", "4"]
    _run([*cli, *export, *local], tmp_path)
    code = (
        "import lsdb\n"
        "catalog = lsdb.open_catalog('hats')\n"
        "print(len(catalog.query('anomaly_score > 0').compute(progress_bar=False)))"
    )
    _run([sys.executable, "-c", code], tmp_path)
