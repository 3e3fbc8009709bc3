"""Gaia DR3 XP files -> XP store (``xpbatch ingest``).

Reads every encoding in ``shared/dr3/FORMAT.md`` (bulk ``XpContinuousMeanSpectrum_*.csv.gz`` with
an ECSV ``#`` header, JSON arrays and ``null``; archive CSV ``"(a, b)"``; archive ECSV
``"[a,b]"``), gzipped or not, and joins ``phot_g_mean_flux`` from gaia_source companions.

How it runs (each step resumable):

1. one task per input file (:func:`ingest_file`) parses it with pyarrow, joins the G flux, sorts
   by source_id and writes a *part* (a directory of ``.npy`` files) into ``<output>.parts/``,
   with a ``done.json`` marker written last; a rerun reuses parts whose marker matches;
2. the parts are laid end to end in source_id order and each store chunk is written by one task
   (:func:`_write_chunk`) from the slices of the parts it covers;
3. the store is finalized (order and completeness checked) under ``<output>.partial`` and only
   then renamed to ``<output>``.

Parsing runs no Python per value or per row. Each ~4 MB block of text is first offered to a
numba-compiled scanner (:mod:`xpbatch.fastscan`) that reads well-formed lines in one pass; a
block it gives up on (a malformed row, an unusual token) goes to the general reader here, which
turns an array column's cells into one CSV buffer (brackets become line breaks) that pyarrow
parses as 55 float columns, and which explains every malformed row. Both give the same values
(float32 of the float64 of the text). The 1485-value correlation arrays are only parsed with
``with_correlations``; otherwise both readers jump over them at memchr speed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from xpbatch import __version__, schema
from xpbatch.config import IngestConfig
from xpbatch.errors import ChecksumError, ConfigError, ParseError
from xpbatch.outputs import locked_output
from xpbatch.partitions import range_of_file_name, ranges_from_file_names
from xpbatch.paths import PathLike
from xpbatch.store import (
    INT_MISSING,
    XPStoreWriter,
    check_overwritable,
    compute_input_flags,
    n_correlations,
    source_id_order,
)

if TYPE_CHECKING:
    from distributed import Client

try:  # the compiled fast path; without numba every block goes through the pyarrow reader
    from xpbatch import fastscan
except ImportError:  # pragma: no cover - numba is a dependency
    fastscan = None  # type: ignore[assignment]

try:  # ISA-L inflates gzip ~3x faster than zlib: decompression is a third of the parse time.
    from isal import igzip as _gzip
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - the plain zlib path is exercised where isal is absent
    import gzip as _gzip  # type: ignore[no-redef]
    from zlib import crc32 as _crc32

logger = logging.getLogger(__name__)


XP_NAME = re.compile(r"^XpContinuousMeanSpectrum_(\d+-\d+)\.", re.IGNORECASE)
GAIA_SOURCE_NAME = re.compile(r"^GaiaSource_(\d+-\d+)\.", re.IGNORECASE)
XP_GLOB = "XpContinuousMeanSpectrum_*"
GAIA_SOURCE_GLOB = "GaiaSource_*"
MD5_MANIFEST = "_MD5SUM.txt"
MAX_RECORDED_BAD_ROWS = 10_000
"""At most this many skipped rows are listed in the store's attributes (all are counted)."""

_BLOCK_BYTES = 1 << 26  # pyarrow reads 64 MB of text per batch: ~1700 bulk rows, flat memory
# The XP scanner inflates 4 MB (~100 bulk rows) at a time: the text is still in cache when it
# is scanned, and gzip itself runs 25% slower into 64 MB buffers (measured, isal).
_SCAN_BLOCK_BYTES = 1 << 22
_NULLS = ["", "null", "NULL", "nan", "NaN"]
_FLOAT = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)"
# An array value: a number (spaces allowed around it), or one of pyarrow's null tokens exactly.
_ARRAY_VALUE = rf"(\s*({_FLOAT})\s*|(?-i:null|NULL))"
_ARRAY_CELL = re.compile(rf"^[\[(]({_ARRAY_VALUE}(,{_ARRAY_VALUE})*)?[\])]$", re.I)


# --- reading text files -----------------------------------------------------------------------
class _HashingReader(io.RawIOBase):
    """A read-only file that checksums the bytes read through it.

    MD5 when there is an MD5 to compare with (``_MD5SUM.txt``), else CRC32, which costs 1 us
    per bulk row against 20 us for MD5 (and gzip already checks the content's own CRC).
    """

    def __init__(self, raw: BinaryIO, expected_md5: str | None) -> None:
        self._raw = raw
        self.expected_md5 = expected_md5
        self._md5 = hashlib.md5() if expected_md5 else None
        self._crc = 0
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            if self._md5 is not None:
                self._md5.update(memoryview(buffer)[:n])
            else:
                self._crc = _crc32(memoryview(buffer)[:n], self._crc)
            self.size += n
        return n or 0

    def checksum(self) -> str:
        """'md5:<hex>' or 'crc32:<hex>' of the bytes read so far."""
        if self._md5 is not None:
            return f"md5:{self._md5.hexdigest()}"
        return f"crc32:{self._crc:08x}"

    def verify(self, path: Path) -> bool:
        """Compare with the manifest's MD5: True when verified, False when there is none."""
        if self._md5 is None:
            return False
        if self._md5.hexdigest() != self.expected_md5:
            raise ChecksumError(
                f"{path}: MD5 {self._md5.hexdigest()} does not match {self.expected_md5} in "
                f"{MD5_MANIFEST}: the file is corrupt or incomplete; download it again"
            )
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()

    def finish(self, path: Path) -> dict[str, Any]:
        """Read (and checksum) the rest of the file, verify it; its provenance record."""
        while self.read(1 << 22):
            pass
        verified = self.verify(path)
        return {
            "name": path.name,
            "path": str(path),
            "checksum": self.checksum(),
            "md5_verified": verified,
            "size": self.size,
        }


