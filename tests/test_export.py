"""`xpbatch export-parquet`: one Parquet file per DR3 partition that holds rows, every catalogue
row exactly once with its values, atomic files, resume, and refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import shared_path

import xpbatch
from xpbatch import schema
from xpbatch.artifact import save_model
from xpbatch.cli import main
from xpbatch.config import EncodeConfig
from xpbatch.errors import CatalogError, OutputExistsError
from xpbatch.export import (
    MANIFEST_NAME,
    export_parquet,
    partition_file_name,
    partition_index,
    partition_ranges,
)
from xpbatch.mock import mock_rows
from xpbatch.store import write_xp_store
from xpbatch.trained import Normalisation, TrainedModel

# Rows 0:1200 of a 1e6-row mock catalogue fall in the first three DR3 partitions (564, 533 and
# 103 rows); chunks of 500 rows straddle the partition boundaries.
MOCK_ROWS, N_ROWS, CHUNK_ROWS = 1_000_000, 1200, 500


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real catalogue: a mock store encoded by an untrained model fitted to its scale."""
    root = tmp_path_factory.mktemp("export")
    rows = mock_rows(MOCK_ROWS, 0, N_ROWS, seed=2)
    store = write_xp_store(
        root / "store.zarr",
        source_id=rows.source_id,
        coefficients=rows.coefficients,
        coefficient_errors=rows.coefficient_errors,
        phot_g_mean_flux=rows.phot_g_mean_flux,
        chunk_rows=CHUNK_ROWS,
    )
    x = rows.coefficients / rows.phot_g_mean_flux[:, None]
    x = x[np.isfinite(x).all(axis=1)]
    model = TrainedModel.untrained(seed=4)
    model.normalisation = Normalisation(x.mean(axis=0), x.std(axis=0))
    save_model(model, root / "model.safetensors")
    out = root / "catalog.zarr"
    xpbatch.encode_catalog(
        store, root / "model.safetensors", out, config=EncodeConfig(progress_bar=False)
    )
    return out


def _catalog_columns(path: Path) -> dict[str, np.ndarray]:
    ds = xpbatch.open_catalog(path).load()
    mean, std = ds[schema.LATENT_MEAN].values, ds[schema.LATENT_STD].values
    sid = ds[schema.SOURCE_ID].values
    return {
        "source_id": sid,
        "healpix_8": sid >> 43,
        **{f"latent_mean_{i}": mean[:, i] for i in range(mean.shape[1])},
        **{f"latent_std_{i}": std[:, i] for i in range(std.shape[1])},
        "rmse": ds[schema.RMSE].values,
        "flags": ds[schema.FLAGS].values,
    }


def _assert_export_equals_catalog(out: Path, catalog: Path) -> None:
    table = pads.dataset(sorted(out.glob("XpLatent_*.parquet")), format="parquet").to_table()
    expected = _catalog_columns(catalog)
    assert table.column_names == list(expected)
    order = np.argsort(table["source_id"].to_numpy())
    for name, values in expected.items():
        got = table[name].to_numpy()[order]
        assert got.dtype == values.dtype or name == "healpix_8", name
        np.testing.assert_array_equal(got, values, err_msg=name)  # NaN == NaN here


def test_every_row_is_exported_once_with_its_values(catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "parquet"
    result = export_parquet(catalog, out, n_threads=2)

    expected_rows = np.bincount(partition_index(_catalog_columns(catalog)["source_id"]))
    expected_files = {
        partition_file_name(*partition_ranges()[p]): int(n)
        for p, n in enumerate(expected_rows)
        if n
    }
    assert (
        result.files
        == expected_files
        == {
            "XpLatent_000000-003111.parquet": 564,
            "XpLatent_003112-005263.parquet": 533,
            "XpLatent_005264-006601.parquet": 103,
        }
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected_files, MANIFEST_NAME])
    assert result.n_rows == N_ROWS and result.n_reused == 0
    _assert_export_equals_catalog(out, catalog)
    for name in expected_files:  # each file holds only its partition's sources
        lo, hi = (
            int(v) for v in name.removeprefix("XpLatent_").removesuffix(".parquet").split("-")
        )
        pixels = pq.read_table(out / name, columns=["healpix_8"])["healpix_8"].to_numpy()
        assert pixels.min() >= lo and pixels.max() <= hi
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and manifest["files"] == expected_files


