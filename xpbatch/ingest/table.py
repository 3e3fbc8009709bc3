"""XP rows held as a table of columns, whatever the encoding: the readers' shared second half.

FITS, VOTable, AVRO, Parquet, per-coefficient CSV and in-memory tables (astropy, pandas) all
become one :class:`pyarrow.Table`; :func:`parse_columns` turns it into the store's columns. Every
layout seen in real use is recognised here: the archive's 26 columns or any subset with
source_id and both bands' coefficients and errors; arrays as list columns (variable or fixed
length) or as one column per coefficient (``bp_coeff_0..54``, ``e_bp_coeff_0..54``, ...);
integers written as floats; any letter case. Arrays are gathered with offsets and fancy
indexing, never value by value.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xpbatch import dr3, schema
from xpbatch.errors import ParseError
from xpbatch.ingest.common import (
    EXTRAS,
    LineMap,
    ParsedFile,
    Problems,
    ReadRequest,
    as_float32,
    check_basis,
    in_range,
    integral,
    numbers,
    parsed_file,
)
from xpbatch.store.xp_store import INT_MISSING

_ARRAY_NAMES = {"coefficients": "coefficients", "coefficient_errors": "coefficient_errors"}
# One column per coefficient, as researchers flatten them: bp_coeff_0, bp_coefficients_0,
# e_bp_coeff_0, bp_coeff_err_0, bp_coefficient_errors_0 (any case).
_PER_COEFFICIENT = (
    (re.compile(r"^(bp|rp)_coef(?:f|ficient)?s?_(\d+)$"), "coefficients"),
    (re.compile(r"^e_(bp|rp)_coef(?:f|ficient)?s?_(\d+)$"), "coefficient_errors"),
    (re.compile(r"^(bp|rp)_coef(?:f|ficient)?s?_err(?:or)?s?_(\d+)$"), "coefficient_errors"),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each DR3 column is in a table: DR3 name -> the table's column name(s)."""

    single: dict[str, str]
    """DR3 name -> the one column holding it (scalars, or arrays as list cells)."""
    split: dict[str, list[str]]
    """DR3 array name -> its columns, one per coefficient, in order."""

    def has(self, name: str) -> bool:
        return name in self.single or name in self.split

    @classmethod
    def of(cls, names: Sequence[str], request: ReadRequest, origin: Path) -> Layout:
        """Recognise the columns ``names`` (of the file ``origin``), with the user's mapping."""
        by_lower = {n.lower(): n for n in names}
        single: dict[str, str] = {}
        split: dict[str, dict[int, str]] = {}
        for lower, name in by_lower.items():
            if lower in dr3.COLUMNS or lower in EXTRAS:
                single[lower] = name
                continue
            for pattern, array in _PER_COEFFICIENT:
                match = pattern.match(lower)
                if match:
                    split.setdefault(f"{match.group(1)}_{array}", {})[int(match.group(2))] = name
        for target, given in request.columns:
            target = target.lower()
            if "{i}" in given:
                found = {i: by_lower[given.format(i=i).lower()] for i in range(len(names))
                         if given.format(i=i).lower() in by_lower}  # fmt: skip
                if not found:
                    raise ParseError(f"{origin}: --columns {target}={given}: no column matches")
                split[target] = found
                single.pop(target, None)
            else:
                if given.lower() not in by_lower:
                    raise ParseError(
                        f"{origin}: --columns {target}={given}: the file has no column {given!r}; "
                        f"it has {list(names)[:8]}{'...' if len(names) > 8 else ''}"
                    )
                single[target] = by_lower[given.lower()]
                split.pop(target, None)
        ordered = {}
        for array, columns in split.items():
            indices = sorted(columns)
            if indices != list(range(len(indices))):
                raise ParseError(
                    f"{origin}: the columns of {array} are numbered {indices[:5]}...; expected "
                    f"0..{len(indices) - 1} without gaps"
                )
            ordered[array] = [columns[i] for i in indices]
        layout = cls(single, ordered)
        layout.require(names, origin)
        return layout

    def require(self, names: Sequence[str], origin: Path) -> None:
        needed = [dr3.SOURCE_ID] + [
            dr3.band_column(band, array) for band in dr3.BANDS for array in _ARRAY_NAMES
        ]
        missing = [n for n in needed if not self.has(n)]
        if missing:
            raise ParseError(
                f"{origin}: an XP continuous-spectrum table needs source_id and both bands' "
                f"coefficients and coefficient_errors (as array columns, or one column per "
                f"coefficient like bp_coeff_0..54 and e_bp_coeff_0..54); missing {missing}; the "
                f"file has {list(names)[:8]}{'...' if len(names) > 8 else ''}. Name other "
                "columns with --columns DR3_NAME=FILE_NAME (e.g. bp_coefficients=bp_coef_{i})."
            )


