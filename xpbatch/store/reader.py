"""Opening and reading an XP store: the checked lazy view (:func:`open_xp_store`), the store's
identity (:func:`store_id`), and the chunk reads of the encode tasks (:class:`ChunkReader`,
:func:`sample_rows`).

The store's layout and how it is written are :mod:`xpbatch.store.xp_store`; the checks (schema,
order, chunk files) are :mod:`xpbatch.store.checks`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from xpbatch import schema
from xpbatch.errors import StoreError
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import STORE
from xpbatch.store import checks as store_checks

if TYPE_CHECKING:
    import xarray as xr


def open_xp_store(path: PathLike | Location) -> xr.Dataset:
    """Open an XP store lazily (Dask-backed), after checking it follows the schema.

    Parameters
    ----------
    path
        Directory of a store written by ``xpbatch ingest``, ``xpbatch mock`` or
        :func:`~xpbatch.store.xp_store.write_xp_store`, or its ``s3://bucket/prefix`` URL
        (settings from the AWS environment, or a :class:`~xpbatch.storage.location.Location`
        carrying its options).

    Returns
    -------
    xarray.Dataset
        Dims ``source`` and ``coeff``; coordinate ``source_id``; see :mod:`xpbatch.store.xp_store`.

    Raises
    ------
    StoreNotFoundError
        The path does not exist.
    StoreError
        The store departs from the schema or is not complete; the message lists every problem.

    Examples
    --------
    >>> ds = open_xp_store("dr3.zarr")  # doctest: +SKIP
    >>> ds.coefficients.sel(coeff="bp_0")  # doctest: +SKIP
    """
    import xarray as xr

    path = zarr_arrays.where(path)
    # Validate the arrays' own metadata, not the consolidated copy, which may be stale.
    group = zarr_arrays.open_group(path, STORE, use_consolidated=False)
    problems = store_checks.schema_problems(group, path)
    if problems:
        raise StoreError(f"{path} is not a usable XP store: " + "; ".join(problems))
    consolidated = zarr_arrays.open_group(path, STORE).metadata.consolidated_metadata is not None
    target = path.zarr_store(read_only=True) if isinstance(path, Location) else path
    return xr.open_zarr(target, consolidated=consolidated)


def store_id(ds_or_path: xr.Dataset | PathLike | Location) -> str:
    """A stable, cheap identifier of a complete store, recorded by models and catalogues.

    A hash of the store's creation uuid, row count and per-chunk source_id ranges, computed once
    by :meth:`~xpbatch.store.xp_store.XPStoreWriter.finalize`; two different stores never share it.
    """
    if isinstance(ds_or_path, str | os.PathLike | Location):
        place = zarr_arrays.where(ds_or_path)
        attrs: dict[str, Any] = zarr_arrays.open_group(place, STORE).attrs.asdict()
        where = str(ds_or_path)
    else:
        attrs = dict(ds_or_path.attrs)
        where = "this dataset"
    value = attrs.get(schema.STORE_ATTR_STORE_ID)
    if not value or attrs.get(schema.STORE_ATTR_COMPLETE) is not True:
        raise StoreError(
            f"{where} has no store_id: it is not a complete XP store (opened with open_xp_store?)"
        )
    return str(value)


def open_variables(path: PathLike | Location, names: Iterable[str]) -> dict[str, zarr.Array]:
    """Arrays of the store at ``path`` by name, straight from Zarr (no xarray, no schema check).

    A StoreError names the store and the array when one is missing.
    """
    return zarr_arrays.open_arrays(path, names, STORE)


def present_variables(path: PathLike | Location, names: Iterable[str]) -> tuple[str, ...]:
    """Those of ``names`` that the store at ``path`` has (e.g. the optional ``ra``, ``dec``)."""
    group = zarr_arrays.open_group(zarr_arrays.where(path), STORE)
    return tuple(name for name in names if name in group)


class ChunkReader:
    """Reads row ranges of some of a store's variables, all of them at once.

    Each chunk file is read once, compared with its record and decoded from the same bytes
    (crc32c); each variable is read in a thread of its own, so they overlap on a worker with cores
    to spare. A damaged chunk is a StoreError naming its variable, chunk and file
    (:func:`xpbatch.store.checks.read_rows_checked`).

    Examples
    --------
    >>> reader = ChunkReader("dr3.zarr", ["source_id", "coefficients"])  # doctest: +SKIP
    >>> reader.read(slice(0, 65536))["coefficients"].shape  # doctest: +SKIP
    (65536, 110)
    """

    def __init__(self, path: PathLike | Location, names: Iterable[str]) -> None:
        self.path = zarr_arrays.where(path)
        group = zarr_arrays.open_group(self.path, STORE)
        self.arrays = {name: zarr_arrays.get_array(group, name, STORE) for name in names}
        self._attrs: dict[str, Any] = group.attrs.asdict()
        self._checksums = store_checks.recorded_checksums(group)  # None: an older store

    def read(self, rows: slice, *, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Variable name -> its values in ``rows`` (of all the reader's variables, or ``names``).

        Each chunk file is first checked against the checksum recorded when it was written, and
        ``source_id`` against the ranges recorded when the store was finalized: a file copied
        from another chunk is refused, naming the store, the variable and the chunk.
        """
        arrays = self.arrays if names is None else {name: self.arrays[name] for name in names}
        recorded = self._recorded(rows, arrays)
        with ThreadPoolExecutor(len(arrays), thread_name_prefix="xpbatch-read") as pool:
            futures = {
                name: pool.submit(
                    store_checks.read_rows_checked,
                    self.path,
                    array,
                    rows,
                    recorded=None if recorded is None else recorded.get(name, {}),
                )
                for name, array in arrays.items()
            }
            values = {name: future.result() for name, future in futures.items()}
        if schema.SOURCE_ID in values:
            chunk_rows = arrays[schema.SOURCE_ID].chunks[0]
            problem = store_checks.source_id_range_problem(
                self._attrs, values[schema.SOURCE_ID], rows, chunk_rows
            )
            if problem:
                raise StoreError(
                    f"{problem} (store {self.path}): its rows were not used. "
                    f"{store_checks.DAMAGED_STORE_REMEDY}"
                )
        return values

    def _recorded(
        self, rows: slice, arrays: Mapping[str, zarr.Array]
    ) -> dict[str, dict[int, int]] | None:
        """Variable -> chunk -> recorded crc32c, for the chunks of ``rows``; None if unrecorded."""
        if self._checksums is None or not arrays:
            return None
        names, table = self._checksums
        chunk_rows = next(iter(arrays.values())).chunks[0]
        first, stop = rows.start // chunk_rows, -(-rows.stop // chunk_rows)
        block = np.asarray(table[first:stop])  # (chunk, variable)
        return {
            name: {first + i: int(block[i, column]) for i in range(len(block))}
            for column, name in enumerate(names)
        }


