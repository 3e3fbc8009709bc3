"""CSV and ECSV XP files: the bulk ``XpContinuousMeanSpectrum_*.csv.gz`` and the archive's.

Reads every text encoding in ``shared/dr3/FORMAT.md`` (bulk files with an ECSV ``#`` header,
JSON arrays and ``null``; archive CSV ``"(a, b)"``; archive ECSV ``"[a,b]"``; pandas re-writes
with ``55.0``), gzipped or not. A file holding its arrays in one column per coefficient is read
as a table (:mod:`xpbatch.ingest.table`).

Parsing runs no Python per value or per row. Each ~4 MB block of text is first offered to a
numba-compiled scanner (:mod:`xpbatch.ingest.fastscan`) that reads well-formed lines in one pass; a
block it gives up on (a malformed row, an unusual token) goes to the general reader here, which
turns an array column's cells into one CSV buffer (brackets become line breaks) that pyarrow
parses as 55 float columns, and which explains every malformed row. Both give the same values
(float32 of the float64 of the text). The 1485-value correlation arrays are only parsed with
``with_correlations``; otherwise both readers jump over them at memchr speed.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from xpbatch import dr3, schema
from xpbatch.errors import ParseError
from xpbatch.ingest.common import (
    EXTRAS,
    BadRow,
    HashingReader,
    LineMap,
    ParsedFile,
    Problems,
    ReadRequest,
    as_float32,
    check_basis,
    concat,
    gzip_module,
    in_range,
    int_values,
    manifest_md5,
    numbers,
    parsed_file,
    string_column,
)
from xpbatch.ingest.table import Layout, parse_columns
from xpbatch.store.xp_store import INT_MISSING, n_correlations

try:  # the compiled fast path; without numba every block goes through the pyarrow reader
    from xpbatch.ingest import fastscan
except ImportError:  # pragma: no cover - numba is a dependency
    fastscan = None  # type: ignore[assignment]

_BLOCK_BYTES = 1 << 26  # pyarrow reads 64 MB of text per batch: ~1700 bulk rows, flat memory
# The XP scanner inflates 4 MB (~100 bulk rows) at a time: the text is still in cache when it
# is scanned, and gzip itself runs 25% slower into 64 MB buffers (measured, isal).
_SCAN_BLOCK_BYTES = 1 << 22
MAX_LINE_BYTES = 1 << 24
"""The longest line a text reader buffers (16 MB; an XP line with its correlations is ~40 kB):
a longer one is refused with its file and line, not read whole into memory."""
_NULLS = list(dr3.NULL_TOKENS)
_FLOAT = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)"
# An array value: a number (spaces allowed around it), or one of pyarrow's null tokens exactly.
_ARRAY_VALUE = rf"(\s*({_FLOAT})\s*|(?-i:null|NULL))"
_ARRAY_CELL = re.compile(rf"^[\[(]({_ARRAY_VALUE}(,{_ARRAY_VALUE})*)?[\])]$", re.I)


@dataclasses.dataclass
class _TextFile:
    """An open (maybe gzipped) CSV file positioned at its first data line."""

    path: Path
    columns: list[str]
    """Column names, lower-cased."""
    first_line: int
    """1-based line number of the first data line (after ``#`` lines and the column names)."""
    stream: BinaryIO
    hashing: HashingReader


def open_text(path: Path, *, verify_md5: bool, raw: BinaryIO | None = None) -> _TextFile:
    """Open ``path`` (gzip detected by its magic bytes), skip ``#`` lines, read the column names.

    ``raw``: the file's bytes when they do not come from ``path`` itself (a zip member).
    """
    if raw is None:
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed through _TextFile.hashing
        except FileNotFoundError as e:
            raise ParseError(f"{path}: file not found") from e
    hashing = HashingReader(raw, manifest_md5(path) if verify_md5 else None)
    buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
    stream: BinaryIO = buffered
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        stream = gzip_module.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[assignment]
    line_no = 0
    try:
        while True:
            line = stream.readline(MAX_LINE_BYTES + 1)
            line_no += 1
            if len(line) > MAX_LINE_BYTES:
                raise _too_long(path, line_no)
            if not line:
                raise ParseError(f"{path}: no column-name line (the file is empty or all '#')")
            if not line.startswith(b"#"):
                break
    except (EOFError, OSError) as e:
        raise ParseError(f"{path}: cannot read the header ({e}); is the file truncated?") from e
    columns = [c.strip().strip('"').lower() for c in line.decode("utf-8").rstrip("\r\n").split(",")]
    return _TextFile(path, columns, line_no + 1, stream, hashing)


def _csv_options(
    text: _TextFile, wanted: Sequence[str], problems: Problems, first_row: int = 0
) -> dict[str, Any]:
    """pyarrow CSV options: ``wanted`` columns as strings; rows of the wrong width go to problems.

    ``first_row`` is the file's data-row number of the first row pyarrow will see.
    """

    def on_invalid(row: Any) -> str:
        data_row = first_row + row.number - 1  # pyarrow counts rows from 1
        problems.lines.dropped.append(data_row)
        reason = f"expected {row.expected_columns} fields, found {row.actual_columns}"
        problems.invalid_lines.append(BadRow(text.path.name, text.first_line + data_row, reason))
        return "skip"

    return {
        "read_options": pacsv.ReadOptions(
            column_names=text.columns, use_threads=False, block_size=_BLOCK_BYTES
        ),
        # use_threads=False: pyarrow numbers invalid rows only when parsing in one thread.
        "parse_options": pacsv.ParseOptions(
            invalid_row_handler=on_invalid, ignore_empty_lines=False
        ),
        "convert_options": pacsv.ConvertOptions(
            include_columns=list(wanted),
            column_types={c: pa.string() for c in wanted},
            null_values=_NULLS,
            strings_can_be_null=True,
        ),
    }


def _unreadable(text: _TextFile, line: int, error: Exception) -> ParseError:
    return ParseError(
        f"{text.path}: cannot read the file after line {line} ({error}); "
        "is it truncated or corrupt? Download it again."
    )


def read_batches(
    text: _TextFile, wanted: Sequence[str], problems: Problems
) -> Iterator[pa.RecordBatch]:
    """Stream ``wanted`` columns (as strings) with pyarrow's CSV reader, in batches."""
    try:
        yield from pacsv.open_csv(text.stream, **_csv_options(text, wanted, problems))
    except (pa.ArrowInvalid, EOFError, OSError) as e:
        raise _unreadable(text, text.first_line, e) from e


# --- the XP files' fast reader ----------------------------------------------------------------
# An XP line is ~39 kB, 30 kB of it the correlation arrays we usually skip. pyarrow's tokenizer
# would walk every byte of it; instead we find the double quotes (memchr speed), cut the quoted
# cells out, let pyarrow parse the short rest of each line (the "skeleton": ~200 bytes, with a
# marker where each non-empty quoted cell was), and hand pyarrow only the cells we want.
_MARK = ord("Q")


class _LineTooLong(Exception):
    """A line longer than MAX_LINE_BYTES (the reader that knows the line number says so)."""


def _too_long(path: Path, line: int) -> ParseError:
    return ParseError(
        f"{path}, line {line}: a line longer than {MAX_LINE_BYTES >> 20} MB (an XP line is tens "
        "of kB); this is not an XP file, or a damaged one"
    )


def _blocks(stream: BinaryIO) -> Iterator[tuple[bytes, int, int]]:
    """Decompressed text in ~4 MB blocks of whole lines: ``data[start:end]``.

    Only a line cut by a read is copied (into a small block of its own), never a whole block.
    A line longer than MAX_LINE_BYTES raises _LineTooLong: memory stays bounded.
    """
    rest = b""
    while data := stream.read(_SCAN_BLOCK_BYTES):
        first = data.find(b"\n") + 1
        if not first:  # a line longer than a block
            rest += data
            if len(rest) > MAX_LINE_BYTES:
                raise _LineTooLong
            continue
        if len(rest) + first > MAX_LINE_BYTES:
            raise _LineTooLong
        if rest:
            yield rest + data[:first], 0, len(rest) + first
        start = first if rest else 0
        end = data.rfind(b"\n") + 1
        if end > start:
            yield data, start, end
        rest = data[end:]
    if rest:
        yield rest + b"\n", 0, len(rest) + 1


def _quote_positions(data: bytes, start: int, end: int) -> np.ndarray:
    """Offsets (from ``start``) of the double quotes in data[start:end]; a loop per quoted cell,
    not per value: ``bytes.find`` skips a 15 kB correlation cell at memchr speed."""
    found = []
    find = data.find
    at = find(b'"', start, end)
    while at >= 0:
        found.append(at)
        at = find(b'"', at + 1, end)
    return np.array(found, dtype=np.int64) - start


def _gather(buffer: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """buffer[starts[0]:stops[0]] + buffer[starts[1]:stops[1]] + ... without a Python loop."""
    lengths = stops - starts
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return buffer[np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))]


