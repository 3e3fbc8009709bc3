"""The Zarr layer under the XP store and the catalogue: array specs, codecs, templates, opening,
region writes and chunk files.

Both outputs are Zarr v3 groups of arrays chunked along ``source`` only, written template first
and then one chunk-aligned region per task. What differs between them (their variables, their
attributes, how they check themselves) lives in :mod:`xpbatch.store` and
:mod:`xpbatch.catalog`;
what they share is here, so an error always names the kind of thing it opened (:data:`STORE`
or :data:`CATALOG`) with its path and array.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import crc32c
import numpy as np
import zarr
import zarr.codecs
from zarr.core.sync import sync as zarr_sync

from xpbatch import schema
from xpbatch.errors import StoreNotFoundError
from xpbatch.storage.chunk_bytes import ChunkBytes as ChunkBytes
from xpbatch.storage.chunk_bytes import checksum_of, ends_in_crc32c
from xpbatch.storage.chunk_bytes import decode_rows as decode_rows
from xpbatch.storage.chunk_bytes import encode_chunks as encode_chunks
from xpbatch.storage.chunk_bytes import has_checksum as has_checksum
from xpbatch.storage.chunk_bytes import plain_dtype as plain_dtype
from xpbatch.storage.chunk_bytes import read_chunk_file as read_chunk_file
from xpbatch.storage.kinds import CATALOG as CATALOG
from xpbatch.storage.kinds import STORE as STORE
from xpbatch.storage.kinds import Kind as Kind
from xpbatch.storage.kinds import check_format_version as check_format_version
from xpbatch.storage.location import Location, as_location, is_url
from xpbatch.storage.paths import PathLike

# --- what is being opened -------------------------------------------------------------------------
Place = Path | Location
"""Where a store or a catalogue is: a local directory (a ``Path``, written through the
filesystem: temporary file, fsync, rename) or an object-storage prefix (a :class:`Location`:
one PUT per object, atomic, no rename)."""


def where(path: PathLike | Location) -> Place:
    """A local path as a ``Path``; an object-storage URL (``s3://``) as a :class:`Location`."""
    if isinstance(path, Location):
        return path.path if path.is_local else path
    return as_location(path) if is_url(path) else Path(path)


def absolute(path: PathLike | Location) -> str | Location:
    """A local path as its absolute path (workers of a remote cluster do not share this
    process's directory); an object-storage URL as its :class:`Location`, options and all."""
    place = where(path)
    return place if isinstance(place, Location) else str(place.resolve())


def zarr_target(path: Place, *, read_only: bool = False) -> Any:
    """What ``zarr.open_group`` takes for ``path``: the path itself, or a Location's store."""
    return path.zarr_store(read_only=read_only) if isinstance(path, Location) else path


def is_file(file: Place) -> bool:
    """Whether a chunk file (or object) exists exactly at ``file``."""
    return file.is_file()


def relative(file: Place, root: Place) -> str:
    """``file``'s name below ``root`` (``latent_mean/c/0/0``), for messages."""
    if isinstance(file, Location) and isinstance(root, Location):
        return file.relative_name(root)
    if isinstance(file, Path) and isinstance(root, Path):
        return file.relative_to(root).as_posix()
    return str(file)


def remove_tree(path: Place) -> None:
    """Remove a directory tree, or every object below a prefix."""
    if isinstance(path, Location):
        path.remove_tree()
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def nbytes(path: Place) -> int:
    """Bytes of every file (or object) under ``path``."""
    if isinstance(path, Location):
        return sum(path.sizes().values())
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def same_place(a: Place, b: Place) -> bool:
    """Whether ``a`` and ``b`` name one directory or prefix."""
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return str(a) == str(b)


def inside(a: Place, b: Place) -> bool:
    """Whether ``a`` lies below ``b`` (or is it)."""
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve().is_relative_to(b.resolve())
    return str(a) == str(b) or str(a).startswith(str(b).rstrip("/") + "/")


def open_group(
    path: Path | Location,
    kind: Kind,
    *,
    mode: Literal["r", "r+"] = "r",
    use_consolidated: bool | None = None,
) -> zarr.Group:
    """The Zarr v3 group at ``path``; StoreNotFoundError or ``kind.error`` naming what it is."""
    if not path.exists():
        raise StoreNotFoundError(f"{kind.noun} {path} does not exist; {kind.remedy}")
    target = path.zarr_store(read_only=mode == "r") if isinstance(path, Location) else path
    try:
        return zarr.open_group(target, mode=mode, use_consolidated=use_consolidated)
    except (FileNotFoundError, ValueError, zarr.errors.NodeTypeValidationError) as e:
        raise kind.error(f"{path} is not a Zarr v3 group ({e}); is it {kind.article_noun}?") from e


def get_array(group: zarr.Group, name: str, kind: Kind) -> zarr.Array:
    """The array ``name`` of ``group``, writing every chunk; ``kind.error`` if it is missing."""
    node = group.get(name)
    if not isinstance(node, zarr.Array):
        raise kind.error(
            f"{kind.noun} {_where(group)} has no array {name!r}: not {kind.article_noun} "
            "written by xpbatch, or damaged"
        )
    # write_empty_chunks is not stored in the metadata: set it on every open, so a chunk that
    # equals the fill value is still written and a missing chunk always means "never written".
    return node.with_config({"write_empty_chunks": True})


def _where(group: zarr.Group) -> str:
    """The group's directory (a local store), else its store path."""
    root = getattr(group.store_path.store, "root", None)
    return str(root) if root is not None else str(group.store_path)


def open_arrays(
    path: PathLike | Location, names: Iterable[str], kind: Kind
) -> dict[str, zarr.Array]:
    """Arrays of the Zarr group at ``path``, by name (``kind.error`` if one is missing)."""
    group = open_group(where(path), kind)
    return {name: get_array(group, name, kind) for name in names}


# --- specs and templates --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One row variable: its name, dtype, dimensions, fill value and attributes."""

    name: str
    dtype: str
    dims: tuple[str, ...]
    fill_value: Any
    units: str
    description: str
    width: int = 0
    """Length of the second dimension (0 for (source,) variables)."""
    extra_attrs: tuple[tuple[str, Any], ...] = ()

    def shape(self, n_rows: int) -> tuple[int, ...]:
        """Array shape for ``n_rows`` rows."""
        return (n_rows, self.width) if self.width else (n_rows,)


def blosc_crc32c(shuffle: Literal["bitshuffle", "shuffle"]) -> tuple[Any, ...]:
    """Blosc lz4 with ``shuffle``, then a crc32c checksum: the codec chain of every row array.

    The crc32c codec turns a corrupted chunk into a read error instead of silent wrong values.
    """
    return (
        zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle=shuffle),
        zarr.codecs.Crc32cCodec(),
    )


