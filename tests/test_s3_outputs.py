"""The outputs written to object storage (mock, ingest, sky maps, neighbours, Parquet and HATS
exports) on a real S3 server (SeaweedFS) equal the same runs on local paths, value for value,
under the same rules: the lease, the one output rule, completion records last.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr

import xpbatch
from xpbatch.config import (
    EncodeConfig,
    IngestConfig,
    MockConfig,
    NeighboursConfig,
    SkyMapConfig,
)
from xpbatch.storage.location import Location, as_location

CONFIG = EncodeConfig(progress_bar=False, check_fit=False)


def same_objects(local: Path, remote: Location, *, skip: tuple[str, ...] = ()) -> None:
    """Every file below ``local`` has an object of the same name below ``remote``, and the
    chunk files (not the metadata, which records times and ids) hold the same bytes."""
    a, b = as_location(local), remote
    names = [n for n in a.list() if not n.startswith(skip)]
    assert names == [n for n in b.list() if not n.startswith(skip)]
    chunks = [n for n in names if "/c/" in n]
    assert chunks and [n for n in chunks if (a / n).read_bytes() != (b / n).read_bytes()] == []


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small encoded mock catalogue (with positions), local: the input of the products."""
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.mock import write_mock_store
    from xpbatch.model.trained import TrainedModel

    root = tmp_path_factory.mktemp("s3out")
    store = write_mock_store(root / "mock.zarr", 900, seed=3, chunk_rows=300, rows_per_file=300)
    out = root / "catalog.zarr"
    encode_catalog(store, TrainedModel.untrained(), out, config=CONFIG)
    return out


def test_mock_store_on_s3_equals_local(s3_url: str, tmp_path: Path) -> None:
    from xpbatch.errors import ConfigError, OutputExistsError
    from xpbatch.mock import make_mock, read_mock_labels
    from xpbatch.storage.lease import read_lease
    from xpbatch.store.reader import open_xp_store

    config = MockConfig(n=700, seed=5, chunk_rows=200, binary_fraction=0.05)
    local = make_mock(tmp_path / "mock.zarr", config=config)
    out = as_location(s3_url) / "mock.zarr"
    remote = make_mock(out.url, config=config)
    assert str(remote.path) == out.url and remote.rare_counts == local.rare_counts
    assert read_lease(out) is None
    same_objects(tmp_path / "mock.zarr", out)
    a, b = open_xp_store(tmp_path / "mock.zarr"), open_xp_store(out.url)
    xr.testing.assert_identical(a.drop_attrs().load(), b.drop_attrs().load())
    assert b.attrs["complete"] is True
    assert read_mock_labels(out.url).equals(read_mock_labels(tmp_path / "mock.zarr"))

    with pytest.raises(OutputExistsError, match="--overwrite"):
        make_mock(out.url, config=config)
    again = make_mock(out.url, config=MockConfig(n=300, seed=6, chunk_rows=200, overwrite=True))
    assert again.rows == 300 and open_xp_store(out.url).sizes["source"] == 300
    assert not [n for n in out.list() if n.endswith(("/2", "/2/0"))]  # nothing left of the old
    foreign = as_location(s3_url) / "foreign"
    (foreign / "data.txt").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="not an xpbatch"):
        make_mock(foreign.url, config=MockConfig(n=100, overwrite=True))
    assert (foreign / "data.txt").read_bytes() == b"mine"
    from click.testing import CliRunner

    from xpbatch.cli.main import main

    cli = as_location(s3_url) / "cli.zarr"
    args = ["mock", "-n", "700", "--seed", "5", "--chunk-rows", "200", "-o", cli.url]
    shown = CliRunner().invoke(main, [*args, "--binary-fraction", "0.05"])
    assert shown.exit_code == 0, shown.output
    assert cli.url in shown.output
    same_objects(tmp_path / "mock.zarr", cli)
    with pytest.raises(ConfigError, match="local directory"):
        make_mock((as_location(s3_url) / "bulk").url, config=MockConfig(n=100, format="dr3-bulk"))


