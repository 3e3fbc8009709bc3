"""A chunk file's bytes without a store: rows encoded into them, decoded from them, checksums.

What :mod:`xpbatch.storage.zarr_arrays` writes and checks chunk files with: each array's own Zarr
codecs encode and decode (an in-memory copy of the array where a chunk must be padded), except a
plain chunk (raw values and a crc32c, the store's row arrays), which is checked against its
trailer and viewed where it was read.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import zarr
import zarr.codecs
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync
from zarr.storage import MemoryStore, StorePath

from xpbatch.storage.location import Location

ChunkBytes = bytes | memoryview
"""A chunk file's bytes: ``bytes``, or a memoryview (as encoded, or a local file read straight
into memory that a plain chunk's values then view, see :func:`decode_rows`)."""


def encode_chunks(
    writes: Sequence[tuple[zarr.Array, np.ndarray]], rows: slice
) -> list[dict[int, memoryview]]:
    """The chunk files that writing ``rows`` of each array would store, without a store: per
    array, chunk index -> the file's bytes, all encoded in one trip through Zarr's event loop
    (its codecs compress the arrays at once, in threads).

    A whole chunk goes straight through the array's codec pipeline; a chunk that ``rows`` covers
    in part (an array's short last chunk) is written into an in-memory copy of the array, which
    pads it with the fill value as Zarr does.
    """
    prototype = default_buffer_prototype()

    async def whole(array: zarr.Array, index: int, values: np.ndarray) -> Any:
        coords = (index, 0)[: array.ndim]
        spec = array.metadata.get_chunk_spec(coords, array.async_array.config, prototype)
        chunk = prototype.nd_buffer.from_numpy_array(values)
        (data,) = await array.async_array.codec_pipeline.encode([(chunk, spec)])
        return data

    async def part(array: zarr.Array, index: int, values: np.ndarray, where: slice) -> Any:
        files: dict[str, Any] = {}
        await in_memory(array, files).async_array.setitem(where, values)
        return files[memory_key(array, index)]

    jobs: list[Coroutine[Any, Any, Any]] = []
    slots: list[tuple[int, int]] = []  # (position in writes, chunk index) of each job
    for position, (array, values) in enumerate(writes):
        chunk_rows = array.chunks[0]
        for index in range(rows.start // chunk_rows, -(-rows.stop // chunk_rows)):
            lo, hi = index * chunk_rows, (index + 1) * chunk_rows
            covered = slice(max(lo, rows.start), min(hi, rows.stop, array.shape[0]))
            mine = values[covered.start - rows.start : covered.stop - rows.start]
            if covered == slice(lo, hi):
                jobs.append(whole(array, index, mine))
            else:
                jobs.append(part(array, index, mine, covered))
            slots.append((position, index))

    async def encode_all() -> list[Any]:
        return await asyncio.gather(*jobs)

    encoded: list[dict[int, memoryview]] = [{} for _ in writes]
    for (position, index), data in zip(slots, zarr_sync(encode_all()), strict=True):
        encoded[position][index] = data.as_numpy_array().data
    return encoded


def in_memory(array: zarr.Array, files: dict[str, Any]) -> zarr.Array:
    """``array`` (its path, metadata and codecs) over ``files``, :func:`memory_key` -> encoded
    bytes (a Buffer): chunks encoded into it, or decoded from bytes already read, without a
    file."""
    memory = AsyncArray(
        metadata=array.metadata,
        store_path=StorePath(MemoryStore(store_dict=files), array.path),
        config=array.async_array.config,
    )
    return zarr.Array(memory)  # type: ignore[type-var]


def memory_key(array: zarr.Array, index: int) -> str:
    """The key of chunk ``index`` (along ``source``) of an :func:`in_memory` array."""
    return f"{array.path}/{array.metadata.encode_chunk_key((index, 0)[: array.ndim])}"


def ends_in_crc32c(array: zarr.Array) -> bool:
    compressors = array.compressors  # the bytes-to-bytes codecs, in order
    return bool(compressors) and isinstance(compressors[-1], zarr.codecs.Crc32cCodec)


def checksum_of(array: zarr.Array, data: ChunkBytes) -> int:
    """The checksum recorded for a chunk file of ``array`` holding ``data``: the crc32c trailer
    Zarr's codec appended (checked against the body on every decode), else the file's crc32c."""
    if ends_in_crc32c(array):
        return int.from_bytes(data[-4:], sys.byteorder) if len(data) >= 4 else -2
    return int(crc32c.crc32c(data))


def read_chunk_file(file: Path | Location) -> ChunkBytes | None:
    """The bytes of chunk ``file``, in one read; None if it is missing.

    What a check reads is what it decodes: :func:`~xpbatch.storage.zarr_arrays.bytes_mismatch`
    compares these bytes with their record and :func:`decode_rows` decodes them, so a file is
    never read twice. A local file is read into a writable uint8 array, which a plain chunk's
    decoded values view.
    """
    try:
        if isinstance(file, Location):
            return file.read_bytes()
        with open(file, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            data, done = np.empty(size, np.uint8).data, 0  # no zero-filling: it is read over
            while done < size:
                n = f.readinto(data[done:])
                if not n:  # cut short since the stat: what was read is what the file holds
                    return data[:done]
                done += n
            return data
    except FileNotFoundError:
        return None


def decode_rows(
    reads: Sequence[tuple[zarr.Array, Mapping[int, ChunkBytes]]], rows: slice
) -> list[np.ndarray | Exception]:
    """``array[rows]`` of each array, decoded from its chunk files' bytes already read (chunk
    index along ``source`` -> bytes, every chunk of ``rows``); in place of a value, the
    exception its decode raised (e.g. a crc32c mismatch: the body is not the one its trailer
    was computed over).

    A plain chunk (:func:`plain_dtype`: raw values and a crc32c) is checked against its
    trailer and viewed where it lies, without a copy; the others are decoded by Zarr, all in one
    trip through its event loop.
    """
    found: list[Any] = [None] * len(reads)
    arrays: list[tuple[int, AsyncArray[Any]]] = []
    buffer = default_buffer_prototype().buffer
    for position, (array, data) in enumerate(reads):
        chunk_rows = array.chunks[0]
        indices = range(rows.start // chunk_rows, -(-rows.stop // chunk_rows))
        for index in indices:
            if index not in data:  # it would read as the fill value
                raise ValueError(f"chunk {index} of {array.basename} was not read")
        dtype = plain_dtype(array)
        if dtype is not None:
            try:
                found[position] = _plain_rows(array, dtype, data, rows)
            except ValueError as e:
                found[position] = e
            continue
        files = {memory_key(array, i): buffer.from_bytes(data[i]) for i in indices}  # type: ignore[arg-type]
        arrays.append((position, in_memory(array, files).async_array))

    async def decode_all() -> list[Any]:
        return await asyncio.gather(*(a.getitem(rows) for _, a in arrays), return_exceptions=True)

    for (position, _), value in zip(arrays, zarr_sync(decode_all()) if arrays else [], strict=True):
        if isinstance(value, BaseException) and not isinstance(value, Exception):
            raise value  # KeyboardInterrupt and the like are not a chunk's problem
        found[position] = value if isinstance(value, Exception) else np.asarray(value)
    return found


def plain_dtype(array: zarr.Array) -> np.dtype[Any] | None:
    """The dtype (with its byte order) of ``array``'s chunk files when they hold its raw values,
    optionally followed by a crc32c (no filter, no compression: the store's row arrays); None
    for any other codec chain."""
    serializer = array.serializer
    compressors = array.compressors
    plain = (
        isinstance(serializer, zarr.codecs.BytesCodec)
        and not array.filters
        and all(isinstance(c, zarr.codecs.Crc32cCodec) for c in compressors)
        and len(compressors) <= 1
    )
    if not plain:
        return None
    endian = getattr(serializer.endian, "value", "little")  # type: ignore[union-attr]
    return np.dtype(array.dtype).newbyteorder("<" if endian == "little" else ">")


def _plain_rows(
    array: zarr.Array, dtype: np.dtype[Any], data: Mapping[int, ChunkBytes], rows: slice
) -> np.ndarray:
    """``array[rows]`` from plain chunk files' bytes (:func:`plain_dtype`): each body checked
    against its crc32c trailer as Zarr's codec checks it, then viewed (one chunk) or joined.

    Raises ValueError, as Zarr's decode does, for a body that is not its trailer's or a file
    of the wrong size.
    """
    chunk_rows = array.chunks[0]
    shape = tuple(array.chunks)
    body = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    trailer = 4 if array.compressors else 0
    pieces = []
    for index in range(rows.start // chunk_rows, -(-rows.stop // chunk_rows)):
        raw = data[index]
        if len(raw) != body + trailer:
            raise ValueError(
                f"chunk {index} of {array.basename} has {len(raw)} bytes, a chunk of "
                f"{shape} {dtype} takes {body + trailer}: cut short or not this array's"
            )
        if trailer:
            stored = int.from_bytes(memoryview(raw)[body:], sys.byteorder)
            if int(crc32c.crc32c(memoryview(raw)[:body])) != stored:
                raise ValueError(
                    f"Stored and computed checksum do not match (chunk {index} of "
                    f"{array.basename}): the file is not the one its crc32c was computed over"
                )
        values = np.frombuffer(raw, dtype, count=body // dtype.itemsize).reshape(shape)
        start = index * chunk_rows
        pieces.append(values[max(rows.start - start, 0) : min(rows.stop, array.shape[0]) - start])
    value = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    if not value.flags.writeable:  # bytes (object storage): a copy the caller may change
        value = value.copy()
    return value.astype(array.dtype, copy=False)


def has_checksum(data: ChunkBytes, checksum: int) -> bool:
    """Whether ``data`` (a chunk file's bytes) is an encoded chunk followed by its crc32c, and
    that crc32c is ``checksum`` (as :func:`~xpbatch.storage.zarr_arrays.write_chunks` recorded
    it): the file is byte for byte as written, checked without decoding it.

    (A CRC of a whole file that ends in its own CRC is a constant, so the body is checked
    against the trailer and the trailer against ``checksum``.)
    """
    view = memoryview(data)
    if len(view) < 4:
        return False
    trailer = int.from_bytes(view[-4:], sys.byteorder)
    return trailer == checksum and int(crc32c.crc32c(view[:-4])) == checksum