def _blank_unbalanced_lines(
    buffer: np.ndarray, quotes: np.ndarray, first_row: int, problems: Problems
) -> tuple[np.ndarray, np.ndarray]:
    """Lines with an odd number of quotes are malformed: record them and blank them out.

    A blanked line has one field, so pyarrow drops it like any row of the wrong width.
    """
    buffer = buffer.copy()
    newlines = np.flatnonzero(buffer == ord("\n"))
    line_of_quote = np.searchsorted(newlines, quotes)
    odd = np.flatnonzero(np.bincount(line_of_quote, minlength=len(newlines)) % 2)
    line_starts = np.concatenate([[0], newlines + 1])
    for line in odd.tolist():
        buffer[line_starts[line] : newlines[line]] = ord(" ")
        problems.invalid_lines.append(
            BadRow(
                problems.path.name,
                problems.lines.first_line + first_row + line,
                "unbalanced double quote (a quoted field is not closed)",
            )
        )
    return buffer, quotes[~np.isin(line_of_quote, odd)]


def _parse_blocks(
    text: _TextFile,
    wanted: Sequence[str],
    request: ReadRequest,
    problems: Problems,
) -> Iterator[dict[str, np.ndarray]]:
    """The parsed columns of each block of lines of an XP file whose arrays are quoted cells.

    The compiled scanner (:mod:`xpbatch.ingest.fastscan`) reads well-formed blocks; a block it
    gives up
    on is read by the general pyarrow reader, which also explains any malformed row.
    """
    fast = _FastLayout.of(text.columns, wanted, request)
    first_row = row0 = 0
    try:
        for data, start, end in _blocks(text.stream):
            buffer = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=start)
            quotes = _quote_positions(data, start, end)
            piece = fast.parse(buffer, quotes) if fast is not None else None
            if piece is not None:
                n_lines = len(piece[schema.SOURCE_ID])
            else:
                if len(quotes) % 2:
                    buffer, quotes = _blank_unbalanced_lines(buffer, quotes, first_row, problems)
                batch, n_lines = _scan_block(text, buffer, quotes, wanted, problems, first_row)
                piece = _parse_xp_batch(batch, request, problems, row0)
            first_row += n_lines
            row0 += len(piece[schema.SOURCE_ID])
            yield piece
    except (EOFError, OSError) as e:
        raise _unreadable(text, text.first_line + first_row, e) from e
    except _LineTooLong:
        raise _too_long(text.path, text.first_line + first_row) from None


