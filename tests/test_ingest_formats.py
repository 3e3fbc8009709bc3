"""Every XP file a user downloads ingests: each encoding and layout of FORMAT.md, real and written.

The reference is the real bulk-style ECSV (3 sources, one of them DR3's RP-only source): the
tests write the same rows as FITS (variable- and fixed-length arrays), VOTable (BINARY, BINARY2,
TABLEDATA), DPAC AVRO, Parquet, zip bundles, gzip-wrapped files, per-coefficient CSV and
in-memory tables, and check the values are the float32 of what each file holds, the RP-only
source keeps its NaN band and flag, and bad files get one clear message.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import shared_path

import xpbatch
from xpbatch import dr3, schema
from xpbatch.errors import CatalogError, ParseError
from xpbatch.ingest import ingest_files, parse_xp_file, sniff
from xpbatch.schema import InputFlag
from xpbatch.store.reader import open_xp_store

RP_ONLY = 5405570973190252288
SCALARS = tuple(schema.DR3_SCALARS)
ARRAYS = [f"{b}_{a}" for b in dr3.BANDS for a in dr3.ARRAYS]


# --- the reference rows ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rows() -> dict[str, Any]:
    """The bulk-style ECSV's columns: scalars as float64 (NaN = null), arrays as lists or None."""
    path = shared_path("dr3", "samples", "XP_CONTINUOUS_bulk_style_null.ecsv")
    table = pacsv.read_csv(
        io.BytesIO(b"\n".join(ln for ln in path.read_bytes().splitlines() if ln[:1] != b"#")),
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(dr3.COLUMNS, pa.string()),
            null_values=["null"],
            strings_can_be_null=True,
        ),
    )
    out: dict[str, Any] = {}
    for name in dr3.COLUMNS:
        cells = table.column(name).to_pylist()
        if name in ARRAYS:
            out[name] = [None if c is None else json.loads(c) for c in cells]
        elif name in (dr3.SOURCE_ID, dr3.SOLUTION_ID):
            out[name] = np.array([int(c) for c in cells], dtype=np.int64)
        else:
            out[name] = np.array([np.nan if c is None else float(c) for c in cells])
    return out


def _expected(rows: dict[str, Any], kind: str) -> np.ndarray:
    """(3, 110) float32 of the file's coefficients or errors, NaN for the missing band."""
    bands = []
    for band in dr3.BANDS:
        cells = rows[f"{band}_{kind}"]
        bands.append(np.array([c if c is not None else [np.nan] * 55 for c in cells]))
    return np.hstack(bands).astype(np.float32)


def _assert_rows(parsed: Any, rows: dict[str, Any], *, scalars: bool = True) -> None:
    order = np.argsort(parsed.source_id)
    expected_order = np.argsort(rows[dr3.SOURCE_ID])
    np.testing.assert_array_equal(parsed.source_id[order], rows[dr3.SOURCE_ID][expected_order])
    for kind, got in (
        ("coefficients", parsed.coefficients),
        ("coefficient_errors", parsed.coefficient_errors),
    ):
        np.testing.assert_array_equal(got[order], _expected(rows, kind)[expected_order], kind)
    rp_only = parsed.source_id[order] == RP_ONLY
    assert np.isnan(parsed.coefficients[order][rp_only, :55]).all()
    assert np.isfinite(parsed.coefficients[order][rp_only, 55:]).all()
    if scalars:
        np.testing.assert_array_equal(
            parsed.scalars["rp_chi_squared"][order],
            rows["rp_chi_squared"][expected_order].astype(np.float32),
        )
        n_par = parsed.scalars["bp_n_parameters"][order]
        assert n_par[rp_only].tolist() == [-1] and (n_par[~rp_only] == 55).all()


