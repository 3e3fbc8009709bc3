"""One XP file, any encoding: recognise it from its first bytes and hand it to its reader.

FITS, VOTable, AVRO, Parquet and zip announce themselves with magic bytes; gzip may wrap any of
them; a file that is none of these and reads as text is CSV/ECSV. The name is not trusted (the
archive serves ``.xml``, ``.vot``, ``.fits``, ``.dat``; users rename files).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from xpbatch.errors import ParseError
from xpbatch.ingest import avro, bundle, fits, parquet, votable
from xpbatch.ingest.common import HashingReader, ParsedFile, ReadRequest, gzip_module, manifest_md5
from xpbatch.ingest.text import parse_text
from xpbatch.storage.paths import PathLike

FORMATS = (
    "CSV/ECSV (archive, bulk; gzipped or not), VOTable (BINARY, BINARY2, TABLEDATA), "
    "FITS binary table, DPAC AVRO, Parquet, and zip bundles of these"
)
_MAGIC = (
    (b"SIMPLE  =", "fits"),
    (b"<?xml", "votable"),
    (b"<VOTABLE", "votable"),
    (b"Obj\x01", "avro"),
    (b"PAR1", "parquet"),
    (b"PK\x03\x04", "zip"),
)
_GZIP = b"\x1f\x8b"
BinaryReader = Callable[[Path, bytes, ReadRequest, dict[str, Any]], ParsedFile]
_READERS: dict[str, BinaryReader] = {
    "fits": fits.read_fits,
    "votable": votable.read_votable,
    "avro": avro.read_avro,
    "parquet": parquet.read_parquet,
}


def sniff(head: bytes) -> str | None:
    """The encoding that ``head`` (a file's first bytes, un-gzipped) starts; 'text' for CSV/ECSV;
    None when it is none of the supported ones."""
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 byte-order mark, blank lines
    for magic, name in _MAGIC:
        if stripped.startswith(magic):
            return name
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut by the end of the sample
            return None
        text = head[: e.start].decode("utf-8")
    printable = all(c.isprintable() or c in "\r\n\t" for c in text)
    return "text" if printable and ("," in text or text.startswith("#")) else None


def _head(path: Path, raw: bytes | None) -> tuple[bytes, bool]:
    """The first bytes of the file's content (un-gzipped), and whether it is gzipped."""
    if raw is not None:
        first = raw[:4096]
    else:
        try:
            with open(path, "rb") as f:
                first = f.read(4096)
        except FileNotFoundError as e:
            raise ParseError(f"{path}: file not found") from e
    if not first.startswith(_GZIP):
        return first, False
    try:
        with gzip_module.GzipFile(fileobj=io.BytesIO(first)) as g:
            return g.read(2048), True
    except (EOFError, OSError):  # a short sample ends mid-stream: read what inflated
        source: BinaryIO = io.BytesIO(raw) if raw is not None else open(path, "rb")  # noqa: SIM115
        with source, gzip_module.GzipFile(fileobj=source) as g:
            try:
                return g.read(2048), True
            except (EOFError, OSError) as e:
                raise ParseError(f"{path}: a broken gzip file ({e}); download it again") from e


def read_xp_file(path: PathLike, request: ReadRequest, *, raw: bytes | None = None) -> ParsedFile:
    """Parse one XP file of any supported encoding (``raw``: its bytes, for a zip member)."""
    path = Path(path)
    head, gzipped = _head(path, raw)
    kind = sniff(head)
    if kind is None:
        raise ParseError(
            f"{path}: not an XP file in a format xpbatch reads (it starts {head[:16]!r}); "
            f"supported: {FORMATS}"
        )
    if kind == "text":
        return parse_text(path, request, raw=io.BytesIO(raw) if raw is not None else None)
    data, info = _read_all(path, raw, request, gzipped)
    if kind == "zip":
        return bundle.read_zip(path, data, request, info, read_member=read_xp_file)
    return _READERS[kind](path, data, request, info)


def _read_all(
    path: Path, raw: bytes | None, request: ReadRequest, gzipped: bool
) -> tuple[bytes, dict[str, Any]]:
    """The whole (inflated) content of a binary file, and its provenance (checksum verified).

    Files in these encodings are what users download per query (kB to MB), so they are held in
    memory; the bulk DR3 files are CSV and streamed.
    """
    source: BinaryIO = io.BytesIO(raw) if raw is not None else open(path, "rb")  # noqa: SIM115
    md5 = manifest_md5(path) if request.verify_md5 and raw is None else None
    with HashingReader(source, md5) as hashing:
        data = hashing.read()
        info = hashing.finish(path)
    if gzipped:
        try:
            data = gzip_module.decompress(data)
        except (EOFError, OSError) as e:
            raise ParseError(f"{path}: a broken gzip file ({e}); download it again") from e
    return data, info


def parse_xp_file(
    path: PathLike,
    *,
    scalars: Sequence[str] = (),
    with_correlations: bool = False,
    on_bad_row: str = "error",
    verify_md5: bool = True,
    columns: Sequence[tuple[str, str]] = (),
) -> ParsedFile:
    """Parse one DR3 XP continuous-spectrum file (any encoding of DR3 XP files, gzipped or not).

    Parameters
    ----------
    path
        The file.
    scalars
        DR3 scalar columns to keep when the file has them (names of
        :data:`xpbatch.schema.DR3_SCALARS`).
    with_correlations
        Also parse the 1485-value correlation arrays.
    on_bad_row
        'error' raises :class:`~xpbatch.errors.ParseError` at the first malformed row (file, line
        or row, reason); 'skip' leaves malformed rows out and lists them in ``bad_rows``.
    verify_md5
        Compare the file with the MD5 listed in a ``_MD5SUM.txt`` beside it, if any.
    columns
        (DR3 name, the file's name) pairs for columns named otherwise (``{i}``: the coefficient
        index of a one-column-per-coefficient table).

    Returns
    -------
    ParsedFile
        Coefficients and errors as float32 of the file's values, BP then RP; NaN for a missing
        band.

    Examples
    --------
    >>> parse_xp_file("XP_CONTINUOUS-Gaia DR3 5405570973190252288.xml")  # doctest: +SKIP
    """
    request = ReadRequest(tuple(scalars), with_correlations, on_bad_row, verify_md5, tuple(columns))
    return read_xp_file(path, request)
