"""The text of DR3 bulk files: ECSV ``#`` headers and CSV lines of mock rows.

The format of the DR3 CDN's bulk files: JSON arrays in double quotes, ``null`` in
every field of a missing band, floats as the shortest decimal that reads back exactly. Column
names, order, dtypes and the archive's ECSV metadata come from :mod:`xpbatch.dr3`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xpbatch import dr3, schema
from xpbatch.mock.instrument import packed_correlations
from xpbatch.mock.rows import MockRows
from xpbatch.schema import N_BP, N_RP


class Column(NamedTuple):
    """A column of a bulk file as its ECSV header describes it."""

    name: str
    datatype: str
    ucd: str
    description: str
    subtype: str | None = None


def _column(name: str, spec: dr3.Column, band: str = "") -> Column:
    """The ECSV description of a DR3 column (an array is a string of a JSON list)."""
    description = spec.description.format(B=band.upper())
    if name.endswith(dr3.ARRAYS):
        return Column(name, "string", spec.ucd, description, f"{spec.dtype}[null]")
    return Column(name, spec.dtype, spec.ucd, description)


XP_COLUMNS = (
    *(_column(name, spec) for name, spec in dr3.KEY_COLUMN_SPECS.items()),
    *(
        _column(dr3.band_column(band, name), spec, band)
        for band in dr3.BANDS
        for name, spec in dr3.BAND_COLUMN_SPECS.items()
    ),
)
"""gaiadr3.xp_continuous_mean_spectrum as the DR3 bulk files describe it."""
GAIA_SOURCE_COLUMNS = tuple(
    _column(name, spec) for name, spec in dr3.GAIA_SOURCE_COLUMN_SPECS.items()
)
"""The GaiaSource companion files' columns."""


def ecsv_header(columns: tuple[Column, ...], generator: str) -> bytes:
    """The ``#`` ECSV header of a bulk file, then the CSV line of column names."""
    lines = ["%ECSV 1.0", "---", "delimiter: ','", "datatype:"]
    for column in columns:
        lines += ["-", f"  name: {column.name}", f"  datatype: {column.datatype}"]
        if column.subtype:
            lines.append(f"  subtype: '{column.subtype}'")
        lines += [f"  description: {column.description}", "  meta:", f"    ucd: {column.ucd}"]
    lines += ["meta:", f"  generator: '{generator}'"]
    header = "".join(f"# {line}\n" for line in lines) + ",".join(c.name for c in columns) + "\n"
    return header.encode()


def _float_text(values: np.ndarray) -> pa.Array:
    """Shortest round-trip decimal of each value (float32 as float32); NaN, Infinity as in JSON."""
    text = pc.cast(pa.array(values), pa.string())
    if not np.isfinite(values).all():
        for mask, token in (
            (np.isnan(values), "NaN"),
            (np.isposinf(values), "Infinity"),
            (np.isneginf(values), "-Infinity"),
        ):
            text = pc.if_else(pa.array(mask), token, text)
    return text


def _json_arrays(matrix: np.ndarray) -> pa.Array:
    """Each row of a (rows, k) array as a double-quoted JSON array: ``"[1.5,-2.25,...]"``."""
    rows, width = matrix.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, _float_text(matrix.reshape(-1)))
    return pc.binary_join_element_wise('"[', pc.binary_join(lists, ","), ']"', "")


@functools.cache
def _correlation_text(band: str) -> pa.Array:
    """The double-quoted JSON text of each correlation template of one band."""
    return _json_arrays(packed_correlations(band))


def _null_where(mask: np.ndarray, text: pa.Array) -> pa.Array:
    """``null`` (the bulk files' missing value) where ``mask``."""
    return pc.if_else(pa.array(mask), "null", text) if mask.any() else text


def _csv_lines(columns: list[pa.Array]) -> memoryview:
    """The bytes of the CSV lines of these text columns (one ``\\n``-terminated line a row)."""
    lines = pc.binary_join_element_wise(pc.binary_join_element_wise(*columns, ","), "", "\n")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
    first, last = offsets[lines.offset], offsets[lines.offset + len(lines)]
    return memoryview(lines.buffers()[2])[first:last]


def xp_text(rows: MockRows) -> memoryview:
    """The bulk-file lines of ``rows`` (gaiadr3.xp_continuous_mean_spectrum columns)."""
    columns = [
        pc.cast(pa.array(rows.source_id), pa.string()),
        pc.cast(pa.array(rows.scalars["solution_id"]), pa.string()),
    ]
    for b, band in enumerate(schema.BANDS):
        missing = rows.scalars[f"{band}_n_parameters"] < 0
        part = slice(0, N_BP) if band == "bp" else slice(N_BP, N_BP + N_RP)
        arrays = {
            # float32 values written as float64 text: every reader gets the same float32 back
            "coefficients": _json_arrays(rows.coefficients[:, part].astype(np.float64)),
            "coefficient_errors": _json_arrays(rows.coefficient_errors[:, part]),
            "coefficient_correlations": _correlation_text(band).take(
                pa.array(rows.correlation_template[:, b])
            ),
        }
        for name in dr3.BAND_COLUMN_SPECS:
            text = arrays.get(name)
            if text is None:
                text = _float_text(rows.scalars[dr3.band_column(band, name)])
            columns.append(_null_where(missing, text))
    return _csv_lines(columns)


def gaia_source_text(rows: MockRows) -> memoryview:
    """The GaiaSource companion lines of ``rows``: source_id, ra, dec and the G photometry."""
    missing = np.isnan(rows.phot_g_mean_flux)
    columns = [pc.cast(pa.array(rows.source_id), pa.string())]
    columns += [_float_text(rows.ra), _float_text(rows.dec)]
    for values in (rows.phot_g_mean_flux, rows.phot_g_mean_flux_error, rows.phot_g_mean_mag):
        columns.append(_null_where(missing, _float_text(values)))
    return _csv_lines(columns)
