"""The general reader's first step: an XP block's lines with their quoted cells cut out.

An XP line is ~39 kB, 30 kB of it the correlation arrays we usually skip. pyarrow's tokenizer
would walk every byte of it; instead we find the double quotes (memchr speed), cut the quoted
cells out, let pyarrow parse the short rest of each line (the "skeleton": ~200 bytes, with a
marker where each non-empty quoted cell was), and hand pyarrow only the cells we want
(:func:`scan_block`); :mod:`xpbatch.ingest.array_cells` then parses them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from xpbatch.ingest.common import BadRow, Problems
from xpbatch.ingest.text_file import TextFile, csv_options, unreadable

_MARK = ord("Q")


def _gather(buffer: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """buffer[starts[0]:stops[0]] + buffer[starts[1]:stops[1]] + ... without a Python loop."""
    lengths = stops - starts
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return buffer[np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))]


def blank_unbalanced_lines(
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


def scan_block(
    text: TextFile,
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
    text: TextFile,
    skeleton: np.ndarray,
    wanted: Sequence[str],
    problems: Problems,
    first_row: int,
) -> pa.Table:
    options = csv_options(text, wanted, problems, first_row)
    try:
        return pacsv.read_csv(pa.BufferReader(pa.py_buffer(skeleton)), **options)
    except pa.ArrowInvalid as e:
        raise unreadable(text, text.first_line + first_row, e) from e


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
