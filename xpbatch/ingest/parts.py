"""Resumable per-file parts, and the store chunks written from them.

One task per input file (:func:`ingest_file`) parses it, joins the G flux, sorts by source_id and
writes a *part* (a directory of ``.npy`` files) with a ``done.json`` marker written last; a rerun
reuses parts whose marker matches. The parts are then laid end to end in source_id order and each
store chunk is written by one task (:func:`write_chunk`) from the slices of the parts it covers.

A part of a store on object storage is a prefix of ``.npy`` objects beside the store (its
``done.json`` again last: a PUT is whole or absent, so no rename is needed); a chunk task reads
just its rows of each (the ``.npy`` header, then one ranged GET).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xpbatch import __version__, schema
from xpbatch.errors import ParseError
from xpbatch.ingest.common import BadRow, ParsedFile, ReadRequest
from xpbatch.ingest.gaia_source import GaiaSourceTable, join_g_flux, read_gaia_source
from xpbatch.ingest.reader import read_xp_file
from xpbatch.storage.location import Location
from xpbatch.storage.zarr_arrays import put_objects
from xpbatch.store.input_recipe import compute_input_flags
from xpbatch.store.xp_store import INT_MISSING, XPStoreWriter, source_id_order

logger = logging.getLogger(__name__)


PartDir = str | Location
"""Where a part is: a local directory, or a prefix on object storage."""


@dataclasses.dataclass(frozen=True)
class FileTask:
    """Everything one worker needs to turn one XP file into a part."""

    xp_file: str
    gaia_source_files: tuple[str, ...]
    part_dir: PartDir
    request: ReadRequest

    def fingerprint(self) -> str:
        """Changes when the inputs (path, size, mtime) or the parsing options change."""
        stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files()]
        options = (dataclasses.astuple(self.request), __version__)
        return hashlib.sha256(json.dumps([stats, options]).encode()).hexdigest()

    def files(self) -> list[str]:
        return [self.xp_file, *self.gaia_source_files]


@dataclasses.dataclass(frozen=True)
class PartInfo:
    """A finished part: where it is, its rows and source_id range, and its provenance."""

    part_dir: PartDir
    rows: int
    first_id: int
    last_id: int
    files: tuple[dict[str, Any], ...]
    bad_rows: tuple[BadRow, ...]
    optional: tuple[str, ...] = ()
    """The optional store variables (DR3 scalars, ra, dec) this part's file had."""

    @classmethod
    def load(cls, part_dir: PartDir | Path) -> PartInfo:
        info = json.loads(_read_marker(part_dir) or b"")
        return cls(
            part_dir if isinstance(part_dir, Location) else str(part_dir),
            info["rows"],
            info["first_id"],
            info["last_id"],
            tuple(info["files"]),
            tuple(BadRow(**b) for b in info["bad_rows"]),
            tuple(info.get("optional", ())),
        )


def _read_marker(part_dir: PartDir | Path) -> bytes | None:
    """The ``done.json`` of a part; None when the part is not finished."""
    if isinstance(part_dir, Location):
        marker = part_dir / "done.json"
        return marker.read_bytes() if marker.is_file() else None
    path = Path(part_dir) / "done.json"
    return path.read_bytes() if path.is_file() else None


def is_finished(task: FileTask) -> bool:
    """Whether an earlier run left this file's part whole, from the same file and options."""
    marker = _read_marker(task.part_dir)
    return marker is not None and json.loads(marker).get("fingerprint") == task.fingerprint()


