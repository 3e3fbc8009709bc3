"""Every failure a user can cause ends in one clear message, with real processes and files: a
killed scheduler, a read-only output, a full disk, the published checkpoint given as a model.
No traceback (only with -v); --resume named where a rerun continues. Ctrl-C: test_interrupts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from xpbatch.cli.main import main
from xpbatch.model.files import save_model
from xpbatch.model.trained import TrainedModel

BIN = Path(sys.executable).parent
CHUNK_ROWS = 512
N_CHUNKS = 40


@pytest.fixture(scope="module")
def inputs(
    tmp_path_factory: pytest.TempPathFactory, make_xp_store: Callable[..., Path]
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("failures")
    store = make_xp_store(root / "s.zarr", N_CHUNKS * CHUNK_ROWS, chunk_rows=CHUNK_ROWS)
    model = root / "m.safetensors"
    save_model(TrainedModel.untrained(seed=5), model)
    return store, model


def _encode(store: Path, model: Path, out: Path, *cluster: str) -> list[str]:
    return [
        *(str(BIN / "xpbatch"), "encode-catalog", str(store), "-m", str(model), "-o", str(out)),
        *("--batch-size", "128", *(cluster or ("--n-workers", "1", "--dashboard-address", ":0"))),
    ]


def _wait_for_records(out: Path, at_least: int, process: subprocess.Popen[str]) -> None:
    records = out / "_xpbatch" / "chunk_records" / "c"
    deadline = time.monotonic() + 240
    while not records.is_dir() or len(list(records.iterdir())) < at_least:
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no chunk finished in time"
        time.sleep(0.05)


def _one_message(stderr: str, *expected: str) -> None:
    """stderr ends in one ``error:`` line holding ``expected``, with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    for text in expected:
        assert text in errors[0], errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # a scheduler, a worker and the client's seconds of reconnecting
def test_a_killed_scheduler_ends_in_one_message_naming_resume(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    store, model = inputs
    out = tmp_path / "c.zarr"
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    scheduler = subprocess.Popen(
        [
            str(BIN / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            ":0",
        ],
        **quiet,
    )
    worker = subprocess.Popen(
        [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"], **quiet
    )
    # the client gives up reconnecting after distributed's connect timeout (30 s by default)
    briefly = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s"}
    run = subprocess.Popen(
        _encode(store, model, out, "--cluster", address),
        stderr=subprocess.PIPE,
        text=True,
        env=briefly,
    )
    try:
        _wait_for_records(out, 1, run)
        os.killpg(scheduler.pid, signal.SIGKILL)
        _, stderr = run.communicate(timeout=240)
    finally:
        for process in (run, scheduler, worker):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL) if process is not run else process.kill()
            process.wait(timeout=60)
    assert run.returncode not in (0, None)
    _one_message(stderr, "lost the Dask scheduler", "--resume")
    blank = [line for line in stderr.splitlines() if line.startswith("ERROR") and line[-2:] == ": "]
    assert not blank, stderr  # distributed's records that held only a traceback are left out


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mount(size, read_only=False)``: a small tmpfs of its own (root only, else skip)."""
    mounted: list[Path] = []

    def mount(size: str, *, read_only: bool = False) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root, as in CI): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_read_only_output_ends_in_one_message(
    inputs: tuple[Path, Path], tmpfs: Callable[..., Path]
) -> None:
    store, model = inputs
    out = tmpfs("1m", read_only=True) / "c.zarr"
    run = subprocess.run(_encode(store, model, out), capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    _one_message(run.stderr, "read-only", str(out))


@pytest.mark.slow  # a CLI run with its cluster
def test_a_full_disk_ends_in_one_message_naming_resume(
    inputs: tuple[Path, Path], tmpfs: Callable[..., Path]
) -> None:
    store, model = inputs
    out = tmpfs("3m") / "c.zarr"  # room for the template and a few of the 40 chunks
    run = subprocess.run(_encode(store, model, out), capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    _one_message(run.stderr, "No space left on device", "--resume")
    assert "Compute Failed" not in run.stderr


def test_the_published_checkpoint_as_a_model_suggests_import_xpvae(
    reference_dir: Path, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    store, _ = inputs
    args = ["encode-catalog", str(store), "-m", str(reference_dir / "weight.pt")]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "c"), "--n-workers", "1"])
    assert result.exit_code == 2
    assert "xpbatch import-xpvae" in result.output and "Traceback" not in result.output


def test_verbose_shows_the_traceback(tmp_path: Path) -> None:
    model = tmp_path / "not-a-model.safetensors"
    model.write_bytes(b"\x00" * 4)
    quiet = CliRunner().invoke(main, ["info", str(model)])
    loud = CliRunner().invoke(main, ["-v", "info", str(model)])
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.output and "Traceback" in loud.output