# --- writers: the same rows in each encoding ------------------------------------------------------
def _astropy_table(rows: dict[str, Any], *, fixed: bool = False) -> Any:
    """The rows as astroquery returns them: masked scalars, arrays variable-length (or fixed,
    NaN-filled for the missing band)."""
    from astropy.table import MaskedColumn, Table

    columns: dict[str, Any] = {}
    for name, dtype in dr3.COLUMNS.items():
        values = rows[name]
        if name in ARRAYS:
            if fixed:
                width = len(next(c for c in values if c is not None))
                columns[name] = np.array([c if c else [np.nan] * width for c in values], dtype)
            else:
                cells = np.empty(len(values), dtype=object)
                for i, cell in enumerate(values):
                    data = np.asarray(cell or [], dtype=dtype)
                    cells[i] = np.ma.array(data, mask=np.zeros(len(data), bool))
                columns[name] = cells
        else:
            missing = np.isnan(values) if values.dtype.kind == "f" else np.zeros(len(values), bool)
            data = np.where(missing, 0, values).astype(dtype)
            columns[name] = MaskedColumn(data, mask=missing)
    return Table(columns)


def _write_fits(rows: dict[str, Any], path: Path, *, fixed: bool = False) -> Path:
    _astropy_table(rows, fixed=fixed).write(path, format="fits")
    return path


def _write_votable(rows: dict[str, Any], path: Path, fmt: str) -> Path:
    from astropy.io.votable import from_table
    from astropy.io.votable.tree import Field

    votable = from_table(_astropy_table(rows))
    fields = votable.get_first_table().fields
    for i, field in enumerate(fields):
        if field.datatype in ("short", "int", "long"):
            field.values.null = -32768  # BINARY needs a null value for masked integers
        if field.name in ARRAYS:  # declared as the archive does (astropy guesses from values)
            datatype = "double" if dr3.COLUMNS[field.name] == "float64" else "float"
            fields[i] = Field(votable, name=field.name, datatype=datatype, arraysize="*")
    votable.to_xml(str(path), tabledata_format=fmt)
    return path


def _covariance(errors: list[float], std: float, seed: int) -> np.ndarray:
    """A packed covariance (tril_indices(n), row-major) without the standard-deviation scaling."""
    n = len(errors)
    a = np.random.default_rng(seed).normal(size=(n, n))
    corr = np.corrcoef(a @ a.T + n * np.eye(n))
    scale = np.asarray(errors) / std
    return (corr * np.outer(scale, scale))[np.tril_indices(n)]


def _write_avro(rows: dict[str, Any], path: Path, *, basis: int | None = None) -> Path:
    """DPAC-style records; returns the path. Errors follow from the covariance as DR3's do."""
    import fastavro

    solution = {
        "type": "record",
        "name": "UncompressedLsqSolution",
        "fields": [
            {"name": "parameters", "type": ["null", {"type": "array", "items": "double"}]},
            {"name": "covariance", "type": ["null", {"type": "array", "items": "double"}]},
            {"name": "numberOfParameters", "type": "int"},
            {"name": "standardDeviation", "type": "double"},
            {"name": "chiSquared", "type": "double"},
            {"name": "degreesOfFreedom", "type": "int"},
            {"name": "numberOfMeasurements", "type": "int"},
            {"name": "numberOfRejectedMeasurements", "type": "int"},
        ],
    }
    spec = {
        "type": "record",
        "name": "ContinuousSpectrum",
        "fields": [
            {"name": "basisFunctionSetDefId", "type": "int"},
            {"name": "NRelevantBases", "type": "int"},
            {"name": "relativeShrinking", "type": "double"},
            {"name": "solution", "type": ["null", solution]},
        ],
    }
    schema_ = fastavro.parse_schema(
        {
            "type": "record",
            "name": "MeanSpectrumSolutionWithCov",
            "fields": [
                {"name": "sourceId", "type": "long"},
                {"name": "solutionId", "type": "long"},
                {"name": "bpSpec", "type": ["null", spec]},
                {"name": "rpSpec", "type": ["null", "ContinuousSpectrum"]},
            ],
        }
    )
    records = []
    for i, sid in enumerate(rows[dr3.SOURCE_ID].tolist()):
        record: dict[str, Any] = {"sourceId": sid, "solutionId": int(rows[dr3.SOLUTION_ID][i])}
        for band, key in dr3.AVRO_BAND.items():
            coefficients = rows[f"{band}_coefficients"][i]
            if coefficients is None:
                record[key] = None
                continue
            std = float(rows[f"{band}_standard_deviation"][i])
            errors = rows[f"{band}_coefficient_errors"][i]
            record[key] = {
                "basisFunctionSetDefId": dr3.BASIS_FUNCTION_ID[band] if basis is None else basis,
                "NRelevantBases": int(rows[f"{band}_n_relevant_bases"][i]),
                "relativeShrinking": float(rows[f"{band}_relative_shrinking"][i]),
                "solution": {
                    "parameters": coefficients,
                    "covariance": _covariance(errors, std, i).tolist(),
                    "numberOfParameters": len(coefficients),
                    "standardDeviation": std,
                    "chiSquared": float(rows[f"{band}_chi_squared"][i]),
                    "degreesOfFreedom": int(rows[f"{band}_degrees_of_freedom"][i]),
                    "numberOfMeasurements": int(rows[f"{band}_n_measurements"][i]),
                    "numberOfRejectedMeasurements": int(rows[f"{band}_n_rejected_measurements"][i]),
                },
            }
        records.append(record)
    with open(path, "wb") as f:
        fastavro.writer(f, schema_, records)
    return path


