"""Zip bundles of XP files: the archive's DataLink download (one file per source, or one for all).

Each member is read by its own reader (any encoding, recognised from its bytes) and the rows
are joined into one file's worth; a bad row is named ``bundle.zip:member``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from xpbatch import schema
from xpbatch.errors import ParseError
from xpbatch.ingest.common import BadRow, ParsedFile, ReadRequest
from xpbatch.store.xp_store import INT_MISSING

ReadMember = Callable[..., ParsedFile]
MAX_MEMBER_BYTES = 1 << 30
"""The largest zip member read (into memory, inflated): the archive's downloads are per-query
files of kB to MB; zipfile stops at the size a member declares, so a lying member is bounded
too."""


def read_zip(
    path: Path,
    data: bytes,
    request: ReadRequest,
    file_info: dict[str, Any],
    *,
    read_member: ReadMember,
) -> ParsedFile:
    """Parse every file in a zip archive (``read_member(path, request, raw=bytes)`` each)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
        # the archive's README-like text files are not XP tables: skip names that say so
        members = [m for m in members if not m.filename.lower().endswith((".txt", ".md", ".pdf"))]
        too_big = [m for m in members if m.file_size > MAX_MEMBER_BYTES]
        if too_big:
            raise ParseError(
                f"{path}:{too_big[0].filename}: a zip member of {too_big[0].file_size:,} bytes "
                f"inflated; xpbatch reads zip members in memory up to {MAX_MEMBER_BYTES >> 20} MB. "
                "Unzip the archive and ingest its files directly (CSV files are streamed)."
            )
        parsed = [
            read_member(Path(f"{path}:{m.filename}"), request, raw=archive.read(m)) for m in members
        ]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise ParseError(f"{path}: a broken zip file ({e}); download it again") from e
    if not parsed:
        raise ParseError(f"{path}: the zip file holds no XP files")
    return _join(path, parsed, file_info)


def _join(path: Path, parsed: list[ParsedFile], file_info: dict[str, Any]) -> ParsedFile:
    """One ParsedFile of the members' rows (a column some members lack is filled as missing)."""

    def stack(get: Callable[[ParsedFile], dict[str, np.ndarray]], fill: Callable[[str], Any]):
        names = list(dict.fromkeys(n for p in parsed for n in get(p)))
        return {
            n: np.concatenate([get(p).get(n, np.full(len(p.source_id), fill(n))) for p in parsed])
            for n in names
        }

    def scalar_fill(name: str) -> Any:
        return INT_MISSING if schema.DR3_SCALARS[name][0].startswith("int") else np.nan

    correlations = None
    if parsed[0].correlations is not None:
        correlations = {
            b: np.concatenate([p.correlations[b] for p in parsed if p.correlations])
            for b in schema.BANDS
        }
    bad = [
        BadRow(f"{path.name}:{b.file}", b.line, b.reason, b.unit)
        for p in parsed
        for b in p.bad_rows
    ]
    return ParsedFile(
        path=path,
        source_id=np.concatenate([p.source_id for p in parsed]),
        line=np.concatenate([p.line for p in parsed]),
        coefficients=np.concatenate([p.coefficients for p in parsed]),
        coefficient_errors=np.concatenate([p.coefficient_errors for p in parsed]),
        scalars=stack(lambda p: p.scalars, scalar_fill),
        correlations=correlations,
        bad_rows=bad,
        file_info={
            **file_info,
            "rows": sum(len(p.source_id) for p in parsed),
            "members": [p.path.name for p in parsed],
        },
        extras=stack(lambda p: p.extras, lambda _: np.nan),
    )
