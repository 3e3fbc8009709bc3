"""Tests of xpbatch.mock: determinism, chunking, labels, the DR3 bulk format, realism, memory."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import itertools
import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from xpbatch import mock
from xpbatch.cli.main import main
from xpbatch.config import MockConfig
from xpbatch.errors import ConfigError, OutputExistsError, StoreNotFoundError
from xpbatch.mock import rows as mock_rows_module
from xpbatch.mock import sky as mock_sky
from xpbatch.schema import G_ZERO_POINT_MAG, N_BP, InputFlag
from xpbatch.storage.partitions import HEALPIX_SHIFT, N_PIXELS
from xpbatch.store.input_recipe import compute_input_flags
from xpbatch.store.reader import open_xp_store

# Defects far more often than the defaults, so a few thousand rows hold every kind.
DEFECTS = MockConfig(
    bp_missing_fraction=0.02,
    rp_missing_fraction=0.01,
    non_finite_fraction=0.02,
    g_flux_missing_fraction=0.02,
)
CLEAN = MockConfig(
    bp_missing_fraction=0.0,
    rp_missing_fraction=0.0,
    non_finite_fraction=0.0,
    g_flux_missing_fraction=0.0,
)
N_STORE = 6000
N_BULK = 800

csv.field_size_limit(1 << 24)  # a bulk line is ~40 kB


def _arrays(path: Path) -> dict[str, np.ndarray]:
    ds = open_xp_store(path)
    return {name: ds[name].values for name in ds.variables if name != "coeff"}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mock_rows_module.block.cache_clear()
    path = tmp_path_factory.mktemp("mock") / "mock.zarr"
    return mock.write_mock_store(path, N_STORE, seed=7, chunk_rows=1000, config=DEFECTS)


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bulk")
    mock.write_mock_dr3_bulk(out, N_BULK, seed=3, rows_per_file=300, config=DEFECTS, workers=2)
    return out


@pytest.fixture(scope="module")
def sample() -> mock.MockRows:
    """8192 rows without defects (two blocks), for the realism checks."""
    return mock.mock_rows(8192, 0, 8192, seed=11, config=CLEAN)


def _read_csv(path: Path) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """Header lines, column names and rows of a bulk file, read with the standard library."""
    with gzip.open(path, "rt", newline="") as f:
        lines = f.read().splitlines()
    header = [line for line in lines if line.startswith("#")]
    body = lines[len(header) :]
    rows = list(csv.DictReader(body))
    return header, body[0].split(","), rows


# --- determinism and chunking ---------------------------------------------------------------
def test_store_is_the_same_for_a_seed_whatever_the_chunking(store: Path, tmp_path: Path) -> None:
    mock_rows_module.block.cache_clear()  # regenerate, do not reuse the first run's blocks
    again = mock.write_mock_store(tmp_path / "again.zarr", N_STORE, seed=7, chunk_rows=777,
                                  config=DEFECTS)  # fmt: skip
    _assert_same(_arrays(store), _arrays(again))
    assert mock.read_mock_labels(store).equals(mock.read_mock_labels(again))


def test_another_seed_gives_other_rows(store: Path) -> None:
    other = mock.mock_rows(N_STORE, 0, 500, seed=8, config=DEFECTS)
    mine = mock.mock_rows(N_STORE, 0, 500, seed=7, config=DEFECTS)
    assert not np.array_equal(other.source_id, mine.source_id)
    assert np.mean(other.labels["teff"] == mine.labels["teff"]) < 0.01


@pytest.fixture(scope="module")
def whole() -> mock.MockRows:
    return mock.mock_rows(9001, 0, 9001, seed=5)


@pytest.mark.parametrize(
    ("start", "stop"),
    [(4095, 4097), (100, 4096), (5000, 9001), (9000, 9001)],
    ids=["across-blocks", "to-block-end", "two-blocks", "last-row"],
)
def test_any_range_equals_the_slice_of_the_whole(
    whole: mock.MockRows, start: int, stop: int
) -> None:
    mock_rows_module.block.cache_clear()
    part = mock.mock_rows(9001, start, stop, seed=5)
    np.testing.assert_array_equal(part.source_id, whole.source_id[start:stop])
    np.testing.assert_array_equal(part.coefficients, whole.coefficients[start:stop])
    np.testing.assert_array_equal(part.labels["logg"], whole.labels["logg"][start:stop])


def test_source_ids_are_ascending_unique_and_gaia_like(store: Path) -> None:
    sid = _arrays(store)["source_id"]
    assert sid.dtype == np.int64 and np.all(np.diff(sid) > 0)
    pixel = sid >> HEALPIX_SHIFT
    assert pixel.min() >= 0 and pixel.max() < N_PIXELS
    assert np.all((sid >> 32) & 7 == 1)  # the processing bit real DR3 ids carry
    # Sources crowd the Galactic plane: |b| < 10 deg is 17 % of the sky but most of the sources.
    low_latitude = np.abs(mock_sky.sky_pixels().sin_b[pixel]) < math.sin(math.radians(10))
    assert low_latitude.mean() > 0.4


@pytest.mark.parametrize("n", [10_000_000, 219_197_643], ids=["ten-million", "dr3-size"])
def test_large_catalogues_are_addressable_without_generating_them(n: int) -> None:
    tail = mock.mock_rows(n, n - 10, n, seed=0)
    assert np.all(np.diff(tail.source_id) > 0)
    assert tail.source_id[-1] >> HEALPIX_SHIFT < N_PIXELS
    plan = mock.bulk_file_plan(n)
    assert plan[-1].stop == n and abs(len(plan) - n / 65_000) < 0.05 * n / 65_000


# --- labels ---------------------------------------------------------------------------------
def test_labels_match_the_rows(store: Path) -> None:
    labels = mock.read_mock_labels(store)
    arrays = _arrays(store)
    np.testing.assert_array_equal(labels.index.to_numpy(), arrays["source_id"])
    assert list(labels.columns) == list(mock.LABEL_COLUMNS)
    flux = arrays["phot_g_mean_flux"]
    has_flux = np.isfinite(flux)
    observed_g = G_ZERO_POINT_MAG - 2.5 * np.log10(flux[has_flux])
    assert np.abs(observed_g - labels["g_mag"].to_numpy()[has_flux]).max() < 0.05
    giants = labels[labels["is_giant"]]
    dwarfs = labels[~labels["is_giant"]]
    assert giants["logg"].between(1.0, 3.5).all() and giants["teff"].between(3800, 5200).all()
    assert dwarfs["logg"].between(3.9, 4.8).all() and dwarfs["teff"].between(3500, 7500).all()
    assert 0.25 < labels["is_giant"].mean() < 0.35
    assert labels["m_h"].between(-2.5, 0.6).all() and (labels["a_v"] >= 0).all()
    np.testing.assert_array_equal(labels["star_id"].to_numpy(), arrays["source_id"])  # no repeats


# --- repeat observations --------------------------------------------------------------------
_STAR_LABELS = [c for c in mock.LABEL_COLUMNS if c != "star_id"]


@pytest.fixture(scope="module")
def pairs() -> mock.MockRows:
    """Two blocks of rows without defects, every star observed twice."""
    return mock.mock_rows(8192, 0, 8192, seed=11, config=dataclasses.replace(CLEAN, repeats=2))


def test_repeats_are_one_star_observed_with_independent_noise(pairs: mock.MockRows) -> None:
    first, second = slice(0, None, 2), slice(1, None, 2)
    np.testing.assert_array_equal(pairs.labels["star_id"][first], pairs.source_id[first])
    np.testing.assert_array_equal(pairs.labels["star_id"][second], pairs.source_id[first])
    assert np.all(np.diff(pairs.source_id) > 0)  # each observation its own source_id
    for name in _STAR_LABELS:
        np.testing.assert_array_equal(pairs.labels[name][first], pairs.labels[name][second], name)
    errors = pairs.coefficient_errors
    np.testing.assert_array_equal(errors[first], errors[second])
    np.testing.assert_array_equal(pairs.correlation_template[first],
                                  pairs.correlation_template[second])  # fmt: skip
    # Independent noise of the stated size: the difference of two draws has sqrt(2) sigma.
    z = (pairs.coefficients[first] - pairs.coefficients[second]) / (np.sqrt(2) * errors[first])
    assert 0.97 < np.std(z) < 1.03
    assert abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1]) < 0.1  # per row, not shared between columns
    # The G flux is observed again too, around the same true magnitude.
    assert not np.array_equal(pairs.phot_g_mean_flux[first], pairs.phot_g_mean_flux[second])


def test_repeats_differ_only_by_their_noise() -> None:
    config = dataclasses.replace(CLEAN, repeats=2, add_noise=False)
    rows = mock.mock_rows(3000, 0, 3000, seed=2, config=config)
    np.testing.assert_array_equal(rows.coefficients[0::2], rows.coefficients[1::2])
    np.testing.assert_array_equal(rows.phot_g_mean_flux[0::2], rows.phot_g_mean_flux[1::2])


TRIPLES = MockConfig(repeats=3)


@pytest.fixture(scope="module")
def triples() -> mock.MockRows:
    return mock.mock_rows(9001, 0, 9001, seed=5, config=TRIPLES)


def test_groups_of_repeats_stay_inside_a_block(triples: mock.MockRows) -> None:
    # 4096 = 3 * 1365 + 1 leaves rows 4095 and 8191 stars of their own; the last block's
    # 809 = 3 * 269 + 2 rows end with a pair.
    _, counts = np.unique(triples.labels["star_id"], return_counts=True)
    assert ((counts == 1).sum(), (counts == 2).sum(), set(counts.tolist())) == (2, 1, {1, 2, 3})
    assert triples.labels["star_id"][4095] == triples.source_id[4095]


@pytest.mark.parametrize(
    ("start", "stop"),
    [(4094, 4100), (1, 2), (8000, 9001)],
    ids=["across-blocks", "second-of-a-group", "to-the-end"],
)
def test_repeat_rows_depend_only_on_their_index(
    triples: mock.MockRows, start: int, stop: int
) -> None:
    mock_rows_module.block.cache_clear()
    part = mock.mock_rows(9001, start, stop, seed=5, config=TRIPLES)
    np.testing.assert_array_equal(part.coefficients, triples.coefficients[start:stop])
    np.testing.assert_array_equal(part.labels["star_id"], triples.labels["star_id"][start:stop])


def test_cli_repeats_write_pairs_and_say_so_in_the_labels(tmp_path: Path) -> None:
    out = tmp_path / "pairs.zarr"
    result = CliRunner().invoke(main, ["mock", "-n", "600", "--repeats", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    labels = mock.read_mock_labels(out)
    assert (labels.groupby("star_id").size() == 2).all()
    same = labels.groupby("star_id")[_STAR_LABELS].nunique()
    assert (same == 1).all().all()
    assert open_xp_store(out).attrs["mock"]["config"]["repeats"] == 2


def test_flat_counts_spread_the_magnitudes_evenly() -> None:
    config = dataclasses.replace(CLEAN, g_mag_min=9.0, g_mag_limit=17.6, counts_slope=0.0,
                                 faint_fraction=0.0)  # fmt: skip
    g = mock.mock_rows(8192, 0, 8192, seed=1, config=config).labels["g_mag"]
    assert g.min() >= 9.0 and g.max() <= 17.6
    counts, _ = np.histogram(g, bins=np.linspace(9.0, 17.6, 5))
    assert counts.min() > 0.9 * counts.max()


def test_missing_labels_say_where_they_should_be(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match=r"mock_labels\.parquet"):
        mock.read_mock_labels(tmp_path)


# --- the DR3 bulk format --------------------------------------------------------------------
def test_bulk_files_follow_the_real_dr3_format(bulk: Path) -> None:
    files = sorted(bulk.glob("XpContinuousMeanSpectrum_*.csv.gz"))
    assert len(files) == 3
    rows = mock.mock_rows(N_BULK, 0, N_BULK, seed=3, config=DEFECTS)
    parsed = [row for f in files for row in _read_csv(f)[2]]
    header, columns, _ = _read_csv(files[0])
    assert header[:4] == ["# %ECSV 1.0", "# ---", "# delimiter: ','", "# datatype:"]
    assert len(columns) == 26 and len(parsed) == N_BULK
    missing = {
        "bp": np.isnan(rows.coefficients[:, :N_BP]).all(axis=1),
        "rp": np.isnan(rows.coefficients[:, N_BP:]).all(axis=1),
    }
    assert missing["bp"].sum() > 10 and missing["rp"].sum() > 3
    for i, row in enumerate(parsed):
        assert int(row["source_id"]) == rows.source_id[i]
        for band in ("bp", "rp"):
            fields = [v for k, v in row.items() if k.startswith(band + "_")]
            if missing[band][i]:  # the bare token null in every field of the band
                assert fields == ["null"] * 12
                continue
            coefficients = json.loads(row[f"{band}_coefficients"])
            correlations = json.loads(row[f"{band}_coefficient_correlations"])
            assert len(coefficients) == int(row[f"{band}_n_parameters"]) == 55
            assert len(correlations) == 1485 and max(map(abs, correlations)) < 1
            part = slice(0, N_BP) if band == "bp" else slice(N_BP, None)
            # float32 of the text is the store's float32, NaN and inf included
            np.testing.assert_array_equal(
                np.float32(coefficients), rows.coefficients[i, part], err_msg=f"row {i}"
            )
            errors = np.float32(json.loads(row[f"{band}_coefficient_errors"]))
            np.testing.assert_array_equal(errors, rows.coefficient_errors[i, part])


def test_bulk_header_matches_a_real_dr3_file(bulk: Path, dr3_samples_dir: Path) -> None:
    real = dr3_samples_dir / "XP_CONTINUOUS_bulk_style_null.ecsv"
    real_lines = real.read_text().splitlines()
    ours_header, ours_columns, _ = _read_csv(next(bulk.glob("XpContinuousMeanSpectrum_*")))

    def schema(lines: list[str]) -> list[str]:
        keep = ("#   name:", "#   datatype:", "#   subtype:")
        return [line for line in lines if line.startswith(keep)]

    assert schema(ours_header) == schema(real_lines)
    assert ours_columns == next(line for line in real_lines if not line.startswith("#")).split(",")


def test_gaia_source_companions_hold_the_g_photometry(bulk: Path) -> None:
    rows = mock.mock_rows(N_BULK, 0, N_BULK, seed=3, config=DEFECTS)
    parsed = [r for f in sorted(bulk.glob("GaiaSource_*.csv.gz")) for r in _read_csv(f)[2]]
    assert [int(r["source_id"]) for r in parsed] == rows.source_id.tolist()
    text_flux = [r["phot_g_mean_flux"] for r in parsed]
    missing = np.isnan(rows.phot_g_mean_flux)
    assert missing.sum() >= 5 and all(text_flux[i] == "null" for i in np.flatnonzero(missing))
    assert all(parsed[i]["phot_g_mean_mag"] == "null" for i in np.flatnonzero(missing))
    flux = np.array([float(v) if v != "null" else np.nan for v in text_flux])
    np.testing.assert_array_equal(flux, rows.phot_g_mean_flux)  # float64 round trip
    mag = np.float32(
        [float(r["phot_g_mean_mag"]) for r in parsed if r["phot_g_mean_mag"] != "null"]
    )
    np.testing.assert_array_equal(mag, rows.phot_g_mean_mag[~missing])


def test_md5_manifest_lists_every_file(bulk: Path) -> None:
    listed = dict(
        reversed(line.split("  ")) for line in (bulk / "_MD5SUM.txt").read_text().splitlines()
    )
    files = sorted(p.name for p in bulk.glob("*.csv.gz"))
    assert sorted(listed) == files and len(files) == 6
    for name in files:
        assert hashlib.md5((bulk / name).read_bytes()).hexdigest() == listed[name]
    assert not list(bulk.glob("*.partial"))


def test_bulk_labels_are_the_rows_labels(bulk: Path) -> None:
    labels = mock.read_mock_labels(bulk)
    rows = mock.mock_rows(N_BULK, 0, N_BULK, seed=3, config=DEFECTS)
    np.testing.assert_array_equal(labels.index.to_numpy(), rows.source_id)
    np.testing.assert_array_equal(labels["teff"].to_numpy(), rows.labels["teff"].astype("f4"))


@pytest.mark.parametrize(
    ("n", "rows_per_file"),
    [(1, 100), (1000, 5000), (1000, 1), (50_000, 7000), (100_000, 65_000)],
    ids=["one-row", "one-file", "row-per-file", "uneven", "default-like"],
)
def test_bulk_file_plan_covers_the_sky_with_whole_pixels(n: int, rows_per_file: int) -> None:
    plan = mock.bulk_file_plan(n, rows_per_file)
    assert plan[0].lo == 0 and plan[-1].hi == N_PIXELS - 1
    assert plan[0].start == 0 and plan[-1].stop == n
    for before, after in itertools.pairwise(plan):
        assert after.lo == before.hi + 1 and after.start == before.stop
    sizes = np.array([f.stop - f.start for f in plan])
    assert sizes.min() >= 1
    assert len(plan) <= max(1, math.ceil(n / rows_per_file))
    if rows_per_file > 1 and n > rows_per_file:  # whole pixels: a little over the target
        assert np.median(sizes) < 1.2 * rows_per_file


def test_bulk_file_names_follow_dr3(bulk: Path) -> None:
    for path in bulk.glob("XpContinuousMeanSpectrum_*.csv.gz"):
        lo, hi = path.name.removeprefix("XpContinuousMeanSpectrum_").split(".")[0].split("-")
        assert len(lo) == len(hi) == 6 and int(lo) <= int(hi)
        assert (bulk / f"GaiaSource_{lo}-{hi}.csv.gz").is_file()


# --- realism --------------------------------------------------------------------------------
def test_coefficients_decay_with_order(sample: mock.MockRows) -> None:
    bright = sample.labels["g_mag"] < 15
    for band in (0, N_BP):
        c = np.abs(sample.coefficients[bright, band : band + N_BP])
        relative = c / c[:, :1]
        medians = [np.median(relative[:, s]) for s in np.s_[1:5, 5:20, 20:40, 40:55]]
        assert medians == sorted(medians, reverse=True), medians
        assert medians[0] > 5 * medians[-1] and medians[0] < 0.1
        assert np.all(sample.coefficients[:, band] > 0)  # the first coefficient is the flux


def test_errors_grow_with_magnitude_like_dr3(sample: mock.MockRows) -> None:
    g = sample.labels["g_mag"]
    relative = sample.coefficient_errors[:, N_BP] / sample.coefficients[:, N_BP]  # RP c_0
    bins = [np.median(relative[(g >= lo) & (g < hi)]) for lo, hi in [(0, 13), (13, 15),
            (15, 16.5), (16.5, 17.65)]]  # fmt: skip
    assert bins == sorted(bins) and bins[-1] > 3 * bins[0]
    # DR3: c_0 signal-to-noise ~2500 for bright stars, a few hundred at the faint limit
    assert 1500 < 1 / bins[0] < 4000 and 150 < 1 / bins[-1] < 1000


def test_spectra_live_near_a_low_dimensional_manifold() -> None:
    noiseless = dataclasses.replace(CLEAN, add_noise=False)
    rows = mock.mock_rows(4096, 0, 4096, seed=2, config=noiseless)
    assert _explained(rows.coefficients / rows.phot_g_mean_flux[:, None], 6) > 0.95


def test_bright_noisy_spectra_are_dominated_by_a_few_components(sample: mock.MockRows) -> None:
    bright = sample.labels["g_mag"] < 14
    x = sample.coefficients[bright] / sample.phot_g_mean_flux[bright, None]
    assert _explained(x, 6) > 0.65  # 0.76 measured; pure noise would give ~0.15


def _explained(x: np.ndarray, k: int) -> float:
    """Fraction of the variance of standardised columns that the first k components explain."""
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    power = np.linalg.svd(z, compute_uv=False) ** 2
    return float(power[:k].sum() / power.sum())


def test_defect_fractions_are_as_configured(store: Path) -> None:
    arrays = _arrays(store)
    flags = arrays["input_flags"]
    np.testing.assert_array_equal(
        flags,
        compute_input_flags(
            arrays["coefficients"], arrays["coefficient_errors"], arrays["phot_g_mean_flux"]
        ),
    )
    for bit, fraction in [
        (InputFlag.BP_MISSING, DEFECTS.bp_missing_fraction),
        (InputFlag.RP_MISSING, DEFECTS.rp_missing_fraction),
        (InputFlag.NON_FINITE, DEFECTS.non_finite_fraction),
        (InputFlag.G_FLUX_MISSING, DEFECTS.g_flux_missing_fraction),
    ]:
        count = int(np.count_nonzero(flags & bit))
        expected = fraction * N_STORE
        assert abs(count - expected) < 5 * math.sqrt(expected) + 1, (bit, count, expected)
    assert np.all(flags & (flags - 1) == 0)  # defects are exclusive: at most one bit a row


def test_correlation_templates_are_valid_correlation_matrices() -> None:
    for band in ("bp", "rp"):
        templates = mock.correlation_templates(band).astype(np.float64)
        assert np.all(np.linalg.eigvalsh(templates)[:, 0] > 0.005)
        np.testing.assert_array_equal(templates, np.swapaxes(templates, 1, 2))
        assert np.all(np.diagonal(templates, axis1=1, axis2=2) == 1)
        packed = mock.packed_correlations(band)
        rows, cols = np.tril_indices(55, k=-1)  # DR3's packing, FORMAT.md
        np.testing.assert_array_equal(packed[3], templates[3][rows, cols].astype(np.float32))
        assert 0.02 < np.median(np.abs(packed)) < 0.1


# --- memory and interfaces ------------------------------------------------------------------
def _peak_bytes(path: Path, n: int) -> int:
    """Peak Python/NumPy memory of writing an n-row store (Arrow's own pool is not traced)."""
    mock_rows_module.block.cache_clear()
    mock_sky.row_bounds.cache_clear()  # 6 MB per n, whatever n
    tracemalloc.start()
    try:
        mock.write_mock_store(path, n, seed=1, chunk_rows=mock.BLOCK_ROWS)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_flat_in_the_number_of_rows(tmp_path: Path) -> None:
    mock.write_mock_store(tmp_path / "warm.zarr", 10, seed=1)  # instrument caches
    small = _peak_bytes(tmp_path / "small.zarr", 2 * mock.BLOCK_ROWS)
    large = _peak_bytes(tmp_path / "large.zarr", 4 * mock.BLOCK_ROWS)
    assert large < 1.1 * small, (small, large)


def test_cli_writes_the_same_store_as_the_api(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["mock", "-n", "700", "-o", str(tmp_path / "cli.zarr"), "--seed", "4",
               "--chunk-rows", "300"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    api = mock.write_mock_store(tmp_path / "api.zarr", 700, seed=4)
    _assert_same(_arrays(tmp_path / "cli.zarr"), _arrays(api))
    assert (tmp_path / "cli.zarr.labels.parquet").is_file()


def test_cli_reads_a_mock_config_file(tmp_path: Path) -> None:
    (tmp_path / "mock.toml").write_text("giant_fractoin = 0.5\n")
    result = CliRunner().invoke(
        main, ["mock", "-n", "10", "-o", str(tmp_path / "x.zarr"), "--config",
               str(tmp_path / "mock.toml")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "Did you mean 'giant_fraction'?" in result.output


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: mock.write_mock_store(p / "s.zarr", 0), ConfigError, "at least 1 row"),
        (lambda p: mock.write_mock_store(p / "s.zarr", 5, seed=-1), ConfigError, "seed"),
        (lambda p: mock.write_mock_dr3_bulk(p, 5, rows_per_file=0), ConfigError, "rows_per_file"),
        (lambda p: mock.write_mock_dr3_bulk(p, 5, workers=0), ConfigError, "workers"),
        (lambda p: mock.mock_rows(5, 3, 9), ValueError, "outside"),
        (lambda p: MockConfig(giant_fraction=1.5), ConfigError, "giant_fraction"),
        (lambda p: MockConfig(bp_missing_fraction=0.6), ConfigError, "add up"),
        (lambda p: MockConfig(add_noise="no"), ConfigError, "add_noise must be bool"),
    ],
    ids=["no-rows", "negative-seed", "no-rows-per-file", "no-workers", "bad-range",
         "fraction-over-one", "defects-over-half", "typed-field"],
)  # fmt: skip
def test_bad_input_gets_a_clear_error(call, error, match, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call(tmp_path)


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    first = open_xp_store(mock.write_mock_store(tmp_path / "s.zarr", 5)).attrs["store_uuid"]
    with pytest.raises(OutputExistsError, match="overwrite"):
        mock.write_mock_store(tmp_path / "s.zarr", 5)
    mock.write_mock_store(tmp_path / "s.zarr", 5, overwrite=True)
    assert open_xp_store(tmp_path / "s.zarr").attrs["store_uuid"] != first
    mock.write_mock_dr3_bulk(tmp_path / "b", 5)
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        mock.write_mock_dr3_bulk(tmp_path / "b", 5)
    mock.write_mock_dr3_bulk(tmp_path / "b", 5, overwrite=True)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"  # only our files are replaced


def test_cli_store_records_the_partition_plan_it_was_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "m.zarr"
    args = ["mock", "-n", "600", "-o", str(out), "--rows-per-file", "200", "--chunk-rows", "300"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    recorded = open_xp_store(out).attrs["partition_ranges"]
    assert len(recorded) == 3 and recorded[0][0] == 0 and recorded[-1][1] == 786431


# --- the stage entry: make_mock(out, config=...) -> MockSummary --------------------------------
RARE = MockConfig(n=900, seed=4, chunk_rows=400, binary_fraction=0.05, white_dwarf_fraction=0.02)


def _disk_bytes(*paths: Path) -> int:
    return sum(
        f.stat().st_size
        for p in paths
        for f in ([p] if p.is_file() else p.rglob("*"))
        if f.is_file()
    )


def test_mock_stage_writes_a_store_and_summarises_it(tmp_path: Path) -> None:
    summary = mock.make_mock(tmp_path / "s.zarr", config=RARE)
    api = mock.write_mock_store(tmp_path / "api.zarr", 900, seed=4, chunk_rows=400, config=RARE)
    _assert_same(_arrays(summary.path), _arrays(api))
    labels = mock.read_mock_labels(summary.path)
    counted = {name: int((labels["population"] == i).sum())
               for i, name in enumerate(mock.POPULATIONS) if i}  # fmt: skip
    assert summary.rare_counts == counted and counted["binary"] > 20 and counted["white_dwarf"] > 5
    assert counted["emission_line"] == 0
    assert (summary.rows, summary.format, summary.files) == (900, "store", (summary.path,))
    assert summary.labels == tmp_path / "s.zarr.labels.parquet"
    assert summary.bytes_on_disk == _disk_bytes(summary.path, summary.labels)
    text = str(summary)
    assert text.startswith(f"wrote 900 mock sources to {summary.path}: ")
    assert f"{counted['binary']} binary" in text and str(summary.labels) in text


def test_mock_stage_writes_bulk_files_and_summarises_them(tmp_path: Path) -> None:
    config = dataclasses.replace(RARE, format="dr3-bulk", rows_per_file=300, workers=2)
    summary = mock.make_mock(tmp_path / "b", config=config)
    plan = mock.bulk_file_plan(900, 300)
    assert summary.files == tuple(tmp_path / "b" / f.xp_name for f in plan)
    assert summary.bytes_on_disk == _disk_bytes(tmp_path / "b")  # holds only what mock wrote
    assert summary.labels == tmp_path / "b" / "mock_labels.parquet"
    assert sum(summary.rare_counts.values()) == int(
        (mock.read_mock_labels(summary.labels)["population"] > 0).sum()
    )
    assert f"in {len(plan)} XpContinuousMeanSpectrum files" in str(summary)


def test_store_records_only_the_settings_that_decide_the_rows(tmp_path: Path) -> None:
    summary = mock.make_mock(tmp_path / "s.zarr", config=dataclasses.replace(RARE, n=50))
    recorded = open_xp_store(summary.path).attrs["mock"]
    assert (recorded["n"], recorded["seed"]) == (50, 4)
    assert recorded["config"] == RARE.row_settings()
    assert "chunk_rows" not in recorded["config"] and "giant_fraction" in recorded["config"]


def test_cli_prints_the_summary_and_keeps_a_config_files_settings(tmp_path: Path) -> None:
    (tmp_path / "mock.toml").write_text("seed = 4\nchunk_rows = 400\nbinary_fraction = 0.05\n"
                                        "white_dwarf_fraction = 0.02\n")  # fmt: skip
    args = ["mock", "-n", "900", "-o", str(tmp_path / "cli.zarr"), "--config",
            str(tmp_path / "mock.toml")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = mock.make_mock(tmp_path / "api.zarr", config=RARE)
    assert result.output.strip() == str(summary).replace("api.zarr", "cli.zarr")
    _assert_same(_arrays(tmp_path / "cli.zarr"), _arrays(summary.path))
    result = CliRunner().invoke(main, [*args[:4], str(tmp_path / "seed.zarr"), *args[5:],
                                       "--seed", "5"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert open_xp_store(tmp_path / "seed.zarr").attrs["mock"]["seed"] == 5  # the option wins


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"format": "dr3-bulk", "with_correlations": True}, "format 'store' only"),
        ({"format": "stor"}, "Did you mean 'store'"),
        ({"n": 0}, "at least 1 row"),
        ({"seed": -1}, "seed must be a non-negative"),
        ({"chunk_rows": "4096"}, "chunk_rows must be int"),
        ({"repeats": 0}, "repeats must be at least 1"),
    ],
    ids=[
        "correlations-in-bulk",
        "unknown-format",
        "no-rows",
        "negative-seed",
        "typed-int",
        "no-observations",
    ],
)
def test_mock_config_checks_the_output_options(settings: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MockConfig(**settings)  # type: ignore[arg-type]
