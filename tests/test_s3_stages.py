"""Every stage through s3:// URLs on a real S3 server (SeaweedFS) equals the same run on local
paths, value for value and chunk object for chunk file, with the same guarantees: one writer
(the lease), completion records last, resume after a killed driver, verification by checksums.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import xarray as xr

from xpbatch.config import EncodeConfig
from xpbatch.storage.location import Location, as_location

if TYPE_CHECKING:
    from distributed import Client

CONFIG = EncodeConfig(progress_bar=False, check_fit=False)


def chunk_objects(where: Path | Location) -> dict[str, bytes]:
    """Every chunk file or object of a Zarr group (not its metadata), by relative name."""
    location = as_location(where)
    return {
        name: (location / name).read_bytes()
        for name in location.list()
        if not name.endswith("zarr.json") and not name.startswith("_xpbatch_run")
    }


def assert_same_chunks(local: Path, remote: Location) -> None:
    a, b = chunk_objects(local), chunk_objects(remote)
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []


@pytest.fixture
def small_store(tmp_path: Path, make_xp_store: Callable[..., Path]) -> Path:
    return make_xp_store(tmp_path / "store.zarr", 1100, chunk_rows=250)


def test_encode_verify_open_on_s3_equal_local(
    s3_url: str, tmp_path: Path, small_store: Path
) -> None:
    from test_s3_read import upload

    from xpbatch.catalog.verify import verify_catalog
    from xpbatch.catalog.zarr_catalog import open_catalog
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.model.trained import TrainedModel
    from xpbatch.storage.lease import read_lease
    from xpbatch.store.reader import open_xp_store

    model = TrainedModel.untrained()
    local = tmp_path / "catalog.zarr"
    encode_catalog(small_store, model, local, config=CONFIG)
    remote_store = as_location(s3_url) / "store.zarr"
    upload(small_store, remote_store)
    remote = as_location(s3_url) / "catalog.zarr"

    # input and output both on object storage
    summary = encode_catalog(remote_store.url, model, remote.url, config=CONFIG)
    assert summary.verified and summary.path == remote.url
    assert "verified complete" in str(summary)
    assert read_lease(remote) is None  # released
    assert_same_chunks(local, remote)
    xr.testing.assert_identical(
        open_catalog(remote.url).drop_attrs(), open_catalog(local).drop_attrs()
    )
    back = xr.open_zarr(remote.url, storage_options=remote.storage_options())
    xr.testing.assert_identical(back.drop_attrs().load(), open_catalog(local).drop_attrs().load())
    report = verify_catalog(remote.url, remote_store.url)
    assert report.ok, str(report)
    xr.testing.assert_identical(
        open_xp_store(remote_store.url).load(), open_xp_store(small_store).load()
    )

    # a local store into an s3 catalogue: the same values again
    again = as_location(s3_url) / "from-local.zarr"
    encode_catalog(small_store, model, again, config=CONFIG)
    assert_same_chunks(local, again)


N_CHUNKS = 24
CHUNK_ROWS = 256


class Faults:
    """Many small chunks (so a kill lands mid-run), a model file, the local reference."""

    def __init__(self, root: Path, make_xp_store: Callable[..., Path]) -> None:
        from xpbatch.encode.stage import encode_catalog
        from xpbatch.model.files import save_model
        from xpbatch.model.trained import TrainedModel

        self.store = make_xp_store(root / "s.zarr", N_CHUNKS * CHUNK_ROWS, chunk_rows=CHUNK_ROWS)
        self.model = root / "m.safetensors"
        save_model(TrainedModel.untrained(seed=8), self.model)
        self.reference = root / "reference.zarr"
        encode_catalog(self.store, self.model, self.reference, config=CONFIG)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, make_xp_store: Callable[..., Path]) -> Faults:
    return Faults(tmp_path_factory.mktemp("s3faults"), make_xp_store)


def _wait_for_records(out: Location, at_least: int, timeout: float) -> int:
    from xpbatch.catalog.zarr_catalog import completed_chunks
    from xpbatch.errors import XPBatchError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = len(completed_chunks(out))
        except (XPBatchError, OSError, ValueError):  # not created yet, or mid-creation
            done = 0
        if done >= at_least:
            return done
        time.sleep(0.05)
    raise TimeoutError(f"{out} recorded fewer than {at_least} chunks in {timeout} s")


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "xpbatch"), *args]


@pytest.mark.slow  # a killed CLI run and its resume on a cluster
def test_a_killed_driver_resumes_to_equal_values(s3_url: str, faults: Faults) -> None:
    from xpbatch.catalog.zarr_catalog import open_catalog
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.errors import CatalogError, OutputLockedError
    from xpbatch.storage.lease import read_lease

    out = as_location(s3_url) / "c.zarr"
    command = _cli(
        *("encode-catalog", str(faults.store), "--model", str(faults.model)),
        *("--output", out.url, "--skip-fit-check", "--no-progress-bar"),
        *("--n-workers", "1", "--threads-per-worker", "1", "--dashboard-address", ":0"),
        *("--storage-options", '{"lease_ttl_s": 3}'),
    )
    driver = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        done_at_kill = _wait_for_records(out, 1, timeout=240)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    assert done_at_kill < N_CHUNKS, "the kill came after the run"
    with pytest.raises(CatalogError, match="incomplete"):
        open_catalog(out.url)
    holder = read_lease(out)  # the killed run's lease is left behind, unreleased
    assert holder is not None and holder.pid == driver.pid and not holder.released

    short = as_location(out.url, storage_options={"lease_ttl_s": 3})
    resume = EncodeConfig(progress_bar=False, check_fit=False, resume=True)
    if not holder.expired():
        with pytest.raises(OutputLockedError, match="being written by"):
            encode_catalog(faults.store, faults.model, short, config=resume)
    time.sleep(max(0.0, holder.renewed + holder.ttl_s - time.time()) + 0.5)
    summary = encode_catalog(faults.store, faults.model, short, config=resume)
    assert summary.chunks_skipped >= done_at_kill and summary.verified
    assert_same_chunks(faults.reference, out)
    xr.testing.assert_identical(
        open_catalog(out.url).drop_attrs(), open_catalog(faults.reference).drop_attrs()
    )
    assert read_lease(out) is None


def test_a_second_writer_is_refused_while_the_first_finishes_intact(
    s3_url: str, faults: Faults
) -> None:
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.errors import OutputLockedError

    out = as_location(s3_url) / "c.zarr"
    results: list[object] = []

    def first() -> None:
        results.append(encode_catalog(faults.store, faults.model, out.url, config=CONFIG))

    thread = threading.Thread(target=first)
    thread.start()
    try:
        _wait_for_records(out, 1, timeout=120)
        for config in (CONFIG, EncodeConfig(progress_bar=False, check_fit=False, resume=True)):
            with pytest.raises(OutputLockedError, match="being written by") as info:
                encode_catalog(faults.store, faults.model, out.url, config=config)
            assert "\n" not in str(info.value)
    finally:
        thread.join()
    assert len(results) == 1 and results[0].verified  # type: ignore[attr-defined]
    assert_same_chunks(faults.reference, out)


def test_a_worker_killed_mid_run_with_secrets_only_in_the_options(
    s3_server: object,
    s3_url: str,
    faults: Faults,
    dask_client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The workers get the explicit secrets through a plugin, never inside a task; a worker
    killed mid-run is replaced (the plugin runs again there) and the result is unchanged."""
    from s3_server import ACCESS_KEY, SECRET_KEY

    from xpbatch.encode.stage import ChunkJob, encode_catalog
    from xpbatch.storage.clients import StorageOptions

    options = {
        "endpoint_url": s3_server.endpoint,  # type: ignore[attr-defined]
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "allow_http": True,
        "region": "us-east-1",
    }
    out = as_location(s3_url, storage_options=options) / "c.zarr"
    job = ChunkJob(faults.store, "id", out, "run", 0, "key", None, "cpu", 8)
    sent = pickle.dumps(job)
    assert SECRET_KEY.encode() not in sent and ACCESS_KEY.encode() not in sent
    assert pickle.loads(sent).out.options == out.options  # the same process knows the secrets
    assert SECRET_KEY not in repr(out) + repr(out.options) + str(StorageOptions.parse(options))

    victim = next(iter(dask_client.run(os.getpid).values()))
    killed_after: list[int] = []

    def kill_when_started() -> None:
        killed_after.append(_wait_for_records(out, 2, timeout=120))
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    try:
        summary = encode_catalog(faults.store, faults.model, out, client=dask_client, config=CONFIG)
    finally:
        killer.join()
        dask_client.wait_for_workers(2, timeout=60)
    assert killed_after and killed_after[0] < N_CHUNKS, "the kill came after the run"
    assert summary.verified
    assert_same_chunks(faults.reference, out)
    every_object = b"".join((out / name).read_bytes() for name in out.list())
    assert SECRET_KEY.encode() not in every_object and ACCESS_KEY.encode() not in every_object


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong secret", "SignatureDoesNotMatch|access denied"),
        ("missing bucket", "NoSuchBucket|does not exist"),
    ],
)
def test_wrong_credentials_and_a_missing_bucket_are_one_line(
    s3_url: str, faults: Faults, case: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from s3_server import SECRET_KEY

    url = s3_url
    if case == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-987654321")
    else:
        url = "s3://no-such-bucket-xpbatch/run"
    for command in (
        ("info", f"{url}/c.zarr"),
        ("verify", f"{url}/c.zarr"),
        ("encode-catalog", str(faults.store), "-m", str(faults.model), "-o", f"{url}/c.zarr"),
        ("mock", "-n", "100", "-o", f"{url}/m.zarr"),  # an output of the new writers
    ):
        done = subprocess.run(
            _cli(*command, *(("--n-workers", "1") if "encode" in command[0] else ())),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode != 0, done
        text = done.stderr.strip()
        assert text.startswith("error: ") and "\n" not in text, text
        assert re.search(expected, text), text
        assert "Traceback" not in done.stderr
        for secret in (SECRET_KEY, "not-the-secret-987654321"):
            assert secret not in done.stderr + done.stdout


def test_train_neighbours_skymap_and_info_read_s3_as_local(
    s3_url: str, tmp_path: Path, make_xp_store: Callable[..., Path]
) -> None:
    """The reading stages take an s3:// URL and give what they give on the local copy."""
    import numpy as np
    from click.testing import CliRunner
    from s3_server import SECRET_KEY
    from test_s3_read import upload

    from xpbatch.benchmarks.neighbours import synthetic_catalog
    from xpbatch.cli.main import main
    from xpbatch.config import TrainConfig
    from xpbatch.mock import write_mock_store
    from xpbatch.model.files import load_model
    from xpbatch.products.neighbours import find_neighbours
    from xpbatch.products.sky_maps import compute_sky_maps
    from xpbatch.train.stage import train_model

    root = as_location(s3_url)
    neighbours = synthetic_catalog(tmp_path / "n.zarr", 900, chunk_rows=300)
    upload(neighbours, root / "n.zarr")
    from xpbatch.catalog.zarr_catalog import open_arrays

    ids = np.asarray(open_arrays(neighbours, ["source_id"])["source_id"][[0, 450, 899]])
    table = find_neighbours(neighbours, ids, k=5)
    assert table.equals(find_neighbours((root / "n.zarr").url, ids, k=5))

    from xpbatch.encode.stage import encode_catalog
    from xpbatch.model.trained import TrainedModel

    store = write_mock_store(tmp_path / "mock.zarr", 900, seed=3, chunk_rows=300)
    sky = tmp_path / "sky.zarr"
    encode_catalog(store, TrainedModel.untrained(), sky, config=CONFIG)
    encode_catalog(store, TrainedModel.untrained(), (root / "sky.zarr").url, config=CONFIG)
    a, b = compute_sky_maps(sky, order=2), compute_sky_maps((root / "sky.zarr").url, order=2)
    assert np.array_equal(a.count, b.count)
    assert np.array_equal(a.latent_sum, b.latent_sum, equal_nan=True)

    upload(store, root / "mock.zarr")
    config = TrainConfig(
        epochs=2, learning_rate=1e-3, batch_size=256, device="cpu", progress_bar=False
    )
    train_model(store, tmp_path / "a.safetensors", config=config)
    train_model((root / "mock.zarr").url, tmp_path / "b.safetensors", config=config)
    net_a = load_model(tmp_path / "a.safetensors").network.state_dict()
    net_b = load_model(tmp_path / "b.safetensors").network.state_dict()
    assert all((net_a[k] == net_b[k]).all() for k in net_a)

    shown = CliRunner().invoke(main, ["info", (root / "sky.zarr").url])
    assert shown.exit_code == 0, shown.output
    assert (root / "sky.zarr").url in shown.output and SECRET_KEY not in shown.output
    assert "complete" in shown.output