@dataclasses.dataclass
class _TextFile:
    """An open (maybe gzipped) CSV file positioned at its first data line."""

    path: Path
    columns: list[str]
    """Column names, lower-cased."""
    first_line: int
    """1-based line number of the first data line (after ``#`` lines and the column names)."""
    stream: BinaryIO
    hashing: _HashingReader


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A malformed input row: where it is and what is wrong with it."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}, line {self.line}: {self.reason}"


def _open_text(path: Path, *, verify_md5: bool) -> _TextFile:
    """Open ``path`` (gzip detected by its magic bytes), skip ``#`` lines, read the column names."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed through _TextFile.hashing
    except FileNotFoundError as e:
        raise ParseError(f"{path}: file not found") from e
    hashing = _HashingReader(raw, _manifest_md5(path) if verify_md5 else None)
    buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
    stream: BinaryIO = buffered
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        stream = _gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[assignment]
    line_no = 0
    try:
        while True:
            line = stream.readline()
            line_no += 1
            if not line:
                raise ParseError(f"{path}: no column-name line (the file is empty or all '#')")
            if not line.startswith(b"#"):
                break
    except (EOFError, OSError) as e:
        raise ParseError(f"{path}: cannot read the header ({e}); is the file truncated?") from e
    columns = [c.strip().strip('"').lower() for c in line.decode("utf-8").rstrip("\r\n").split(",")]
    return _TextFile(path, columns, line_no + 1, stream, hashing)


class _LineMap:
    """Maps the index of a row pyarrow kept to its line in the file, given the rows it dropped."""

    def __init__(self, first_line: int) -> None:
        self.first_line = first_line
        self.dropped: list[int] = []
        """0-based data-row numbers pyarrow dropped as invalid, ascending."""

    def line(self, kept_rows: np.ndarray) -> np.ndarray:
        dropped = np.asarray(self.dropped, dtype=np.int64)
        # kept rows before the j-th dropped row: dropped[j] - j
        shift = np.searchsorted(dropped - np.arange(len(dropped)), kept_rows, side="right")
        return self.first_line + kept_rows + shift


class _Problems:
    """Bad rows of one file, by index of the kept row; the first reason of a row wins."""

    def __init__(self, path: Path, lines: _LineMap) -> None:
        self.path = path
        self.lines = lines
        self.rows: dict[int, str] = {}
        self.invalid_lines: list[BadRow] = []
        """Rows pyarrow could not split into the right number of fields."""

    def add(self, rows: np.ndarray, reason: Callable[[int], str] | str) -> None:
        for row in np.asarray(rows).tolist():
            if row not in self.rows:
                self.rows[row] = reason if isinstance(reason, str) else reason(row)

    def bad_rows(self) -> list[BadRow]:
        """Every bad row once (its first reason), by line."""
        kept = np.fromiter(self.rows, dtype=np.int64, count=len(self.rows))
        lines = self.lines.line(kept).tolist()
        found = [
            BadRow(self.path.name, ln, self.rows[r]) for r, ln in zip(kept, lines, strict=True)
        ]
        first = {b.line: b for b in reversed(self.invalid_lines + found)}
        return sorted(first.values(), key=lambda b: b.line)

    def raise_first(self) -> None:
        bad = self.bad_rows()
        if bad:
            more = f" ({len(bad) - 1} more bad row(s) in this file)" if len(bad) > 1 else ""
            raise ParseError(
                f"{self.path}, line {bad[0].line}: {bad[0].reason}{more}. Fix or remove the row, "
                "or pass --on-bad-row skip to leave malformed rows out (they are recorded)."
            )


def _csv_options(
    text: _TextFile, wanted: Sequence[str], problems: _Problems, first_row: int = 0
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


def _read_batches(
    text: _TextFile, wanted: Sequence[str], problems: _Problems
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


def _blocks(stream: BinaryIO) -> Iterator[tuple[bytes, int, int]]:
    """Decompressed text in ~4 MB blocks of whole lines: ``data[start:end]``.

    Only a line cut by a read is copied (into a small block of its own), never a whole block.
    """
    rest = b""
    while data := stream.read(_SCAN_BLOCK_BYTES):
        first = data.find(b"\n") + 1
        if not first:  # a line longer than a block
            rest += data
            continue
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
    buffer: np.ndarray, quotes: np.ndarray, first_row: int, problems: _Problems
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
    scalars: Sequence[str],
    with_correlations: bool,
    problems: _Problems,
) -> Iterator[dict[str, np.ndarray]]:
    """The parsed columns of each block of lines of an XP file whose arrays are quoted cells.

    The compiled scanner (:mod:`xpbatch.fastscan`) reads well-formed blocks; a block it gives up
    on is read by the general pyarrow reader, which also explains any malformed row.
    """
    fast = _FastLayout.of(text.columns, scalars, with_correlations)
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
                piece = _parse_xp_batch(batch, scalars, with_correlations, problems, row0)
            first_row += n_lines
            row0 += len(piece[schema.SOURCE_ID])
            yield piece
    except (EOFError, OSError) as e:
        raise _unreadable(text, text.first_line + first_row, e) from e


@dataclasses.dataclass(frozen=True)
class _FastLayout:
    """How the compiled scanner lays out an XP file's columns, and how to unpack its output."""

    layout: fastscan.Layout
    """Where the scanner puts each column."""
    integers: list[str]
    """Names of the scanner's integer slots: source_id, both n_parameters, integer scalars."""
    floats: list[str]
    """Names of its float slots (float scalars)."""
    scalars: Sequence[str]
    with_correlations: bool

    @classmethod
    def of(
        cls, columns: Sequence[str], scalars: Sequence[str], with_correlations: bool
    ) -> _FastLayout | None:
        """The layout for a file with these columns; None without numba."""
        if fastscan is None:  # pragma: no cover - numba is a dependency
            return None
        n_parameters = [f"{band}_n_parameters" for band in schema.BANDS]
        integers = [schema.SOURCE_ID, *n_parameters]
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
                if not _fits(integer[name], dtype).all():
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
    problems: _Problems,
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
    problems: _Problems,
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
    skeleton: np.ndarray, marks: np.ndarray, first_row: int, problems: _Problems
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