def _avro_errors(rows: dict[str, Any]) -> np.ndarray:
    """float32 of sqrt(diag(covariance)) * standardDeviation, as the AVRO file holds them."""
    out = np.full((len(rows[dr3.SOURCE_ID]), 110), np.nan)
    for i in range(len(out)):
        for b, band in enumerate(dr3.BANDS):
            errors = rows[f"{band}_coefficient_errors"][i]
            if errors is None:
                continue
            std = float(rows[f"{band}_standard_deviation"][i])
            cov = _covariance(errors, std, i)
            diagonal = cov[np.arange(55) * (np.arange(55) + 3) // 2]
            out[i, 55 * b : 55 * (b + 1)] = np.sqrt(diagonal) * std
    return out.astype(np.float32)


def _arrow(rows: dict[str, Any]) -> pa.Table:
    columns = {}
    for name, dtype in dr3.COLUMNS.items():
        values = rows[name]
        if name in ARRAYS:
            columns[name] = pa.array(values, pa.list_(pa.float64()))
        else:
            columns[name] = pa.array(
                values, mask=np.isnan(values) if values.dtype.kind == "f" else None
            )
            if dtype.startswith("int") and name not in (dr3.SOURCE_ID, dr3.SOLUTION_ID):
                columns[name] = columns[name].cast(pa.int16())
    return pa.table(columns)


def _write_parquet(rows: dict[str, Any], path: Path) -> Path:
    pq.write_table(_arrow(rows), path)
    return path


def _write_per_coefficient_csv(rows: dict[str, Any], path: Path) -> Path:
    """As a researcher flattens them: BP_COEFF_0..54, E_BP_COEFF_0..54 (upper case), integers
    written as floats (pandas' 55.0), Java-style exponents."""
    import pandas as pd

    frame: dict[str, Any] = {"SOURCE_ID": rows[dr3.SOURCE_ID]}
    for band in dr3.BANDS:
        frame[f"{band.upper()}_N_PARAMETERS"] = rows[f"{band}_n_parameters"]  # float: 55.0, NaN
        for prefix, kind in (("", "coefficients"), ("E_", "coefficient_errors")):
            cells = rows[f"{band}_{kind}"]
            matrix = np.array([c if c is not None else [np.nan] * 55 for c in cells])
            for k in range(55):
                frame[f"{prefix}{band.upper()}_COEFF_{k}"] = matrix[:, k]
    frame["RP_CHI_SQUARED"] = rows["rp_chi_squared"]
    text = pd.DataFrame(frame).to_csv(index=False, float_format="%.17g")
    path.write_text(text.replace("e+", "E"))
    return path


# --- 1. the real files in ../shared/dr3/peer ------------------------------------------------------
PEER_FILES = [
    "XP_CONTINUOUS_RAW.fits",
    "XP_CONTINUOUS_RAW.xml",
    "XP_CONTINUOUS_RAW_plain.xml",
    "MeanSpectrumSolutionWithCov.avro",
]


@pytest.mark.parametrize("name", PEER_FILES)
def test_real_peer_files_read_like_the_archive_csv(name: str) -> None:
    """Same source_ids, coefficients, errors and correlations, float32-exact, as the CSV."""
    csv = parse_xp_file(
        shared_path("dr3", "samples", "XP_CONTINUOUS_RAW.csv"),
        scalars=SCALARS,
        with_correlations=True,
    )
    other = parse_xp_file(shared_path("dr3", "peer", name), scalars=SCALARS, with_correlations=True)
    a, b = np.argsort(csv.source_id), np.argsort(other.source_id)
    np.testing.assert_array_equal(other.source_id[b], csv.source_id[a])
    np.testing.assert_array_equal(other.coefficients[b], csv.coefficients[a])
    np.testing.assert_array_equal(other.coefficient_errors[b], csv.coefficient_errors[a])
    assert other.correlations is not None and csv.correlations is not None
    for band in dr3.BANDS:
        np.testing.assert_array_equal(other.correlations[band][b], csv.correlations[band][a])
    for name_ in ("bp_n_parameters", "rp_basis_function_id", "rp_chi_squared"):
        np.testing.assert_array_equal(other.scalars[name_][b], csv.scalars[name_][a], name_)


@pytest.mark.parametrize("name", PEER_FILES)
def test_real_peer_files_are_recognised_by_content_not_name(name: str, tmp_path: Path) -> None:
    renamed = tmp_path / "download.dat"
    renamed.write_bytes(gzip.compress(shared_path("dr3", "peer", name).read_bytes()))
    parsed = parse_xp_file(renamed)
    assert len(parsed.source_id) == 2 and np.isfinite(parsed.coefficients).all()


# --- 2. files the tests write: every encoding, the RP-only source included ------------------------
WRITERS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "fits-variable-length": lambda r, d: _write_fits(r, d / "xp.fits"),
    "fits-fixed-length": lambda r, d: _write_fits(r, d / "xp_fixed.fits", fixed=True),
    "votable-binary2": lambda r, d: _write_votable(r, d / "xp2.xml", "binary2"),
    "votable-binary": lambda r, d: _write_votable(r, d / "xp1.xml", "binary"),
    "votable-tabledata": lambda r, d: _write_votable(r, d / "xp0.xml", "tabledata"),
    "parquet": lambda r, d: _write_parquet(r, d / "xp.parquet"),
    "per-coefficient-csv": lambda r, d: _write_per_coefficient_csv(r, d / "flat.csv"),
}


