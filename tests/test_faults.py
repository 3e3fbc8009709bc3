"""Faults made for real: a worker process SIGKILLed mid-run, the driver SIGKILLed mid-run and
resumed, a deleted output chunk. The result must equal an uninterrupted run, byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from xpbatch.catalog.zarr_catalog import completed_chunks, open_catalog
from xpbatch.cli.main import main
from xpbatch.config import EncodeConfig
from xpbatch.encode.stage import encode_catalog
from xpbatch.errors import CatalogError, ChunkError, ClusterError
from xpbatch.model.files import save_model
from xpbatch.model.trained import TrainedModel
from xpbatch.runtime.executor import Executor
from xpbatch.storage.outputs import lock_path

if TYPE_CHECKING:
    from distributed import Client

N_CHUNKS = 40
CHUNK_ROWS = 512
BATCH = 128
CONFIG = EncodeConfig(batch_size=BATCH, progress_bar=False)


class Inputs:
    """Many small chunks (so a kill lands mid-run) and the uninterrupted serial catalogue."""

    def __init__(self, root: Path, make_xp_store: Callable[..., Path]) -> None:
        self.store = make_xp_store(root / "s.zarr", N_CHUNKS * CHUNK_ROWS, chunk_rows=CHUNK_ROWS)
        self.model = root / "m.safetensors"
        save_model(TrainedModel.untrained(seed=8), self.model)
        self.reference = root / "reference.zarr"
        encode_catalog(self.store, self.model, self.reference, config=CONFIG)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, make_xp_store: Callable[..., Path]) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("faults"), make_xp_store)


def _wait_for_records(out: Path, at_least: int, timeout: float) -> int:
    """Poll (not sleep blindly) until ``out`` records ``at_least`` finished chunks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = len(completed_chunks(out))
        except (OSError, ValueError):  # not created yet, or mid-creation
            done = 0
        if done >= at_least:
            return done
        time.sleep(0.02)
    raise TimeoutError(f"{out} recorded fewer than {at_least} chunks in {timeout} s")


def test_a_worker_killed_mid_run_does_not_fail_the_run(
    inputs: Inputs,
    dask_client: Client,
    tmp_path: Path,
    assert_same_catalogue: Callable[[Path, Path], None],
) -> None:
    out = tmp_path / "c.zarr"
    victim = next(iter(dask_client.run(os.getpid).values()))
    killed_after: list[int] = []

    def kill_when_started() -> None:
        killed_after.append(_wait_for_records(out, 2, timeout=120))
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    try:
        summary = encode_catalog(inputs.store, inputs.model, out, client=dask_client, config=CONFIG)
    finally:
        killer.join()
        dask_client.wait_for_workers(2, timeout=60)  # the nanny restarts it for later tests
    assert killed_after and killed_after[0] < N_CHUNKS, "the kill came after the run"
    assert victim not in dask_client.run(os.getpid).values()
    assert summary.verified and summary.rows_this_run == N_CHUNKS * CHUNK_ROWS
    assert_same_catalogue(inputs.reference, out)


def test_a_driver_killed_mid_run_is_completed_by_resume(
    inputs: Inputs,
    dask_client: Client,
    tmp_path: Path,
    assert_same_catalogue: Callable[[Path, Path], None],
) -> None:
    out = tmp_path / "c.zarr"
    command = [
        *(str(Path(sys.executable).parent / "xpbatch"), "encode-catalog", str(inputs.store)),
        *("--model", str(inputs.model), "--output", str(out), "--batch-size", str(BATCH)),
        *("--n-workers", "1", "--dashboard-address", ":0"),
    ]
    # Its own session: killpg takes the driver, its scheduler, nanny and worker at once.
    driver = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        done_at_kill = _wait_for_records(out, 1, timeout=240)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    assert done_at_kill < N_CHUNKS, "the kill came after the run"
    with pytest.raises(CatalogError, match="incomplete"):
        open_catalog(out)
    stale = json.loads(lock_path(out).read_text())  # the killed run's lock is left behind
    assert stale["pid"] == driver.pid

    config = EncodeConfig(batch_size=BATCH, progress_bar=False, resume=True)
    summary = encode_catalog(inputs.store, inputs.model, out, client=dask_client, config=config)
    assert summary.chunks_skipped >= done_at_kill
    assert summary.verified
    assert_same_catalogue(inputs.reference, out)
    assert not lock_path(out).exists()  # taken over (its pid was gone), then released


def test_verify_command_reports_a_deleted_output_chunk(inputs: Inputs, tmp_path: Path) -> None:
    out = shutil.copytree(inputs.reference, tmp_path / "c.zarr")
    runner = CliRunner()
    clean = runner.invoke(main, ["verify", str(out), "--store", str(inputs.store)])
    assert clean.exit_code == 0 and "no problem found" in clean.output
    (out / "latent_mean" / "c" / "3" / "0").unlink()
    damaged = runner.invoke(main, ["verify", str(out)])
    assert damaged.exit_code == 1
    assert "chunk 3 (rows 1536..): latent_mean chunk file latent_mean/c/3/0 is missing" in (
        damaged.output
    )


def test_resume_of_a_complete_catalogue_with_a_flipped_byte_is_not_verified(
    inputs: Inputs, tmp_path: Path
) -> None:
    out = shutil.copytree(inputs.reference, tmp_path / "c.zarr")
    chunk = out / "latent_mean" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    args = ["encode-catalog", str(inputs.store), "-m", str(inputs.model), "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--resume", "--batch-size", str(BATCH)])
    assert result.exit_code == 2
    assert "verified" not in result.output and "Traceback" not in result.output
    assert "verification FAILED" in result.output
    assert "latent_mean chunk file latent_mean/c/3/0 is unreadable" in result.output


# --- the bounded map's own fault handling ------------------------------------------------------
def test_a_failing_task_is_retried_then_reported_with_its_number(
    dask_client: Client, tmp_path: Path
) -> None:
    def flaky(i: int) -> int:  # a closure: pickled by value, so workers need not import tests
        flag = tmp_path / f"failed-{i}"
        if i == 1 and not flag.exists():
            flag.touch()
            raise RuntimeError("transient")
        if i == 3:
            raise RuntimeError("always")
        return 2 * i

    executor = Executor(dask_client, max_attempts=2)
    results = executor.map(flaky, range(3), name="t")
    assert sorted(results) == [0, 2, 4]
    with pytest.raises(ChunkError, match=r"t task 0 \(3\) failed 2 times; last error: .*always"):
        list(executor.map(flaky, [3], name="t"))


def test_a_cluster_without_workers_fails_the_run_resumably() -> None:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
        pytest.raises(ClusterError, match=r"no workers for 0 s.*--resume"),
    ):
        list(Executor(client, no_workers_timeout=0.3, poll_s=0.1).map(abs, [1], name="t"))
