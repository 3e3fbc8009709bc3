"""The general reader's second step: a batch of text cells -> the XP columns.

Array cells (``[a,b,...]`` or ``(a, b, ...)``) become one CSV buffer (brackets become line
breaks) that pyarrow parses as 55 float columns; a cell of the wrong length or with a
non-number is a bad row with its reason. Scalars, source_id and the G-flux extras are parsed
as numbers (:func:`parse_xp_batch`).
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from xpbatch import schema
from xpbatch.errors import ParseError
from xpbatch.ingest.common import (
    EXTRAS,
    Problems,
    ReadRequest,
    as_float32,
    check_basis,
    in_range,
    int_values,
    numbers,
    string_column,
)
from xpbatch.ingest.text_file import NULLS
from xpbatch.store.xp_store import INT_MISSING, n_correlations

_FLOAT = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)"
# An array value: a number (spaces allowed around it), or one of pyarrow's null tokens exactly.
_ARRAY_VALUE = rf"(\s*({_FLOAT})\s*|(?-i:null|NULL))"
_ARRAY_CELL = re.compile(rf"^[\[(]({_ARRAY_VALUE}(,{_ARRAY_VALUE})*)?[\])]$", re.I)


def _array_cells(
    column: pa.StringArray,
    expected: np.ndarray | None,
    width: int,
    name: str,
    problems: Problems,
    row0: int,
) -> np.ndarray:
    """Parse a column of array cells ('[a,b,...]' or '(a, b, ...)') into (rows, width) float64.

    ``expected`` is each row's declared length (from ``*_n_parameters``; -1 when missing;
    None when the file has no n_parameters: then only the width is checked). Null cells give NaN
    rows. A cell of the wrong length or with a non-number is a bad row (NaN).
    """
    n = len(column)
    out = np.full((n, width), np.nan)
    present = np.asarray(column.is_valid().to_numpy(zero_copy_only=False))
    if not present.any():
        return out
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[
        column.offset : column.offset + n + 1
    ]
    text = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]].copy()
    starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]  # cell i is text[s:e]
    if len(text) == 0:  # only empty cells
        problems.add(np.flatnonzero(present) + row0, f"{name} is not an array like [1.0,2.0,...]")
        return out
    n_values = _n_values(column, ends - starts)
    if expected is None:
        expected = n_values
    bad = _check_cells(text, starts, ends, present, n_values, expected, width, name, problems, row0)
    good = present & ~bad
    # Brackets become line breaks and bad cells blank lines, which pyarrow skips, so the buffer
    # is a CSV of `width` numbers per line with one line per good cell, in row order.
    text[starts[present]] = ord("\n")
    text[ends[present] - 1] = ord("\n")
    _blank(text, starts[present & bad], ends[present & bad])
    values = _parse_number_lines(text, width)
    if values is None:  # a token is not a number: find the rows, then parse the others
        bad_tokens = _rows_with_bad_tokens(column, good)
        problems.add(bad_tokens + row0, lambda r: _bad_token_reason(column, r - row0, name))
        good[bad_tokens] = False
        _blank(text, starts[bad_tokens], ends[bad_tokens])
        values = _parse_number_lines(text, width)
        if values is None:  # pragma: no cover - the regex and pyarrow disagree on a token
            raise ParseError(f"{problems.path}: {name} holds a value pyarrow cannot parse")
    if len(values) != good.sum():  # pragma: no cover - guards the buffer trick above
        raise ParseError(
            f"{problems.path}: {name}: parsed {len(values)} cells, expected {good.sum()}"
        )
    out[good] = values
    return out


def _n_values(column: pa.StringArray, length: np.ndarray) -> np.ndarray:
    """Number of comma-separated values in each cell (0 for '[]' and for null cells)."""
    commas = pc.fill_null(pc.count_substring(column, ","), 0).to_numpy(zero_copy_only=False)
    return np.where(length > 2, commas + 1, 0)


def _check_cells(
    text: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    present: np.ndarray,
    n_values: np.ndarray,
    expected: np.ndarray,
    width: int,
    name: str,
    problems: Problems,
    row0: int,
) -> np.ndarray:
    """Bad present cells: not bracketed, or a count of values other than the declared one."""
    length = ends - starts
    first = text[np.minimum(starts, len(text) - 1)]
    last = text[np.maximum(ends - 1, 0)]
    bracketed = (length >= 2) & np.isin(first, list(b"[(")) & np.isin(last, list(b"])"))
    not_array = present & ~bracketed
    problems.add(np.flatnonzero(not_array) + row0, f"{name} is not an array like [1.0,2.0,...]")
    no_length = present & bracketed & (expected < 0)
    problems.add(
        np.flatnonzero(no_length) + row0,
        f"{name} is present but its band's n_parameters is missing",
    )
    wrong = present & bracketed & (expected >= 0) & (n_values != expected)
    problems.add(
        np.flatnonzero(wrong) + row0,
        lambda r: (
            f"{name} has {n_values[r - row0]} values but n_parameters says {expected[r - row0]}"
        ),
    )
    other_width = (
        present & bracketed & (expected >= 0) & (n_values == expected) & (expected != width)
    )
    problems.add(
        np.flatnonzero(other_width) + row0,
        lambda r: (
            f"{name} has {expected[r - row0]} values; the store holds {width} per band "
            "(Gaia DR3); other releases need a new store schema"
        ),
    )
    return not_array | no_length | wrong | other_width


def _blank(text: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    """Overwrite text[s:e] with line breaks for every (s, e)."""
    if len(starts):
        edges = np.zeros(len(text) + 1, dtype=np.int64)
        np.add.at(edges, starts, 1)
        np.add.at(edges, ends, -1)
        text[np.cumsum(edges[:-1]) > 0] = ord("\n")


def _parse_number_lines(text: np.ndarray, width: int) -> np.ndarray | None:
    """Parse lines of ``width`` comma-separated numbers; None when some token is not a number."""
    names = [str(i) for i in range(width)]
    try:
        table = pacsv.read_csv(
            pa.BufferReader(pa.py_buffer(text)),
            read_options=pacsv.ReadOptions(
                column_names=names, use_threads=False, block_size=1 << 26
            ),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.float64()), null_values=NULLS
            ),
        )
    except pa.ArrowInvalid:
        return None
    if table.num_rows == 0:
        return np.empty((0, width))
    return np.column_stack([c.to_numpy() for c in table.columns])  # nulls (nan, null) -> NaN


def _rows_with_bad_tokens(column: pa.StringArray, good: np.ndarray) -> np.ndarray:
    ok = pc.match_substring_regex(column, _ARRAY_CELL.pattern, ignore_case=True)
    ok_mask = np.asarray(pc.fill_null(ok, True).to_numpy(zero_copy_only=False))
    return np.flatnonzero(good & ~ok_mask)


def _bad_token_reason(column: pa.StringArray, row: int, name: str) -> str:
    cell = str(column[row].as_py())
    for token in cell.strip("[]()").split(","):
        if not re.fullmatch(_ARRAY_VALUE, token, re.I):
            return f"{name} holds {token.strip()!r}, which is not a number"
    return f"{name} is not a valid array"  # pragma: no cover


def parse_xp_batch(
    batch: pa.RecordBatch,
    request: ReadRequest,
    problems: Problems,
    row0: int,
) -> dict[str, np.ndarray]:
    """Columns of one batch: source_id, coefficients, errors, scalars, correlations, extras."""
    names = set(batch.schema.names)
    sid = numbers(string_column(batch, schema.SOURCE_ID), pa.int64(), "source_id", problems, row0)
    source_id = int_values(sid, 0)
    problems.add(np.flatnonzero(source_id <= 0) + row0, "source_id is missing or not positive")
    out: dict[str, np.ndarray] = {schema.SOURCE_ID: source_id}
    coefficients: list[np.ndarray] = []
    errors: list[np.ndarray] = []
    for band in schema.BANDS:
        expected = _optional_integers(batch, f"{band}_n_parameters", problems, row0)
        width = n_coefficients(band)
        for name, sink in (
            (f"{band}_coefficients", coefficients),
            (f"{band}_coefficient_errors", errors),
        ):
            cells = _array_cells(string_column(batch, name), expected, width, name, problems, row0)
            sink.append(as_float32(cells))
        basis = _optional_integers(batch, f"{band}_basis_function_id", problems, row0)
        if basis is not None:
            present = ~np.isnan(coefficients[-1]).all(axis=1)
            check_basis(basis, present, band, problems, row0)
        if request.with_correlations:
            name = schema.correlations_name(band)
            n_corr_width = n_correlations(width)
            if name not in names:  # a file without correlations: NaN, like a missing band
                out[name] = np.full((batch.num_rows, n_corr_width), np.nan, dtype=np.float32)
                continue
            n_corr = (
                None
                if expected is None
                else np.where(expected >= 0, expected * (expected - 1) // 2, -1)
            )
            cells = _array_cells(
                string_column(batch, name), n_corr, n_corr_width, name, problems, row0
            )
            out[name] = as_float32(cells)
    out[schema.COEFFICIENTS] = np.hstack(coefficients)  # (rows, 110): BP then RP
    out[schema.COEFFICIENT_ERRORS] = np.hstack(errors)
    for name in (s for s in request.scalars if s in names):
        dtype = np.dtype(schema.DR3_SCALARS[name][0])
        arrow_type = pa.int64() if dtype.kind == "i" else pa.float64()
        values = numbers(string_column(batch, name), arrow_type, name, problems, row0)
        if dtype.kind == "i":
            integers = int_values(values, INT_MISSING)
            for row in np.flatnonzero(~in_range(integers, dtype)).tolist():  # bad input only
                reason = f"{name} = {integers[row]} does not fit {dtype}"
                problems.add(np.array([row0 + row]), reason)
            out[name] = integers.astype(dtype)
        else:
            out[name] = as_float32(pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False))
    for name in (e for e in EXTRAS if e in names):
        values = numbers(string_column(batch, name), pa.float64(), name, problems, row0)
        out[name] = np.asarray(pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False))
    return out


def _optional_integers(
    batch: pa.RecordBatch, name: str, problems: Problems, row0: int
) -> np.ndarray | None:
    """An integer column the file may lack (None then); -1 where a value is missing."""
    if name not in batch.schema.names:
        return None
    return int_values(numbers(string_column(batch, name), pa.int64(), name, problems, row0), -1)


def n_coefficients(band: str) -> int:
    """Coefficients per row of ``band`` ('bp' or 'rp') in the store."""
    return schema.N_BP if band == "bp" else schema.N_RP