@pytest.mark.parametrize("encoding", WRITERS)
def test_each_encoding_reads_the_float32_of_what_it_holds(
    encoding: str, rows: dict[str, Any], tmp_path: Path
) -> None:
    path = WRITERS[encoding](rows, tmp_path)
    parsed = parse_xp_file(path, scalars=SCALARS)
    _assert_rows(parsed, rows)


def test_avro_errors_are_the_scaled_covariance_diagonal(rows: dict[str, Any], tmp_path: Path):  # type: ignore[no-untyped-def]
    parsed = parse_xp_file(_write_avro(rows, tmp_path / "xp.avro"), scalars=SCALARS)
    np.testing.assert_array_equal(parsed.source_id, rows[dr3.SOURCE_ID])
    np.testing.assert_array_equal(parsed.coefficients, _expected(rows, "coefficients"))
    np.testing.assert_array_equal(parsed.coefficient_errors, _avro_errors(rows))
    rp_only = parsed.source_id == RP_ONLY
    assert np.isnan(parsed.coefficients[rp_only, :55]).all()
    assert parsed.scalars["bp_basis_function_id"][rp_only].tolist() == [-1]


def test_a_zip_bundle_of_one_votable_per_source(rows: dict[str, Any], tmp_path: Path) -> None:
    """The archive's DataLink download: one file per source, in a zip."""
    bundle = tmp_path / "datalink.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        for i, sid in enumerate(rows[dr3.SOURCE_ID].tolist()):
            one = {k: v[i : i + 1] for k, v in rows.items()}
            path = _write_votable(one, tmp_path / f"XP_CONTINUOUS-Gaia DR3 {sid}.xml", "binary2")
            archive.write(path, path.name)
        archive.writestr("README.txt", "not an XP file")
    _assert_rows(parse_xp_file(bundle, scalars=SCALARS), rows)