def crc32c_only() -> tuple[Any, ...]:
    """No compression, only a crc32c checksum: the codec chain of the store's row arrays.

    Float32 coefficients are mostly noise in their low bits: Blosc-lz4 with bit shuffle saves
    15 % of the store's bytes but costs 2.3x the CPU to read (docs/format.md, "Codecs of the store
    and the catalogue"); a chunk read is then a file read and a checksum, which a GPU could also
    take as it is.
    """
    return (zarr.codecs.Crc32cCodec(),)


def flag_attrs(flags: type[enum.IntFlag]) -> tuple[tuple[str, Any], ...]:
    """CF ``flag_masks``/``flag_meanings`` of an IntFlag."""
    return (
        (schema.ATTR_FLAG_MASKS, [int(f) for f in flags]),
        (schema.ATTR_FLAG_MEANINGS, " ".join(str(f.name).lower() for f in flags)),
    )


def create_row_arrays(
    group: zarr.Group,
    specs: Iterable[ArraySpec],
    *,
    n_rows: int,
    chunk_rows: int,
    compressors: tuple[Any, ...],
    coordinates: Sequence[str],
) -> None:
    """Create every row array of a template: NaN (fill) valued, chunked along ``source`` only.

    The arrays not in ``coordinates`` name them in their ``coordinates`` attribute, which xarray
    reads to make them coordinates.
    """
    for spec in specs:
        attributes: dict[str, Any] = {
            schema.ATTR_UNITS: spec.units,
            schema.ATTR_DESCRIPTION: spec.description,
        }
        attributes.update(spec.extra_attrs)
        if spec.name not in coordinates:
            attributes[schema.ATTR_COORDINATES] = " ".join(coordinates)
        group.create_array(
            spec.name,
            shape=spec.shape(n_rows),
            chunks=spec.shape(chunk_rows),
            dtype=spec.dtype,
            fill_value=spec.fill_value,
            compressors=compressors,
            dimension_names=list(spec.dims),
            attributes=attributes,
            config={"write_empty_chunks": True},
        )


