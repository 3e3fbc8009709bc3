"""First runs: a command checks its inputs and claims its output before a cluster starts, and a
failed ingest that parsed nothing does not block its corrected rerun."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from xpbatch import schema
from xpbatch.benchmarks.neighbours import synthetic_catalog
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.cli.main import main
from xpbatch.config import ClusterConfig
from xpbatch.errors import ClusterUnavailableError, InputShapeError, ParseError
from xpbatch.ingest import ingest_files
from xpbatch.runtime import cluster
from xpbatch.storage.outputs import lock_path
from xpbatch.store.reader import open_xp_store

BRIGHT = 5853498713190525696  # a source of the DR3 samples


class ConnectSpy:
    """Stands in for :func:`xpbatch.runtime.cluster.connect`: records each call (and whether the
    output's lock existed then) and refuses, so no cluster ever starts."""

    def __init__(self, output: Path | None = None) -> None:
        self.output = output
        self.calls: list[bool] = []

    @contextlib.contextmanager
    def __call__(self, config: ClusterConfig) -> Iterator[None]:
        self.calls.append(self.output is not None and lock_path(self.output).exists())
        raise ClusterUnavailableError("the spy starts no cluster")
        yield


@pytest.fixture
def gaia(tmp_path: Path) -> Path:
    path = tmp_path / "gaia_source.csv"
    path.write_text(f"source_id,phot_g_mean_flux\n{BRIGHT},123456.78\n")
    return path


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_catalog(tmp_path_factory.mktemp("first") / "c.zarr", 3000, chunk_rows=512)


def _catalog_ids(path: Path, rows: list[int]) -> list[int]:
    ids = catalog.open_arrays(path, [schema.SOURCE_ID])[schema.SOURCE_ID]
    return [int(np.asarray(ids[row])) for row in rows]


BAD_INPUTS = {
    "encode-catalog, missing store": (
        lambda d, c, t: ["encode-catalog", str(t / "nope.zarr"), "-m", str(t / "m.safetensors")],
        "nope.zarr",
    ),
    "neighbours, unknown source id": (
        lambda d, c, t: ["neighbours", str(c), "--source-id", "123"],
        "not in catalogue",
    ),
    "ingest, a file with no G flux": (
        lambda d, c, t: ["ingest", str(d / "XP_CONTINUOUS_RAW.csv")],
        "no G flux",
    ),
    "ingest, a shell glob after --gaia-source": (
        lambda d, c, t: [
            "ingest",
            str(d / "XP_CONTINUOUS_RAW.csv"),
            "--gaia-source",
            str(t / "GaiaSource_1-2.csv"),
            str(t / "GaiaSource_3-4.csv"),
        ],
        r"is a gaia_source file, given as an XP file: --gaia-source takes one path",
    ),
}


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_before_any_cluster_starts(
    args,  # type: ignore[no-untyped-def]
    message: str,
    dr3_samples_dir: Path,
    small_catalog: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("GaiaSource_1-2.csv", "GaiaSource_3-4.csv"):
        (tmp_path / name).write_text(f"source_id,phot_g_mean_flux\n{BRIGHT},1.0\n")
    spy = ConnectSpy()
    monkeypatch.setattr(cluster, "connect", spy)
    command = [*args(dr3_samples_dir, small_catalog, tmp_path), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2, result.output
    assert spy.calls == [], "a cluster was asked for before the refusal"
    assert len(result.output.strip().splitlines()) == 1  # one line, no traceback
    assert re.search(message, result.output), result.output


def test_the_output_is_claimed_before_the_cluster_starts(
    dr3_samples_dir: Path,
    gaia: Path,
    small_catalog: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cases = {
        tmp_path / "s.zarr": [
            "ingest",
            str(dr3_samples_dir / "XP_CONTINUOUS_RAW.csv"),
            str(dr3_samples_dir / "XP_CONTINUOUS_RAW.ecsv"),  # parsed on the cluster
            "--gaia-source",
            str(gaia),
        ],
        tmp_path / "n.csv": ["neighbours", str(small_catalog), "--source-id", "1"],
        tmp_path / "sky.png": ["skymap", str(small_catalog)],
    }
    cases[tmp_path / "n.csv"][-1] = str(_catalog_ids(small_catalog, [7])[0])
    for output, args in cases.items():
        spy = ConnectSpy(output)
        monkeypatch.setattr(cluster, "connect", spy)
        result = CliRunner().invoke(main, [*args, "-o", str(output)])
        assert result.exit_code == 2 and "the spy starts no cluster" in result.output, args
        assert spy.calls == [True], f"{args[0]}: the lock did not exist when the cluster started"
        assert not lock_path(output).exists()  # released on the way out


def test_neighbours_lookup_finds_every_chunks_ids(small_catalog: Path) -> None:
    from xpbatch.products.neighbours import find_neighbours

    rows = [0, 511, 512, 1023, 2047, 2999]  # first and last rows of chunks, and the very last
    ids = _catalog_ids(small_catalog, rows)
    table = find_neighbours(small_catalog, ids, k=1)
    # each query's nearest other source is found (the query itself is not its own neighbour)
    assert sorted(set(table.query_source_id)) == sorted(ids)
    with pytest.raises(InputShapeError, match="not in catalogue"):
        find_neighbours(small_catalog, [ids[0] + 1], k=1)  # between two catalogue ids


def test_a_failed_ingest_that_parsed_nothing_lets_its_corrected_rerun_start(
    dr3_samples_dir: Path, gaia: Path, tmp_path: Path
) -> None:
    xp, out = dr3_samples_dir / "XP_CONTINUOUS_RAW.csv", tmp_path / "s.zarr"
    with pytest.raises(ParseError, match="no G flux"):
        ingest_files([xp], [], out)
    assert (tmp_path / "s.zarr.parts").is_dir()  # what blocked the rerun before
    summary = ingest_files([xp], [gaia], out)  # neither --resume nor --overwrite
    assert summary.rows == open_xp_store(out).sizes["source"] > 0


def test_a_quoted_glob_names_several_gaia_source_files(
    dr3_samples_dir: Path, tmp_path: Path
) -> None:
    gaia_dir = tmp_path / "gaia"
    gaia_dir.mkdir()
    (gaia_dir / "a.csv").write_text(f"source_id,phot_g_mean_flux\n{BRIGHT},123456.78\n")
    (gaia_dir / "b.csv").write_text("source_id,phot_g_mean_flux\n1,2.0\n")
    xp = dr3_samples_dir / "XP_CONTINUOUS_RAW.csv"
    args = ["ingest", str(xp), "--gaia-source", str(gaia_dir / "*.csv"), "-o", str(tmp_path / "s")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    recorded = open_xp_store(tmp_path / "s").attrs[schema.STORE_ATTR_INPUT_FILES]
    assert {Path(f["path"]).name for f in recorded} >= {"a.csv", "b.csv"}
    nothing = CliRunner().invoke(main, [*args[:3], str(gaia_dir / "*.fits"), "-o", "t"])
    assert nothing.exit_code == 2 and "no file matches this pattern" in nothing.output


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_small_store_is_small_whichever_writer_wrote_it(
    dr3_samples_dir: Path, gaia: Path, tmp_path: Path
) -> None:
    from xpbatch.config import MockConfig
    from xpbatch.mock import make_mock
    from xpbatch.store.xp_store import write_xp_store

    one = np.ones((2, schema.N_COEFF), np.float32)
    written = write_xp_store(
        tmp_path / "w.zarr",
        source_id=np.array([5, 7]),
        coefficients=one,
        coefficient_errors=one,
        phot_g_mean_flux=np.ones(2),
    )
    ingested = ingest_files([dr3_samples_dir / "XP_CONTINUOUS_RAW.csv"], [gaia], tmp_path / "i")
    make_mock(tmp_path / "m.zarr", config=MockConfig(n=300))
    for path in (written, ingested.path, tmp_path / "m.zarr"):
        ds = open_xp_store(path)
        rows = ds.sizes["source"]
        assert ds.chunks["source"] == (rows,), path  # one chunk, never longer than the rows
        coefficient_bytes = 2 * rows * schema.N_COEFF * 4  # coefficients and their errors
        assert _bytes(Path(path)) < 2 * coefficient_bytes + 200_000, path  # + metadata


def test_output_files_get_the_umasks_permissions(tmp_path: Path) -> None:
    from xpbatch.model.files import save_model
    from xpbatch.model.trained import TrainedModel
    from xpbatch.storage.paths import atomic_path, new_file_mode

    mask = os.umask(0o022)
    os.umask(mask)
    assert new_file_mode() == 0o666 & ~mask
    save_model(TrainedModel.untrained(), tmp_path / "m.safetensors")  # safetensors writes 0600
    with atomic_path(tmp_path / "t.txt") as tmp:
        tmp.touch(mode=0o600)
    for name in ("m.safetensors", "t.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def test_info_on_a_dr3_file_does_not_call_it_a_model(dr3_samples_dir: Path) -> None:
    result = CliRunner().invoke(main, ["info", str(dr3_samples_dir / "XP_CONTINUOUS_RAW.csv")])
    assert result.exit_code == 2
    assert "not a model file" in result.output and "corrupt" not in result.output
    assert "info reads XP stores and catalogues" in result.output


def test_a_taken_dashboard_port_gives_a_free_one_without_a_warning(
    small_catalog: Path, tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        assert cluster.free_dashboard_address(taken) == "127.0.0.1:0"
        args = ["skymap", str(small_catalog), "-o", str(tmp_path / "sky.png"), "--n-workers", "1"]
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                "from xpbatch.cli.main import main; main()",
                *args,
                "--dashboard-address",
                taken,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert run.returncode == 0, run.stderr
    assert re.search(r"Dask dashboard: http://127\.0\.0\.1:\d+/status", run.stderr), run.stderr
    assert "Warning" not in run.stderr, run.stderr  # no Python warning (port, sizeof, ...)
    assert cluster.free_dashboard_address("127.0.0.1:0") == "127.0.0.1:0"


def test_under_jupyterhub_the_dashboard_link_goes_through_the_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dask.config

    with dask.config.set({"distributed.dashboard.link": "{scheme}://{host}:{port}/status"}):
        monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
        assert not cluster.use_jupyterhub_dashboard_link()
        monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
        assert cluster.use_jupyterhub_dashboard_link()
        with cluster.connect(ClusterConfig(n_workers=1, dashboard_address=":0")) as client:
            port = client.cluster.scheduler.http_server.port  # type: ignore[union-attr]
            assert client.dashboard_link == f"/user/ada/proxy/{port}/status"
    with dask.config.set({"distributed.dashboard.link": "https://mine/{port}"}):
        assert not cluster.use_jupyterhub_dashboard_link()  # a configured link is kept