# --- 3. the store: G from the XP file, positions, ingest_table ------------------------------------
def _subset_csv(rows: dict[str, Any], path: Path, *, with_mag: bool = True) -> Path:
    """The archive CSV of a user's column choice: source_id, n_parameters, G mag, the arrays."""
    header = ["source_id", "bp_n_parameters", "rp_n_parameters"]
    header += ["phot_g_mean_mag", "ra", "dec"] if with_mag else []
    header += [f"{b}_{a}" for b in dr3.BANDS for a in ("coefficients", "coefficient_errors")]
    lines = [",".join(header)]
    for i, sid in enumerate(rows[dr3.SOURCE_ID].tolist()):
        cells = [str(sid)]
        for band in dr3.BANDS:
            n = rows[f"{band}_n_parameters"][i]
            cells.append("" if np.isnan(n) else str(int(n)))
        if with_mag:
            cells += [str(14.0 + i), str(10.5 + i), str(-20.25 - i)]
        for name in header[len(cells) :]:
            cell = rows[name][i]
            cells.append("" if cell is None else '"(' + ", ".join(map(repr, cell)) + ')"')
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_g_flux_and_positions_from_the_xp_file_itself(rows: dict[str, Any], tmp_path: Path) -> None:
    out = ingest_files([_subset_csv(rows, tmp_path / "subset.csv")], [], tmp_path / "s.zarr").path
    ds = open_xp_store(out)
    i = np.argsort(rows[dr3.SOURCE_ID])
    mags = (14.0 + np.arange(3))[i]
    expected = 10 ** ((schema.G_ZERO_POINT_MAG - mags) / 2.5)
    np.testing.assert_allclose(ds.phot_g_mean_flux.values, expected, rtol=1e-12)
    flags = ds.input_flags.values
    assert (flags & (InputFlag.G_FLUX_FROM_MAG | InputFlag.G_FLUX_FROM_XP_FILE) != 0).all()
    rp_only = ds.source_id.values == RP_ONLY
    assert flags[rp_only][0] & InputFlag.BP_MISSING
    np.testing.assert_array_equal(ds.ra.values, (10.5 + np.arange(3))[i])
    np.testing.assert_array_equal(ds.dec.values, (-20.25 - np.arange(3))[i])
    assert ds.ra.attrs["units"] == "deg" and ds.ra.attrs["frame"] == "ICRS"
    assert "bp_chi_squared" not in ds  # the file has no such column: none, not a refusal


def test_a_companion_wins_over_the_xp_files_own_g(rows: dict[str, Any], tmp_path: Path) -> None:
    gaia = tmp_path / "gaia_source.csv"
    sid = rows[dr3.SOURCE_ID]
    gaia.write_text(
        "source_id,phot_g_mean_flux,ra,dec\n" + "\n".join(f"{s},1000.5,1.0,2.0" for s in sid[:2])
    )
    out = ingest_files(
        [_subset_csv(rows, tmp_path / "subset.csv")], [gaia], tmp_path / "s.zarr"
    ).path
    ds = open_xp_store(out)
    from_companion = np.isin(ds.source_id.values, sid[:2])
    assert (ds.phot_g_mean_flux.values[from_companion] == 1000.5).all()
    flags = ds.input_flags.values
    assert not (flags[from_companion] & InputFlag.G_FLUX_FROM_XP_FILE).any()
    assert (flags[~from_companion] & InputFlag.G_FLUX_FROM_XP_FILE).all()
    assert (ds.ra.values[from_companion] == 1.0).all()
    assert ds.ra.values[~from_companion][0] == 10.5 + 2  # the third row's own position