def write_axis(group: zarr.Group, name: str, values: np.ndarray, description: str) -> None:
    """Create the 1-D coordinate array ``name`` (its own dimension) holding ``values``."""
    axis = group.create_array(
        name,
        shape=values.shape,
        dtype=values.dtype if values.dtype.kind != "U" else str,
        dimension_names=[name],
        attributes={schema.ATTR_UNITS: "1", schema.ATTR_DESCRIPTION: description},
    )
    axis[:] = values


def consolidate(path: Place) -> None:
    """Consolidate the group's metadata, so that ``xarray.open_zarr(path)`` opens it in one read."""
    with warnings.catch_warnings():
        # Consolidated metadata is a zarr-python extension to Zarr v3; xarray reads it and
        # warns when it is absent, so we write it (and silence zarr's note about it).
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(path.zarr_store() if isinstance(path, Location) else str(path))


def utc_now() -> str:
    """The time now, in UTC, ISO 8601 to the second: what the outputs' time attributes hold."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --- region writes --------------------------------------------------------------------------------
def read_together(reads: Sequence[tuple[zarr.Array, Any]]) -> list[np.ndarray]:
    """``array[selection]`` of several arrays in one trip through Zarr's event loop."""

    async def read_all() -> list[Any]:
        return await asyncio.gather(*(array.async_array.getitem(where) for array, where in reads))

    return [np.asarray(value) for value in zarr_sync(read_all())]


# --- chunk files ----------------------------------------------------------------------------------
def chunk_file(path: Place, array: zarr.Array, index: int) -> Place:
    """The file (or object) of chunk ``index`` (along ``source``) of ``array`` in the group at
    ``path``."""
    return path / array.basename / chunk_key(array, index)


def chunk_key(array: zarr.Array, index: int) -> str:
    """The key of chunk ``index`` (along ``source``) of ``array``, relative to the array."""
    return array.metadata.encode_chunk_key((index, 0)[: array.ndim])


