"""CSV and ECSV XP files: the bulk ``XpContinuousMeanSpectrum_*.csv.gz`` and the archive's.

Reads every text encoding of DR3 XP files (bulk files with an ECSV ``#`` header,
JSON arrays and ``null``; archive CSV ``"(a, b)"``; archive ECSV ``"[a,b]"``; pandas re-writes
with ``55.0``), gzipped or not. A file holding its arrays in one column per coefficient is read
as a table (:mod:`xpbatch.ingest.table`).

Parsing runs no Python per value or per row. Each ~4 MB block of text is first offered to a
numba-compiled scanner (:mod:`xpbatch.ingest.fastscan`, through
:mod:`xpbatch.ingest.fast_layout`) that reads well-formed lines in one pass; a block it gives up
on (a malformed row, an unusual token) goes to the general reader, which cuts the quoted cells
out of the lines (:mod:`xpbatch.ingest.quoted_cells`), turns an array column's cells into one
CSV buffer (brackets become line breaks) that pyarrow parses as 55 float columns
(:mod:`xpbatch.ingest.array_cells`), and explains every malformed row. Both give the same values
(float32 of the float64 of the text). The 1485-value correlation arrays are only parsed with
``with_correlations``; otherwise both readers jump over them at memchr speed. Opening a file
and reading its header is :mod:`xpbatch.ingest.text_file`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from xpbatch import schema
from xpbatch.ingest.array_cells import parse_xp_batch
from xpbatch.ingest.common import (
    EXTRAS,
    LineMap,
    ParsedFile,
    Problems,
    ReadRequest,
    concat,
    parsed_file,
)
from xpbatch.ingest.fast_layout import FastLayout
from xpbatch.ingest.quoted_cells import blank_unbalanced_lines, scan_block
from xpbatch.ingest.table import Layout, parse_columns
from xpbatch.ingest.text_file import (
    MAX_LINE_BYTES,
    TextFile,
    open_text,
    read_batches,
    too_long,
    unreadable,
)

# The XP scanner inflates 4 MB (~100 bulk rows) at a time: the text is still in cache when it
# is scanned, and gzip itself runs slower into much larger buffers.
_SCAN_BLOCK_BYTES = 1 << 22


class _LineTooLong(Exception):
    """A line longer than MAX_LINE_BYTES (the reader that knows the line number says so)."""


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


def _parse_blocks(
    text: TextFile,
    wanted: Sequence[str],
    request: ReadRequest,
    problems: Problems,
) -> Iterator[dict[str, np.ndarray]]:
    """The parsed columns of each block of lines of an XP file whose arrays are quoted cells.

    The compiled scanner (:mod:`xpbatch.ingest.fastscan`) reads well-formed blocks; a block it
    gives up on is read by the general pyarrow reader, which also explains any malformed row.
    """
    fast = FastLayout.of(text.columns, wanted, request)
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
                    buffer, quotes = blank_unbalanced_lines(buffer, quotes, first_row, problems)
                batch, n_lines = scan_block(text, buffer, quotes, wanted, problems, first_row)
                piece = parse_xp_batch(batch, request, problems, row0)
            first_row += n_lines
            row0 += len(piece[schema.SOURCE_ID])
            yield piece
    except (EOFError, OSError) as e:
        raise unreadable(text, text.first_line + first_row, e) from e
    except _LineTooLong:
        raise too_long(text.path, text.first_line + first_row) from None


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
    """Parse one CSV or ECSV XP file (any text encoding of DR3 XP files, gzipped or not).

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
                pieces.append(parse_xp_batch(_empty(wanted).to_batches()[0], request, problems, 0))
            columns = concat(pieces)
        file_info = text.hashing.finish(path)
    return parsed_file(path, columns, problems, file_info, request)


def _empty(names: Sequence[str]) -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in names})
