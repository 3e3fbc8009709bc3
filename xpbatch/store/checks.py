"""Checking an XP store: its schema, its source_id order and its chunk files, no data read;
and reading rows so that damage is an error naming the file, never fill values standing in.

:mod:`xpbatch.store.xp_store` runs these checks when it finalizes a store,
:mod:`xpbatch.store.reader` when it opens and reads one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from xpbatch import schema
from xpbatch.errors import StoreError
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import STORE
from xpbatch.store.layout import MAX_CHUNK_ROWS, SOURCE_ID_FILL, variable_specs


def chunk_file_problems(path: PathLike | Location) -> list[str]:
    """Every chunk file of the store's variables that is missing, not the size recorded, or not
    the file written there (its crc32c trailer is not the one recorded).

    Checks each file against the chunk records (:data:`~xpbatch.schema.CHUNK_FILES`, sizes, and
    :data:`~xpbatch.schema.CHECKSUMS_ARRAY`, crc32c): a ``stat`` and a 4-byte read per chunk file,
    no data decoded.

    Returns
    -------
    list[str]
        One sentence per problem naming the variable, chunk, rows and file.
    """
    path = zarr_arrays.where(path)
    group = zarr_arrays.open_group(
        path, STORE, use_consolidated=False
    )  # what is on disk, not what was listed
    record_node = group.get(schema.CHUNK_FILES)
    if not isinstance(record_node, zarr.Array):
        return [f"the chunk file table {schema.CHUNK_FILES} is missing"]
    record_attrs: dict[str, Any] = record_node.attrs.asdict()
    names = [str(name) for name in record_attrs.get(schema.ATTR_CHUNK_FILE_VARIABLES, [])]
    recorded = np.asarray(record_node[:])  # (chunk, variable)
    checksums = recorded_checksums(group)
    if checksums is None:
        return [f"the chunk checksum table {schema.CHECKSUMS_ARRAY} is missing"]
    crc_names, crc_table = checksums[0], np.asarray(checksums[1][:])
    problems = []
    for column, name in enumerate(names):
        array = group.get(name)
        if not isinstance(array, zarr.Array):
            continue  # the schema check names missing variables
        crc_column = crc_names.index(name) if name in crc_names else -1
        for index, where, size in zarr_arrays.chunk_file_sizes(path, array):
            expected = recorded[index, column] if index < len(recorded) else -1
            if size < 0:
                problems.append(f"{where} is missing")
            elif expected < 0:
                problems.append(f"{where} was never recorded as written")
            elif size != expected:
                problems.append(f"{where} has {size} bytes, {expected} were written")
            elif crc_column >= 0:
                crc = int(crc_table[index, crc_column]) if index < len(crc_table) else -1
                file = (
                    path / array.basename / zarr_arrays.chunk_key(array, index)
                    if isinstance(path, Location)
                    else zarr_arrays.chunk_file(path, array, index)
                )
                why = (
                    "was never recorded as written"
                    if crc < 0
                    else zarr_arrays.record_mismatch(file, array, crc)
                )
                if why:
                    problems.append(f"{where} {why}")
    return problems


DAMAGED_STORE_REMEDY = (
    "the store is damaged (a chunk file was deleted, cut short or altered after it was written; "
    "a missing one would read as the fill value): restore the file from a backup, or rebuild the "
    "store with the `xpbatch ingest ... --overwrite` (or `xpbatch mock`) that made it"
)


def recorded_checksums(group: zarr.Group) -> tuple[list[str], zarr.Array] | None:
    """The variables and the (chunk, variable) table of the crc32c each chunk file had when
    written (:data:`~xpbatch.schema.CHECKSUMS_ARRAY`); None for a store written before them."""
    node = group.get(schema.CHECKSUMS_ARRAY)
    if not isinstance(node, zarr.Array):
        return None
    attrs: dict[str, Any] = node.attrs.asdict()
    return [str(name) for name in attrs.get(schema.ATTR_CHUNK_FILE_VARIABLES, [])], node


def read_rows_checked(
    path: PathLike | Location,
    array: zarr.Array,
    rows: slice,
    *,
    recorded: Mapping[int, int] | None = None,
) -> np.ndarray:
    """``array[rows]``, or a StoreError naming the variable, chunk and file that cannot be read.

    Each chunk file is read once: with ``recorded`` (chunk index -> the crc32c its file had when
    written), a file that is not the one written there (e.g. another chunk's, copied over it) is
    refused before its bytes are decoded; decoding them checks their crc32c, so a flipped byte
    fails here instead of reading as wrong values. A chunk file deleted since the store was
    opened is an error, not fill values.
    """
    path = zarr_arrays.where(path)
    chunk_rows = array.chunks[0]
    data = {}
    for index in range(rows.start // chunk_rows, -(-rows.stop // chunk_rows)):
        file = zarr_arrays.chunk_file(path, array, index)
        try:
            found = zarr_arrays.read_chunk_file(file)
        except OSError as e:  # e.g. not readable by this user
            raise StoreError(
                f"{array.basename} chunk {index} of {path} cannot be read from {file} "
                f"({type(e).__name__}: {e}); {DAMAGED_STORE_REMEDY}"
            ) from e
        if found is None:
            raise StoreError(
                f"{array.basename} chunk {index} of {path}: file {file} is missing; "
                f"{DAMAGED_STORE_REMEDY}"
            )
        if recorded is not None:
            expected = recorded.get(index, -1)
            why = (
                "was never recorded as written"
                if expected < 0
                else zarr_arrays.bytes_mismatch(array, found, expected)
            )
            if why:
                raise StoreError(
                    f"{array.basename} chunk {index} of store {path}: file "
                    f"{zarr_arrays.relative(file, path)} {why}; its rows were not used. "
                    f"{DAMAGED_STORE_REMEDY}"
                )
        data[index] = found
    (value,) = zarr_arrays.decode_rows([(array, data)], rows)
    if not isinstance(value, Exception):
        return value
    if not isinstance(value, ValueError | RuntimeError | OSError):
        raise value
    for index, found in data.items():  # only on this error path: find the chunk that fails
        start, stop = index * chunk_rows, min((index + 1) * chunk_rows, array.shape[0])
        (bad,) = zarr_arrays.decode_rows([(array, {index: found})], slice(start, stop))
        if isinstance(bad, Exception):
            raise StoreError(
                f"{array.basename} chunk {index} (rows {start}..{stop}) of {path} cannot "
                f"be read from {zarr_arrays.chunk_file(path, array, index)} "
                f"({type(bad).__name__}: {bad}); {DAMAGED_STORE_REMEDY}"
            ) from value
    raise value


def source_id_range_problem(
    attrs: Mapping[str, Any], source_id: np.ndarray, rows: slice, chunk_rows: int
) -> str | None:
    """Whether ``source_id`` (rows ``rows``) holds the ids finalize recorded for those chunks:
    ascending, and starting and ending each chunk where its recorded range says."""
    ranges = attrs.get(schema.STORE_ATTR_CHUNK_RANGES)
    if not isinstance(ranges, list) or not len(source_id):
        return None
    if np.any(np.diff(source_id) <= 0):
        return "source_id is not strictly ascending"
    for index in range(rows.start // chunk_rows, -(-rows.stop // chunk_rows)):
        lo, hi = max(index * chunk_rows, rows.start), min((index + 1) * chunk_rows, rows.stop)
        block = source_id[lo - rows.start : hi - rows.start]
        first, last = ranges[index] if index < len(ranges) else (0, -1)
        starts_chunk = lo == index * chunk_rows
        if block[0] < first or block[-1] > last or (starts_chunk and block[0] != first):
            return (
                f"source_id of chunk {index} runs {int(block[0])}..{int(block[-1])} in rows "
                f"{lo}..{hi}, but the store recorded {first}..{last} for that chunk when it "
                "was finalized"
            )
    return None


def chunk_ranges(source_id: zarr.Array, chunk_rows: int, path: Path | Location) -> list[list[int]]:
    """[first, last] source_id of every chunk; errors if a chunk is unwritten or out of order."""
    ranges: list[list[int]] = []
    n_rows = source_id.shape[0]
    for start in range(0, n_rows, chunk_rows):
        block = np.asarray(source_id[start : start + chunk_rows])
        where = f"rows {start}..{start + len(block)} (chunk {start // chunk_rows}) of {path}"
        if np.any(block == SOURCE_ID_FILL):
            raise StoreError(
                f"{where} were never written (source_id still holds the fill value); the writer "
                "of that chunk did not finish. Rerun the command that builds this store."
            )
        if np.any(np.diff(block) <= 0):
            raise StoreError(f"source_id is not strictly ascending within {where}")
        if ranges and block[0] <= ranges[-1][1]:
            raise StoreError(
                f"source_id {int(block[0])} at the start of {where} is not above the previous "
                f"chunk's last id {ranges[-1][1]}: duplicate or out-of-order sources across chunks"
            )
        ranges.append([int(block[0]), int(block[-1])])
    return ranges


def schema_problems(group: zarr.Group, path: Path | Location) -> list[str]:
    """Every way in which the store ``group`` at ``path`` departs from the schema or is damaged.

    A store of another format version is refused at once
    (:func:`xpbatch.storage.zarr_arrays.check_format_version`).
    """
    attrs: dict[str, Any] = group.attrs.asdict()
    zarr_arrays.check_format_version(attrs, path, STORE)
    problems = []
    if attrs.get(schema.STORE_ATTR_COMPLETE) is not True:
        problems.append(
            "it is not complete (attribute complete is not true): the ingest or mock that wrote it "
            "failed or is still running; rerun it"
        )
    arrays = dict(group.arrays())
    n_rows = attrs.get(schema.STORE_ATTR_ROW_COUNT)
    specs = variable_specs(
        attrs.get(schema.STORE_ATTR_SCALARS, []),
        bool(attrs.get(schema.STORE_ATTR_WITH_CORRELATIONS)),
        bool(attrs.get(schema.STORE_ATTR_WITH_POSITIONS)),
    )
    for spec in specs:
        array = arrays.get(spec.name)
        if array is None:
            problems.append(f"variable {spec.name!r} is missing")
            continue
        expected_shape = (n_rows, spec.width) if spec.width else (n_rows,)
        dims = tuple(array.metadata.dimension_names or ())  # type: ignore[union-attr]
        if array.dtype != np.dtype(spec.dtype):
            problems.append(f"{spec.name} has dtype {array.dtype}, expected {spec.dtype}")
        if array.shape != expected_shape:
            problems.append(f"{spec.name} has shape {array.shape}, expected {expected_shape}")
        if dims != spec.dims:
            problems.append(f"{spec.name} has dims {dims}, expected {spec.dims}")
        if spec.width and array.chunks[1:] != (spec.width,):
            problems.append(f"{spec.name} must be chunked along source only, got {array.chunks}")
        if array.chunks[0] > MAX_CHUNK_ROWS:
            problems.append(
                f"{spec.name} has {array.chunks[0]} rows per chunk, at most {MAX_CHUNK_ROWS}"
            )
    if schema.COEFF not in arrays or arrays[schema.COEFF].shape != (schema.N_COEFF,):
        problems.append(f"coordinate {schema.COEFF!r} with {schema.N_COEFF} labels is missing")
    problems.extend(_order_problems(attrs, arrays.get(schema.SOURCE_ID)))
    if not problems and attrs.get(schema.STORE_ATTR_COMPLETE) is True:
        missing = chunk_file_problems(path)
        if missing:
            problems.append(
                f"{zarr_arrays.describe_chunk_problems(missing)}; {DAMAGED_STORE_REMEDY}"
            )
    return problems


def _order_problems(attrs: Mapping[str, Any], source_id: Any) -> list[str]:
    """Check ascending unique ids from the per-chunk ranges finalize recorded (no data read)."""
    ranges = attrs.get(schema.STORE_ATTR_CHUNK_RANGES)
    if attrs.get(schema.STORE_ATTR_COMPLETE) is not True or source_id is None:
        return []
    n_chunks = -(-source_id.shape[0] // source_id.chunks[0])
    if not isinstance(ranges, list) or len(ranges) != n_chunks:
        return [f"attribute source_id_chunk_ranges must list {n_chunks} [first, last] pairs"]
    bounds = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)  # (chunk, [first, last])
    if np.any(bounds[:, 1] < bounds[:, 0]) or np.any(bounds[1:, 0] <= bounds[:-1, 1]):
        return ["source_id is not ascending and unique across chunks (source_id_chunk_ranges)"]
    return []
