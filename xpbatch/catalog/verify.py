"""Verifying a catalogue: every chunk written, completely and consistently (with its store).

Reads the catalogue chunk by chunk, never a whole variable, so it runs on Dask workers as well as
serially (see ``map_chunks``); :mod:`xpbatch.catalog.zarr_catalog` describes what a sound catalogue
holds.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from xpbatch import schema
from xpbatch.catalog.zarr_catalog import (
    CHECKSUM_MISSING,
    RECORD_MISSING,
    CatalogLayout,
    ChunkRecord,
    completed_chunks,
    read_attrs,
    value_problems,
)
from xpbatch.errors import CatalogError
from xpbatch.storage import zarr_arrays
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import CATALOG


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


CHECKSUM_CHECKS = (
    "every chunk's completion record, every chunk file present and either byte for byte as its "
    "writer wrote it after checking NaN exactly where not_encoded (crc32c against the one "
    "recorded then) or decoded and checked for that again, flags equal to the records"
)
"""What :func:`verify_catalog` with ``decode=False`` checks, as the run summary says it (with a
store: also the row count, store id and every source_id against it; a chunk without recorded
checksums for every file, or with a file that differs, is decoded and checked in full)."""

ChunkMapper = Callable[[Callable[[int], list[str]], Iterable[int]], Iterable[list[str]]]
"""Runs a per-chunk check over chunk indices (builtin ``map``, or Dask workers)."""

_ALWAYS_DECODED = (schema.SOURCE_ID, schema.FLAGS)
"""Variables decoded even when checksums vouch for the files: small, and what the record and
the store are compared with."""


@dataclasses.dataclass(frozen=True)
class ChunkVerifier:
    """Checks one chunk of a catalogue against its record (and the input store); picklable.

    The arrays are opened once per process (on the first chunk it checks), not once per chunk.
    With ``decode=False``, a chunk whose files all match the checksums its writer recorded is
    not decoded beyond ``source_id`` and ``flags``.
    """

    path: Path
    layout: CatalogLayout
    store: Path | None = None
    decode: bool = True

    def __getstate__(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @functools.cached_property
    def _arrays(self) -> _Opened:
        group = zarr_arrays.open_group(self.path, CATALOG)
        store_source_id = None
        if self.store is not None:
            store = zarr_arrays.open_arrays(self.store, [schema.SOURCE_ID], zarr_arrays.STORE)
            store_source_id = store[schema.SOURCE_ID]
        return _Opened(
            records=zarr_arrays.get_array(group, schema.RECORDS_ARRAY, CATALOG),
            checksums=zarr_arrays.get_array(group, schema.CHECKSUMS_ARRAY, CATALOG),
            variables={
                spec.name: zarr_arrays.get_array(group, spec.name, CATALOG)
                for spec in self.layout.variables()
            },
            store_source_id=store_source_id,
        )

    def __call__(self, index: int) -> list[str]:
        """Problems of chunk ``index`` (empty when sound)."""
        where = f"chunk {index} (rows {self.layout.rows(index).start}..)"
        try:
            return [f"{where}: {p}" for p in self._check(index)]
        except Exception as e:  # any read failure is a finding, e.g. a checksum mismatch
            return [f"{where}: unreadable ({type(e).__name__}: {e})"]

    def _check(self, index: int) -> list[str]:
        rows = self.layout.rows(index)
        opened = self._arrays
        problems = []
        row = np.asarray(opened.records[index])
        record = None if row[0] == RECORD_MISSING else ChunkRecord.from_row(index, row)
        if record is None:
            problems.append("no completion record: the chunk was never finished")
        files = {}  # name -> its chunk file
        for name, array in opened.variables.items():
            file = zarr_arrays.chunk_file(self.path, array, index)
            if file.is_file():
                files[name] = file
            else:
                problems.append(f"{name} chunk file {self._relative(file)} is missing")
        # Files exactly as their writer wrote (and checked) them need not be decoded again. A file
        # that differs is decoded and judged by its values: another attempt at the same chunk
        # (e.g. a task Dask ran twice, on another kind of device) may have written it last.
        trusted = (
            not self.decode
            and not problems
            and _as_written(files, self._recorded_checksums(index), opened.variables)
        )
        values: dict[str, np.ndarray] = {}
        for name, file in files.items():
            if trusted and name not in _ALWAYS_DECODED:
                continue
            try:
                values[name] = np.asarray(opened.variables[name][rows])
            except (ValueError, RuntimeError, OSError) as e:  # e.g. a checksum mismatch
                problems.append(
                    f"{name} chunk file {self._relative(file)} is unreadable "
                    f"({type(e).__name__}: {e})"
                )
        problems.extend(value_problems(values, rows))
        if record is not None and schema.FLAGS in values:
            actual = ChunkRecord.from_outputs(index, values)
            if actual != record:
                problems.append(f"flags do not match the completion record ({record} vs {actual})")
        source_id, store_source_id = values.get(schema.SOURCE_ID), opened.store_source_id
        if (
            source_id is not None
            and store_source_id is not None
            and not np.array_equal(source_id, store_source_id[rows])
        ):
            problems.append(f"source_id differs from the input store {self.store}")
        return problems

    def _relative(self, file: Path) -> str:
        return file.relative_to(self.path).as_posix()

    def _recorded_checksums(self, index: int) -> dict[str, int] | None:
        """Variable -> crc32c its writer recorded for chunk ``index``; None if not recorded."""
        checksums = self._arrays.checksums
        row = np.asarray(checksums[index])
        if np.any(row == CHECKSUM_MISSING):  # not taken: the chunk's files are decoded instead
            return None
        names = cast(list[str], checksums.attrs[schema.ATTR_CHUNK_FILE_VARIABLES])
        return dict(zip(names, map(int, row), strict=True))


def _as_written(
    files: Mapping[str, Path],
    recorded: Mapping[str, int] | None,
    variables: Iterable[str],
) -> bool:
    """Whether every variable's chunk file has a recorded checksum and still matches it."""
    if recorded is None:
        return False
    return all(
        name in files
        and name in recorded
        and zarr_arrays.file_has_checksum(files[name], recorded[name])
        for name in variables
    )


@dataclasses.dataclass(frozen=True)
class _Opened:
    """The arrays a :class:`ChunkVerifier` reads, opened once."""

    records: zarr.Array
    checksums: zarr.Array
    variables: dict[str, zarr.Array]
    store_source_id: zarr.Array | None


def verify_catalog(
    path: PathLike,
    store: PathLike | None = None,
    *,
    map_chunks: ChunkMapper | None = None,
    decode: bool = True,
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
        :mod:`xpbatch.encode.stage` passes one that runs them on Dask workers.
    decode
        False: a chunk whose files all still carry the checksums its writer recorded is not
        decoded beyond ``source_id`` and ``flags`` (its writer checked the values before writing
        them; see :data:`CHECKSUM_CHECKS`); any other chunk is decoded and checked in full.
        ``encode-catalog`` verifies so after writing; ``xpbatch verify`` decodes everything.

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
        verifier = ChunkVerifier(path, layout, store_path, decode=decode)
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
    from xpbatch.store.xp_store import open_xp_store, store_id

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