def _require_columns(text: _TextFile, required: Sequence[str], what: str) -> None:
    missing = [c for c in required if c not in text.columns]
    if missing:
        raise ParseError(
            f"{text.path}: {what} needs column(s) {missing}, but the file has "
            f"{text.columns[:8]}{'...' if len(text.columns) > 8 else ''}; is this the right file?"
        )


# --- parsing columns --------------------------------------------------------------------------
def _string_column(batch: pa.RecordBatch, name: str) -> pa.StringArray:
    column = batch.column(name)
    return column.cast(pa.string()) if column.type != pa.string() else column


def _numbers(
    column: pa.StringArray, dtype: pa.DataType, name: str, problems: _Problems, row0: int
) -> pa.Array:
    """Cast a string column to ``dtype``; a token that is not a number becomes a bad row."""
    try:
        return pc.cast(column, dtype)
    except pa.ArrowInvalid:
        # Only on bad input: find the offending tokens one by one, with pyarrow's own rules.
        values = column.to_pylist()
        bad = [i for i, v in enumerate(values) if v is not None and not _castable(v, dtype)]
        problems.add(
            np.array(bad, dtype=np.int64) + row0,
            lambda r: f"{name} is not a number: {values[r - row0]!r}",
        )
        keep = np.ones(len(values), dtype=bool)
        keep[bad] = False
        return pc.cast(pc.if_else(pa.array(keep), column, pa.scalar(None, pa.string())), dtype)


def _castable(text: str, dtype: pa.DataType) -> bool:
    try:
        pc.cast(pa.array([text]), dtype)
    except pa.ArrowInvalid:
        return False
    return True


def _int_values(column: pa.Array, missing: int) -> np.ndarray:
    return np.asarray(pc.fill_null(column, missing).to_numpy(zero_copy_only=False))