def parse_table(
    table: pa.Table, path: Path, request: ReadRequest, file_info: dict[str, Any]
) -> ParsedFile:
    """Parse a table of XP rows (rows count from 1 in messages)."""
    layout = Layout.of(table.column_names, request, path)
    problems = Problems(path, LineMap(1), unit="row")
    columns = parse_columns(table, layout, request, problems)
    return parsed_file(path, columns, problems, file_info, request)


def parse_columns(
    table: pa.Table, layout: Layout, request: ReadRequest, problems: Problems
) -> dict[str, np.ndarray]:
    """The store's columns of one table: source_id, coefficients, errors, scalars, extras."""
    n = table.num_rows
    source_id = _integers(table.column(layout.single[dr3.SOURCE_ID]), "source_id", problems, 0)
    problems.add(np.flatnonzero(source_id <= 0), "source_id is missing or not positive")
    out: dict[str, np.ndarray] = {schema.SOURCE_ID: source_id}
    coefficients, errors = [], []
    for band in dr3.BANDS:
        width = dr3.N_COEFFICIENTS[band]
        declared = _optional_integers(table, layout, f"{band}_n_parameters", problems, n)
        arrays = {}
        for array in ("coefficients", "coefficient_errors"):
            name = dr3.band_column(band, array)
            values, length = _array(table, layout, name, width, problems, n)
            arrays[array] = (values, length)
        (coeff, n_coeff), (err, n_err) = arrays["coefficients"], arrays["coefficient_errors"]
        present = n_coeff > 0
        _check_lengths(band, width, present, n_coeff, n_err, declared, problems)
        basis = _optional_integers(table, layout, f"{band}_basis_function_id", problems, n)
        check_basis(basis, present, band, problems, 0)
        coefficients.append(as_float32(coeff))
        errors.append(as_float32(err))
        if request.with_correlations:
            name = schema.correlations_name(band)
            width_corr = dr3.n_correlations(width)
            if layout.has(name):
                corr, n_corr = _array(table, layout, name, width_corr, problems, n)
                _check_width(name, n_corr, width_corr, problems)
            else:
                corr = np.full((n, width_corr), np.nan)
            out[name] = as_float32(corr)
    out[schema.COEFFICIENTS] = np.hstack(coefficients)  # (rows, 110): BP then RP
    out[schema.COEFFICIENT_ERRORS] = np.hstack(errors)
    for name in request.scalars:
        if layout.has(name):
            out[name] = _scalar(table.column(layout.single[name]), name, problems)
    for name in EXTRAS:
        if name in layout.single:
            out[name] = _floats(table.column(layout.single[name]), name, problems)
    return out


def _check_lengths(
    band: str,
    width: int,
    present: np.ndarray,
    n_coeff: np.ndarray,
    n_err: np.ndarray,
    declared: np.ndarray,
    problems: Problems,
) -> None:
    """A present band has DR3's count of coefficients, as many errors, and says so."""
    name = f"{band}_coefficients"
    other = np.flatnonzero(present & (n_coeff != width))
    problems.add(
        other,
        lambda r: (
            f"{name} has {n_coeff[r]} values; a Gaia DR3 spectrum has {width} per band (another "
            "release or a test solution cannot share a store with DR3 spectra)"
        ),
    )
    mismatch = np.flatnonzero(n_coeff != n_err)
    problems.add(
        mismatch,
        lambda r: f"{band}_coefficient_errors has {n_err[r]} values, {name} has {n_coeff[r]}",
    )
    said = np.flatnonzero(present & (declared >= 0) & (declared != n_coeff))
    problems.add(said, lambda r: f"{name} has {n_coeff[r]} values but n_parameters says "
                                 f"{declared[r]}")  # fmt: skip


