"""skymap: per-pixel sums over every row, the same serially and on a cluster, drawn as a PNG."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from xpbatch.schema import CatalogFlag

if TYPE_CHECKING:
    from distributed import Client

N_ROWS, CHUNK_ROWS, ORDER = 2500, 1000, 2


@pytest.fixture(scope="module")
def catalog(
    tmp_path_factory: pytest.TempPathFactory, encode_untrained: Callable[[Path, Path], Path]
) -> Path:
    from xpbatch.mock import write_mock_store

    root = tmp_path_factory.mktemp("skymap")
    store = write_mock_store(root / "mock.zarr", N_ROWS, seed=3, chunk_rows=CHUNK_ROWS)
    return encode_untrained(store, root / "catalog.zarr")


def test_maps_count_every_row_in_its_pixel(catalog: Path) -> None:
    import cdshealpix.nested
    from astropy import units as u

    from xpbatch.catalog.zarr_catalog import open_catalog
    from xpbatch.products.sky_maps import compute_sky_maps

    maps = compute_sky_maps(catalog, order=ORDER)
    ds = open_catalog(catalog).compute()
    pixel = cdshealpix.nested.lonlat_to_healpix(ds.ra.values * u.deg, ds.dec.values * u.deg, ORDER)
    pixel = np.asarray(pixel, np.int64)
    assert maps.count.sum() == N_ROWS
    np.testing.assert_array_equal(maps.count, np.bincount(pixel, minlength=12 * 4**ORDER))
    encoded = (ds.flags.values & CatalogFlag.NOT_ENCODED) == 0
    assert maps.encoded.sum() == encoded.sum() < N_ROWS  # the mock has unencodable rows
    busiest = int(np.argmax(maps.count))
    rows = (pixel == busiest) & encoded
    np.testing.assert_allclose(
        maps.mean_latent[busiest], ds.latent_mean.values[rows].mean(axis=0), rtol=1e-6
    )
    # The histogram median is exact to half a bin (1/40 dex).
    exact = np.median(ds.rmse.values[rows])
    assert abs(np.log10(maps.median_rmse[busiest]) - np.log10(exact)) <= 1 / 40 + 1e-9
    assert maps.fraction_encoded[busiest] == pytest.approx(rows.sum() / (pixel == busiest).sum())
    empty = maps.count == 0
    assert np.isnan(maps.fraction_encoded[empty]).all() and np.isnan(maps.median_rmse[empty]).all()


def test_the_cluster_gives_the_same_maps(catalog: Path, dask_client: Client) -> None:
    from xpbatch.products.sky_maps import compute_sky_maps

    serial = compute_sky_maps(catalog, order=ORDER)
    parallel = compute_sky_maps(catalog, order=ORDER, client=dask_client)
    np.testing.assert_array_equal(serial.count, parallel.count)
    np.testing.assert_array_equal(serial.rmse_histogram, parallel.rmse_histogram)
    np.testing.assert_allclose(serial.latent_sum, parallel.latent_sum, rtol=1e-12)


def test_median_of_a_known_histogram() -> None:
    from xpbatch.products.sky_maps import SkyMaps

    maps = SkyMaps.empty(0, 1)
    values = np.array([0.5, 1.0, 2.0, 4.0, 8.0])  # median 2
    from xpbatch.products.sky_maps import _rmse_edges

    bins = np.searchsorted(_rmse_edges(), np.log10(values), side="right")
    np.add.at(maps.rmse_histogram[0], bins, 1)
    maps.count[0] = maps.encoded[0] = len(values)
    assert abs(np.log10(maps.median_rmse[0]) - np.log10(2.0)) <= 1 / 40
    assert np.isnan(maps.median_rmse[1])


def test_the_figure_is_labelled_for_a_talk(catalog: Path, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from xpbatch.products.plots import save_figure
    from xpbatch.products.sky_maps import compute_sky_maps, draw_sky_maps

    fig = draw_sky_maps(compute_sky_maps(catalog, order=ORDER), width=120)
    assert isinstance(fig, Figure)
    maps = [ax for ax in fig.axes if ax.name == "mollweide"]
    bars = [ax for ax in fig.axes if ax.name != "mollweide"]
    assert len(maps) == len(bars) == 3 + 6  # sources, encoded, rmse, six latents
    labels = [bar.get_xlabel() for bar in bars]
    assert labels[:3] == [
        "sources per pixel (215 deg²)",  # order 2: 192 pixels
        "encoded / sources",
        "median rmse [units of the errors]",
    ]
    assert labels[3:] == [f"mean z{k}" for k in range(6)]
    for ax in maps:
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("RA", "Dec")
        ticks = sorted(
            zip(ax.get_xticks(), [t.get_text() for t in ax.get_xticklabels()], strict=True)
        )
        ra = [int(text.rstrip("°")) for _, text in ticks]
        assert ra == sorted(ra, reverse=True)  # RA increases to the left
        assert [line.get_label() for line in ax.lines] == ["celestial equator", "Galactic plane"]
    png = save_figure(fig, tmp_path / "maps.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("n_sources", "order"),
    [(0, 0), (959, 0), (960, 1), (20_000, 3), (200_000, 4), (219_000_000, 5)],
)
def test_the_order_follows_the_number_of_sources(n_sources: int, order: int) -> None:
    from xpbatch.products.sky_maps import MIN_SOURCES_PER_PIXEL, auto_order

    assert auto_order(n_sources) == order
    if order:  # at least MIN_SOURCES_PER_PIXEL a pixel on average, and not one order finer
        assert n_sources / (12 * 4**order) >= MIN_SOURCES_PER_PIXEL


def test_without_an_order_the_catalogue_size_chooses_it(catalog: Path) -> None:
    from xpbatch.products.sky_maps import auto_order, compute_sky_maps

    maps = compute_sky_maps(catalog)
    assert maps.order == auto_order(N_ROWS) == 1 and maps.count.sum() == N_ROWS


def test_an_order_beyond_the_source_id_pixel_is_refused(catalog: Path) -> None:
    from xpbatch.errors import ConfigError
    from xpbatch.products.sky_maps import compute_sky_maps

    with pytest.raises(ConfigError, match=r"0\.\.12"):
        compute_sky_maps(catalog, order=13)
