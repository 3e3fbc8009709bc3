"""Verifying a catalogue: every chunk written, completely and consistently (with its store).

Reads the catalogue chunk by chunk, never a whole variable, so it runs on Dask workers as well as
serially (see ``executor``); :mod:`xpbatch.catalog.writer` describes what a sound catalogue
holds.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zarr

from xpbatch import schema
from xpbatch.catalog.layout import CHECKSUM_MISSING, RECORD_MISSING, CatalogLayout, ChunkRecord
from xpbatch.catalog.writer import value_problems
from xpbatch.catalog.zarr_catalog import completed_chunks, read_attrs
from xpbatch.errors import CatalogError, StoreError
from xpbatch.runtime.executor import SERIAL, Executor
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import CATALOG, Place

if TYPE_CHECKING:
    from xpbatch.store.reader import ChunkReader


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

    path: Place
    layout: CatalogLayout
    store: Place | None = None
    decode: bool = True

    def __getstate__(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @functools.cached_property
    def _arrays(self) -> _Opened:
        group = zarr_arrays.open_group(self.path, CATALOG)
        return _Opened(
            records=zarr_arrays.get_array(group, schema.RECORDS_ARRAY, CATALOG),
            checksums=zarr_arrays.get_array(group, schema.CHECKSUMS_ARRAY, CATALOG),
            variables={
                spec.name: zarr_arrays.get_array(group, spec.name, CATALOG)
                for spec in self.layout.variables()
            },
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
        # The chunk's record and checksums in one trip through Zarr's event loop.
        tables = [opened.records] + ([] if opened.checksums is None else [opened.checksums])
        row, *checksums = zarr_arrays.read_together([(table, index) for table in tables])
        record = None if row[0] == RECORD_MISSING else ChunkRecord.from_row(index, row)
        if record is None:
            problems.append("no completion record: the chunk was never finished")
        recorded = self._recorded_checksums(checksums[0]) if checksums else None
        data = {}  # name -> its chunk file's bytes: each file is read once, checked, decoded
        for name, array in opened.variables.items():
            file = zarr_arrays.chunk_file(self.path, array, index)
            try:
                found = zarr_arrays.read_chunk_file(file)
            except OSError as e:
                problems.append(
                    f"{name} chunk file {self._relative(file)} is unreadable "
                    f"({type(e).__name__}: {e})"
                )
                continue
            if found is None:
                problems.append(f"{name} chunk file {self._relative(file)} is missing")
                continue
            data[name] = found
            # A file is the one its writer recorded, or refused: a chunk file copied over
            # another's is a valid file with valid values, only its record tells it apart.
            why = (
                None
                if recorded is None
                else zarr_arrays.bytes_mismatch(array, found, recorded[name])
            )
            if why:
                where = f"{name} chunk {index}: file {self._relative(file)}"
                problems.append(f"{where} {why}; {REDERIVE}")
        # Files whose checksums match their records (the decoded ones: trailer here, body on
        # decode) are exactly as their writer wrote and checked them: not decoded again.
        trusted = (
            not self.decode
            and not problems
            and recorded is not None
            and all(
                zarr_arrays.has_checksum(found, recorded[name])
                for name, found in data.items()
                if name not in _ALWAYS_DECODED
            )
        )
        names = [n for n in data if not trusted or n in _ALWAYS_DECODED]
        decoded = zarr_arrays.decode_rows(
            [(opened.variables[n], {index: data.pop(n)}) for n in names], rows
        )
        values: dict[str, np.ndarray] = {}
        for name, value in zip(names, decoded, strict=True):
            if isinstance(value, ValueError | RuntimeError | OSError):  # e.g. a checksum mismatch
                file = zarr_arrays.chunk_file(self.path, opened.variables[name], index)
                problems.append(
                    f"{name} chunk file {self._relative(file)} is unreadable "
                    f"({type(value).__name__}: {value})"
                )
            elif isinstance(value, Exception):
                raise value
            else:
                values[name] = value
        problems.extend(value_problems(values, rows))
        if record is not None and schema.FLAGS in values:
            actual = ChunkRecord.from_outputs(index, values)
            if actual != record:
                problems.append(f"flags do not match the completion record ({record} vs {actual})")
        source_id = values.get(schema.SOURCE_ID)
        if source_id is not None:
            problems.extend(self._order_problems(index, source_id))
        if self.store is not None:
            problems.extend(self._store_row_problems(rows, values))
        return problems

    def _order_problems(self, index: int, source_id: np.ndarray) -> list[str]:
        """source_id strictly ascending within the chunk and above the previous chunk's last."""
        start = self.layout.rows(index).start
        steps = np.diff(source_id)
        if np.any(steps <= 0):
            at = start + 1 + int(np.argmax(steps <= 0))
            kind = "repeats" if steps[at - start - 1] == 0 else "is not ascending"
            return [f"source_id {kind} at row {at} ({int(source_id[at - start])})"]
        if not len(source_id):
            return []
        self._last_ids[index] = int(source_id[-1])
        if index == 0:
            return []
        previous = self._last_ids.get(index - 1)  # chunks checked in order: no second read
        if previous is None:
            previous = int(np.asarray(self._arrays.variables[schema.SOURCE_ID][start - 1]))
        if source_id[0] <= previous:
            return [
                f"source_id {int(source_id[0])} at row {start} is not above the previous chunk's "
                f"last, {previous}: duplicate or out-of-order sources across chunks"
            ]
        return []

    def _store_row_problems(self, rows: slice, values: Mapping[str, np.ndarray]) -> list[str]:
        """Row for row against the input store: source_id, the input flags (the low byte of
        flags) and, when decoded, the copied positions."""
        names = [schema.SOURCE_ID, schema.INPUT_FLAGS]
        names += [n for n in (schema.RA, schema.DEC) if n in values]
        try:
            store = self._store_reader.read(rows, names=names)
        except StoreError as e:
            return [f"the input store cannot be read: {e}"]
        problems = []
        if schema.SOURCE_ID in values and not np.array_equal(
            values[schema.SOURCE_ID], store[schema.SOURCE_ID]
        ):
            problems.append(f"source_id differs from the input store {self.store}")
        if schema.FLAGS in values:
            low = (values[schema.FLAGS] & np.uint16(0xFF)).astype(np.uint8)
            differ = np.flatnonzero(low != store[schema.INPUT_FLAGS])
            if differ.size:
                problems.append(
                    f"flags differ from the input store's input_flags in {differ.size} row(s), "
                    f"e.g. row {rows.start + int(differ[0])}"
                )
        for name in (schema.RA, schema.DEC):
            if name in values and not np.array_equal(values[name], store[name], equal_nan=True):
                problems.append(f"{name} differs from the input store's")
        return problems

    @functools.cached_property
    def _last_ids(self) -> dict[int, int]:
        """Chunk -> its last source_id, of the chunks this process checked."""
        return {}

    @functools.cached_property
    def _store_reader(self) -> ChunkReader:
        from xpbatch.store.reader import ChunkReader

        assert self.store is not None
        names = [schema.SOURCE_ID, schema.INPUT_FLAGS]
        if self.layout.with_positions:
            names += [schema.RA, schema.DEC]
        return ChunkReader(self.store, names)

    def _relative(self, file: Place) -> str:
        return zarr_arrays.relative(file, self.path)

    def _recorded_checksums(self, row: np.ndarray) -> dict[str, int] | None:
        """Variable -> crc32c its writer recorded for a chunk (its ``row`` of the checksums);
        None if not recorded."""
        checksums = self._arrays.checksums
        if np.any(row == CHECKSUM_MISSING):  # not taken: the chunk's files are decoded instead
            return None
        names = cast(list[str], checksums.attrs[schema.ATTR_CHUNK_FILE_VARIABLES])
        return dict(zip(names, map(int, row), strict=True))


