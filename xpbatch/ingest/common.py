"""What every XP reader shares: checksummed reading, bad rows, number casts, the parsed result."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xpbatch import dr3, schema
from xpbatch.dr3 import MD5_MANIFEST
from xpbatch.errors import ChecksumError, ParseError

try:  # ISA-L inflates gzip several times faster than zlib: decompression weighs on the parse.
    from isal import igzip as gzip_module  # noqa: F401 - the readers inflate with it
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - the plain zlib path is exercised where isal is absent
    from zlib import crc32 as _crc32

logger = logging.getLogger(__name__)


class HashingReader(io.RawIOBase):
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


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A malformed input row: where it is and what is wrong with it."""

    file: str
    line: int
    """Line of a text file, or 1-based row of a table (FITS, VOTable, AVRO, Parquet)."""
    reason: str
    unit: str = "line"
    """'line' or 'row': what ``line`` counts."""

    def __str__(self) -> str:
        return f"{self.file}, {self.unit} {self.line}: {self.reason}"


class LineMap:
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


class Problems:
    """Bad rows of one file, by index of the kept row; the first reason of a row wins."""

    def __init__(self, path: Path, lines: LineMap, unit: str = "line") -> None:
        self.path = path
        self.lines = lines
        self.unit = unit
        """'line' for text files; 'row' for tables, whose rows count from 1."""
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
            BadRow(self.path.name, ln, self.rows[r], self.unit)
            for r, ln in zip(kept, lines, strict=True)
        ]
        first = {b.line: b for b in reversed(self.invalid_lines + found)}
        return sorted(first.values(), key=lambda b: b.line)

    def raise_first(self) -> None:
        bad = self.bad_rows()
        if bad:
            more = f" ({len(bad) - 1} more bad row(s) in this file)" if len(bad) > 1 else ""
            raise ParseError(
                f"{self.path}, {self.unit} {bad[0].line}: {bad[0].reason}{more}. Fix or remove "
                "the row, or pass --on-bad-row skip to leave malformed rows out (they are "
                "recorded)."
            )


# --- parsing columns --------------------------------------------------------------------------
def string_column(batch: pa.RecordBatch, name: str) -> pa.StringArray:
    column = batch.column(name)
    return column.cast(pa.string()) if column.type != pa.string() else column


def numbers(
    column: pa.StringArray, dtype: pa.DataType, name: str, problems: Problems, row0: int
) -> pa.Array:
    """Cast a string column to ``dtype``; a token that is not a number becomes a bad row.

    An integer column may be written as floats (pandas writes ``55.0``): accepted when integral.
    """
    if pa.types.is_integer(dtype):
        try:
            return pc.cast(column, dtype)
        except pa.ArrowInvalid:
            floats = _tokens(column, pa.float64(), name, problems, row0)
            return integral(floats.to_numpy(zero_copy_only=False), name, problems, row0)
    return _tokens(column, dtype, name, problems, row0)


def integral(values: np.ndarray, name: str, problems: Problems, row0: int) -> pa.Array:
    """int64 of float values that are whole numbers (NaN is null); any other is a bad row.

    Beyond 2**53 a float no longer holds every integer (a source_id written as a float has lost
    digits), so such values are bad rows too.
    """
    values = np.asarray(values, dtype=np.float64)
    null = np.isnan(values)
    whole = ~null & (values == np.round(values)) & (np.abs(values) < 2.0**53)
    bad = np.flatnonzero(~null & ~whole)
    problems.add(bad + row0, lambda r: f"{name} = {values[r - row0]!r} is not an integer")
    return pa.array(np.where(whole, values, 0).astype(np.int64), mask=~whole)


def _tokens(
    column: pa.StringArray, dtype: pa.DataType, name: str, problems: Problems, row0: int
) -> pa.Array:
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


def int_values(column: pa.Array, missing: int) -> np.ndarray:
    return np.asarray(pc.fill_null(column, missing).to_numpy(zero_copy_only=False))


