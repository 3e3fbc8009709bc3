"""Verifying a catalogue: every chunk written, completely and consistently (with its store).

Reads the catalogue chunk by chunk, never a whole variable, so it runs on Dask workers as well as
serially (see ``map_chunks``); :mod:`xpbatch.catalog` describes what a sound catalogue holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from xpbatch import schema, zarr_arrays
from xpbatch.catalog import (
    RECORD_MISSING,
    CatalogLayout,
    ChunkRecord,
    completed_chunks,
    read_attrs,
)
from xpbatch.errors import CatalogError
from xpbatch.paths import PathLike
from xpbatch.schema import CatalogFlag
from xpbatch.zarr_arrays import CATALOG


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_catalog`."""

    path: str
    n_rows: int
    n_chunks: int
    chunks_recorded: int
    problems: tuple[str, ...]
    """Every problem found, one sentence each (empty when the catalogue is sound)."""

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def __str__(self) -> str:
        head = (
            f"{self.path}: {self.n_rows} rows in {self.n_chunks} chunks, "
            f"{self.chunks_recorded} recorded done"
        )
        if self.ok:
            return head + "; verified, no problem found"
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        return f"{head}; {len(self.problems)} problem(s):\n  {shown}{more}"

    def raise_if_failed(self) -> None:
        """Raise a CatalogError listing the problems, if any."""
        if not self.ok:
            raise CatalogError(str(self))


VERIFY_CHECKS = (
    "every chunk's completion record, every chunk file present and decoding (crc32c), NaN exactly "
    "where not_encoded, flags equal to the records"
)
"""What :func:`verify_catalog` checks, as the run summary says it (with a store: also the row
count, store id and every source_id against it)."""

ChunkMapper = Callable[[Callable[[int], list[str]], Iterable[int]], Iterable[list[str]]]
"""Runs a per-chunk check over chunk indices (builtin ``map``, or Dask workers)."""


@dataclasses.dataclass(frozen=True)
class ChunkVerifier:
    """Checks one chunk of a catalogue against its record (and the input store); picklable."""

    path: Path
    layout: CatalogLayout
    store: Path | None = None

    def __call__(self, index: int) -> list[str]:
        """Problems of chunk ``index`` (empty when sound)."""
        where = f"chunk {index} (rows {self.layout.rows(index).start}..)"
        try:
            return [f"{where}: {p}" for p in self._check(index)]
        except Exception as e:  # any read failure is a finding, e.g. a checksum mismatch
            return [f"{where}: unreadable ({type(e).__name__}: {e})"]

    def _check(self, index: int) -> list[str]:
        rows = self.layout.rows(index)
        group = zarr_arrays.open_group(self.path, CATALOG)
        problems = []
        row = np.asarray(zarr_arrays.get_array(group, schema.RECORDS_ARRAY, CATALOG)[index])
        record = None if row[0] == RECORD_MISSING else ChunkRecord.from_row(index, row)
        if record is None:
            problems.append("no completion record: the chunk was never finished")
        values: dict[str, np.ndarray] = {}
        for spec in self.layout.variables():
            array = zarr_arrays.get_array(group, spec.name, CATALOG)
            key = array.metadata.encode_chunk_key((index, 0)[: array.ndim])
            if not (self.path / spec.name / key).is_file():
                problems.append(f"{spec.name} chunk file {spec.name}/{key} is missing")
                continue
            try:
                values[spec.name] = np.asarray(array[rows])
            except (ValueError, RuntimeError, OSError) as e:  # e.g. a checksum mismatch
                problems.append(
                    f"{spec.name} chunk file {spec.name}/{key} is unreadable "
                    f"({type(e).__name__}: {e})"
                )
        problems.extend(_value_problems(values, rows))
        if record is not None and schema.FLAGS in values:
            actual = ChunkRecord.from_outputs(index, values)
            if actual != record:
                problems.append(f"flags do not match the completion record ({record} vs {actual})")
        if self.store is not None and schema.SOURCE_ID in values:
            store = zarr_arrays.open_arrays(self.store, [schema.SOURCE_ID], zarr_arrays.STORE)
            if not np.array_equal(values[schema.SOURCE_ID], store[schema.SOURCE_ID][rows]):
                problems.append(f"source_id differs from the input store {self.store}")
        return problems


