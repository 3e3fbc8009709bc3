"""The stray warnings a first session met are gone: distributed's "Sizeof calculation ...
failed" (a performance report gathering the workers' profiles) here, in a command's stderr;
hats' "Looking for catalog - found collection." (export-hats) in tests/test_hats_export.py;
lsdb's ``to_hats`` deprecation (notebook 05) in tests/test_notebooks.py, which checks that no
notebook cell prints any of :data:`STRAY`."""

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


@pytest.mark.slow  # a command with its own cluster
def test_encode_with_a_performance_report_prints_no_stray_warning(tmp_path: Path) -> None:
    """The workers send their profiles to the report: no "Sizeof calculation ... failed"."""
    from xpbatch.mock import write_mock_store
    from xpbatch.model.files import save_model
    from xpbatch.model.trained import TrainedModel

    write_mock_store(tmp_path / "mock.zarr", 2000, seed=3, chunk_rows=1000)
    save_model(TrainedModel.untrained(), tmp_path / "model.safetensors")
    cli = [sys.executable, "-c", "from xpbatch.cli.main import main; main()"]
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
            "--n-workers",
            "1",
            "--dashboard-address",
            "127.0.0.1:0",
        ],
        tmp_path,
    )
    assert (tmp_path / "report.html").stat().st_size > 10_000
