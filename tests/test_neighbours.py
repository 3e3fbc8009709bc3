"""Similar-spectrum search: exact against NumPy, the same serially and on the cluster, via the
CLI, and its refusals."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from xpbatch import schema
from xpbatch.benchmarks.neighbours import brute_force, synthetic_catalog
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.cli.main import main
from xpbatch.errors import CatalogError, InputShapeError
from xpbatch.products.neighbours import BLOCK_VALUES, find_neighbours
from xpbatch.storage import zarr_arrays

if TYPE_CHECKING:
    from distributed import Client

N_ROWS, CHUNK_ROWS = 5000, 1024


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_catalog(
        tmp_path_factory.mktemp("nb") / "c.zarr", N_ROWS, chunk_rows=CHUNK_ROWS
    )


def _ids(path: Path, rows: list[int]) -> np.ndarray:
    return np.asarray(catalog.open_arrays(path, [schema.SOURCE_ID])[schema.SOURCE_ID][rows])


def test_equals_brute_force_numpy(synthetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "xpbatch.products.neighbours.BLOCK_VALUES", 3000
    )  # several blocks per chunk
    queries = _ids(synthetic, [0, 1, 777, 1024, 4999])
    found = find_neighbours(synthetic, queries, k=25)
    reference = brute_force(synthetic, queries, 25)
    assert list(found.columns[:6]) == [
        "query_index", "query_source_id", "rank", "source_id", "distance", "rmse",
    ]  # fmt: skip
    pd.testing.assert_frame_equal(
        found[reference.columns], reference, check_dtype=False, rtol=1e-12
    )
    assert not (found.source_id == found.query_source_id).any()  # a source is not its own match
    assert BLOCK_VALUES > 3000


def test_cluster_equals_serial_and_carries_the_row_variables(
    synthetic: Path, dask_client: Client
) -> None:
    queries = _ids(synthetic, [10, 2048, 3000])
    serial = find_neighbours(synthetic, queries, k=7)
    distributed = find_neighbours(synthetic, queries, k=7, client=dask_client)
    pd.testing.assert_frame_equal(serial, distributed)
    ds = catalog.open_catalog(synthetic).set_index(source="source_id")
    row = ds.sel(source=serial.source_id.to_numpy())
    np.testing.assert_array_equal(serial.rmse, row.rmse.values)
    np.testing.assert_array_equal(serial.anomaly_score, row.anomaly_score.values)
    np.testing.assert_array_equal(serial["flags"], row.flags.values)
    assert serial["flags"].dtype == np.uint16 and len(serial) == 21


def test_latent_vector_queries_match_id_queries(synthetic: Path) -> None:
    ids = _ids(synthetic, [42])
    by_id = find_neighbours(synthetic, ids, k=6)
    latent = catalog.open_catalog(synthetic).latent_mean.values[[42]].astype(np.float64)
    table = pd.DataFrame(latent, columns=[f"latent_{i}" for i in range(latent.shape[1])])
    by_vector = find_neighbours(synthetic, table, k=7)  # itself first, at distance 0
    assert by_vector.source_id.iloc[0] == ids[0] and by_vector.distance.iloc[0] == 0
    np.testing.assert_array_equal(by_vector.source_id.iloc[1:], by_id.source_id)
    assert "query_source_id" not in by_vector


@pytest.mark.parametrize(
    ("queries", "message"),
    [
        (np.array([123]), "not in catalogue"),
        (np.array([4_295_000_000 + 5 * 256]), "not_encoded"),  # row 5: every 97th from 5 is dead
        (np.zeros((2, 3)), "latent vectors"),
        (pd.DataFrame({"x": [1]}), "source_id column"),
    ],
    ids=["unknown-id", "not-encoded", "wrong-width", "table-without-columns"],
)
def test_bad_queries_are_refused(synthetic: Path, queries: object, message: str) -> None:
    with pytest.raises(InputShapeError, match=message):
        find_neighbours(synthetic, queries, k=3)  # type: ignore[arg-type]


def test_a_catalogue_without_its_density_is_refused(tmp_path: Path) -> None:
    path = synthetic_catalog(tmp_path / "old.zarr", 300, chunk_rows=128)
    group = zarr_arrays.open_group(path, zarr_arrays.CATALOG, mode="r+")
    attrs = group.attrs.asdict()
    del attrs[schema.ATTR_LATENT_DENSITY]
    group.attrs.clear()
    group.attrs.update(attrs)
    with pytest.raises(CatalogError, match=r"latent_density.*re-encode it"):
        find_neighbours(path, _ids(path, [0]), k=3)


def test_cli_writes_csv_and_parquet(synthetic: Path, tmp_path: Path, dask_client: Client) -> None:
    ids = _ids(synthetic, [1, 2, 3])
    args = ["neighbours", str(synthetic), "--source-id", f"{ids[0]},{ids[1]}"]
    args += ["--source-id", str(ids[2]), "-k", "4", "--cluster", dask_client.scheduler.address]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "n.parquet")])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "n.parquet")
    assert len(table) == 12 and set(table.query_source_id) == set(ids)
    printed = CliRunner().invoke(main, args)
    assert printed.exit_code == 0, printed.output
    assert printed.output.splitlines()[0].startswith("query_index,query_source_id,rank")
    bad = CliRunner().invoke(main, ["neighbours", str(synthetic), "--source-id", "12x"])
    assert bad.exit_code == 2 and "integers" in bad.output