def _array_cells(
    column: pa.StringArray,
    expected: np.ndarray,
    width: int,
    name: str,
    problems: _Problems,
    row0: int,
) -> np.ndarray:
    """Parse a column of array cells ('[a,b,...]' or '(a, b, ...)') into (rows, width) float64.

    ``expected`` is each row's declared length (from ``*_n_parameters``; -1 when missing). Null
    cells give NaN rows. A cell of the wrong length or with a non-number is a bad row (NaN).
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
    problems: _Problems,
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


# --- one XP file ------------------------------------------------------------------------------
@dataclasses.dataclass
class ParsedFile:
    """The rows of one XP file (in file order), plus what was wrong with some of them."""

    path: Path
    source_id: np.ndarray
    line: np.ndarray
    coefficients: np.ndarray
    coefficient_errors: np.ndarray
    scalars: dict[str, np.ndarray]
    correlations: dict[str, np.ndarray] | None
    bad_rows: list[BadRow]
    file_info: dict[str, Any]
    """Name, path, checksum, size, rows (see :meth:`_HashingReader.finish`)."""


def _xp_columns(scalars: Sequence[str], with_correlations: bool) -> list[str]:
    columns = [schema.SOURCE_ID]
    for band in schema.BANDS:
        columns += [f"{band}_n_parameters", f"{band}_coefficients", f"{band}_coefficient_errors"]
        if with_correlations:
            columns.append(schema.correlations_name(band))
    return columns + [s for s in scalars if s not in columns]


def parse_xp_file(
    path: PathLike,
    *,
    scalars: Sequence[str] = (),
    with_correlations: bool = False,
    on_bad_row: str = "error",
    verify_md5: bool = True,
) -> ParsedFile:
    """Parse one DR3 XP continuous-spectrum file (any encoding of FORMAT.md, gzipped or not).

    Parameters
    ----------
    path
        The file.
    scalars
        DR3 scalar columns to keep (names of :data:`xpbatch.schema.DR3_SCALARS`).
    with_correlations
        Also parse the 1485-value correlation arrays.
    on_bad_row
        'error' raises :class:`~xpbatch.errors.ParseError` at the first malformed row (file, line,
        reason); 'skip' leaves malformed rows out and lists them in ``bad_rows``.
    verify_md5
        Compare the file with the MD5 listed in a ``_MD5SUM.txt`` beside it, if any.

    Returns
    -------
    ParsedFile
        Coefficients and errors as float32 of the text values, BP then RP; NaN for a missing band.
    """
    path = Path(path)
    text = _open_text(path, verify_md5=verify_md5)
    with text.stream, text.hashing:
        wanted = _xp_columns(scalars, with_correlations)
        _require_columns(text, wanted, "an XP continuous-spectrum file")
        problems = _Problems(path, _LineMap(text.first_line))
        pieces: list[dict[str, Any]] = []
        row0 = 0
        for piece in _parse_blocks(text, wanted, scalars, with_correlations, problems):
            pieces.append(piece)
            row0 += len(piece[schema.SOURCE_ID])
            if on_bad_row == "error":
                problems.raise_first()
        file_info = text.hashing.finish(path)
    bad_rows = problems.bad_rows()
    if on_bad_row == "error":
        problems.raise_first()
    if not pieces:  # a header without rows: parse an empty batch for the right shapes
        empty = pa.RecordBatch.from_pydict({c: pa.array([], pa.string()) for c in wanted})
        pieces.append(_parse_xp_batch(empty, scalars, with_correlations, problems, 0))
    columns = _concat(pieces)
    keep = np.ones(row0, dtype=bool)
    keep[list(problems.rows)] = False
    if not keep.all():
        columns = {k: v[keep] for k, v in columns.items()}
    return ParsedFile(
        path=path,
        source_id=columns.pop(schema.SOURCE_ID),
        line=problems.lines.line(np.flatnonzero(keep)),
        coefficients=columns.pop(schema.COEFFICIENTS),
        coefficient_errors=columns.pop(schema.COEFFICIENT_ERRORS),
        correlations=(
            {b: columns.pop(schema.correlations_name(b)) for b in schema.BANDS}
            if with_correlations
            else None
        ),
        scalars={s: columns.pop(s) for s in scalars},
        bad_rows=bad_rows,
        file_info={**file_info, "rows": int(keep.sum())},
    )


def _concat(pieces: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    if not pieces:
        return {}
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def _parse_xp_batch(
    batch: pa.RecordBatch,
    scalars: Sequence[str],
    with_correlations: bool,
    problems: _Problems,
    row0: int,
) -> dict[str, np.ndarray]:
    """Columns of one batch: source_id, coefficients, errors, scalars, correlations."""
    sid = _numbers(_string_column(batch, schema.SOURCE_ID), pa.int64(), "source_id", problems, row0)
    source_id = _int_values(sid, 0)
    problems.add(np.flatnonzero(source_id <= 0) + row0, "source_id is missing or not positive")
    out: dict[str, np.ndarray] = {schema.SOURCE_ID: source_id}
    coefficients: list[np.ndarray] = []
    errors: list[np.ndarray] = []
    for band in schema.BANDS:
        n_par = _numbers(
            _string_column(batch, f"{band}_n_parameters"),
            pa.int64(),
            f"{band}_n_parameters",
            problems,
            row0,
        )
        expected = _int_values(n_par, -1)
        width = _n_coefficients(band)
        for name, sink in (
            (f"{band}_coefficients", coefficients),
            (f"{band}_coefficient_errors", errors),
        ):
            cells = _array_cells(_string_column(batch, name), expected, width, name, problems, row0)
            sink.append(_as_float32(cells))
        if with_correlations:
            name = schema.correlations_name(band)
            n_corr = np.where(expected >= 0, expected * (expected - 1) // 2, -1)
            cells = _array_cells(
                _string_column(batch, name), n_corr, n_correlations(width), name, problems, row0
            )
            out[name] = _as_float32(cells)
    out[schema.COEFFICIENTS] = np.hstack(coefficients)  # (rows, 110): BP then RP
    out[schema.COEFFICIENT_ERRORS] = np.hstack(errors)
    for name in scalars:
        dtype = np.dtype(schema.DR3_SCALARS[name][0])
        arrow_type = pa.int64() if dtype.kind == "i" else pa.float64()
        values = _numbers(_string_column(batch, name), arrow_type, name, problems, row0)
        if dtype.kind == "i":
            integers = _int_values(values, INT_MISSING)
            for row in np.flatnonzero(~_fits(integers, dtype)).tolist():  # bad input only
                reason = f"{name} = {integers[row]} does not fit {dtype}"
                problems.add(np.array([row0 + row]), reason)
            out[name] = integers.astype(dtype)
        else:
            out[name] = _as_float32(pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False))
    return out


def _fits(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Which integers ``dtype`` can hold (DR3's int16 columns: a larger value is malformed)."""
    limits = np.iinfo(dtype)
    return (values >= limits.min) & (values <= limits.max)


def _as_float32(values: np.ndarray) -> np.ndarray:
    """float32 of float64 values; one beyond float32's range becomes inf (flagged downstream)."""
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


# --- gaia_source ------------------------------------------------------------------------------
@dataclasses.dataclass
class GaiaSourceTable:
    """source_id (ascending), phot_g_mean_flux and phot_g_mean_mag of gaia_source files."""

    source_id: np.ndarray
    flux: np.ndarray
    mag: np.ndarray
    files: list[dict[str, Any]]


