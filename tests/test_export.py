"""`xpbatch export-parquet`: one Parquet file per DR3 partition that holds rows, every catalogue
row exactly once with its values, atomic files, resume, refusals, and where the partition ranges
come from (--partitions, the catalogue, --store, else a clear error)."""

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

import xpbatch
from xpbatch import schema
from xpbatch.cli.main import main
from xpbatch.config import EncodeConfig, ParquetExportConfig
from xpbatch.errors import CatalogError, ConfigError, OutputExistsError, ResumeRefusedError
from xpbatch.mock import mock_rows
from xpbatch.model.files import save_model
from xpbatch.model.trained import Normalisation, TrainedModel
from xpbatch.products.parquet_export import MANIFEST_NAME, export_parquet, resolve_partitions
from xpbatch.storage.partitions import PartitionRanges, file_name
from xpbatch.store.reader import open_xp_store, store_id
from xpbatch.store.xp_store import write_xp_store

# Rows 0:1200 of a 1e6-row mock catalogue fall in the first three DR3 partitions (564, 533 and
# 103 rows); chunks of 500 rows straddle the partition boundaries.
MOCK_ROWS, N_ROWS, CHUNK_ROWS = 1_000_000, 1200, 500
DR3_FIRST = PartitionRanges([[0, 3111], [3112, 5263], [5264, 6601]], "the first DR3 ranges")
"""The first three DR3 bulk partitions, as in shared/dr3/partition_ranges.txt."""
DR3_FIRST_FILES = {
    "XpLatent_000000-003111.parquet": 564,
    "XpLatent_003112-005263.parquet": 533,
    "XpLatent_005264-006601.parquet": 103,
}
# A _MD5SUM.txt of the DR3 bulk download lists the same three partitions (checksums made up).
MD5SUM = "".join(
    f"{i:032x}  {table}_{suffix}.csv.gz\n"
    for i, suffix in enumerate(["000000-003111", "003112-005263", "005264-006601"])
    for table in ("XpContinuousMeanSpectrum", "GaiaSource")
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The input store, recording its partitions as `xpbatch ingest` does for DR3 bulk files."""
    rows = mock_rows(MOCK_ROWS, 0, N_ROWS, seed=2)
    return write_xp_store(
        tmp_path_factory.mktemp("store") / "store.zarr",
        source_id=rows.source_id,
        coefficients=rows.coefficients,
        coefficient_errors=rows.coefficient_errors,
        phot_g_mean_flux=rows.phot_g_mean_flux,
        chunk_rows=CHUNK_ROWS,
        attrs={schema.STORE_ATTR_PARTITION_RANGES: DR3_FIRST.to_list()},
    )


@pytest.fixture(scope="module")
def catalog(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real catalogue: the store encoded by an untrained model fitted to its scale."""
    root = tmp_path_factory.mktemp("export")
    ds = open_xp_store(store)
    x = ds[schema.COEFFICIENTS].values / ds[schema.PHOT_G_MEAN_FLUX].values[:, None]
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
    positions = [name for name in (schema.RA, schema.DEC) if name in ds.variables]
    return {
        "source_id": sid,
        "healpix_8": sid >> 43,
        **{name: ds[name].values for name in positions},  # when the catalogue has them
        **{f"latent_mean_{i}": mean[:, i] for i in range(mean.shape[1])},
        **{f"latent_std_{i}": std[:, i] for i in range(std.shape[1])},
        "rmse": ds[schema.RMSE].values,
        "anomaly_score": ds[schema.ANOMALY_SCORE].values,
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
    result = export_parquet(
        catalog,
        out,
        partitions=DR3_FIRST,
        config=ParquetExportConfig(threads=2, progress_bar=False),
    )

    expected_rows = np.bincount(DR3_FIRST.index_of(_catalog_columns(catalog)["source_id"]))
    expected_files = {
        file_name("XpLatent", lo, hi): int(n)
        for (lo, hi), n in zip(DR3_FIRST, expected_rows, strict=True)
        if n
    }
    assert result.files == expected_files == DR3_FIRST_FILES
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


def test_a_catalogue_with_positions_exports_ra_dec_and_sorts_by_anomaly_score(
    tmp_path: Path,
) -> None:
    import pandas as pd

    rows = mock_rows(MOCK_ROWS, 0, N_ROWS, seed=2)
    store = write_xp_store(
        tmp_path / "store.zarr",
        source_id=rows.source_id,
        coefficients=rows.coefficients,
        coefficient_errors=rows.coefficient_errors,
        phot_g_mean_flux=rows.phot_g_mean_flux,
        positions={schema.RA: rows.ra, schema.DEC: rows.dec},
        chunk_rows=CHUNK_ROWS,
    )
    catalog = tmp_path / "catalog.zarr"
    config = EncodeConfig(progress_bar=False, check_fit=False)
    xpbatch.encode_catalog(store, TrainedModel.untrained(seed=4), catalog, config=config)
    out = tmp_path / "parquet"
    export_parquet(catalog, out, partitions=DR3_FIRST, config=ParquetExportConfig(threads=1))
    _assert_export_equals_catalog(out, catalog)  # ra and dec included, beside healpix_8
    frame = pd.read_parquet(out)
    np.testing.assert_array_equal(np.sort(frame.ra.to_numpy()), np.sort(rows.ra))
    # Equal scores (an untrained model) rank by row, i.e. by source_id.
    ranked = frame.sort_values(["anomaly_score", "source_id"], ascending=[False, True]).head(5)
    top = xpbatch.top_anomalies(catalog, 5)
    np.testing.assert_array_equal(ranked.source_id.to_numpy(), top.source_id.to_numpy())


def test_encode_catalog_carries_the_store_partitions_so_export_needs_no_flag(
    catalog: Path, tmp_path: Path
) -> None:
    assert xpbatch.open_catalog(catalog).attrs[schema.STORE_ATTR_PARTITION_RANGES] == (
        DR3_FIRST.to_list()
    )
    result = export_parquet(catalog, tmp_path / "out")  # neither partitions= nor store=
    assert {p.name for p in (tmp_path / "out").glob("*.parquet")} == set(DR3_FIRST_FILES)
    assert result.partitions == DR3_FIRST


RESUME = ParquetExportConfig(resume=True)


def test_resume_keeps_whole_files_and_rewrites_missing_ones(catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "parquet"
    first = export_parquet(catalog, out, partitions=DR3_FIRST)
    victim = out / sorted(first.files)[1]
    victim.unlink()
    (out / f".{victim.name}.tmp-dead").write_bytes(b"half a file from a killed run")
    with pytest.raises(OutputExistsError, match=r"an export of .*--resume"):
        export_parquet(catalog, out, partitions=DR3_FIRST)  # the convention: --resume or not

    again = export_parquet(catalog, out, partitions=DR3_FIRST, config=RESUME)

    assert again.files == first.files and again.n_reused == len(first.files) - 1
    assert not list(out.glob(".*tmp*"))
    _assert_export_equals_catalog(out, catalog)
    with pytest.raises(ResumeRefusedError, match="partitions_fingerprint"):
        export_parquet(catalog, out, partitions=PartitionRanges([[0, 786431]]), config=RESUME)


def test_export_on_a_dask_cluster_equals_the_local_one(
    catalog: Path, tmp_path: Path, dask_client
) -> None:
    local = export_parquet(catalog, tmp_path / "local", partitions=DR3_FIRST)
    distributed = export_parquet(
        catalog, tmp_path / "cluster", partitions=DR3_FIRST, client=dask_client
    )
    assert distributed.files == local.files
    for name in local.files:  # frame_equal: NaN (rows not encoded) equals NaN
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "cluster" / name), pd.read_parquet(tmp_path / "local" / name)
        )


ANOTHER_EXPORT = json.dumps(
    {"format": "xpbatch-run", "kind": "Parquet export", "fingerprint": {"catalog": "another"}}
)
"""The run manifest of an export of another catalogue."""


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        pytest.param(
            lambda out: (out.mkdir(), (out / "notes.txt").write_text("mine")),
            "not an xpbatch Parquet export",
            id="foreign-directory",
        ),
        pytest.param(lambda out: out.write_text("a file"), "not a directory", id="a-file"),
        pytest.param(
            lambda out: (
                out.mkdir(),
                (out / MANIFEST_NAME).write_text(ANOTHER_EXPORT),
            ),
            "already exists",
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
        export_parquet(catalog, out, partitions=DR3_FIRST)


def test_overwrite_replaces_an_export_of_another_catalogue(catalog: Path, tmp_path: Path) -> None:
    out = tmp_path / "parquet"
    out.mkdir()
    (out / MANIFEST_NAME).write_text(ANOTHER_EXPORT)
    (out / "XpLatent_786097-786431.parquet").write_bytes(b"from the other catalogue")
    result = export_parquet(
        catalog, out, partitions=DR3_FIRST, config=ParquetExportConfig(overwrite=True)
    )
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(result.files)


def test_incomplete_catalogue_is_refused(catalog: Path, tmp_path: Path) -> None:
    import shutil

    import zarr

    partial = tmp_path / "partial.zarr"
    shutil.copytree(catalog, partial)
    zarr.open_group(partial, mode="r+").attrs["complete"] = False
    with pytest.raises(CatalogError, match="incomplete"):
        export_parquet(partial, tmp_path / "parquet", partitions=DR3_FIRST)


def test_a_source_in_no_partition_is_an_error(catalog: Path, tmp_path: Path) -> None:
    """Ranges that miss some rows (here the last partition) name a row instead of dropping it."""
    two = PartitionRanges(DR3_FIRST.ranges[:2], "two ranges")
    message = r"source_id \d+ \(HEALPix level-8 pixel \d+\) is in none of the 2 partition ranges"
    with pytest.raises(ConfigError, match=message):
        export_parquet(catalog, tmp_path / "parquet", partitions=two)


# --- where the partition ranges come from -----------------------------------------------------
WHOLE_SKY = [[0, 786431]]


@pytest.fixture(scope="module")
def other_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store the catalogue was not made from, recording no partition ranges."""
    n = 3
    return write_xp_store(
        tmp_path_factory.mktemp("other") / "other.zarr",
        source_id=np.arange(1, n + 1),
        coefficients=np.ones((n, schema.N_COEFF)),
        coefficient_errors=np.ones((n, schema.N_COEFF)),
        phot_g_mean_flux=np.full(n, 1e4),
    )


@pytest.mark.parametrize(
    ("partitions", "catalogue_ranges", "use_store", "expected"),
    [
        pytest.param("md5sum", WHOLE_SKY, True, DR3_FIRST, id="--partitions-first"),
        pytest.param(None, WHOLE_SKY, True, PartitionRanges(WHOLE_SKY), id="catalogue-next"),
        pytest.param(None, None, True, DR3_FIRST, id="--store-last"),
    ],
)
def test_partition_ranges_are_taken_in_order(
    store: Path, tmp_path: Path, partitions, catalogue_ranges, use_store, expected
) -> None:
    attrs = {"input_store_id": store_id(store)}
    if catalogue_ranges is not None:
        attrs[schema.STORE_ATTR_PARTITION_RANGES] = catalogue_ranges
    if partitions == "md5sum":
        partitions = tmp_path / "_MD5SUM.txt"
        partitions.write_text(MD5SUM)
    got = resolve_partitions(
        "cat.zarr", attrs, partitions=partitions, store=store if use_store else None
    )
    assert got == expected


@pytest.mark.parametrize(
    ("which_store", "store_of_catalogue", "messages"),
    [
        pytest.param(
            "store",
            "other",
            ["--store", "has store id", "pass the store that encode-catalog read"],
            id="store-of-another-catalogue",
        ),
        pytest.param(
            "other",
            "other",
            ["records no partition ranges", "--partitions", "_MD5SUM.txt"],
            id="store-without-ranges",
        ),
        pytest.param(
            None,
            "store",
            [
                "needs the DR3 partition ranges",
                "cat.zarr",
                "--partitions _MD5SUM.txt",
                "--partitions DIR",
                "XpContinuousMeanSpectrum_000000-003111.csv.gz",
                "'lo hi' lines",
                "--store STORE",
            ],
            id="nothing-given",
        ),
    ],
)
def test_missing_or_wrong_partition_sources_are_explained(
    store: Path, other_store: Path, which_store, store_of_catalogue, messages
) -> None:
    stores = {"store": store, "other": other_store}
    attrs = {"input_store_id": store_id(stores[store_of_catalogue])}
    with pytest.raises(ConfigError) as error:
        resolve_partitions("cat.zarr", attrs, store=stores.get(which_store))
    for text in messages:
        assert text in str(error.value)


def test_cli_exports_and_reports(catalog: Path, store: Path, tmp_path: Path) -> None:
    """--store, then the same ranges from a _MD5SUM.txt: the second run keeps every file."""
    out, md5sum = tmp_path / "parquet", tmp_path / "_MD5SUM.txt"
    md5sum.write_text(MD5SUM)
    command = ["export-parquet", os.fspath(catalog), "-o", os.fspath(out)]
    result = CliRunner().invoke(main, [*command, "--store", os.fspath(store)])
    assert result.exit_code == 0, result.output
    assert "1,200 in 3 files" in result.output
    again = CliRunner().invoke(main, [*command, "--partitions", os.fspath(md5sum), "--resume"])
    assert "(3 kept from an earlier run)" in again.output
    assert f"ranges from {md5sum}" in again.output
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(DR3_FIRST_FILES)
    api = export_parquet(catalog, tmp_path / "api", store=store)  # the CLI == the API
    assert str(api).splitlines()[1] in result.output
    for name in api.files:
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / name), pd.read_parquet(api.output_dir / name)
        )


def test_cli_reports_unusable_partitions_in_one_line(catalog: Path, tmp_path: Path) -> None:
    listing = tmp_path / "files.txt"
    listing.write_text("README.md\nnotes.txt\n")
    command = ["export-parquet", os.fspath(catalog), "-o", os.fspath(tmp_path / "out")]
    result = CliRunner().invoke(main, [*command, "--partitions", os.fspath(listing)])
    assert result.exit_code == 2
    assert "no DR3 bulk file names found" in result.output
    assert not (tmp_path / "out").exists()
