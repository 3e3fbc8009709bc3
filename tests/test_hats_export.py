"""export-hats: a HATS collection that lsdb opens with every catalogue row once, cone-searches
exactly and joins by source_id; an index that finds rows; resumable; clear refusals."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from xpbatch import schema
from xpbatch.config import EncodeConfig, HatsExportConfig

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

# The module fixture runs hats-import on a cluster (~1 min on 2 cores).
pytestmark = pytest.mark.slow

N_ROWS, CHUNK_ROWS, THRESHOLD = 3000, 1024, 400
ORDER = 6
"""Highest partition order in the tests: hats-import's binning at the default order 10 costs
~30 s whatever the rows; order 6 is enough for 3000 rows."""


@dataclasses.dataclass(frozen=True)
class Exported:
    store: Path
    catalog: Path
    hats: Path


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
    dask_client: Client,
    encode_untrained: Callable[[Path, Path], Path],
) -> Exported:
    """A mock store with positions, its catalogue (untrained model) and its HATS export."""
    from xpbatch.mock import write_mock_store
    from xpbatch.products.hats_export import export_hats

    root = tmp_path_factory.mktemp("hats")
    store = write_mock_store(root / "mock.zarr", N_ROWS, seed=2, chunk_rows=CHUNK_ROWS)
    catalog = root / "catalog.zarr"
    encode_untrained(store, catalog)
    config = HatsExportConfig(pixel_threshold=THRESHOLD, highest_order=ORDER, progress_bar=False)
    export_hats(catalog, root / "hats", client=dask_client, config=config)
    return Exported(store, catalog, root / "hats")


def catalogue_frame(path: Path) -> pd.DataFrame:
    """The catalogue's rows as the export's flat columns, by source_id."""
    from xpbatch.catalog.zarr_catalog import open_catalog

    ds = open_catalog(path).compute()
    columns = {schema.RA: ds.ra.values, schema.DEC: ds.dec.values}
    for name in (schema.LATENT_MEAN, schema.LATENT_STD):
        for i in range(ds.sizes[schema.LATENT]):
            columns[f"{name}_{i}"] = ds[name].values[:, i]
    columns[schema.RMSE] = ds.rmse.values
    columns[schema.ANOMALY_SCORE] = ds.anomaly_score.values
    columns[schema.FLAGS] = ds.flags.values
    import pandas as pd

    return pd.DataFrame(columns, index=pd.Index(ds.source_id.values, name=schema.SOURCE_ID))


def lsdb_frame(hats: Path) -> pd.DataFrame:
    import lsdb

    frame = lsdb.open_catalog(hats).compute().reset_index()
    return frame.set_index(schema.SOURCE_ID).sort_index()


def test_lsdb_opens_every_row_once_with_equal_values(exported: Exported) -> None:
    from hats.pixel_math.spatial_index import compute_spatial_index

    expected = catalogue_frame(exported.catalog)
    found = lsdb_frame(exported.hats)
    assert found.index.is_unique and len(found) == N_ROWS
    assert np.array_equal(found.index.to_numpy(), expected.index.to_numpy())
    for column in expected.columns:
        np.testing.assert_array_equal(
            found[column].to_numpy(expected[column].dtype), expected[column].to_numpy()
        )
    spatial = compute_spatial_index(expected[schema.RA].to_numpy(), expected[schema.DEC].to_numpy())
    assert np.array_equal(found["_healpix_29"].to_numpy(np.int64), spatial)
    assert not found["position_from_source_id"].to_numpy(bool).any()


def test_partitions_are_adaptive_and_the_properties_describe_the_catalogue(
    exported: Exported,
) -> None:
    import hats

    collection = hats.read_hats(exported.hats)
    primary = collection.main_catalog
    info = primary.catalog_info
    assert info.total_rows == N_ROWS and info.ra_column == "ra" and info.dec_column == "dec"
    counts = primary.partition_info.as_dataframe()
    pixels = primary.get_healpix_pixels()
    assert len(pixels) > 4 and len({p.order for p in pixels}) > 1  # denser sky, finer partitions
    assert counts is not None
    assert collection.collection_properties.all_indexes == {
        "source_id": "xpbatch_latents_source_id"
    }


def test_cone_search_returns_exactly_the_sources_in_the_cone(exported: Exported) -> None:
    import lsdb
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    expected = catalogue_frame(exported.catalog)
    centre = expected.iloc[N_ROWS // 2]  # a source near the Galactic plane: a dense cone
    radius_arcsec = 8 * 3600.0
    ra, dec = float(centre[schema.RA]), float(centre[schema.DEC])
    separation = SkyCoord(ra * u.deg, dec * u.deg).separation(
        SkyCoord(expected[schema.RA].to_numpy() * u.deg, expected[schema.DEC].to_numpy() * u.deg)
    )
    inside = set(expected.index[separation.arcsec <= radius_arcsec])
    found = lsdb.open_catalog(exported.hats).cone_search(ra, dec, radius_arcsec).compute()
    assert 20 < len(inside) < N_ROWS // 2
    assert found[schema.SOURCE_ID].is_unique
    assert set(found[schema.SOURCE_ID]) == inside


def test_the_source_id_index_finds_rows(exported: Exported) -> None:
    import lsdb

    expected = catalogue_frame(exported.catalog)
    wanted = [int(expected.index[i]) for i in (0, 1234, N_ROWS - 1)]
    found = lsdb.open_catalog(exported.hats).id_search(values={"source_id": wanted}).compute()
    assert sorted(found[schema.SOURCE_ID]) == wanted


def test_lsdb_filters_and_ranks_by_anomaly_score(exported: Exported) -> None:
    import lsdb

    import xpbatch

    top = xpbatch.top_anomalies(exported.catalog, 5)
    threshold = float(top.anomaly_score.iloc[-1])
    catalog = lsdb.open_catalog(exported.hats, columns=["source_id", "anomaly_score"])
    found = catalog.query(f"anomaly_score >= {threshold!r}").compute()
    ranked = found.sort_values(["anomaly_score", "source_id"], ascending=[False, True])
    # Equal scores (an untrained model) rank by catalogue row, i.e. by source_id.
    np.testing.assert_array_equal(ranked.source_id.to_numpy()[:5], top.source_id.to_numpy())
    np.testing.assert_array_equal(ranked.anomaly_score.to_numpy()[:5], top.anomaly_score)


def gaia_source_like(store: Path, out: Path) -> Path:
    """A HATS catalogue of the mock's gaia_source columns (source_id, ra, dec, G magnitude)."""
    import lsdb
    import pandas as pd

    from xpbatch.mock import mock_rows
    from xpbatch.store.reader import open_xp_store

    mock = open_xp_store(store).attrs["mock"]
    rows = mock_rows(mock["n"], 0, mock["n"], seed=mock["seed"])
    frame = pd.DataFrame(
        {
            "source_id": rows.source_id,
            "ra": rows.ra,
            "dec": rows.dec,
            "phot_g_mean_mag": rows.phot_g_mean_mag,
        }
    )
    catalog = lsdb.from_dataframe(
        frame,
        ra_column="ra",
        dec_column="dec",
        catalog_name="gaia",
        highest_order=ORDER,
        margin_threshold=None,
        should_generate_moc=False,
    )
    catalog.write_catalog(out, progress_bar=False)
    return out