@dataclasses.dataclass
class ParsedFile:
    """The rows of one XP file (in file order), plus what was wrong with some of them."""

    path: Path
    source_id: np.ndarray
    line: np.ndarray
    coefficients: np.ndarray
    coefficient_errors: np.ndarray
    scalars: dict[str, np.ndarray]
    """The requested DR3 scalar columns that the file has."""
    correlations: dict[str, np.ndarray] | None
    bad_rows: list[BadRow]
    file_info: dict[str, Any]
    """Name, path, checksum, size, rows (see :meth:`HashingReader.finish`)."""
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """gaia_source columns the XP file itself carries (G flux, G magnitude, ra, dec), float64."""


@dataclasses.dataclass(frozen=True)
class ReadRequest:
    """What a reader extracts from an XP file, whatever its encoding."""

    scalars: tuple[str, ...] = ()
    """DR3 scalar columns to keep when the file has them (a file without them is fine)."""
    with_correlations: bool = False
    """Also read the packed correlations (a file without them leaves NaN there)."""
    on_bad_row: str = "error"
    """'error' raises at the first malformed row; 'skip' leaves it out and records it."""
    verify_md5: bool = True
    """Compare the file with a ``_MD5SUM.txt`` beside it, when there is one."""
    columns: tuple[tuple[str, str], ...] = ()
    """(DR3 name, the file's name) for columns named otherwise; ``{i}`` in the file's name
    stands for the coefficient index of a one-column-per-coefficient table."""


EXTRAS = (dr3.PHOT_G_MEAN_FLUX, dr3.PHOT_G_MEAN_MAG, dr3.RA, dr3.DEC)
"""gaia_source columns read from an XP file when it has them."""


def check_basis(
    basis: np.ndarray, present: np.ndarray, band: str, problems: Problems, row0: int
) -> None:
    """A present band on another basis than DR3's is a bad row naming the basis."""
    wanted = dr3.BASIS_FUNCTION_ID[band]
    other = np.flatnonzero(present & (basis >= 0) & (basis != wanted))
    problems.add(
        other + row0,
        lambda r: (
            f"{band}_basis_function_id is {basis[r - row0]}, not Gaia DR3's {wanted}: this is not "
            "a DR3 spectrum and cannot share a store with DR3 ones"
        ),
    )


def drop_bad_rows(
    columns: dict[str, np.ndarray], problems: Problems, n_rows: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The columns without the bad rows, and the kept rows' lines (or 1-based rows)."""
    keep = np.ones(n_rows, dtype=bool)
    keep[list(problems.rows)] = False
    if not keep.all():
        columns = {k: v[keep] for k, v in columns.items()}
    return columns, problems.lines.line(np.flatnonzero(keep))


def parsed_file(
    path: Path,
    columns: dict[str, np.ndarray],
    problems: Problems,
    file_info: dict[str, Any],
    request: ReadRequest,
) -> ParsedFile:
    """A :class:`ParsedFile` from a reader's columns (named as in the store) and its problems."""
    n_rows = len(columns[schema.SOURCE_ID])
    bad_rows = problems.bad_rows()
    if request.on_bad_row == "error":
        problems.raise_first()
    columns, lines = drop_bad_rows(columns, problems, n_rows)
    with_corr = request.with_correlations
    return ParsedFile(
        path=path,
        source_id=columns.pop(schema.SOURCE_ID),
        line=lines,
        coefficients=columns.pop(schema.COEFFICIENTS),
        coefficient_errors=columns.pop(schema.COEFFICIENT_ERRORS),
        correlations=(
            {b: columns.pop(schema.correlations_name(b)) for b in schema.BANDS}
            if with_corr
            else None
        ),
        scalars={s: columns.pop(s) for s in request.scalars if s in columns},
        extras={e: columns.pop(e) for e in EXTRAS if e in columns},
        bad_rows=bad_rows,
        file_info={**file_info, "rows": len(lines)},
    )


def concat(pieces: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    if not pieces:
        return {}
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def in_range(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Which integers ``dtype`` can hold (DR3's int16 columns: a larger value is malformed)."""
    limits = np.iinfo(dtype)
    return (values >= limits.min) & (values <= limits.max)


def as_float32(values: np.ndarray) -> np.ndarray:
    """float32 of float64 values; one beyond float32's range becomes inf (flagged downstream)."""
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


# --- checksums --------------------------------------------------------------------------------
def manifest_md5(path: Path) -> str | None:
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
