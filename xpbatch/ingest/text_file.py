"""Open a CSV/ECSV file and read its header, and pyarrow's CSV options for its lines.

Shared by the XP text reader (:mod:`xpbatch.ingest.text`) and the gaia_source reader
(:mod:`xpbatch.ingest.gaia_source`): gzip is detected by its magic bytes, ``#`` lines are
skipped, and a line longer than :data:`MAX_LINE_BYTES` or an unreadable file is one
:class:`~xpbatch.errors.ParseError` naming the file and line.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv

from xpbatch import dr3
from xpbatch.errors import ParseError
from xpbatch.ingest.common import BadRow, HashingReader, Problems, gzip_module, manifest_md5

_BLOCK_BYTES = 1 << 26  # pyarrow reads 64 MB of text per batch: ~1700 bulk rows, flat memory
MAX_LINE_BYTES = 1 << 24
"""The longest line a text reader buffers (16 MB; an XP line with its correlations is ~40 kB):
a longer one is refused with its file and line, not read whole into memory."""
NULLS = list(dr3.NULL_TOKENS)


@dataclasses.dataclass
class TextFile:
    """An open (maybe gzipped) CSV file positioned at its first data line."""

    path: Path
    columns: list[str]
    """Column names, lower-cased."""
    first_line: int
    """1-based line number of the first data line (after ``#`` lines and the column names)."""
    stream: BinaryIO
    hashing: HashingReader


def open_text(path: Path, *, verify_md5: bool, raw: BinaryIO | None = None) -> TextFile:
    """Open ``path`` (gzip detected by its magic bytes), skip ``#`` lines, read the column names.

    ``raw``: the file's bytes when they do not come from ``path`` itself (a zip member).
    """
    if raw is None:
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed through TextFile.hashing
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
                raise too_long(path, line_no)
            if not line:
                raise ParseError(f"{path}: no column-name line (the file is empty or all '#')")
            if not line.startswith(b"#"):
                break
    except (EOFError, OSError) as e:
        raise ParseError(f"{path}: cannot read the header ({e}); is the file truncated?") from e
    columns = [c.strip().strip('"').lower() for c in line.decode("utf-8").rstrip("\r\n").split(",")]
    return TextFile(path, columns, line_no + 1, stream, hashing)


def csv_options(
    text: TextFile, wanted: Sequence[str], problems: Problems, first_row: int = 0
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
            null_values=NULLS,
            strings_can_be_null=True,
        ),
    }


def unreadable(text: TextFile, line: int, error: Exception) -> ParseError:
    """The error for a file that cannot be read on after ``line`` (truncated or corrupt)."""
    return ParseError(
        f"{text.path}: cannot read the file after line {line} ({error}); "
        "is it truncated or corrupt? Download it again."
    )


def read_batches(
    text: TextFile, wanted: Sequence[str], problems: Problems
) -> Iterator[pa.RecordBatch]:
    """Stream ``wanted`` columns (as strings) with pyarrow's CSV reader, in batches."""
    try:
        yield from pacsv.open_csv(text.stream, **csv_options(text, wanted, problems))
    except (pa.ArrowInvalid, EOFError, OSError) as e:
        raise unreadable(text, text.first_line, e) from e


def too_long(path: Path, line: int) -> ParseError:
    """The error for a line longer than :data:`MAX_LINE_BYTES`."""
    return ParseError(
        f"{path}, line {line}: a line longer than {MAX_LINE_BYTES >> 20} MB (an XP line is tens "
        "of kB); this is not an XP file, or a damaged one"
    )