def test_join_by_source_id_gives_every_row_its_g_magnitude(
    exported: Exported, tmp_path: Path
) -> None:
    import lsdb

    from xpbatch.mock import mock_rows

    gaia = lsdb.open_catalog(gaia_source_like(exported.store, tmp_path / "gaia"))
    with warnings.catch_warnings():
        # Both sides hold each source at the same position, so no match crosses a partition
        # edge and the right side needs no margin cache (the test shows every row is found).
        warnings.filterwarnings("ignore", "Right catalog does not have a margin", RuntimeWarning)
        frame = (
            lsdb.open_catalog(exported.hats)
            .join(
                gaia,
                left_on="source_id",
                right_on="source_id",
                suffixes=("", "_gaia"),
                suffix_method="overlapping_columns",
                log_changes=False,
            )
            .compute()
        )
    assert len(frame) == N_ROWS and frame[schema.SOURCE_ID].is_unique
    truth = mock_rows(N_ROWS, 0, N_ROWS, seed=2)
    order = np.argsort(frame[schema.SOURCE_ID].to_numpy())
    assert np.array_equal(frame[schema.SOURCE_ID].to_numpy()[order], truth.source_id)
    g_mag = frame["phot_g_mean_mag"].to_numpy(np.float32)[order]
    np.testing.assert_array_equal(g_mag, truth.phot_g_mean_mag)