def _check_width(name: str, length: np.ndarray, width: int, problems: Problems) -> None:
    wrong = np.flatnonzero((length > 0) & (length != width))
    problems.add(wrong, lambda r: f"{name} has {length[r]} values, not {width}")


def _array(
    table: pa.Table, layout: Layout, name: str, width: int, problems: Problems, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, width) float64 of an array column (NaN where missing), and each row's length.

    A missing band (null, zero-length, or all its split columns empty) has length 0; a row of
    another length keeps NaN values and is reported by the caller.
    """
    if name in layout.split:
        columns = [_floats(table.column(c), c, problems) for c in layout.split[name]]
        values = np.column_stack(columns) if columns else np.empty((n, 0))
        length = np.where(np.isnan(values).all(axis=1), 0, values.shape[1])
        if values.shape[1] != width:
            out = np.full((n, width), np.nan)
            return out, length
        return values, length
    column = table.column(layout.single[name])
    kind = column.type
    if pa.types.is_fixed_size_list(kind):
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        size = kind.list_size
        valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False))
        length = np.where(valid, size, 0)
        if size != width:
            return np.full((n, width), np.nan), length
        # .values keeps the slots of null rows (flatten() drops them): row i is values[i*size:]
        slots = column.values.slice(column.offset * size, n * size)
        values = _float_values(slots).reshape(n, size).copy()
        values[~valid] = np.nan
        return values, length
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        column = pa.concat_arrays(column.chunks) if isinstance(column, pa.ChunkedArray) else column
        if not isinstance(column, pa.ListArray | pa.LargeListArray):  # pragma: no cover
            raise ParseError(f"{problems.path}: {name} is not an array column ({kind})")
        length = np.asarray(pc.fill_null(pc.list_value_length(column), 0), dtype=np.int64)
        offsets = np.asarray(column.offsets, dtype=np.int64)[:-1]
        flat = _float_values(column.values)
        out = np.full((n, width), np.nan)
        rows = np.flatnonzero(length == width)
        if rows.size:  # one gather for all complete rows: (rows, width) indices into the values
            out[rows] = flat[offsets[rows, None] + np.arange(width)]
        return out, length
    raise ParseError(
        f"{problems.path}: column {layout.single[name]} should hold {name} as arrays of {width} "
        f"numbers, but its type is {kind}; is this the right column? (--columns names others)"
    )


def _float_values(values: pa.Array) -> np.ndarray:
    return np.asarray(
        pc.fill_null(values.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    )


def _floats(column: pa.ChunkedArray | pa.Array, name: str, problems: Problems) -> np.ndarray:
    """float64 of a numeric (or text) column; null is NaN."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = numbers(_as_array(column), pa.float64(), name, problems, 0)
    elif pa.types.is_boolean(column.type) or not _is_numeric(column.type):
        raise ParseError(f"{problems.path}: column {name} holds {column.type}, not numbers")
    return _float_values(_as_array(column))


def _integers(
    column: pa.ChunkedArray | pa.Array, name: str, problems: Problems, missing: int
) -> np.ndarray:
    """int64 of an integer column, of integral floats or of text; null is ``missing``."""
    column = _as_array(column)
    if pa.types.is_integer(column.type):
        values = column.cast(pa.int64())
    elif pa.types.is_floating(column.type):
        values = integral(_float_values(column), name, problems, 0)
    else:
        values = numbers(column.cast(pa.string()), pa.int64(), name, problems, 0)
    return np.asarray(pc.fill_null(values, missing).to_numpy(zero_copy_only=False))