def ingest_file(task: FileTask) -> PartInfo:
    """Parse one XP file, join its G flux, sort by source_id and write its part (or reuse it)."""
    part_dir = task.part_dir
    fingerprint = task.fingerprint()
    if is_finished(task):
        logger.info("reusing the finished part of %s", task.xp_file)
        return PartInfo.load(part_dir)
    parsed = read_xp_file(task.xp_file, task.request)
    if not task.gaia_source_files and not {schema.PHOT_G_MEAN_FLUX, "phot_g_mean_mag"} & set(
        parsed.extras
    ):
        raise ParseError(
            f"{task.xp_file}: no G flux: the file has neither phot_g_mean_flux nor "
            "phot_g_mean_mag, and no gaia_source companion was given; pass --gaia-source FILES "
            "(GaiaSource_*.csv.gz, or any CSV/Parquet with source_id and phot_g_mean_flux or "
            "phot_g_mean_mag), or add phot_g_mean_mag to the archive query"
        )
    gaia = read_gaia_source(task.gaia_source_files, verify_md5=task.request.verify_md5)
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
    joined = join_g_flux(sid, gaia, {k: sort(v) for k, v in parsed.extras.items()})
    coefficients = sort(parsed.coefficients)
    errors = sort(parsed.coefficient_errors)
    flags = compute_input_flags(
        coefficients,
        errors,
        joined.flux,
        flux_from_mag=joined.from_mag,
        flux_from_xp_file=joined.from_xp_file,
    )
    flags[joined.position_invalid] |= np.uint8(schema.InputFlag.POSITION_INVALID)
    columns = {
        schema.SOURCE_ID: sid,
        "line": sort(parsed.line),
        schema.COEFFICIENTS: coefficients,
        schema.COEFFICIENT_ERRORS: errors,
        schema.PHOT_G_MEAN_FLUX: joined.flux,
        schema.INPUT_FLAGS: flags,
        **{name: sort(values) for name, values in parsed.scalars.items()},
        **joined.positions,
    }
    for band, values in (parsed.correlations or {}).items():
        columns[schema.correlations_name(band)] = sort(values)
    return columns


POSITIONS = (schema.RA, schema.DEC)
OPTIONAL = (*schema.DR3_SCALARS, *POSITIONS)
"""Store variables a part may lack (its file had no such column), in store order."""


def _fill(name: str) -> tuple[str, Any]:
    """dtype and value of an optional variable where the file had no such column."""
    if name in POSITIONS:
        return "float64", np.nan
    dtype = schema.DR3_SCALARS[name][0]
    return dtype, INT_MISSING if dtype.startswith("int") else np.nan