def write_chunks(
    path: Place,
    writes: Sequence[tuple[zarr.Array, np.ndarray]],
    rows: slice,
    *,
    sizes: dict[int, list[int]] | None = None,
) -> dict[int, list[int]]:
    """Write ``rows`` (whole chunks) of several arrays of the group at ``path``; return, per chunk
    index, the checksum of each array's chunk file as this call wrote it.

    The chunks are encoded in memory (:func:`~xpbatch.storage.chunk_bytes.encode_chunks`), then
    each file is written to a temporary name, fsynced and renamed into place: a record written
    next never outlives its data, and the checksums are of these bytes, whoever writes the same
    file at the same time (see :func:`chunk_checksum`). On object storage every chunk object is
    PUT at once (a PUT is atomic: no temporary name, no rename); the call returns when all are
    stored, so a record written next never outlives its data there either. ``sizes``, if
    given, receives each chunk's file sizes in bytes, in the same order.
    """
    encoded = encode_chunks(writes, rows)
    chunk_rows = writes[0][0].chunks[0] if writes else 1
    written: dict[int, list[int]] = {}
    objects: list[tuple[str, bytes]] = []
    for index in range(rows.start // chunk_rows, -(-rows.stop // chunk_rows)):
        written[index] = []
        for (array, _), chunks in zip(writes, encoded, strict=True):
            key = chunk_key(array, index)
            data = chunks[index]
            if isinstance(path, Location):
                objects.append((f"{array.basename}/{key}", bytes(data)))
            else:
                _write_file(path / array.basename / key, data)
            written[index].append(checksum_of(array, data))
            if sizes is not None:
                sizes.setdefault(index, []).append(len(data))
    if isinstance(path, Location):
        put_objects(path, objects)
    return written


def put_objects(root: Location, objects: Sequence[tuple[str, bytes]]) -> None:
    """PUT every ``(name below root, bytes)`` at once (object stores want many requests in
    flight, not one after another), through this process's one client of the bucket."""
    import obstore

    from xpbatch.storage.clients import object_store, storage_errors

    store = object_store(root)
    prefix = f"{root.key}/" if root.key else ""

    async def put_all() -> None:
        await asyncio.gather(
            *(obstore.put_async(store, prefix + name, data) for name, data in objects)
        )

    with storage_errors(root, "write chunks to"):
        zarr_sync(put_all())


def _write_file(file: Path, data: ChunkBytes) -> None:
    """Write ``file`` whole or not at all: a temporary file, fsynced, renamed into place."""
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(f"{file.name}.{uuid.uuid4().hex}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, file)


def chunk_checksum(file: Path | Location, array: zarr.Array) -> int | None:
    """The checksum chunk ``file`` of ``array`` carries (as :func:`write_chunks` records it),
    None if the file is missing.

    For arrays whose codecs end in crc32c this reads the 4-byte trailer only: whether the body
    still matches it is checked by every decode (and by
    :func:`~xpbatch.storage.chunk_bytes.has_checksum`).
    """
    if isinstance(file, Location):  # object storage: one ranged GET of the object's end
        try:
            if ends_in_crc32c(array):
                tail = file.read_tail(4)
                return int.from_bytes(tail, sys.byteorder) if len(tail) == 4 else -2
            return int(crc32c.crc32c(file.read_bytes()))
        except FileNotFoundError:
            return None
    try:
        fd = os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if ends_in_crc32c(array):
            size = os.fstat(fd).st_size
            return int.from_bytes(os.pread(fd, 4, size - 4), sys.byteorder) if size >= 4 else -2
        return int(crc32c.crc32c(file.read_bytes()))
    finally:
        os.close(fd)


def record_mismatch(file: Path | Location, array: zarr.Array, recorded: int) -> str | None:
    """Why chunk ``file`` of ``array`` is not the file its writer recorded (``recorded``), as a
    predicate ("is missing", ...); None when it is (its trailer, see :func:`chunk_checksum`)."""
    return _mismatch(chunk_checksum(file, array), recorded)


def bytes_mismatch(array: zarr.Array, data: ChunkBytes | None, recorded: int) -> str | None:
    """:func:`record_mismatch` of a chunk file of ``array`` already read (``data``; None: the file
    is missing). For arrays whose codecs end in crc32c only the trailer is compared: decoding
    the bytes (:func:`~xpbatch.storage.chunk_bytes.decode_rows`) checks the body against it,
    :func:`~xpbatch.storage.chunk_bytes.has_checksum` without a
    decode."""
    return _mismatch(None if data is None else checksum_of(array, data), recorded)


def _mismatch(found: int | None, recorded: int) -> str | None:
    if found is None:
        return "is missing"
    if found != recorded:
        return (
            f"is not the file written there (crc32c {found:08x}, its record says "
            f"{recorded:08x}): copied from another chunk, replaced or altered"
        )
    return None


def create_chunk_table(
    group: zarr.Group, name: str, *, n_chunks: int, variables: Sequence[str], description: str
) -> None:
    """Create a (chunk, variable) int64 table, -1 until written, one file per chunk's row (so a
    writer sets a row in one file rename); its attribute ``variables`` names the columns."""
    group.create_array(
        name,
        shape=(n_chunks, len(variables)),
        chunks=(1, len(variables)),
        dtype="int64",
        fill_value=-1,
        compressors=(zarr.codecs.Crc32cCodec(),),
        dimension_names=["chunk", "variable"],
        attributes={
            schema.ATTR_CHUNK_FILE_VARIABLES: list(variables),
            schema.ATTR_DESCRIPTION: description,
        },
        config={"write_empty_chunks": True},
    )


def chunk_file_sizes(path: Path | Location, array: zarr.Array) -> Iterator[tuple[int, str, int]]:
    """(chunk index, "NAME chunk I (rows A..B): file F", size or -1 if missing) of every chunk
    along ``source`` of ``array`` in the Zarr group at ``path``: one ``stat`` each (on object
    storage, one listing of the array)."""
    chunk_rows = array.chunks[0]
    listed = (path / array.basename).sizes() if isinstance(path, Location) else None
    for index in range(-(-array.shape[0] // chunk_rows)):
        key = array.metadata.encode_chunk_key((index, 0)[: array.ndim])
        if isinstance(path, Location):
            size = -1 if listed is None else listed.get(key, -1)
            name = f"{array.basename}/{key}"
        else:
            file = path / array.basename / key
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                size = -1
            name = str(file.relative_to(path))
        stop = min((index + 1) * chunk_rows, array.shape[0])
        where = f"{array.basename} chunk {index} (rows {index * chunk_rows}..{stop}): file {name}"
        yield index, where, size


MAX_LISTED_PROBLEMS = 10
"""Chunk-file problems named one by one in a message; the rest are counted."""


def describe_chunk_problems(problems: Sequence[str]) -> str:
    """The first :data:`MAX_LISTED_PROBLEMS` chunk problems and how many more, in one sentence."""
    shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    return shown + (f"; and {more} more" if more > 0 else "")