def test_an_existing_export_is_refused_and_resumed_to_the_same_files(
    exported: Exported, dask_client: Client
) -> None:
    from xpbatch.errors import OutputExistsError, ResumeRefusedError
    from xpbatch.products.hats_export import export_hats

    config = HatsExportConfig(pixel_threshold=THRESHOLD, highest_order=ORDER, progress_bar=False)
    with pytest.raises(OutputExistsError, match="--resume"):
        export_hats(exported.catalog, exported.hats, client=dask_client, config=config)
    other = dataclasses.replace(config, pixel_threshold=THRESHOLD + 1, resume=True)
    with pytest.raises(ResumeRefusedError, match="pixel_threshold"):
        export_hats(exported.catalog, exported.hats, client=dask_client, config=other)

    index_files = sorted((exported.hats / "xpbatch_latents_source_id").rglob("part.*.parquet"))
    before = {p: p.read_bytes() for p in index_files}
    index_files[1].unlink()  # as if killed while writing the index
    resumed = dataclasses.replace(config, resume=True)
    summary = export_hats(exported.catalog, exported.hats, client=dask_client, config=resumed)
    assert summary.n_rows == N_ROWS
    assert {p: p.read_bytes() for p in index_files} == before
    assert len(lsdb_frame(exported.hats)) == N_ROWS