def read_gaia_source(paths: Sequence[PathLike], *, verify_md5: bool = True) -> GaiaSourceTable:
    """Read source_id and the G flux/magnitude from gaia_source CSV(.gz) or Parquet files.

    Either of ``phot_g_mean_flux`` and ``phot_g_mean_mag`` may be absent (not both). Duplicate
    source_ids across the files are an error.
    """
    ids, fluxes, mags, files = [], [], [], []
    for path in map(Path, paths):
        read = _read_gaia_parquet if path.suffix.lower() == ".parquet" else _read_gaia_csv
        sid, flux, mag, info = read(path, verify_md5)
        ids.append(sid)
        fluxes.append(flux)
        mags.append(mag)
        files.append(info)
    source_id = np.concatenate(ids) if ids else np.empty(0, np.int64)
    order, repeats = source_id_order(source_id)
    source_id = source_id[order]
    repeated = source_id[repeats]
    if repeated.size:
        raise ParseError(
            f"gaia_source files {[str(p) for p in paths]} list source_id {int(repeated[0])} more "
            f"than once ({repeated.size} repeats); give each gaia_source file once"
        )
    return GaiaSourceTable(
        source_id,
        np.concatenate(fluxes)[order] if fluxes else np.empty(0),
        np.concatenate(mags)[order] if mags else np.empty(0),
        files,
    )


_G_COLUMNS = (schema.SOURCE_ID, schema.PHOT_G_MEAN_FLUX, "phot_g_mean_mag")