@pytest.mark.parametrize("kind", ["astropy", "astropy-fixed", "pandas"])
def test_ingest_table_builds_the_same_store_as_the_file(
    kind: str, rows: dict[str, Any], tmp_path: Path
) -> None:
    gaia = tmp_path / "gaia_source.csv"
    gaia.write_text(
        "source_id,phot_g_mean_flux\n" + "\n".join(f"{s},{1e5 + s % 7}" for s in rows["source_id"])
    )
    if kind == "pandas":
        table = _arrow(rows).to_pandas()
    else:
        table = _astropy_table(rows, fixed=kind == "astropy-fixed")
    from_table = open_xp_store(
        xpbatch.ingest_table(table, tmp_path / "t.zarr", gaia_source_files=[gaia]).path
    )
    path = _write_fits(rows, tmp_path / "xp.fits")
    from_file = open_xp_store(ingest_files([path], [gaia], tmp_path / "f.zarr").path)
    for name in from_file.variables:
        np.testing.assert_array_equal(from_table[name].values, from_file[name].values, name)
    assert not (tmp_path / "t.zarr.table.parquet").exists()


def test_column_mapping_for_other_names(rows: dict[str, Any], tmp_path: Path) -> None:
    flat = _write_per_coefficient_csv(rows, tmp_path / "flat.csv")
    text = flat.read_text().replace("E_BP_COEFF_", "BPERR").replace("E_RP_COEFF_", "RPERR")
    flat.write_text(text.replace("SOURCE_ID", "gaia_id"))
    with pytest.raises(ParseError, match=r"needs source_id .* --columns"):
        parse_xp_file(flat)
    columns = [
        ("source_id", "gaia_id"),
        ("bp_coefficient_errors", "BPERR{i}"),
        ("rp_coefficient_errors", "RPERR{i}"),
    ]
    _assert_rows(parse_xp_file(flat, columns=columns), rows, scalars=False)


# --- 4. refused: other bases, other lengths, broken and unknown files -----------------------------
def _truncated_fits(rows: dict[str, Any], d: Path) -> Path:
    data = _write_fits(rows, d / "whole.fits").read_bytes()
    (d / "cut.fits").write_bytes(data[: len(data) // 2])
    return d / "cut.fits"


def _broken_xml(rows: dict[str, Any], d: Path) -> Path:
    text = _write_votable(rows, d / "whole.xml", "tabledata").read_text()
    (d / "broken.xml").write_text(text.replace("</TR>", "</TD>", 1))
    return d / "broken.xml"


def _other_avro(rows: dict[str, Any], d: Path) -> Path:
    import fastavro

    schema_ = {"type": "record", "name": "Other", "fields": [{"name": "x", "type": "int"}]}
    with open(d / "other.avro", "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(schema_), [{"x": 1}])
    return d / "other.avro"


def _short_arrays(rows: dict[str, Any], d: Path) -> Path:
    short = dict(rows)
    for name in ("rp_coefficients", "rp_coefficient_errors"):
        short[name] = [None if c is None else c[:51] for c in rows[name]]
    return _write_parquet(short, d / "short.parquet")


BAD = {
    "truncated FITS": (_truncated_fits, r"cut\.fits: cannot read this FITS file .* truncated"),
    "invalid XML": (_broken_xml, r"broken\.xml, line \d+: not a readable VOTable"),
    "AVRO of another schema": (_other_avro, r"other\.avro: an AVRO file of another schema"),
    "another basis (AVRO)": (
        lambda r, d: _write_avro(r, d / "b0.avro", basis=0),
        r"b0\.avro, row 1: bp_basis_function_id is 0, not Gaia DR3's 56",
    ),
    "another coefficient count": (
        _short_arrays,
        r"short\.parquet, row 1: rp_coefficients has 51 values; a Gaia DR3 spectrum has 55",
    ),
    "not a supported format": (
        lambda r, d: (d / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)) and d / "x.png",
        r"x\.png: not an XP file in a format xpbatch reads .* supported: CSV/ECSV .* VOTable",
    ),
}


@pytest.mark.parametrize(("make", "message"), BAD.values(), ids=BAD.keys())
def test_bad_files_get_one_clear_message(
    make: Callable[[dict[str, Any], Path], Path], message: str, rows: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(ParseError, match=message):
        parse_xp_file(make(rows, tmp_path))


def test_skip_keeps_the_dr3_rows_and_records_the_others(rows: dict[str, Any], tmp_path: Path):  # type: ignore[no-untyped-def]
    parsed = parse_xp_file(_short_arrays(rows, tmp_path), on_bad_row="skip")
    assert parsed.source_id.tolist() == [RP_ONLY] or len(parsed.source_id) == 0
    assert {b.unit for b in parsed.bad_rows} == {"row"} and len(parsed.bad_rows) >= 2


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"SIMPLE  =                    T", "fits"),
        (b'<?xml version="1.0"?><VOTABLE', "votable"),
        (b"\xef\xbb\xbf<VOTABLE version", "votable"),
        (b"Obj\x01\x04\x14avro.codec", "avro"),
        (b"PAR1\x15\x04", "parquet"),
        (b"PK\x03\x04\x14\x00", "zip"),
        (b"# %ECSV 1.0\nsource_id,", "text"),
        (b"source_id,bp_coefficients\n1,", "text"),
        (b"\x89PNG\r\n\x1a\n", None),
    ],
)
def test_formats_are_recognised_from_their_first_bytes(head: bytes, kind: str | None) -> None:
    assert sniff(head) == kind