def _optional_integers(
    table: pa.Table, layout: Layout, name: str, problems: Problems, n: int
) -> np.ndarray:
    if name not in layout.single:
        return np.full(n, -1, dtype=np.int64)
    return _integers(table.column(layout.single[name]), name, problems, -1)


def _scalar(column: pa.ChunkedArray | pa.Array, name: str, problems: Problems) -> np.ndarray:
    """A DR3 scalar column in its DR3 dtype; integers -1 where missing."""
    dtype = np.dtype(dr3.SCALARS[name])
    if dtype.kind != "i":
        return as_float32(_floats(column, name, problems))
    values = _integers(column, name, problems, INT_MISSING)
    wrong = np.flatnonzero(~in_range(values, dtype))
    problems.add(wrong, lambda r: f"{name} = {values[r]} does not fit {dtype}")
    return values.astype(dtype)


def _as_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


# --- in-memory tables -> arrow -----------------------------------------------------------------
def arrow_table(table: Any) -> pa.Table:
    """A :class:`pyarrow.Table` of an astropy Table, a pandas DataFrame or a pyarrow Table.

    Object columns (variable-length arrays: FITS ``PD()``, VOTable ``arraysize="*"``, pandas
    cells holding arrays) become list columns; masked or empty cells become null.
    """
    if isinstance(table, pa.Table):
        return table
    module = type(table).__module__
    if module.startswith("pandas"):
        return pa.table({str(name): _arrow_column(table[name].to_numpy()) for name in table})
    if module.startswith("astropy"):
        return pa.table({name: _arrow_column(table[name]) for name in table.colnames})
    raise ParseError(
        f"cannot read a {type(table).__name__}: give an astropy Table, a pandas DataFrame or a "
        "pyarrow Table"
    )


def _arrow_column(column: Any) -> pa.Array:
    mask = np.ma.getmaskarray(column) if np.ma.isMaskedArray(column) else None
    data = np.ma.getdata(column)
    if data.dtype == object:
        return _ragged(data, mask)
    data = data.astype(data.dtype.newbyteorder("="))  # FITS is big-endian; arrow wants native
    if data.ndim == 2:
        if mask is not None and mask.ndim == 2:
            mask = np.asarray(mask.all(axis=1))
        flat = pa.array(data.reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, data.shape[1], mask=_arrow_mask(mask))
    if data.dtype.kind in "US":
        return pa.array(data.astype(str), mask=mask)
    return pa.array(data, mask=mask)


def _arrow_mask(mask: np.ndarray | None) -> pa.Array | None:
    return None if mask is None or not mask.any() else pa.array(mask)


def _ragged(cells: np.ndarray, mask: np.ndarray | None) -> pa.Array:
    """A list column of cells that are arrays (or None/NaN/masked for a missing value).

    One pass over the cells (not their values) measures them; numpy joins them in C.
    """
    arrays = [_cell(c) for c in cells]
    if arrays and all(a is None for a in arrays) and all(isinstance(c, str) for c in cells):
        return pa.array(cells.astype(str))
    length = np.array([0 if a is None else len(a) for a in arrays], dtype=np.int64)
    missing = np.array([a is None for a in arrays], dtype=bool)
    if mask is not None:
        missing |= mask if mask.ndim == 1 else mask.all(axis=tuple(range(1, mask.ndim)))
        length[missing] = 0
    present = [a for a, m in zip(arrays, missing, strict=True) if a is not None and not m]
    values = np.concatenate(present).astype(np.float64) if present else np.empty(0)
    offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int32)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values), mask=pa.array(missing) if missing.any() else None
    )


def _cell(cell: Any) -> np.ndarray | None:
    if cell is None or cell is np.ma.masked or isinstance(cell, str | bytes):
        return None
    if np.ndim(cell) == 0:
        return None  # a NaN (pandas) or other scalar where an array is missing
    return np.ma.filled(np.ma.asarray(cell, dtype=np.float64), np.nan).reshape(-1)