def test_skymap_and_neighbours_outputs_on_s3_equal_local(
    s3_url: str, tmp_path: Path, catalogue: Path
) -> None:
    from xpbatch.catalog.zarr_catalog import open_arrays
    from xpbatch.errors import OutputExistsError
    from xpbatch.products.neighbours import write_neighbours
    from xpbatch.products.sky_maps import write_sky_maps
    from xpbatch.storage.lease import read_lease

    root = as_location(s3_url)
    config = SkyMapConfig(order=1)
    a = write_sky_maps(catalogue, tmp_path / "sky.png", config=config)
    b = write_sky_maps(catalogue, (root / "sky.png").url, config=config)
    assert np.array_equal(a.count, b.count)
    assert (root / "sky.png").read_bytes() == (tmp_path / "sky.png").read_bytes()
    assert (root / "sky.png.xpbatch.json").is_file() and read_lease(root / "sky.png") is None
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_sky_maps(catalogue, (root / "sky.png").url, config=config)
    (root / "mine.png").write_bytes(b"not ours")
    with pytest.raises(OutputExistsError, match="not an xpbatch"):
        write_sky_maps(catalogue, (root / "mine.png").url, config=SkyMapConfig(overwrite=True))
    assert (root / "mine.png").read_bytes() == b"not ours"

    ids = np.asarray(open_arrays(catalogue, ["source_id"])["source_id"][[0, 450, 899]])
    for name in ("n.parquet", "n.csv"):
        local = write_neighbours(catalogue, ids, tmp_path / name, config=NeighboursConfig(k=4))
        remote = write_neighbours(catalogue, ids, (root / name).url, config=NeighboursConfig(k=4))
        assert local.equals(remote)
        assert (root / name).read_bytes() == (tmp_path / name).read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_neighbours(catalogue, ids, (root / "n.csv").url, config=NeighboursConfig(k=4))
    again = NeighboursConfig(k=2, overwrite=True)
    assert len(write_neighbours(catalogue, ids, (root / "n.csv").url, config=again)) == 6


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mock DR3 bulk files (many small ones, so that a kill lands mid-ingest)."""
    from xpbatch.mock import write_mock_dr3_bulk

    root = tmp_path_factory.mktemp("s3bulk") / "bulk"
    write_mock_dr3_bulk(root, 800, seed=4, rows_per_file=50)
    return root


INGEST = IngestConfig(chunk_rows=256, progress_bar=False)


def _parts_done(staging: Location) -> int:
    from xpbatch.errors import XPBatchError

    try:
        return sum(1 for name in staging.list() if name.endswith("/done.json"))
    except (XPBatchError, OSError):
        return 0


@pytest.mark.slow  # ingests on a cluster, one of them killed
def test_ingest_on_s3_equals_local_and_resumes_after_a_killed_driver(
    s3_url: str, tmp_path: Path, bulk: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from xpbatch.errors import OutputExistsError, StoreError
    from xpbatch.ingest import ingest_files
    from xpbatch.storage.lease import read_lease
    from xpbatch.store.reader import open_xp_store

    local = tmp_path / "s.zarr"
    ingest_files([bulk], [bulk], local, config=INGEST)
    out = as_location(s3_url) / "s.zarr"
    staging = as_location(s3_url) / "s.zarr.parts"
    command = [
        *(str(Path(sys.executable).parent / "xpbatch"), "ingest", str(bulk)),
        *("--gaia-source", str(bulk), "-o", out.url, "--chunk-rows", "256"),
        *("--n-workers", "1", "--threads-per-worker", "1", "--dashboard-address", ":0"),
        *("--no-progress-bar", "--storage-options", '{"lease_ttl_s": 3}'),
    ]
    driver = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while _parts_done(staging) < 1:
            assert driver.poll() is None, driver.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no file parsed in time"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    parsed = _parts_done(staging)
    assert 1 <= parsed < 16, "the kill came after the parsing"
    with pytest.raises(StoreError):
        open_xp_store(out.url)  # no store, or an incomplete one: refused either way
    holder = read_lease(out)
    assert holder is not None and not holder.released

    short = as_location(out.url, storage_options={"lease_ttl_s": 3})
    resume = IngestConfig(chunk_rows=256, progress_bar=False, resume=True)
    with pytest.raises(OutputExistsError, match="--resume"):
        time.sleep(max(0.0, holder.renewed + holder.ttl_s - time.time()) + 0.5)
        ingest_files([bulk], [bulk], short, config=INGEST)
    summary = ingest_files([bulk], [bulk], short, config=resume)
    assert summary.files_reused >= parsed and summary.rows == 800
    assert not staging.exists() and read_lease(out) is None
    same_objects(local, out)
    a, b = open_xp_store(local), open_xp_store(out.url)
    xr.testing.assert_identical(a.drop_attrs().load(), b.drop_attrs().load())
    assert b.attrs["input_files"] == a.attrs["input_files"]

    # complete: --resume does nothing; --overwrite replaces only an xpbatch store
    again = ingest_files([bulk], [bulk], short, config=resume)
    assert again.checks.startswith("none")
    overwrite = IngestConfig(chunk_rows=512, progress_bar=False, overwrite=True)
    ingest_files([bulk], [bulk], short, config=overwrite)
    assert open_xp_store(out.url).attrs["chunk_rows"] == 512
    assert not [n for n in out.list() if "/c/" in n and n.split("/c/")[1].startswith("4")]
    foreign = as_location(s3_url) / "foreign.zarr"
    (foreign / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_type": "group"}')
    with pytest.raises(OutputExistsError, match="not an xpbatch"):
        ingest_files([bulk], [bulk], foreign, config=overwrite)
    assert foreign.list() == ["zarr.json"]


def test_parquet_export_on_s3_equals_local_and_resumes(
    s3_url: str, tmp_path: Path, catalogue: Path
) -> None:
    import pandas as pd

    from xpbatch.config import ParquetExportConfig
    from xpbatch.errors import OutputExistsError
    from xpbatch.products.parquet_export import export_parquet
    from xpbatch.storage.lease import read_lease

    store = catalogue.parent / "mock.zarr"
    config = ParquetExportConfig(progress_bar=False)
    local = export_parquet(catalogue, tmp_path / "pq", store=store, config=config)
    out = as_location(s3_url) / "pq"
    remote = export_parquet(catalogue, out.url, store=store, config=config)
    assert remote.files == local.files and len(local.files) > 1
    assert read_lease(out) is None

    def tables(where: Path | Location) -> dict[str, pd.DataFrame]:
        loc = as_location(where)
        names = [n for n in loc.list() if n.endswith(".parquet")]
        return {n: pd.read_parquet((loc / n).open_reader()) for n in names}

    expected = tables(tmp_path / "pq")
    assert all(frame.equals(expected[n]) for n, frame in tables(out).items())
    assert sorted(tables(out)) == sorted(expected)

    # a killed run's state: the manifest unfinished, one file missing; --resume completes it
    first = sorted(local.files)[0]
    (out / first).remove_tree()
    with pytest.raises(OutputExistsError, match="--resume"):
        export_parquet(catalogue, out.url, store=store, config=config)
    resume = ParquetExportConfig(progress_bar=False, resume=True)
    again = export_parquet(catalogue, out.url, store=store, config=resume)
    assert again.n_reused == len(local.files) - 1 and again.files == local.files
    assert all(frame.equals(expected[n]) for n, frame in tables(out).items())

    from click.testing import CliRunner

    from xpbatch.cli.main import main

    cli = as_location(s3_url) / "pq-cli"
    args = ["export-parquet", str(catalogue), "-o", cli.url, "--store", str(store)]
    shown = CliRunner().invoke(main, [*args, "--no-progress-bar"])
    assert shown.exit_code == 0, shown.output
    assert sorted(tables(cli)) == sorted(expected)

    # the catalogue itself on object storage too
    from test_s3_read import upload

    upload(catalogue, as_location(s3_url) / "catalog.zarr")
    both = as_location(s3_url) / "pq-from-s3"
    export_parquet((as_location(s3_url) / "catalog.zarr").url, both, store=store, config=config)
    assert sorted(tables(both)) == sorted(expected)
    assert all(frame.equals(expected[n]) for n, frame in tables(both).items())

    (out / "notes.txt").write_bytes(b"mine")
    overwrite = ParquetExportConfig(progress_bar=False, overwrite=True)
    with pytest.raises(OutputExistsError, match="not an xpbatch"):
        export_parquet(catalogue, out.url, store=store, config=overwrite)
    assert (out / "notes.txt").read_bytes() == b"mine"


def test_hats_export_on_s3_equals_local_and_lsdb_opens_it(
    s3_url: str, tmp_path: Path, catalogue: Path
) -> None:
    """hats-import writes through UPath; the workers (threads here: they see the AWS variables
    this test sets) take credentials from the environment."""
    import lsdb
    from distributed import Client, LocalCluster
    from upath import UPath

    from xpbatch.config import HatsExportConfig
    from xpbatch.errors import OutputExistsError
    from xpbatch.products.hats_export import export_hats
    from xpbatch.storage.lease import read_lease

    config = HatsExportConfig(pixel_threshold=400, highest_order=3, progress_bar=False)
    out = as_location(s3_url) / "hats"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        local = export_hats(catalogue, tmp_path / "hats", client=client, config=config)
        remote = export_hats(catalogue, out.url, client=client, config=config)
        assert remote.n_partitions == local.n_partitions and remote.n_rows == 900
        assert f"UPath('{out.url}', anon=False)" in str(remote)
        with pytest.raises(OutputExistsError, match="--overwrite"):
            export_hats(catalogue, out.url, client=client, config=config)
    assert read_lease(out) is None and not [n for n in out.list() if "intermediate" in n]
    # read in this process's threads, which see the AWS variables set here (not on a default
    # client another test left, whose worker processes started without them)
    with dask.config.set(scheduler="threads"):
        a = lsdb.open_catalog(tmp_path / "hats").compute().sort_index()
        b = lsdb.open_catalog(UPath(out.url, anon=False)).compute().sort_index()
        assert a.equals(b)
        # (lsdb.open_catalog(url, storage_options=...) of a collection passes the options on to
        # a relative path on Python 3.11, which upath refuses: open it through a UPath, as here)
        index = lsdb.open_catalog(UPath(out.url, anon=False)).id_search(
            values={"source_id": int(a["source_id"].iloc[5])}
        )
        assert len(index.compute()) == 1


STAGES: dict[str, Callable[[str, Path], object]] = {
    "ingest": lambda url, catalog: xpbatch.ingest_files([], [], url),
    "mock": lambda url, catalog: xpbatch.make_mock(url),
    "skymap": lambda url, catalog: xpbatch.write_sky_maps(catalog, url),
    "neighbours": lambda url, catalog: xpbatch.write_neighbours(catalog, [1], url),
    "export-parquet": lambda url, catalog: xpbatch.export_parquet(catalog, url),
    "export-hats": lambda url, catalog: xpbatch.export_hats(catalog, url, client=None),
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_second_writer_of_an_s3_output_is_refused(
    s3_url: str, catalogue: Path, stage: str
) -> None:
    """While another run holds the output's lease, every stage is refused before it writes."""
    from xpbatch.errors import OutputLockedError
    from xpbatch.storage.outputs import output_lock

    out = as_location(s3_url) / "out"
    with output_lock(out, command="the first writer"):
        with pytest.raises(OutputLockedError, match="the first writer") as info:
            STAGES[stage](out.url, catalogue)
        assert "\n" not in str(info.value)
        assert out.list() == []


def test_bench_object_storage_replaces_only_its_own_catalogue(s3_url: str, tmp_path: Path) -> None:
    from xpbatch.benchmarks.object_storage import run_object_storage_benchmark
    from xpbatch.errors import OutputExistsError

    foreign = as_location(s3_url) / "catalog.zarr" / "notes.txt"
    foreign.write_bytes(b"mine")
    with pytest.raises(OutputExistsError):
        run_object_storage_benchmark(s3_url, rows=2000, repeats=1, workdir=str(tmp_path))
    assert foreign.read_bytes() == b"mine"
    report = run_object_storage_benchmark(
        f"{s3_url}/bench", rows=2000, repeats=2, workdir=str(tmp_path)
    )
    assert len(report.local_s) == len(report.remote_s) == 2 and report.catalogue_bytes > 0
    assert foreign.read_bytes() == b"mine"