def sample_rows(
    path: PathLike | Location, names: Iterable[str], *, per_chunk: int
) -> dict[str, np.ndarray]:
    """``per_chunk`` evenly spaced rows of every chunk of the store, for each of ``names``, and
    ``chunk`` (the chunk of each row): a look at the whole store for the price of a few rows.

    Chunk files stored without compression (every store written now) are read row by row at
    their offsets, without reading the chunks; compressed ones (older stores) are decoded.
    These are a sample to measure, not rows to use: whole chunks are checked when read.
    """
    path = zarr_arrays.where(path)
    arrays = open_variables(path, names)
    first = next(iter(arrays.values()))
    n_rows, chunk_rows = int(first.shape[0]), int(first.chunks[0])
    rows = np.unique(
        np.concatenate(
            [
                np.linspace(start, min(start + chunk_rows, n_rows) - 1, per_chunk).astype(np.int64)
                for start in range(0, n_rows, chunk_rows)
            ]
            or [np.zeros(0, np.int64)]
        )
    )
    sample = {name: _rows_of(path, array, rows) for name, array in arrays.items()}
    sample["chunk"] = rows // chunk_rows
    return sample


def _rows_of(path: zarr_arrays.Place, array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``: read at their offsets from uncompressed chunk files, else decoded (and
    always decoded on object storage)."""
    dtype = zarr_arrays.plain_dtype(array)
    if dtype is None or not rows.size or not isinstance(path, Path):
        return np.asarray(array.get_orthogonal_selection(rows))  # type: ignore[arg-type]
    row_bytes = dtype.itemsize * int(np.prod(array.chunks[1:], dtype=np.int64))
    out = np.empty((rows.size, *array.shape[1:]), dtype)
    chunk_rows = array.chunks[0]
    for index in np.unique(rows // chunk_rows):
        file = path / array.basename / zarr_arrays.chunk_key(array, int(index))
        picked = np.flatnonzero(rows // chunk_rows == index)
        try:
            with open(file, "rb") as f:
                for i in picked:
                    f.seek(int(rows[i] - index * chunk_rows) * row_bytes)
                    out[i] = np.frombuffer(f.read(row_bytes), dtype).reshape(array.shape[1:])
        except (FileNotFoundError, ValueError) as e:
            raise StoreError(
                f"{array.basename} chunk {index} of store {path}: file {file} is missing or cut "
                f"short ({e}); {store_checks.DAMAGED_STORE_REMEDY}"
            ) from e
    return out.astype(array.dtype, copy=False)
