"""One writer per output: the lock file beside every output, with real processes holding it.

Two concurrent runs on one output: one wins, the other is refused naming the holder, and the
output equals a clean run of the winner byte for byte. A lock left by a SIGKILLed run is taken
over; one held on another host needs --break-lock; --overwrite never removes a held output."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from xpbatch.config import EncodeConfig
from xpbatch.encode.stage import encode_catalog
from xpbatch.errors import OutputLockedError
from xpbatch.model.files import save_model
from xpbatch.model.trained import TrainedModel
from xpbatch.storage.outputs import lock_path, output_lock

if TYPE_CHECKING:
    from distributed import Client

XPBATCH = str(Path(sys.executable).parent / "xpbatch")
CONFIG = EncodeConfig(batch_size=128, progress_bar=False)
HOLD = (
    "import sys, time\n"
    "from xpbatch.storage.outputs import output_lock\n"
    "with output_lock(sys.argv[1], command='test-holder'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


@pytest.fixture
def holder() -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """Start a process that holds the lock of a path until killed (killed after the test)."""
    started: list[subprocess.Popen[str]] = []

    def start(output: Path) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(output)], stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=30)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    return process.pid


def _write_lock(output: Path, **holder: object) -> Path:
    path = lock_path(output)
    path.write_text(json.dumps({"run_id": "r0", "command": "encode-catalog", **holder}))
    return path


def test_the_lock_is_a_sibling_file_naming_its_holder(tmp_path: Path) -> None:
    out = tmp_path / "catalog.zarr"
    with output_lock(out, command="encode-catalog") as path:
        assert path == tmp_path / "catalog.zarr.lock"
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == "encode-catalog" and holder["run_id"] and holder["started"]
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"), output_lock(out):
            pass  # one owner: not re-entrant, even in the same process
        assert path.exists()
    assert not path.exists()


def test_a_live_holder_in_another_process_is_named_in_the_refusal(
    tmp_path: Path, holder: Callable[[Path], subprocess.Popen[str]]
) -> None:
    out = tmp_path / "catalog.zarr"
    process = holder(out)
    with pytest.raises(OutputLockedError) as refused, output_lock(out):
        pass
    message = str(refused.value)
    assert f"pid {process.pid}" in message and "test-holder" in message
    assert socket.gethostname() in message and "Nothing was changed" in message


def test_a_stale_lock_on_this_host_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "catalog.zarr"
    _write_lock(out, host=socket.gethostname(), pid=_dead_pid(), started="earlier")
    with output_lock(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_lock_of_another_host_needs_break_lock(tmp_path: Path) -> None:
    out = tmp_path / "catalog.zarr"
    path = _write_lock(out, host="node-elsewhere", pid=4242, started="earlier")
    with pytest.raises(OutputLockedError, match=r"node-elsewhere.*--break-lock"), output_lock(out):
        pass
    assert json.loads(path.read_text())["host"] == "node-elsewhere"  # untouched
    with output_lock(out, break_lock=True):
        assert json.loads(path.read_text())["pid"] == os.getpid()


@pytest.fixture(scope="module")
def inputs(
    tmp_path_factory: pytest.TempPathFactory, make_xp_store: Callable[..., Path]
) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("lock")
    store = make_xp_store(root / "s.zarr", 8 * 512, chunk_rows=512)
    models = []
    for seed in (1, 2):
        models.append(root / f"m{seed}.safetensors")
        save_model(TrainedModel.untrained(seed=seed), models[-1])
    return store, models[0], models[1]


def test_overwrite_never_removes_an_output_a_live_run_holds(
    inputs: tuple[Path, Path, Path],
    tmp_path: Path,
    holder: Callable[[Path], subprocess.Popen[str]],
) -> None:
    store, model, _ = inputs
    out = tmp_path / "c.zarr"
    encode_catalog(store, model, out, config=CONFIG)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    holder(out)
    config = EncodeConfig(batch_size=128, progress_bar=False, overwrite=True)
    with pytest.raises(OutputLockedError, match="test-holder"):
        encode_catalog(store, model, out, config=config)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.slow  # two CLI runs, then the winner's reference
def test_two_overwrite_runs_at_once_one_wins_and_its_catalogue_is_exact(
    inputs: tuple[Path, Path, Path],
    tmp_path: Path,
    assert_same_catalogue: Callable[[Path, Path], None],
    dask_client: Client,
) -> None:
    store, model_a, model_b = inputs
    # Both runs on the suite's running cluster: the lock is the driver's, so where the chunks
    # run does not change who wins; a LocalCluster per run only cost two worker starts.
    cluster = dask_client.scheduler.address
    out = tmp_path / "c.zarr"
    encode_catalog(store, model_a, out, config=CONFIG)  # an earlier catalogue to overwrite
    runs = {
        model: subprocess.Popen(
            [
                *(XPBATCH, "encode-catalog", str(store), "-m", str(model), "-o", str(out)),
                *("--overwrite", "--batch-size", "128", "--cluster", cluster),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for model in (model_a, model_b)
    }
    results = {model: (p.wait(timeout=300), *p.communicate()) for model, p in runs.items()}
    winners = [model for model, (code, _, _) in results.items() if code == 0]
    losers = [model for model, (code, _, _) in results.items() if code != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    _, stdout, stderr = results[losers[0]]
    assert f"pid {runs[winners[0]].pid}" in stderr and "is being written by run" in stderr
    assert "Traceback" not in stderr and "verified" not in stdout
    assert "verified complete" in results[winners[0]][1]
    clean = tmp_path / "clean.zarr"
    encode_catalog(store, winners[0], clean, config=CONFIG)
    assert_same_catalogue(clean, out)
    assert not lock_path(out).exists()


def test_break_lock_is_an_option_of_every_writing_command() -> None:
    from click.testing import CliRunner

    from xpbatch.cli.main import main

    commands = ("encode-catalog", "ingest", "train", "export-parquet", "export-hats", "mock")
    for command in (*commands, "neighbours", "skymap"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert "--break-lock" in result.output, command


def test_the_lock_survives_removal_of_the_output(tmp_path: Path) -> None:
    out = tmp_path / "c.zarr"
    out.mkdir()
    with output_lock(out) as path:
        shutil.rmtree(out)  # what --overwrite does
        assert path.exists()


def test_every_stage_function_holds_the_lock_before_any_work(
    tmp_path: Path, holder: Callable[[Path], subprocess.Popen[str]]
) -> None:
    from xpbatch.ingest import ingest_files
    from xpbatch.products.parquet_export import export_parquet
    from xpbatch.train.stage import train_model

    stages: dict[str, Callable[[Path], object]] = {
        "train": lambda out: train_model(tmp_path / "no-store.zarr", out),
        "ingest": lambda out: ingest_files([], [], out),
        "export-parquet": lambda out: export_parquet(tmp_path / "no-catalogue.zarr", out),
        "encode-catalog": lambda out: encode_catalog(tmp_path / "s", tmp_path / "m", out),
    }
    for name, stage in stages.items():
        out = tmp_path / f"{name}.out"
        holder(out)
        with pytest.raises(OutputLockedError, match="test-holder"):
            stage(out)