@dataclasses.dataclass(frozen=True)
class _FastLayout:
    """How the compiled scanner lays out an XP file's columns, and how to unpack its output."""

    layout: fastscan.Layout
    """Where the scanner puts each column."""
    integers: list[str]
    """Names of the scanner's integer slots: source_id, both n_parameters, basis ids, integer
    scalars."""
    floats: list[str]
    """Names of its float slots (float scalars)."""
    scalars: Sequence[str]
    with_correlations: bool

    @classmethod
    def of(
        cls, columns: Sequence[str], wanted: Sequence[str], request: ReadRequest
    ) -> _FastLayout | None:
        """The layout for a file with these columns (``wanted`` of them read); None without
        numba, or for a file the scanner does not cover: without n_parameters, with G or
        positions (read as float64, the scanner's floats are float32), or without the
        correlations asked for."""
        n_parameters = [f"{band}_n_parameters" for band in schema.BANDS]
        with_correlations = request.with_correlations
        correlations = [schema.correlations_name(band) for band in schema.BANDS]
        if (
            fastscan is None
            or not set(n_parameters) <= set(wanted)
            or set(EXTRAS) & set(wanted)
            or (with_correlations and not set(correlations) <= set(wanted))
        ):
            return None
        scalars = [s for s in request.scalars if s in wanted]
        basis = [f"{band}_basis_function_id" for band in schema.BANDS]
        integers = [schema.SOURCE_ID, *n_parameters, *(b for b in basis if b in wanted)]
        integers += [s for s in scalars if _is_integer(s) and s not in integers]
        floats = [s for s in scalars if not _is_integer(s)]
        # BP then RP side by side, so coefficients (and errors) are one (rows, 110) slice.
        arrays = [f"{band}_{schema.COEFFICIENTS}" for band in schema.BANDS]
        arrays += [f"{band}_{schema.COEFFICIENT_ERRORS}" for band in schema.BANDS]
        if with_correlations:
            arrays += [schema.correlations_name(band) for band in schema.BANDS]
        missing = {schema.SOURCE_ID: 0, **dict.fromkeys(integers[1:], INT_MISSING)}
        layout = fastscan.make_layout(
            columns,
            integers=[(name, missing[name]) for name in integers],
            floats=floats,
            arrays=[(name, _band_width(name)) for name in arrays],
        )
        return cls(layout, integers, floats, scalars, with_correlations)

    def parse(self, buffer: np.ndarray, quotes: np.ndarray) -> dict[str, np.ndarray] | None:
        """The columns of :func:`_parse_xp_batch` for this block; None when the block (or one of
        its rows) needs the general reader."""
        block = fastscan.scan_block(buffer, quotes, self.layout)  # type: ignore[union-attr]
        if block is None:
            return None
        integer = {name: block.integers[:, i] for i, name in enumerate(self.integers)}
        if (integer[schema.SOURCE_ID] <= 0).any():
            return None
        for band_index, band in enumerate(schema.BANDS):
            # an array present needs its band's n_parameters to be the store's width
            present = block.present[:, band_index :: len(schema.BANDS)].any(axis=1)
            if (integer[f"{band}_n_parameters"][present] != _n_coefficients(band)).any():
                return None
            basis = integer.get(f"{band}_basis_function_id")
            if basis is not None and (basis[present] != dr3.BASIS_FUNCTION_ID[band]).any():
                return None
        n_coeff = schema.N_BP + schema.N_RP
        out = {
            schema.SOURCE_ID: integer[schema.SOURCE_ID].copy(),
            schema.COEFFICIENTS: block.values[:, :n_coeff],
            schema.COEFFICIENT_ERRORS: block.values[:, n_coeff : 2 * n_coeff],
        }
        start = 2 * n_coeff
        for band in schema.BANDS if self.with_correlations else ():
            width = n_correlations(_n_coefficients(band))
            out[schema.correlations_name(band)] = block.values[:, start : start + width]
            start += width
        for name in self.scalars:
            dtype = np.dtype(schema.DR3_SCALARS[name][0])
            if name in integer:
                if not in_range(integer[name], dtype).all():
                    return None
                out[name] = integer[name].astype(dtype)
            else:
                out[name] = block.floats[:, self.floats.index(name)].astype(dtype)
        return out