def test_the_cli_writes_the_same_rows_as_the_api(
    exported: Exported, tmp_path: Path, dask_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    from click.testing import CliRunner

    from xpbatch.cli.main import main

    out = tmp_path / "cli_hats"
    args = ["export-hats", str(exported.catalog), "-o", str(out), "--highest-order", str(ORDER)]
    args += ["--pixel-threshold", str(THRESHOLD), "--cluster", dask_client.scheduler.address]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {N_ROWS:,} rows in " in result.output and "lsdb.open_catalog(" in result.output
    cli, api = lsdb_frame(out), lsdb_frame(exported.hats)
    assert cli.equals(api)
    # hats-import's last check of the collection says nothing (hats' catalogue check would log
    # "Looking for catalog - found collection." on the root logger).
    assert not [r for r in caplog.records if "found collection" in r.getMessage()]


def test_a_catalogue_without_positions_needs_the_source_id_fallback(
    tmp_path: Path,
    make_xp_store: Callable[..., Path],
    dask_client: Client,
    encode_untrained: Callable[[Path, Path], Path],
) -> None:
    from xpbatch.errors import CatalogError
    from xpbatch.products.hats_export import export_hats
    from xpbatch.products.sky_positions import source_id_pixel_centres

    store = make_xp_store(tmp_path / "s.zarr", 600, chunk_rows=300)
    catalog = tmp_path / "c.zarr"
    encode_untrained(store, catalog)
    config = HatsExportConfig(highest_order=ORDER, progress_bar=False)
    with pytest.raises(CatalogError, match="--positions-from-source-id"):
        export_hats(catalog, tmp_path / "h", client=dask_client, config=config)
    assert not (tmp_path / "h").exists()

    fallback = dataclasses.replace(config, positions_from_source_id=True)
    summary = export_hats(catalog, tmp_path / "h", client=dask_client, config=fallback)
    assert summary.n_approximate == 600
    frame = lsdb_frame(tmp_path / "h")
    assert frame["position_from_source_id"].to_numpy(bool).all()
    ra, dec = source_id_pixel_centres(frame.index.to_numpy())
    np.testing.assert_array_equal(frame["ra"].to_numpy(float), ra)
    np.testing.assert_array_equal(frame["dec"].to_numpy(float), dec)


# --- the bar: DR3 bulk files -> ingest -> train -> encode -> export-hats -> lsdb -------------
def gaia_source_hats(bulk: Path, out: Path, client: Client) -> Path:
    """A HATS catalogue of the GaiaSource companions, imported by hats-import's CSV reader."""
    from hats_import.catalog.arguments import ImportArguments
    from hats_import.catalog.file_readers import CsvReader
    from hats_import.pipeline import pipeline_with_client

    args = ImportArguments(
        output_path=out.parent,
        output_artifact_name=out.name,
        input_file_list=sorted(bulk.glob("GaiaSource_*.csv.gz")),
        file_reader=CsvReader(comment="#", compression="gzip", na_values=["null"]),
        ra_column="ra",
        dec_column="dec",
        highest_healpix_order=ORDER,
        progress_bar=False,
    )
    pipeline_with_client(args, client)
    return out


def test_dr3_bulk_files_to_an_lsdb_catalogue_joined_with_gaia_source(
    tmp_path: Path, dask_client: Client
) -> None:
    import lsdb
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    from xpbatch.config import IngestConfig
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.ingest import ingest_files
    from xpbatch.mock import mock_rows, write_mock_dr3_bulk
    from xpbatch.products.hats_export import export_hats
    from xpbatch.train.demo import DEMO_TRAINING
    from xpbatch.train.stage import train_model

    n_rows, seed = 2000, 5
    bulk = tmp_path / "bulk"
    write_mock_dr3_bulk(bulk, n_rows, seed=seed, rows_per_file=700)
    store = ingest_files(
        [bulk], [bulk], tmp_path / "s.zarr", config=IngestConfig(chunk_rows=512)
    ).path
    model = tmp_path / "model.safetensors"
    training = dataclasses.replace(DEMO_TRAINING, epochs=1, cycle_epochs=1, sample=None)
    train_model(store, model, config=dataclasses.replace(training, progress_bar=False))
    catalog = tmp_path / "c.zarr"
    encode_catalog(
        store,
        model,
        catalog,
        client=dask_client,
        config=EncodeConfig(progress_bar=False),
    )
    hats = tmp_path / "hats"
    config = HatsExportConfig(pixel_threshold=300, highest_order=ORDER, progress_bar=False)
    export_hats(catalog, hats, client=dask_client, config=config)

    expected = catalogue_frame(catalog)
    found = lsdb_frame(hats)
    assert found.index.is_unique and np.array_equal(found.index, expected.index)
    for column in expected.columns:
        np.testing.assert_array_equal(
            found[column].to_numpy(expected[column].dtype), expected[column]
        )
    truth = mock_rows(n_rows, 0, n_rows, seed=seed)
    np.testing.assert_array_equal(expected[schema.RA].to_numpy(), truth.ra)  # from GaiaSource

    ra, dec, radius = float(truth.ra[n_rows // 3]), float(truth.dec[n_rows // 3]), 10 * 3600.0
    separation = SkyCoord(ra * u.deg, dec * u.deg).separation(
        SkyCoord(truth.ra, truth.dec, unit="deg")
    )
    cone = lsdb.open_catalog(hats).cone_search(ra, dec, radius).compute()
    assert set(cone[schema.SOURCE_ID]) == set(truth.source_id[separation.arcsec <= radius])

    gaia = lsdb.open_catalog(gaia_source_hats(bulk, tmp_path / "gaia_source", dask_client))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Right catalog does not have a margin", RuntimeWarning)
        joined = (
            lsdb.open_catalog(hats)
            .join(gaia, left_on="source_id", right_on="source_id", suffixes=("", "_gs"),
                  suffix_method="overlapping_columns", log_changes=False)
            .compute()
        )  # fmt: skip
    assert len(joined) == n_rows and joined[schema.SOURCE_ID].is_unique
    order = np.argsort(joined[schema.SOURCE_ID].to_numpy())
    g_mag = joined["phot_g_mean_mag"].to_numpy(np.float32)[order]
    np.testing.assert_array_equal(g_mag, truth.phot_g_mean_mag)