REDERIVE = (
    "refused whatever its values (re-derive the chunk with `xpbatch encode-catalog ... "
    "--resume`, or restore the file)"
)


@dataclasses.dataclass(frozen=True)
class _Opened:
    """The arrays a :class:`ChunkVerifier` reads, opened once."""

    records: zarr.Array
    checksums: zarr.Array
    variables: dict[str, zarr.Array]


def verify_catalog(
    path: PathLike | Location,
    store: PathLike | Location | None = None,
    *,
    executor: Executor = SERIAL,
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
        The catalogue: a local path or an ``s3://`` URL (or a Location with its options).
    store
        The input XP store it was made from (optional), likewise.
    executor
        Where the per-chunk checks run; by default serially here. ``encode-catalog`` passes the
        executor that encoded the chunks (Dask workers, when it had a cluster).
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
    path = zarr_arrays.where(path)
    attrs = read_attrs(path)
    layout = CatalogLayout.from_attrs(attrs[schema.CATALOG_ATTR_LAYOUT])
    problems = _layout_problems(path, layout)
    store_path = None
    if store is not None:
        store_path = zarr_arrays.where(store)
        problems.extend(_store_problems(attrs, layout, store_path))
    recorded = len(completed_chunks(path))
    if not problems:
        verifier = ChunkVerifier(path, layout, store_path, decode=decode)
        for found in executor.map(verifier, range(layout.n_chunks), name="xpbatch-verify"):
            problems.extend(found)
    return VerifyReport(str(path), layout.n_rows, layout.n_chunks, recorded, tuple(problems))


def _layout_problems(path: Place, layout: CatalogLayout) -> list[str]:
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


def _store_problems(attrs: Mapping[str, Any], layout: CatalogLayout, store: Place) -> list[str]:
    from xpbatch.store.reader import open_xp_store, store_id

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