def test_the_cli_ingests_a_votable_carrying_its_own_g(
    rows: dict[str, Any],
    tmp_path: Path,
    dask_client,  # type: ignore[no-untyped-def]
) -> None:
    from click.testing import CliRunner

    from xpbatch.cli.main import main

    table = _astropy_table(rows)
    table["phot_g_mean_flux"] = np.array([1e5, 2e5, 3e5])
    table.write(tmp_path / "xp.vot", format="votable", tabledata_format="binary2")
    out = tmp_path / "s.zarr"
    address = dask_client.scheduler.address
    args = ["ingest", str(tmp_path / "xp.vot"), "-o", str(out), "--cluster", address]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "rows           3 from 1 XP file(s)" in result.output
    ds = open_xp_store(out)
    assert (ds.input_flags.values & InputFlag.G_FLUX_FROM_XP_FILE).all()
    bad = CliRunner().invoke(main, [*args[:-2], "--columns", "nonsense", "--overwrite"])
    assert bad.exit_code == 2 and "DR3_NAME=FILE_NAME" in bad.output


@pytest.mark.parametrize(
    ("ra", "dec"), [("nan", "2.0"), ("400", "2.0"), ("1.0", "inf"), ("1.0", "-100")]
)
def test_a_companion_position_that_is_no_position_is_flagged_and_dropped(
    rows: dict[str, Any], tmp_path: Path, ra: str, dec: str
) -> None:
    """Not finite or out of range: stored as NaN and flagged POSITION_INVALID, so export-hats and
    skymap see a row without a position (placed by source_id on request) instead of failing."""
    from xpbatch.products.sky_positions import SkySource

    gaia = tmp_path / "gaia_source.csv"
    sid = rows[dr3.SOURCE_ID]
    good = "\n".join(f"{s},1000.5,1.0,2.0" for s in sid[1:])
    gaia.write_text(f"source_id,phot_g_mean_flux,ra,dec\n{sid[0]},1000.5,{ra},{dec}\n{good}\n")
    store = ingest_files(
        [_subset_csv(rows, tmp_path / "subset.csv", with_mag=False)], [gaia], tmp_path / "s.zarr"
    ).path
    ds = open_xp_store(store)
    bad = ds.source_id.values == sid[0]
    flags = ds.input_flags.values
    assert (flags[bad] & InputFlag.POSITION_INVALID).all()
    assert not (flags[~bad] & InputFlag.POSITION_INVALID).any()
    assert np.isnan(ds.ra.values[bad]).all() and np.isnan(ds.dec.values[bad]).all()
    assert (ds.ra.values[~bad] == 1.0).all()
    # a catalogue of it: the flag carries over, the row has no position
    from xpbatch.config import EncodeConfig
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.model.trained import TrainedModel

    catalog = tmp_path / "c.zarr"
    config = EncodeConfig(progress_bar=False, check_fit=False)
    encode_catalog(store, TrainedModel.untrained(), catalog, config=config)
    with pytest.raises(CatalogError, match="no valid ra/dec"):
        SkySource.open(catalog).read(0, ())
    values = SkySource.open(catalog, positions_from_source_id=True).read(0, ())
    assert values["position_from_source_id"].sum() == 1
    assert np.isfinite(values["ra"]).all()