def _write_part(
    part_dir: PartDir | Path,
    columns: Mapping[str, np.ndarray],
    fingerprint: str,
    files: list[dict[str, Any]],
    bad_rows: list[BadRow],
) -> None:
    """Write a part under a temporary name, its marker last, then rename it into place; on
    object storage in place, after removing what a killed writer left, its marker last."""
    info = _part_info(columns, fingerprint, files, bad_rows)
    if isinstance(part_dir, Location):
        part_dir.remove_tree()
        put_objects(part_dir, [(f"{name}.npy", _npy(values)) for name, values in columns.items()])
        (part_dir / "done.json").write_bytes(json.dumps(info).encode())
        return
    part_dir = Path(part_dir)
    tmp = part_dir.with_name(f"{part_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    for name, values in columns.items():
        np.save(tmp / f"{name}.npy", values)
    (tmp / "done.json").write_text(json.dumps(info))
    if part_dir.exists():
        shutil.rmtree(part_dir)
    tmp.rename(part_dir)


def _npy(values: np.ndarray) -> bytes:
    """``values`` as the bytes of a ``.npy`` file."""
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


def _part_info(
    columns: Mapping[str, np.ndarray],
    fingerprint: str,
    files: list[dict[str, Any]],
    bad_rows: list[BadRow],
) -> dict[str, Any]:
    """What a part's ``done.json`` records."""
    sid = columns[schema.SOURCE_ID]
    info = {
        "fingerprint": fingerprint,
        "rows": len(sid),
        "first_id": int(sid[0]) if len(sid) else None,
        "last_id": int(sid[-1]) if len(sid) else None,
        "files": files,
        "bad_rows": [dataclasses.asdict(b) for b in bad_rows],
        "optional": [name for name in OPTIONAL if name in columns],
    }
    return info


FETCH_THREADS = 16
"""Slices of parts fetched at once by a chunk task (object storage wants requests in flight)."""
NPY_HEADER_BYTES = 4096
"""Bytes read to find a ``.npy`` object's header (the parts' headers are far shorter)."""


def _npy_header(file: Location) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` object (one ranged GET)."""
    head = io.BytesIO(file.read_range(0, NPY_HEADER_BYTES))
    major, _ = np.lib.format.read_magic(head)
    read_header = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, fortran, found = read_header(head)
    if fortran:
        raise ParseError(f"{file}: a Fortran-ordered array, not written by xpbatch ingest")
    return tuple(shape), np.dtype(found), head.tell()


def _load_object(part_dir: Location, name: str, rows: slice | None) -> np.ndarray:
    """Rows of one column of a part on object storage: its header, then only those rows."""
    file = part_dir / f"{name}.npy"
    if name in OPTIONAL and not file.is_file():  # the part's file had no such column
        ids = range(_npy_header(part_dir / f"{schema.SOURCE_ID}.npy")[0][0])
        n = len(ids if rows is None else ids[rows])
        fill_dtype, fill = _fill(name)
        return np.full(n, fill, dtype=fill_dtype)
    shape, dtype, offset = _npy_header(file)
    lo, hi, _ = (rows or slice(None)).indices(shape[0])
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    data = file.read_range(offset + lo * row_bytes, offset + max(hi, lo) * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape((max(hi - lo, 0), *shape[1:]))


def _load(part_dir: PartDir, name: str, rows: slice | None = None) -> np.ndarray:
    if isinstance(part_dir, Location):
        return _load_object(part_dir, name, rows)
    path = Path(part_dir) / f"{name}.npy"
    if name in OPTIONAL and not path.is_file():  # the part's file had no such column
        n = len(np.load(Path(part_dir) / f"{schema.SOURCE_ID}.npy", mmap_mode="r")[rows or ...])
        dtype, fill = _fill(name)
        return np.full(n, fill, dtype=dtype)
    values = np.load(path, mmap_mode="r")
    return np.asarray(values if rows is None else values[rows])


# --- assembling the store ---------------------------------------------------------------------
Piece = tuple[PartDir, int, int]
"""(part directory, first row, stop row) of a part."""


def merge_overlapping(parts: list[PartInfo], staging: Path | Location) -> list[PartInfo]:
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


def _columns(part_dir: PartDir) -> list[str]:
    """The names of the columns a part holds."""
    if isinstance(part_dir, Location):
        return [n[:-4] for n in part_dir.list() if n.endswith(".npy") and "/" not in n]
    return [n.name[:-4] for n in Path(part_dir).glob("*.npy")]


def _merge_group(group: list[PartInfo], staging: Path | Location) -> PartInfo:
    names = sorted({name for p in group for name in _columns(p.part_dir)})
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
    key = hashlib.sha256("".join(str(p.part_dir) for p in group).encode()).hexdigest()[:12]
    merged = staging / f"merged-{key}"
    files = [f for p in group for f in p.files]
    _write_part(merged, columns, key, files, [b for p in group for b in p.bad_rows])
    return PartInfo.load(merged)


def chunk_pieces(parts: list[PartInfo], regions: Sequence[slice]) -> list[list[Piece]]:
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


def write_chunk(writer: XPStoreWriter, start: int, pieces: list[Piece]) -> int:
    """Write one store chunk from slices of parts; returns its first row (a task's result).

    Slices of parts on object storage are fetched together (many requests in flight)."""
    names = [
        schema.SOURCE_ID,
        schema.COEFFICIENTS,
        schema.COEFFICIENT_ERRORS,
        schema.PHOT_G_MEAN_FLUX,
        schema.INPUT_FLAGS,
        *writer.scalars,
        *(schema.correlations_name(b) for b in schema.BANDS if writer.with_correlations),
        *(POSITIONS if writer.with_positions else ()),
    ]
    reads = [(d, name, slice(lo, hi)) for name in names for d, lo, hi in pieces]
    if any(isinstance(d, Location) for d, _, _ in pieces):
        with concurrent.futures.ThreadPoolExecutor(FETCH_THREADS) as pool:
            loaded = list(pool.map(lambda read: _load(*read), reads))
    else:
        loaded = [_load(*read) for read in reads]
    by_name = {
        name: np.concatenate(loaded[i * len(pieces) : (i + 1) * len(pieces)])
        for i, name in enumerate(names)
    }

    def column(name: str) -> np.ndarray:
        return by_name[name]

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
        positions={p: column(p) for p in POSITIONS} if writer.with_positions else None,
    )
    return start
