"""The XP store: writing (streaming and in-memory), flags, validation on open, store_id."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from xpbatch import schema
from xpbatch.errors import InputShapeError, OutputExistsError, StoreError, StoreNotFoundError
from xpbatch.schema import InputFlag
from xpbatch.store.input_recipe import compute_input_flags
from xpbatch.store.reader import open_xp_store, store_id
from xpbatch.store.xp_store import XPStoreWriter, write_xp_store


def _arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    coefficients = rng.normal(size=(n, schema.N_COEFF)).astype(np.float32)
    return {
        "source_id": rng.permutation(n).astype(np.int64) * 7 + 11,  # unsorted on purpose
        "coefficients": coefficients,
        "coefficient_errors": np.abs(coefficients) + 0.5,
        "phot_g_mean_flux": rng.uniform(1e3, 1e5, n),
    }


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return write_xp_store(tmp_path / "s.zarr", **_arrays(10), chunk_rows=4)


def test_write_then_open_sorts_rows_and_keeps_values(tmp_path: Path) -> None:
    arrays = _arrays(10)
    path = write_xp_store(tmp_path / "s.zarr", **arrays, chunk_rows=4)
    ds = open_xp_store(path)
    order = np.argsort(arrays["source_id"])
    assert ds.sizes == {schema.SOURCE: 10, schema.COEFF: schema.N_COEFF}
    assert ds.chunks[schema.SOURCE] == (4, 4, 2)
    np.testing.assert_array_equal(ds.source_id.values, arrays["source_id"][order])
    np.testing.assert_array_equal(ds.coefficients.values, arrays["coefficients"][order])
    np.testing.assert_array_equal(ds.phot_g_mean_flux.values, arrays["phot_g_mean_flux"][order])
    assert list(ds.coeff.values[[0, 54, 55, 109]]) == ["bp_0", "bp_54", "rp_0", "rp_54"]
    assert ds.coefficients.dtype == np.float32 and ds.input_flags.dtype == np.uint8
    for name, variable in ds.variables.items():
        assert variable.attrs.get("units") and variable.attrs.get("description"), name
    assert ds.attrs["complete"] is True and ds.attrs["row_count"] == 10
    assert ds.attrs["source_id_chunk_ranges"] == [[11, 32], [39, 60], [67, 74]]


def test_plain_xarray_opens_the_store_lazily_without_warnings(store: Path) -> None:
    ds = xr.open_zarr(store)  # filterwarnings=error: no consolidated-metadata warning
    assert ds.coefficients.chunks is not None
    assert "source_id" in ds.coords


def test_scalars_and_correlations_round_trip(tmp_path: Path) -> None:
    n = 5
    arrays = _arrays(n)
    scalars = {"bp_n_parameters": np.full(n, 55), "rp_chi_squared": np.arange(n, dtype=float)}
    correlations = {b: np.full((n, 1485), 0.5) for b in schema.BANDS}
    path = write_xp_store(
        tmp_path / "s.zarr", **arrays, scalars=scalars, correlations=correlations, chunk_rows=2
    )
    ds = open_xp_store(path)
    assert ds.bp_n_parameters.dtype == np.int16 and (ds.bp_n_parameters == 55).all()
    assert ds.bp_coefficient_correlations.dims == (schema.SOURCE, schema.CORRELATION)
    assert float(ds.rp_coefficient_correlations.max()) == 0.5


FLAG_CASES = {
    "clean": ({}, 0),
    "bp missing": ({"coeff": (slice(0, 55), np.nan)}, InputFlag.BP_MISSING),
    "rp missing": ({"coeff": (slice(55, 110), np.nan)}, InputFlag.RP_MISSING),
    "one nan coefficient": ({"coeff": (slice(3, 4), np.nan)}, InputFlag.NON_FINITE),
    "infinite error": ({"err": (slice(60, 61), np.inf)}, InputFlag.NON_FINITE),
    "zero error": ({"err": (slice(0, 1), 0.0)}, InputFlag.NON_FINITE),
    "flux nan": ({"flux": np.nan}, InputFlag.G_FLUX_MISSING),
    "flux negative": ({"flux": -3.0}, InputFlag.G_FLUX_MISSING),
    "flux from magnitude": ({"from_mag": True}, InputFlag.G_FLUX_FROM_MAG),
    "bp missing, no flux": (
        {"coeff": (slice(0, 55), np.nan), "flux": np.nan},
        InputFlag.BP_MISSING | InputFlag.G_FLUX_MISSING,
    ),
}


@pytest.mark.parametrize(("change", "expected"), FLAG_CASES.values(), ids=FLAG_CASES.keys())
def test_compute_input_flags(change: dict, expected: int) -> None:
    coeff = np.ones((1, 110), np.float32)
    err = np.ones((1, 110), np.float32)
    flux = np.array([1e4])
    if "coeff" in change:
        coeff[0, change["coeff"][0]] = change["coeff"][1]
    if "err" in change:
        err[0, change["err"][0]] = change["err"][1]
    if "flux" in change:
        flux[0] = change["flux"]
    from_mag = np.array([change.get("from_mag", False)])
    assert compute_input_flags(coeff, err, flux, flux_from_mag=from_mag)[0] == expected


def test_duplicate_source_ids_are_rejected(tmp_path: Path) -> None:
    arrays = _arrays(4)
    arrays["source_id"][:] = [5, 9, 5, 7]
    with pytest.raises(StoreError, match=r"unique.*\[5\]"):
        write_xp_store(tmp_path / "s.zarr", **arrays)
    assert not (tmp_path / "s.zarr").exists()


def _write(writer: XPStoreWriter, start: int, n: int, first_id: int = 1) -> None:
    writer.write_rows(
        start,
        source_id=np.arange(first_id, first_id + n),
        coefficients=np.ones((n, 110)),
        coefficient_errors=np.ones((n, 110)),
        phot_g_mean_flux=np.ones(n),
    )


MISALIGNED = {
    "start inside a chunk": (2, 4),
    "short write in the middle": (0, 3),
    "past the end": (8, 4),
}


@pytest.mark.parametrize(("start", "n"), MISALIGNED.values(), ids=MISALIGNED.keys())
def test_writes_must_be_chunk_aligned(tmp_path: Path, start: int, n: int) -> None:
    writer = XPStoreWriter.create(tmp_path / "s.zarr", 10, chunk_rows=4)
    with pytest.raises(InputShapeError, match=r"chunk|outside"):
        _write(writer, start, n)


def test_streaming_writer_pickles_and_writes_several_chunks_at_once(tmp_path: Path) -> None:
    writer = XPStoreWriter.create(tmp_path / "s.zarr", 10, chunk_rows=4)
    writer = pickle.loads(pickle.dumps(writer))  # as shipped to a Dask worker
    _write(writer, 0, 8)
    _write(writer, 8, 2, first_id=100)
    writer.finalize()
    assert open_xp_store(tmp_path / "s.zarr").source_id.values[-1] == 101
    # every chunk file exists, also those equal to the fill value (input_flags all 0)
    assert len(list((tmp_path / "s.zarr" / "input_flags" / "c").iterdir())) == 3


def test_finalize_refuses_unwritten_chunks_and_open_refuses_incomplete(tmp_path: Path) -> None:
    writer = XPStoreWriter.create(tmp_path / "s.zarr", 10, chunk_rows=4)
    _write(writer, 0, 4)
    with pytest.raises(StoreError, match=r"rows 4\.\.8 \(chunk 1\).*never written"):
        writer.finalize()
    with pytest.raises(StoreError, match="not complete"):
        open_xp_store(tmp_path / "s.zarr")


def test_finalize_refuses_ids_out_of_order_across_chunks(tmp_path: Path) -> None:
    writer = XPStoreWriter.create(tmp_path / "s.zarr", 8, chunk_rows=4)
    _write(writer, 0, 4, first_id=10)
    _write(writer, 4, 4, first_id=12)
    with pytest.raises(StoreError, match="duplicate or out-of-order"):
        writer.finalize()


def _break_dtype(path: Path) -> None:
    group = zarr.open_group(path, mode="r+")
    del group[schema.PHOT_G_MEAN_FLUX]
    group.create_array(
        schema.PHOT_G_MEAN_FLUX, shape=(10,), dtype="float32", dimension_names=["source"]
    )


BROKEN = {
    "missing variable": (
        lambda p: shutil.rmtree(p / schema.INPUT_FLAGS),
        "variable 'input_flags' is missing",
    ),
    "wrong dtype": (_break_dtype, "phot_g_mean_flux has dtype float32, expected float64"),
    "of a newer format": (
        lambda p: zarr.open_group(p, mode="r+").attrs.update({"xpbatch_store_schema_version": 99}),
        r"written by a newer xpbatch \(format 99, this xpbatch reads 2\): upgrade xpbatch",
    ),
    "chunk ranges out of order": (
        lambda p: zarr.open_group(p, mode="r+").attrs.update(
            {"source_id_chunk_ranges": [[1, 5], [3, 9], [10, 11]]}
        ),
        "not ascending and unique",
    ),
}


@pytest.mark.parametrize(("breaker", "message"), BROKEN.values(), ids=BROKEN.keys())
def test_open_names_what_is_wrong(store: Path, breaker, message: str) -> None:  # type: ignore[no-untyped-def]
    breaker(store)
    with pytest.raises(StoreError, match=message):
        open_xp_store(store)


def test_open_missing_path_and_non_store(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        open_xp_store(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError):
        open_xp_store(tmp_path / "plain")


def test_corrupted_chunk_is_an_error_not_wrong_values(store: Path) -> None:
    chunk = store / schema.COEFFICIENTS / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        open_xp_store(store).coefficients.values  # noqa: B018


def test_store_id_is_stable_and_differs_between_stores(tmp_path: Path) -> None:
    a = write_xp_store(tmp_path / "a.zarr", **_arrays(6))
    b = write_xp_store(tmp_path / "b.zarr", **_arrays(6))  # same data, another store
    assert store_id(a) == store_id(open_xp_store(a)) == store_id(str(a))
    assert store_id(a) != store_id(b)
    with pytest.raises(StoreError, match="no store_id"):
        store_id(xr.Dataset())


def test_overwrite_rules(tmp_path: Path, store: Path) -> None:
    with pytest.raises(OutputExistsError, match="already exists"):
        write_xp_store(store, **_arrays(3))
    write_xp_store(store, **_arrays(3), overwrite=True)
    assert open_xp_store(store).sizes[schema.SOURCE] == 3
    (tmp_path / "docs").mkdir()
    with pytest.raises(OutputExistsError, match="not a Zarr store"):
        write_xp_store(tmp_path / "docs", **_arrays(3), overwrite=True)