def _is_integer(scalar: str) -> bool:
    return np.dtype(schema.DR3_SCALARS[scalar][0]).kind == "i"


def _n_coefficients(band: str) -> int:
    return schema.N_BP if band == "bp" else schema.N_RP


def _band_width(array_name: str) -> int:
    """Values per row of a DR3 array column (coefficients, errors or correlations of a band)."""
    width = _n_coefficients(array_name[:2])
    return n_correlations(width) if array_name.endswith("correlations") else width


def _scan_block(
    text: _TextFile,
    buffer: np.ndarray,
    quotes: np.ndarray,
    wanted: Sequence[str],
    problems: Problems,
    first_row: int,
) -> tuple[pa.RecordBatch, int]:
    """The ``wanted`` columns of one block of whole lines, and its number of lines."""
    end = len(buffer)
    opens, closes = quotes[0::2], quotes[1::2]
    filled = closes > opens + 1  # an empty quoted cell "" stays empty, i.e. null
    # Keep what lies between quoted cells, plus each non-empty cell's opening quote,
    # which becomes the marker.
    keep_from = np.concatenate([[0], closes + 1])
    keep_to = np.concatenate([opens + filled, [end]])
    skeleton = _gather(buffer, keep_from, keep_to)
    marks = np.cumsum(keep_to - keep_from)[:-1][filled] - 1
    skeleton[marks] = _MARK
    table = _parse_skeleton(text, skeleton, wanted, problems, first_row)
    cells = _cell_rows(skeleton, marks, first_row, problems)
    columns = {}
    for name in wanted:
        on_column = cells.column == text.columns.index(name)
        columns[name] = _with_cells(
            table.column(name).combine_chunks(),
            buffer,
            opens[filled][on_column] + 1,
            closes[filled][on_column],
            cells.row[on_column],
        )
    return pa.RecordBatch.from_pydict(columns), cells.n_lines


def _parse_skeleton(
    text: _TextFile,
    skeleton: np.ndarray,
    wanted: Sequence[str],
    problems: Problems,
    first_row: int,
) -> pa.Table:
    options = _csv_options(text, wanted, problems, first_row)
    try:
        return pacsv.read_csv(pa.BufferReader(pa.py_buffer(skeleton)), **options)
    except pa.ArrowInvalid as e:
        raise _unreadable(text, text.first_line + first_row, e) from e


@dataclasses.dataclass
class _CellRows:
    column: np.ndarray
    """Column index of each marker."""
    row: np.ndarray
    """Row of each marker in the parsed skeleton table (-1 when pyarrow dropped its line)."""
    n_lines: int
    """Lines in the block."""


