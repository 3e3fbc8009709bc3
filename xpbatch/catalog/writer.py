"""Writing one chunk of a catalogue: check its values, write every variable, then its record.

How a run stays correct when it is killed at any moment:

1. :func:`~xpbatch.catalog.layout.create_catalog` writes every array's metadata first (NaN
   fill values, a crc32c checksum in every codec chain), and the ``_xpbatch`` group last: a
   template without it is unfinished and is rebuilt on resume.
2. A task writes exactly the rows of one input chunk, i.e. one chunk of every output array
   (:class:`CatalogWriter` checks the alignment and every shape first, then writes the variables
   at once), each file fsynced, then that chunk's checksums (the crc32c of each file it wrote,
   ``_xpbatch/chunk_checksums``), and only then that chunk's completion record. The record is a
   single chunk of the ``chunk_records`` array, so writing it is one atomic file rename; it holds
   the chunk's row and flag counts.
3. Everything a task writes is a deterministic function of its input chunk and device. A task
   that runs twice (Dask may do that after a worker dies, on another kind of device) checks
   after writing its record that the files, checksums and record on disk are all its own, and
   writes them again if not: whichever attempt writes last leaves a consistent chunk. Readers
   refuse any file that is not the one its checksum records.
4. :func:`xpbatch.catalog.verify.verify_catalog` then checks every chunk and
   :func:`~xpbatch.catalog.output.mark_complete` sets ``complete = true``;
   :func:`~xpbatch.catalog.zarr_catalog.open_catalog` refuses a catalogue without it.

The catalogue is written to a POSIX filesystem that every worker sees (local disk, NFS, Lustre,
GPFS): records rely on atomic renames and chunk files are fsynced before their record.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numba
import numpy as np
import zarr

from xpbatch import schema
from xpbatch.catalog.layout import ChunkRecord
from xpbatch.catalog.zarr_catalog import read_layout
from xpbatch.errors import CatalogError, InputShapeError
from xpbatch.schema import CatalogFlag
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import CATALOG

logger = logging.getLogger(__name__)


MAX_WRITE_ATTEMPTS = 8
"""Times a chunk writer rewrites a chunk that another attempt at it overwrote meanwhile."""


class CatalogWriter:
    """Writes whole chunks of a catalogue created by
    :func:`~xpbatch.catalog.layout.create_catalog`, then their records.

    Picklable and cheap: each process opens the arrays once, on first use.

    Examples
    --------
    >>> writer = CatalogWriter("catalog.zarr")  # doctest: +SKIP
    >>> record = writer.write_chunk(3, encode_chunk(model, chunk))  # doctest: +SKIP
    """

    def __init__(self, path: PathLike | Location) -> None:
        self.path = zarr_arrays.where(path)
        self._arrays: dict[str, zarr.Array] | None = None
        self._records: zarr.Array | None = None
        self._devices: zarr.Array | None = None
        self._checksums: zarr.Array | None = None
        self.layout = read_layout(self.path)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "layout": self.layout,
            "_arrays": None,
            "_records": None,
            "_devices": None,
            "_checksums": None,
        }

    def _open(self) -> tuple[dict[str, zarr.Array], zarr.Array]:
        if self._arrays is None or self._records is None:
            group = zarr_arrays.open_group(self.path, CATALOG, mode="r+")
            arrays = {}
            for spec in self.layout.variables():
                array = zarr_arrays.get_array(group, spec.name, CATALOG)
                # Regions are chunks only if the arrays are chunked as the layout says; xarray
                # and zarr would not catch a numpy write straddling two chunks.
                if array.chunks[0] != self.layout.chunk_rows:
                    raise CatalogError(
                        f"{self.path}/{spec.name} has {array.chunks[0]} rows per chunk, the "
                        f"layout says {self.layout.chunk_rows}: writes would not be aligned"
                    )
                arrays[spec.name] = array
            records = zarr_arrays.get_array(group, schema.RECORDS_ARRAY, CATALOG)
            self._arrays, self._records = arrays, records
            self._devices = zarr_arrays.get_array(group, schema.DEVICES_ARRAY, CATALOG)
            self._checksums = zarr_arrays.get_array(group, schema.CHECKSUMS_ARRAY, CATALOG)
        return self._arrays, self._records

    def write_chunk(
        self, index: int, outputs: Mapping[str, np.ndarray], *, device: str = ""
    ) -> ChunkRecord:
        """Check chunk ``index``'s values, write every variable, flush them to disk, take
        their checksums, then record the chunk done.

        Parameters
        ----------
        index
            Chunk number; its rows are ``layout.rows(index)``.
        outputs
            Variable name -> array of exactly those rows (see
            :func:`xpbatch.encode.kernel.encode_chunk`).
        device
            What encoded the chunk (e.g. 'cuda:0 (NVIDIA H200)'), kept in
            :data:`~xpbatch.schema.DEVICES_ARRAY`.

        Returns
        -------
        ChunkRecord
            What was recorded for this chunk.

        Raises
        ------
        InputShapeError
            A variable is missing or has the wrong shape.
        CatalogError
            The values break the catalogue's rules (:func:`value_problems`); nothing is written.
        """
        arrays, records = self._open()
        rows = self.layout.rows(index)
        n = rows.stop - rows.start
        converted = {}
        for name, array in arrays.items():
            values = outputs.get(name)
            expected = (n, *array.shape[1:])
            if values is None or values.shape != expected:
                found = None if values is None else values.shape
                raise InputShapeError(
                    f"chunk {index} of {self.path}: {name} must have shape {expected}, got {found}"
                )
            converted[name] = values.astype(array.dtype, copy=False)
        # Checked here, on the values written, so that verification after a run can rely on the
        # files' checksums instead of decoding every value again.
        problems = value_problems(converted, rows)
        if problems:
            raise CatalogError(
                f"chunk {index} of {self.path} was not written: {'; '.join(problems)}"
            )
        writes = [(arrays[name], values) for name, values in converted.items()]
        record = ChunkRecord.from_outputs(index, outputs)
        if device and self._devices is not None:
            self._devices[index] = device
        for _ in range(MAX_WRITE_ATTEMPTS):
            # Every variable at once, each file fsynced, so a record never outlives its data.
            checksums = zarr_arrays.write_chunks(self.path, writes, rows)[index]
            if self._checksums is not None:
                self._checksums[index] = checksums
            # Last, and atomically (one file rename): the record says every variable is on disk.
            records[index] = record.to_row()
            if self._as_written(index, checksums, record):
                return record
            # Another attempt at this chunk (Dask may run a task twice, on another kind of
            # device) wrote some of these files or records in between: write ours again, so
            # that whichever attempt writes last leaves its files and its records together.
            logger.warning(
                "chunk %d of %s was written by another attempt meanwhile", index, self.path
            )
        raise CatalogError(
            f"chunk {index} of {self.path}: another writer kept replacing its files "
            f"({MAX_WRITE_ATTEMPTS} attempts); is a second encode-catalog writing this catalogue?"
        )

    def _as_written(self, index: int, checksums: Sequence[int], record: ChunkRecord) -> bool:
        """Whether chunk ``index``'s files, checksums and record on disk are all this write's."""
        arrays, records = self._open()
        tables = [records] + ([] if self._checksums is None else [self._checksums])
        row, *found = zarr_arrays.read_together([(table, index) for table in tables])
        if not np.array_equal(row, record.to_row()):
            return False
        if found and not np.array_equal(found[0], np.asarray(checksums, np.int64)):
            return False
        return all(
            zarr_arrays.chunk_checksum(zarr_arrays.chunk_file(self.path, array, index), array)
            == checksum
            for array, checksum in zip(arrays.values(), checksums, strict=True)
        )


def value_problems(values: Mapping[str, np.ndarray], rows: slice) -> list[str]:
    """What breaks the catalogue's rules in one chunk's ``values`` (empty: nothing).

    NaN exactly where the NOT_ENCODED flag is (in every model output; ra and dec are copied
    inputs); source_id never the fill value.
    """
    problems = []
    if schema.SOURCE_ID in values and np.any(values[schema.SOURCE_ID] == -1):
        problems.append("source_id holds the fill value -1 (never written)")
    if schema.FLAGS not in values:
        return problems
    not_encoded = (values[schema.FLAGS] & np.uint16(CatalogFlag.NOT_ENCODED)) != 0
    messages = (
        "is NaN in {} row(s) without the not_encoded flag",
        "has values in {} row(s) flagged not_encoded",
    )
    for name, array in values.items():
        if array.dtype.kind != "f" or name in (schema.RA, schema.DEC):  # copied inputs
            continue
        counts = _nan_against_flag(array.reshape(len(array), -1), not_encoded)
        for (count, first), message in zip(counts, messages, strict=True):
            if count:
                problems.append(f"{name} {message.format(count)}, e.g. row {rows.start + first}")
    return problems


@numba.njit(cache=True, nogil=True)
def _nan_against_flag(
    values: np.ndarray,  # (rows, values per row) float
    not_encoded: np.ndarray,  # (rows,) bool
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((rows with a NaN but no flag, first such row), (flagged rows with a value, first)).

    One pass over the chunk (the NumPy version made four full-size temporaries).
    """
    nan_unflagged, first_nan = 0, -1
    value_flagged, first_value = 0, -1
    for i in range(values.shape[0]):
        n_nan = 0
        for j in range(values.shape[1]):
            n_nan += np.isnan(values[i, j])
        if not not_encoded[i] and n_nan > 0:
            nan_unflagged += 1
            first_nan = i if first_nan < 0 else first_nan
        elif not_encoded[i] and n_nan < values.shape[1]:
            value_flagged += 1
            first_value = i if first_value < 0 else first_value
    return (nan_unflagged, first_nan), (value_flagged, first_value)