def _value_problems(values: Mapping[str, np.ndarray], rows: slice) -> list[str]:
    """NaN exactly where the NOT_ENCODED flag is; source_id never written."""
    problems = []
    if schema.SOURCE_ID in values and np.any(values[schema.SOURCE_ID] == -1):
        problems.append("source_id holds the fill value -1 (never written)")
    if schema.FLAGS not in values:
        return problems
    not_encoded = (values[schema.FLAGS] & np.uint16(CatalogFlag.NOT_ENCODED)) != 0
    for name, array in values.items():
        if array.dtype.kind != "f" or name in (schema.RA, schema.DEC):  # copied inputs
            continue
        nan = np.isnan(array).reshape(len(array), -1)  # (rows, values per row)
        for wrong, what in (
            (nan.any(axis=1) & ~not_encoded, "is NaN in {} row(s) without the not_encoded flag"),
            (~nan.all(axis=1) & not_encoded, "has values in {} row(s) flagged not_encoded"),
        ):
            where = np.flatnonzero(wrong)
            if where.size:
                example = rows.start + int(where[0])
                problems.append(f"{name} {what.format(where.size)}, e.g. row {example}")
    return problems


def verify_catalog(
    path: PathLike, store: PathLike | None = None, *, map_chunks: ChunkMapper | None = None
) -> VerifyReport:
    """Check that every chunk of a catalogue was written, completely and consistently.

    Reads the catalogue chunk by chunk (never a whole variable): every chunk has its completion
    record and a file for every variable; every chunk decodes (crc32c checksums); no value is NaN
    without the ``not_encoded`` flag; flags match the records. With ``store``, also that the row
    count, store id and ``source_id`` values equal the input store's.

    Parameters
    ----------
    path
        The catalogue.
    store
        The input XP store it was made from (optional).
    map_chunks
        How to run the per-chunk checks; default the builtin ``map`` (serial).
        :mod:`xpbatch.pipeline` passes one that runs them on Dask workers.

    Returns
    -------
    VerifyReport
        ``report.ok`` is True when nothing is wrong; ``str(report)`` lists the problems.

    Examples
    --------
    >>> print(verify_catalog("catalog.zarr", store="dr3.zarr"))  # doctest: +SKIP
    catalog.zarr: 219197643 rows in 3345 chunks, 3345 recorded done; verified, no problem found
    """
    path = Path(path)
    attrs = read_attrs(path)
    layout = CatalogLayout.from_attrs(attrs[schema.CATALOG_ATTR_LAYOUT])
    problems = _layout_problems(path, layout)
    store_path = None
    if store is not None:
        store_path = Path(store)
        problems.extend(_store_problems(attrs, layout, store_path))
    recorded = len(completed_chunks(path))
    if not problems:
        verifier = ChunkVerifier(path, layout, store_path)
        for found in (map_chunks or map)(verifier, range(layout.n_chunks)):
            problems.extend(found)
    return VerifyReport(str(path), layout.n_rows, layout.n_chunks, recorded, tuple(problems))


def _layout_problems(path: Path, layout: CatalogLayout) -> list[str]:
    """Arrays missing, or of another shape or chunking than the layout says."""
    group = zarr_arrays.open_group(path, CATALOG)
    problems = []
    for spec in layout.variables():
        node = group.get(spec.name)
        if not isinstance(node, zarr.Array):
            problems.append(f"variable {spec.name!r} is missing")
        elif node.shape != spec.shape(layout.n_rows) or node.chunks[0] != layout.chunk_rows:
            problems.append(
                f"{spec.name} has shape {node.shape} and chunks {node.chunks}, the layout says "
                f"{spec.shape(layout.n_rows)} in chunks of {layout.chunk_rows} rows"
            )
    if not isinstance(group.get(schema.RECORDS_ARRAY), zarr.Array):
        problems.append("the completion records are missing: the template was never finished")
    return problems


def _store_problems(attrs: Mapping[str, Any], layout: CatalogLayout, store: Path) -> list[str]:
    from xpbatch.store import open_xp_store, store_id

    ds = open_xp_store(store)
    problems = []
    recorded = attrs.get(schema.CATALOG_ATTR_STORE_ID)
    if store_id(ds) != recorded:
        problems.append(
            f"the catalogue was made from store id {recorded}, but {store} has id {store_id(ds)}: "
            "not the same input"
        )
    if ds.sizes[schema.SOURCE] != layout.n_rows:
        problems.append(
            f"the catalogue has {layout.n_rows} rows, the store {store} has "
            f"{ds.sizes[schema.SOURCE]}"
        )
    return problems