def test_rerun_keeps_whole_files_and_rewrites_missing_ones(catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "parquet"
    first = export_parquet(catalog, out)
    victim = out / sorted(first.files)[1]
    victim.unlink()
    (out / f".{victim.name}.tmp-dead").write_bytes(b"half a file from a killed run")

    again = export_parquet(catalog, out)

    assert again.files == first.files and again.n_reused == len(first.files) - 1
    assert not list(out.glob(".*tmp*"))
    _assert_export_equals_catalog(out, catalog)


def test_export_on_a_dask_cluster_equals_the_local_one(
    catalog: Path, tmp_path: Path, dask_client
) -> None:
    local = export_parquet(catalog, tmp_path / "local")
    distributed = export_parquet(catalog, tmp_path / "cluster", client=dask_client)
    assert distributed.files == local.files
    for name in local.files:  # frame_equal: NaN (rows not encoded) equals NaN
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "cluster" / name), pd.read_parquet(tmp_path / "local" / name)
        )


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        pytest.param(
            lambda out: (out.mkdir(), (out / "notes.txt").write_text("mine")),
            "holds no _xpbatch_export.json",
            id="foreign-directory",
        ),
        pytest.param(lambda out: out.write_text("a file"), "not a directory", id="a-file"),
        pytest.param(
            lambda out: (
                out.mkdir(),
                (out / MANIFEST_NAME).write_text('{"catalog_fingerprint": "another"}'),
            ),
            "export of another catalogue",
            id="another-catalogue",
        ),
    ],
)
def test_refuses_outputs_that_are_not_its_own(
    catalog: Path, tmp_path: Path, prepare, message: str
) -> None:
    out = tmp_path / "parquet"
    prepare(out)
    with pytest.raises(OutputExistsError, match=message):
        export_parquet(catalog, out)


def test_overwrite_replaces_an_export_of_another_catalogue(catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "parquet"
    out.mkdir()
    (out / MANIFEST_NAME).write_text('{"catalog_fingerprint": "another"}')
    (out / "XpLatent_786097-786431.parquet").write_bytes(b"from the other catalogue")
    result = export_parquet(catalog, out, overwrite=True)
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(result.files)


def test_incomplete_catalogue_is_refused(catalog: Path, tmp_path: Path) -> None:
    import shutil

    import zarr

    partial = tmp_path / "partial.zarr"
    shutil.copytree(catalog, partial)
    zarr.open_group(partial, mode="r+").attrs["complete"] = False
    with pytest.raises(CatalogError, match="incomplete"):
        export_parquet(partial, tmp_path / "parquet")


@pytest.mark.parametrize(
    ("source_id", "partition"),
    [
        (0, 0),
        ((3112 << 43) - 1, 0),
        (3112 << 43, 1),
        (
            5405570973190252288,
            int(np.searchsorted(partition_ranges()[:, 0], 5405570973190252288 >> 43, "right") - 1),
        ),
        ((786432 << 43) - 1, 3385),
    ],
    ids=["first", "last-of-first", "first-of-second", "real-dr3-id", "last"],
)
def test_partition_index(source_id: int, partition: int) -> None:
    assert partition_index(np.array([source_id]))[0] == partition
    lo, hi = partition_ranges()[partition]
    assert lo <= source_id >> 43 <= hi


@pytest.mark.parametrize("source_id", [-1, 786432 << 43], ids=["negative", "beyond-last-pixel"])
def test_ids_outside_the_sky_are_an_error(source_id: int) -> None:
    with pytest.raises(CatalogError, match="not a Gaia source_id"):
        partition_index(np.array([5, source_id]))


def test_shipped_ranges_equal_the_dr3_bulk_file_ranges() -> None:
    text = shared_path("dr3", "partition_ranges.txt").read_text()
    rows = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    dr3 = np.array([[int(r[0]), int(r[1])] for r in rows])
    np.testing.assert_array_equal(partition_ranges(), dr3)
    assert np.all(partition_ranges()[1:, 0] == partition_ranges()[:-1, 1] + 1)  # contiguous


def test_cli_exports_and_reports(catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "parquet"
    result = CliRunner().invoke(main, ["export-parquet", os.fspath(catalog), "-o", os.fspath(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 1,200 rows in 3 files" in result.output
    again = CliRunner().invoke(main, ["export-parquet", os.fspath(catalog), "-o", os.fspath(out)])
    assert "(3 kept from an earlier run)" in again.output