def _read_gaia_csv(
    path: Path, verify_md5: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    text = _open_text(path, verify_md5=verify_md5)
    with text.stream, text.hashing:
        wanted = [c for c in _G_COLUMNS if c in text.columns]
        _require_gaia_columns(path, wanted)
        problems = _Problems(path, _LineMap(text.first_line))
        pieces, row0 = [], 0
        for batch in _read_batches(text, wanted, problems):
            piece = {}
            for name in wanted:
                arrow_type = pa.int64() if name == schema.SOURCE_ID else pa.float64()
                values = _numbers(_string_column(batch, name), arrow_type, name, problems, row0)
                piece[name] = pc.fill_null(values, np.nan if name != schema.SOURCE_ID else 0)
            pieces.append({k: v.to_numpy(zero_copy_only=False) for k, v in piece.items()})
            row0 += batch.num_rows
            problems.raise_first()  # a broken gaia_source row is never skipped: the join needs it
        info = text.hashing.finish(path)
    return _gaia_arrays(_concat(pieces), row0, info)


def _read_gaia_parquet(
    path: Path, verify_md5: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        names = {n.lower(): n for n in pq.read_schema(path).names}
        wanted = [c for c in _G_COLUMNS if c in names]
        _require_gaia_columns(path, wanted)
        table = pq.read_table(path, columns=[names[c] for c in wanted])
    except (OSError, pa.ArrowInvalid) as e:
        raise ParseError(f"{path}: cannot read this Parquet file ({e})") from e
    columns = {
        c: pc.fill_null(
            table.column(names[c]).cast(pa.float64() if c != schema.SOURCE_ID else pa.int64()),
            np.nan if c != schema.SOURCE_ID else 0,
        ).to_numpy()
        for c in wanted
    }
    with _HashingReader(open(path, "rb"), _manifest_md5(path) if verify_md5 else None) as hashing:
        info = hashing.finish(path)
    return _gaia_arrays(columns, table.num_rows, info)


def _require_gaia_columns(path: Path, found: list[str]) -> None:
    if schema.SOURCE_ID not in found or len(found) < 2:
        raise ParseError(
            f"{path}: a gaia_source file needs source_id and phot_g_mean_flux or phot_g_mean_mag; "
            f"found {found}"
        )


def _gaia_arrays(
    columns: dict[str, np.ndarray], n: int, info: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    nan = np.full(n, np.nan)
    info = {**info, "rows": n, "role": "gaia_source"}
    return (
        np.asarray(columns.get(schema.SOURCE_ID, np.empty(0)), dtype=np.int64),
        np.asarray(columns.get(schema.PHOT_G_MEAN_FLUX, nan), dtype=np.float64),
        np.asarray(columns.get("phot_g_mean_mag", nan), dtype=np.float64),
        info,
    )


def join_g_flux(source_id: np.ndarray, gaia: GaiaSourceTable) -> tuple[np.ndarray, np.ndarray]:
    """phot_g_mean_flux of each source, and whether it came from phot_g_mean_mag.

    A source absent from gaia_source, or with neither flux nor magnitude, gets NaN (it is kept and
    flagged G_FLUX_MISSING by :func:`~xpbatch.store.compute_input_flags`).
    """
    index = np.searchsorted(gaia.source_id, source_id)
    index = np.minimum(index, max(len(gaia.source_id) - 1, 0))
    found = (
        gaia.source_id[index] == source_id
        if len(gaia.source_id)
        else np.zeros(len(source_id), bool)
    )
    flux = np.where(found, gaia.flux[index] if len(gaia.flux) else np.nan, np.nan)
    mag = np.where(found, gaia.mag[index] if len(gaia.mag) else np.nan, np.nan)
    from_mag = ~np.isfinite(flux) & np.isfinite(mag)
    flux[from_mag] = 10 ** ((schema.G_ZERO_POINT_MAG - mag[from_mag]) / 2.5)
    if not found.all():
        logger.warning("%d source(s) are not in the gaia_source files; flagged", (~found).sum())
    return flux, from_mag


# --- checksums --------------------------------------------------------------------------------
def _manifest_md5(path: Path) -> str | None:
    """The MD5 that ``_MD5SUM.txt`` beside ``path`` lists for it, or None."""
    manifest = path.parent / MD5_MANIFEST
    if not manifest.is_file():
        return None
    for line in manifest.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == path.name:
            return fields[0].lower()
    logger.warning("%s does not list %s; its checksum is not verified", manifest, path.name)
    return None


# --- per-file parts (resumable) ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FileTask:
    """Everything one worker needs to turn one XP file into a part."""

    xp_file: str
    gaia_source_files: tuple[str, ...]
    part_dir: str
    scalars: tuple[str, ...]
    with_correlations: bool
    on_bad_row: str
    verify_md5: bool

    def fingerprint(self) -> str:
        """Changes when the inputs (path, size, mtime) or the parsing options change."""
        stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files()]
        options = (self.scalars, self.with_correlations, self.on_bad_row, __version__)
        return hashlib.sha256(json.dumps([stats, options]).encode()).hexdigest()

    def files(self) -> list[str]:
        return [self.xp_file, *self.gaia_source_files]


@dataclasses.dataclass(frozen=True)
class PartInfo:
    """A finished part: where it is, its rows and source_id range, and its provenance."""

    part_dir: str
    rows: int
    first_id: int
    last_id: int
    files: tuple[dict[str, Any], ...]
    bad_rows: tuple[BadRow, ...]

    @classmethod
    def load(cls, part_dir: Path) -> PartInfo:
        info = json.loads((part_dir / "done.json").read_text())
        return cls(
            str(part_dir),
            info["rows"],
            info["first_id"],
            info["last_id"],
            tuple(info["files"]),
            tuple(BadRow(**b) for b in info["bad_rows"]),
        )


def ingest_file(task: FileTask) -> PartInfo:
    """Parse one XP file, join its G flux, sort by source_id and write its part (or reuse it)."""
    part_dir = Path(task.part_dir)
    fingerprint = task.fingerprint()
    marker = part_dir / "done.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        logger.info("reusing the finished part of %s", task.xp_file)
        return PartInfo.load(part_dir)
    parsed = parse_xp_file(
        task.xp_file,
        scalars=task.scalars,
        with_correlations=task.with_correlations,
        on_bad_row=task.on_bad_row,
        verify_md5=task.verify_md5,
    )
    gaia = read_gaia_source(task.gaia_source_files, verify_md5=task.verify_md5)
    files = [{**parsed.file_info, "role": "xp"}, *gaia.files]
    columns = _sorted_part_columns(parsed, gaia)
    _write_part(part_dir, columns, fingerprint, files, parsed.bad_rows)
    return PartInfo.load(part_dir)


def _sorted_part_columns(parsed: ParsedFile, gaia: GaiaSourceTable) -> dict[str, np.ndarray]:
    order, repeats = source_id_order(parsed.source_id)
    in_order = bool(np.all(order[1:] > order[:-1]))  # DR3 files are sorted: then copy nothing

    def sort(values: np.ndarray) -> np.ndarray:
        return values if in_order else values[order]

    sid = sort(parsed.source_id)
    if repeats.size:
        lines = sort(parsed.line)
        i = repeats[0] - 1
        raise ParseError(
            f"{parsed.path}: source_id {int(sid[i])} appears twice (lines {int(lines[i])} and "
            f"{int(lines[i + 1])}); every source must be listed once. Remove the duplicate row."
        )
    flux, from_mag = join_g_flux(sid, gaia)
    coefficients = sort(parsed.coefficients)
    errors = sort(parsed.coefficient_errors)
    columns = {
        schema.SOURCE_ID: sid,
        "line": sort(parsed.line),
        schema.COEFFICIENTS: coefficients,
        schema.COEFFICIENT_ERRORS: errors,
        schema.PHOT_G_MEAN_FLUX: flux,
        schema.INPUT_FLAGS: compute_input_flags(coefficients, errors, flux, flux_from_mag=from_mag),
        **{name: sort(values) for name, values in parsed.scalars.items()},
    }
    for band, values in (parsed.correlations or {}).items():
        columns[schema.correlations_name(band)] = sort(values)
    return columns


def _write_part(
    part_dir: Path,
    columns: Mapping[str, np.ndarray],
    fingerprint: str,
    files: list[dict[str, Any]],
    bad_rows: list[BadRow],
) -> None:
    """Write a part under a temporary name, its marker last, then rename it into place."""
    tmp = part_dir.with_name(f"{part_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    for name, values in columns.items():
        np.save(tmp / f"{name}.npy", values)
    sid = columns[schema.SOURCE_ID]
    info = {
        "fingerprint": fingerprint,
        "rows": len(sid),
        "first_id": int(sid[0]) if len(sid) else None,
        "last_id": int(sid[-1]) if len(sid) else None,
        "files": files,
        "bad_rows": [dataclasses.asdict(b) for b in bad_rows],
    }
    (tmp / "done.json").write_text(json.dumps(info))
    if part_dir.exists():
        shutil.rmtree(part_dir)
    tmp.rename(part_dir)


def _load(part_dir: str, name: str, rows: slice | None = None) -> np.ndarray:
    values = np.load(Path(part_dir) / f"{name}.npy", mmap_mode="r")
    return np.asarray(values if rows is None else values[rows])


# --- assembling the store ---------------------------------------------------------------------
Piece = tuple[str, int, int]
"""(part directory, first row, stop row) of a part."""


def _merge_overlapping(parts: list[PartInfo], staging: Path) -> list[PartInfo]:
    """Parts in source_id order with disjoint id ranges; overlapping ones are merged into one.

    DR3 bulk files never overlap, so this is a no-op there; arbitrary archive extracts may.
    Merging holds the overlapping parts in memory.
    """
    ordered = sorted((p for p in parts if p.rows), key=lambda p: (p.first_id, p.last_id))
    groups: list[list[PartInfo]] = []
    for part in ordered:
        if groups and part.first_id <= max(p.last_id for p in groups[-1]):
            groups[-1].append(part)
        else:
            groups.append([part])
    return [g[0] if len(g) == 1 else _merge_group(g, staging) for g in groups]


def _merge_group(group: list[PartInfo], staging: Path) -> PartInfo:
    names = [n.name[:-4] for n in sorted(Path(group[0].part_dir).glob("*.npy"))]
    sid = np.concatenate([_load(p.part_dir, schema.SOURCE_ID) for p in group])
    origin = np.concatenate([np.full(p.rows, i) for i, p in enumerate(group)])
    order, repeats = source_id_order(sid)
    if repeats.size:
        a, b = order[repeats[0] - 1], order[repeats[0]]
        lines = np.concatenate([_load(p.part_dir, "line") for p in group])
        files = [p.files[0]["path"] for p in group]
        raise ParseError(
            f"source_id {int(sid[a])} appears in {files[origin[a]]} (line {int(lines[a])}) and in "
            f"{files[origin[b]]} (line {int(lines[b])}); every source must be listed once. "
            "Remove the duplicate file or row."
        )
    columns = {n: np.concatenate([_load(p.part_dir, n) for p in group])[order] for n in names}
    key = hashlib.sha256("".join(p.part_dir for p in group).encode()).hexdigest()[:12]
    merged = staging / f"merged-{key}"
    files = [f for p in group for f in p.files]
    _write_part(merged, columns, key, files, [b for p in group for b in p.bad_rows])
    return PartInfo.load(merged)


def _chunk_pieces(parts: list[PartInfo], regions: Sequence[slice]) -> list[list[Piece]]:
    """For each store chunk (``regions``), the slices of the ordered, disjoint parts filling it."""
    bounds = np.cumsum([0] + [p.rows for p in parts])  # global first row of each part
    chunks = []
    for region in regions:
        start, stop = region.start, region.stop
        pieces = []
        for i in range(np.searchsorted(bounds, start, side="right") - 1, len(parts)):
            lo, hi = max(start, bounds[i]), min(stop, bounds[i + 1])
            if lo >= stop:
                break
            if hi > lo:
                pieces.append((parts[i].part_dir, int(lo - bounds[i]), int(hi - bounds[i])))
        chunks.append(pieces)
    return chunks


def _write_chunk(writer: XPStoreWriter, start: int, pieces: list[Piece]) -> int:
    """Write one store chunk from slices of parts; returns its first row (a task's result)."""

    def column(name: str) -> np.ndarray:
        return np.concatenate([_load(d, name, slice(lo, hi)) for d, lo, hi in pieces])

    writer.write_rows(
        start,
        source_id=column(schema.SOURCE_ID),
        coefficients=column(schema.COEFFICIENTS),
        coefficient_errors=column(schema.COEFFICIENT_ERRORS),
        phot_g_mean_flux=column(schema.PHOT_G_MEAN_FLUX),
        input_flags=column(schema.INPUT_FLAGS),
        scalars={name: column(name) for name in writer.scalars},
        correlations=(
            {b: column(schema.correlations_name(b)) for b in schema.BANDS}
            if writer.with_correlations
            else None
        ),
    )
    return start


# --- the entry point --------------------------------------------------------------------------
def pair_files(
    xp_files: Sequence[PathLike], gaia_source_files: Sequence[PathLike]
) -> dict[str, tuple[str, ...]]:
    """The gaia_source files to join with each XP file.

    DR3 bulk names pair by suffix (``XpContinuousMeanSpectrum_000000-003111.csv.gz`` with
    ``GaiaSource_000000-003111.csv.gz``); otherwise every XP file joins against all given files.
    """
    if not gaia_source_files:
        raise ConfigError(
            "no gaia_source files given: phot_g_mean_flux comes from gaia_source; pass "
            "--gaia-source FILES (the same-suffix GaiaSource_*.csv.gz, or any CSV/Parquet with "
            "source_id and phot_g_mean_flux or phot_g_mean_mag)"
        )
    for path in [*xp_files, *gaia_source_files]:
        if not Path(path).is_file():
            raise ParseError(
                f"{path}: file not found" if not Path(path).exists() else f"{path}: not a file"
            )
    by_suffix: dict[str, str] = {}
    for path in map(str, gaia_source_files):
        match = GAIA_SOURCE_NAME.match(Path(path).name)
        if match:
            by_suffix[match.group(1)] = path
    pairs: dict[str, tuple[str, ...]] = {}
    for path in map(str, xp_files):
        match = XP_NAME.match(Path(path).name)
        if match and by_suffix:
            if match.group(1) not in by_suffix:
                raise ParseError(
                    f"{path}: its gaia_source file GaiaSource_{match.group(1)}.csv.gz is not among "
                    f"the --gaia-source files; add it (the G flux of this file's sources is there)"
                )
            pairs[path] = (by_suffix[match.group(1)],)
        else:
            pairs[path] = tuple(map(str, gaia_source_files))
    return pairs


def expand_inputs(paths: Sequence[PathLike], pattern: str) -> list[str]:
    """Files as given, with each directory replaced by its files matching ``pattern``, sorted.

    Lets ``xpbatch ingest dr3/ --gaia-source gaia_source/`` name the 3386 DR3 files without
    overflowing the shell's argument list.
    """
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(str(p) for p in path.glob(pattern) if p.is_file())
            if not found:
                raise ParseError(f"{path}: the directory has no {pattern} files")
            files.extend(found)
        else:
            files.append(str(path))
    return files


def _part_dir(staging: Path, xp_file: str) -> Path:
    key = hashlib.sha256(str(Path(xp_file).resolve()).encode()).hexdigest()[:12]
    return staging / f"{Path(xp_file).name}-{key}"


def _run(client: Client | None, func: Callable[..., Any], *iterables: Sequence[Any]) -> list[Any]:
    """``map(func, *iterables)`` serially or on the cluster; the first failure is re-raised."""
    if client is None:
        return [func(*args) for args in zip(*iterables, strict=True)]
    futures = client.map(func, *iterables, pure=False)
    try:
        return client.gather(futures)
    finally:
        client.cancel(futures)


@locked_output("out", "ingest")
def ingest_files(
    xp_files: Sequence[PathLike],
    gaia_source_files: Sequence[PathLike],
    out: PathLike,
    *,
    client: Client | None = None,
    config: IngestConfig = IngestConfig(),  # noqa: B008 - frozen, so a shared default is safe
) -> Path:
    """Ingest DR3 XP continuous-spectrum files into an XP store.

    Parameters
    ----------
    xp_files
        ``XpContinuousMeanSpectrum_*.csv.gz`` bulk files or archive CSV/ECSV files; a directory
        stands for its ``XpContinuousMeanSpectrum_*`` files.
    gaia_source_files
        Companions with source_id and phot_g_mean_flux/phot_g_mean_mag (CSV(.gz) or Parquet);
        a directory stands for its ``GaiaSource_*`` files.
    out
        The store to write (Zarr v3 directory).
    client
        A ``distributed.Client`` to parse files and write chunks in parallel; None runs serially.
        Workers read and write ``<out>.parts/`` and ``out``: on several machines both must be
        on a filesystem they share.
    config
        Options; see :class:`~xpbatch.config.IngestConfig`.

    Returns
    -------
    pathlib.Path
        ``out``, complete. A failed ingest leaves ``out`` untouched; rerunning it reuses the
        files already parsed (``<out>.parts/``).

    Examples
    --------
    >>> ingest_files(["XpContinuousMeanSpectrum_000000-003111.csv.gz"],
    ...              ["GaiaSource_000000-003111.csv.gz"], "dr3.zarr")  # doctest: +SKIP
    PosixPath('dr3.zarr')
    """
    out = Path(out)
    check_overwritable(out, config.overwrite)  # out itself is only replaced once all went well
    xp_files = expand_inputs(xp_files, XP_GLOB)
    pairs = pair_files(xp_files, expand_inputs(gaia_source_files, GAIA_SOURCE_GLOB))
    staging = out.with_name(out.name + ".parts")
    scalars = tuple(schema.DR3_SCALARS) if config.scalars is None else config.scalars
    tasks = [
        FileTask(
            xp,
            gs,
            str(_part_dir(staging, xp)),
            scalars,
            config.with_correlations,
            config.on_bad_row,
            config.verify_md5,
        )
        for xp, gs in pairs.items()
    ]
    logger.info("parsing %d XP file(s) into %s", len(tasks), staging)
    parts: list[PartInfo] = _run(client, ingest_file, tasks)
    ordered = _merge_overlapping(parts, staging)
    n_rows = sum(p.rows for p in ordered)
    partial = out.with_name(out.name + ".partial")
    writer = XPStoreWriter.create(
        partial,
        n_rows,
        chunk_rows=config.chunk_rows,
        attrs={"ingest_options": {"on_bad_row": config.on_bad_row}},
        scalars=scalars,
        with_correlations=config.with_correlations,
        overwrite=True,  # a leftover .partial is ours, from a failed run
    )
    regions = writer.chunk_slices()
    chunks = _chunk_pieces(ordered, regions)
    _run(client, _write_chunk, [writer] * len(chunks), [r.start for r in regions], chunks)
    writer.finalize(extra_attrs={**_provenance(parts), **_partition_attrs(xp_files)})
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    if not config.keep_parts:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s: %d rows from %d file(s)", out, n_rows, len(tasks))
    return out


def _partition_attrs(xp_files: Sequence[str]) -> dict[str, Any]:
    """The DR3 partition ranges of the XP files, when every one is named like a bulk file.

    Recorded so that ``export-parquet`` can split the catalogue like the files it came from.
    """
    names = [Path(path).name for path in xp_files]
    if not all(range_of_file_name(name) for name in names):
        return {}
    try:
        ranges = ranges_from_file_names(names, origin="the XP file names")
    except ConfigError as error:  # overlapping names: not a DR3 partition, so none recorded
        logger.warning("no partition ranges recorded in the store: %s", error)
        return {}
    return {schema.STORE_ATTR_PARTITION_RANGES: ranges.to_list()}


def _provenance(parts: list[PartInfo]) -> dict[str, Any]:
    """Store attributes: input files with checksums and the skipped rows."""
    files: dict[str, dict[str, Any]] = {}
    for part in parts:
        for f in part.files:
            files.setdefault(f["path"], f)
    bad = [dataclasses.asdict(b) for p in parts for b in p.bad_rows]
    return {
        schema.STORE_ATTR_INPUT_FILES: list(files.values()),
        "skipped_row_count": len(bad),
        "skipped_rows": bad[:MAX_RECORDED_BAD_ROWS],
    }