def _cell_rows(
    skeleton: np.ndarray, marks: np.ndarray, first_row: int, problems: Problems
) -> _CellRows:
    """Column (commas before it on its line) and table row (line minus dropped lines) of marks."""
    newlines = np.flatnonzero(skeleton == ord("\n"))
    line = np.searchsorted(newlines, marks)
    commas = np.concatenate([[0], np.cumsum(skeleton == ord(","))])
    line_start = np.concatenate([[0], newlines + 1])[line]
    column = commas[marks] - commas[line_start]
    dropped = np.asarray(problems.lines.dropped, dtype=np.int64) - first_row
    dropped = dropped[(dropped >= 0) & (dropped < len(newlines))]
    row = line - np.searchsorted(np.sort(dropped), line)
    row[np.isin(line, dropped)] = -1
    return _CellRows(column, row, len(newlines))


def _with_cells(
    skeleton_column: pa.Array,
    buffer: np.ndarray,
    starts: np.ndarray,
    stops: np.ndarray,
    rows: np.ndarray,
) -> pa.StringArray:
    """The skeleton's column with each marked row's cell text (buffer[start:stop]) put back."""
    keep = rows >= 0
    starts, stops, rows = starts[keep], stops[keep], rows[keep]
    n = len(skeleton_column)
    lengths = np.zeros(n, dtype=np.int64)
    lengths[rows] = stops - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    has_cell = np.zeros(n, dtype=bool)
    has_cell[rows] = True
    # One slice per cell (not per value): an index gather would move 8 bytes of index per byte.
    view = memoryview(buffer.data)
    text = b"".join([view[a:b] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)])
    cells = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))
    if has_cell.all():
        return cells
    return pc.if_else(pa.array(has_cell), cells, skeleton_column.cast(pa.string()))


# --- array cells ------------------------------------------------------------------------------
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
                column_types=dict.fromkeys(names, pa.float64()), null_values=_NULLS
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


def _wanted(layout: Layout, request: ReadRequest) -> list[str]:
    """The columns to read: source_id and the arrays, then the optional ones the file has."""
    columns = [schema.SOURCE_ID]
    for band in schema.BANDS:
        columns += [f"{band}_coefficients", f"{band}_coefficient_errors"]
        optional = [f"{band}_n_parameters", f"{band}_basis_function_id"]
        if request.with_correlations:
            optional.append(schema.correlations_name(band))
        columns += [c for c in optional if c in layout.single]
    optional = [*request.scalars, *EXTRAS]
    return columns + [c for c in optional if c in layout.single and c not in columns]


def parse_text(path: Path, request: ReadRequest, *, raw: BinaryIO | None = None) -> ParsedFile:
    """Parse one CSV or ECSV XP file (any text encoding of FORMAT.md, gzipped or not).

    ``raw``: the file's bytes when they do not come from ``path`` (a zip member).
    Coefficients and errors are float32 of the text values, BP then RP; NaN for a missing band.
    """
    text = open_text(path, verify_md5=request.verify_md5, raw=raw)
    with text.stream, text.hashing:
        layout = Layout.of(text.columns, request, path)
        # read the columns under their DR3 names (a --columns mapping renames them)
        renamed = {given: dr3_name for dr3_name, given in layout.single.items()}
        text.columns = [renamed.get(c, c) for c in text.columns]
        layout = Layout({n: n for n in layout.single}, layout.split)
        problems = Problems(path, LineMap(text.first_line))
        if layout.split:  # one column per coefficient: a plain table
            wanted = [*layout.single, *(c for cs in layout.split.values() for c in cs)]
            batches = list(read_batches(text, wanted, problems))
            table = pa.Table.from_batches(batches) if batches else _empty(wanted)
            columns = parse_columns(table, layout, request, problems)
        else:
            wanted = _wanted(layout, request)
            pieces: list[dict[str, Any]] = []
            for piece in _parse_blocks(text, wanted, request, problems):
                pieces.append(piece)
                if request.on_bad_row == "error":
                    problems.raise_first()
            if not pieces:  # a header without rows: parse an empty batch for the right shapes
                pieces.append(_parse_xp_batch(_empty(wanted).to_batches()[0], request, problems, 0))
            columns = concat(pieces)
        file_info = text.hashing.finish(path)
    return parsed_file(path, columns, problems, file_info, request)


def _empty(names: Sequence[str]) -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in names})


def _parse_xp_batch(
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
        width = _n_coefficients(band)
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
