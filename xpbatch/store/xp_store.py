"""Writing an XP store: the Zarr v3 group of DR3 XP coefficients that every later stage reads.

Layout (all names from :mod:`xpbatch.schema`), chunked along ``source`` only:

============================  ===================  =========  ===============================
variable                      dims                 dtype      note
============================  ===================  =========  ===============================
``source_id`` (coordinate)    (source,)            int64      ascending, unique
``coeff`` (coordinate)        (coeff,)             string     ``bp_0 … bp_54, rp_0 … rp_54``
``coefficients``              (source, coeff)      float32    e-/s, NaN where a band is missing
``coefficient_errors``        (source, coeff)      float32    e-/s
``phot_g_mean_flux``          (source,)            float64    e-/s
``input_flags``               (source,)            uint8      :class:`~xpbatch.schema.InputFlag`
``ra``, ``dec`` (optional)    (source,)            float64    deg, ICRS, epoch J2016.0 (gaia_source)
DR3 scalars (optional)        (source,)            see schema ``bp_chi_squared`` ...
``*_coefficient_correlations``  (source, correlation)  float32  only when asked for
============================  ===================  =========  ===============================

A store is written template first (:meth:`XPStoreWriter.create` writes all metadata), then chunk
by chunk (:meth:`XPStoreWriter.write_rows`, one task per chunk-aligned region), then
:meth:`XPStoreWriter.finalize` checks that every row was written with ascending unique
``source_id`` and only then marks the store ``complete``. Readers
(:func:`~xpbatch.store.reader.open_xp_store`) refuse stores that are not complete; the encode
tasks read their chunk's rows with :class:`~xpbatch.store.reader.ChunkReader`.

The variables themselves are defined in :mod:`xpbatch.store.layout`, the checks (schema, order,
chunk files) are :mod:`xpbatch.store.checks`, and the Zarr plumbing the store shares with the
catalogue is :mod:`xpbatch.storage.zarr_arrays`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from xpbatch import __version__, config, schema
from xpbatch.errors import InputShapeError, OutputExistsError, StoreError
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import STORE
from xpbatch.store import checks as store_checks
from xpbatch.store.input_recipe import compute_input_flags
from xpbatch.store.layout import (
    INT_MISSING as INT_MISSING,  # re-exported: the ingest readers and mock fill with it
)
from xpbatch.store.layout import (
    MAX_CHUNK_ROWS,
    check_scalar_names,
    variable_specs,
)
from xpbatch.store.layout import (
    n_correlations as n_correlations,  # re-exported: the ingest readers size arrays with it
)

logger = logging.getLogger(__name__)

# 65536 rows (29 MB per float32 variable): fastest of 16k/64k/128k on mock rows (see config.py).
DEFAULT_CHUNK_ROWS = config.DEFAULT_CHUNK_ROWS
"""Rows per chunk of every variable."""


def check_overwritable(path: zarr_arrays.Place, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite`` is set and it is a Zarr store."""
    if not path.exists():
        return
    if not overwrite:
        raise OutputExistsError(
            f"{path} already exists; pass overwrite=True (--overwrite) to replace it, "
            "or choose another output path"
        )
    if not (path / "zarr.json").is_file():
        # Never rm -rf something that is not ours, whatever the flag says.
        raise OutputExistsError(
            f"{path} exists but is not a Zarr store (no zarr.json); refusing to overwrite it"
        )


def _remove_existing(path: zarr_arrays.Place, overwrite: bool) -> None:
    """Refuse an existing output, or remove it when ``overwrite`` and it is a Zarr store."""
    check_overwritable(path, overwrite)
    if path.exists():
        zarr_arrays.remove_tree(path)


class XPStoreWriter:
    """Streaming writer of an XP store: template first, then chunk-aligned regions, then finalize.

    Picklable, so one writer can be shipped to Dask tasks that each write their own chunks;
    each task opens the Zarr group itself.

    Examples
    --------
    >>> w = XPStoreWriter.create("s.zarr", n_rows=3, chunk_rows=2)  # doctest: +SKIP
    >>> w.write_rows(0, source_id=ids[:2], coefficients=c[:2], ...)  # doctest: +SKIP
    >>> w.write_rows(2, source_id=ids[2:], coefficients=c[2:], ...)  # doctest: +SKIP
    >>> w.finalize()  # doctest: +SKIP
    """

    def __init__(
        self,
        path: PathLike | Location,
        *,
        n_rows: int,
        chunk_rows: int,
        scalars: Collection[str] = (),
        with_correlations: bool = False,
        with_positions: bool = False,
    ) -> None:
        self.path = zarr_arrays.where(path)
        self.n_rows = int(n_rows)
        self.chunk_rows = int(chunk_rows)
        self.scalars = check_scalar_names(scalars)
        self.with_correlations = bool(with_correlations)
        self.with_positions = bool(with_positions)
        self._specs = variable_specs(self.scalars, self.with_correlations, self.with_positions)
        self._group: zarr.Group | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_group"] = None  # each process opens the store itself
        return state

    # --- creation -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: PathLike | Location,
        n_rows: int,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        attrs: Mapping[str, Any] | None = None,
        scalars: Collection[str] = (),
        with_correlations: bool = False,
        with_positions: bool = False,
        overwrite: bool = False,
    ) -> XPStoreWriter:
        """Create the whole store's metadata (every array, NaN-filled) and return its writer.

        Parameters
        ----------
        path
            Directory of the new Zarr v3 store.
        n_rows
            Number of sources the store will hold.
        chunk_rows
            Rows per chunk; every :meth:`write_rows` call covers whole chunks. A store of fewer
            rows gets one chunk of exactly its size (Zarr encodes a chunk's full shape, so a
            65536-row chunk holding 24k rows costs 3x as much to write).
        attrs
            Extra group attributes (e.g. ``data_release``, ``input_files``).
        scalars
            DR3 scalar columns to carry (names in :data:`xpbatch.schema.DR3_SCALARS`).
        with_correlations
            Also create the packed ``bp_/rp_coefficient_correlations`` arrays.
        with_positions
            Also create ``ra`` and ``dec`` (float64 degrees, ICRS, epoch J2016.0).
        overwrite
            Replace an existing store at ``path``.
        """
        if n_rows < 0:
            raise InputShapeError(f"n_rows must be >= 0, got {n_rows}")
        if not 1 <= chunk_rows <= MAX_CHUNK_ROWS:
            raise StoreError(f"chunk_rows must be in 1..{MAX_CHUNK_ROWS}, got {chunk_rows}")
        writer = cls(
            path,
            n_rows=n_rows,
            chunk_rows=min(chunk_rows, max(n_rows, 1)),
            scalars=scalars,
            with_correlations=with_correlations,
            with_positions=with_positions,
        )
        _remove_existing(writer.path, overwrite)
        group = zarr.open_group(zarr_arrays.zarr_target(writer.path), mode="w-", zarr_format=3)
        group.attrs.update(writer._initial_attrs(attrs))
        zarr_arrays.create_row_arrays(
            group,
            writer._specs,
            n_rows=n_rows,
            chunk_rows=writer.chunk_rows,  # never longer than the store
            compressors=zarr_arrays.crc32c_only(),
            coordinates=[schema.SOURCE_ID],
        )
        zarr_arrays.write_axis(
            group,
            schema.COEFF,
            np.array(schema.coeff_labels()),
            "coefficient label: band and order",
        )
        zarr_arrays.create_chunk_table(
            group,
            schema.CHUNK_FILES,
            n_chunks=len(writer.chunk_slices()),
            variables=[spec.name for spec in writer._specs],
            description="bytes of each variable's chunk file, recorded when written",
        )
        zarr_arrays.create_chunk_table(
            group,
            schema.CHECKSUMS_ARRAY,
            n_chunks=len(writer.chunk_slices()),
            variables=[spec.name for spec in writer._specs],
            description="the crc32c of each variable's chunk file, recorded when written",
        )
        writer._group = group
        logger.info(
            "created store %s: %d rows in chunks of %d", writer.path, n_rows, writer.chunk_rows
        )
        return writer

    def _initial_attrs(self, attrs: Mapping[str, Any] | None) -> dict[str, Any]:
        base: dict[str, Any] = {
            schema.STORE_ATTR_SCHEMA_VERSION: schema.STORE_SCHEMA_VERSION,
            schema.STORE_ATTR_DATA_RELEASE: "Gaia DR3",
            schema.STORE_ATTR_INPUT_FILES: [],
            schema.STORE_ATTR_XPBATCH_VERSION: __version__,
            schema.STORE_ATTR_CREATED: zarr_arrays.utc_now(),
            schema.STORE_ATTR_UUID: str(uuid.uuid4()),
            schema.STORE_ATTR_CHUNK_ROWS: self.chunk_rows,
            schema.STORE_ATTR_SCALARS: self.scalars,
            schema.STORE_ATTR_WITH_CORRELATIONS: self.with_correlations,
            schema.STORE_ATTR_WITH_POSITIONS: self.with_positions,
            schema.STORE_ATTR_ROW_COUNT: self.n_rows,
            schema.STORE_ATTR_COMPLETE: False,
        }
        base.update(attrs or {})
        return base

    # --- writing --------------------------------------------------------------------------
    def chunk_slices(self) -> list[slice]:
        """The row range of every chunk, in order: the regions :meth:`write_rows` accepts."""
        return [
            slice(start, min(start + self.chunk_rows, self.n_rows))
            for start in range(0, self.n_rows, self.chunk_rows)
        ]

    def _open(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(zarr_arrays.zarr_target(self.path), mode="r+")
        return self._group

    def _check_region(self, start: int, n: int) -> None:
        """A region must start on a chunk boundary and end on one (or at the end of the store)."""
        stop = start + n
        if start < 0 or n < 1 or stop > self.n_rows:
            raise InputShapeError(
                f"rows {start}..{stop} are outside the store's {self.n_rows} rows of {self.path}"
            )
        if start % self.chunk_rows or (n % self.chunk_rows and stop != self.n_rows):
            raise InputShapeError(
                f"write_rows({start}, n={n}) is not chunk aligned (chunk_rows={self.chunk_rows}); "
                "each write must cover whole chunks so parallel writers never share one"
            )

    def write_rows(
        self,
        start: int,
        *,
        source_id: np.ndarray,
        coefficients: np.ndarray,
        coefficient_errors: np.ndarray,
        phot_g_mean_flux: np.ndarray,
        input_flags: np.ndarray | None = None,
        scalars: Mapping[str, np.ndarray] | None = None,
        correlations: Mapping[str, np.ndarray] | None = None,
        positions: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write rows ``[start, start + len(source_id))``, a chunk-aligned region.

        Parameters
        ----------
        start
            First row; a multiple of ``chunk_rows``.
        source_id
            (n,) int64, strictly ascending, positive.
        coefficients, coefficient_errors
            (n, 110) BP then RP, e-/s; NaN where a band is missing.
        phot_g_mean_flux
            (n,) e-/s; NaN where unknown.
        input_flags
            (n,) uint8 :class:`InputFlag` bits; computed with :func:`compute_input_flags` if None.
        scalars
            The DR3 scalar columns this store was created with, name -> (n,) array.
        correlations
            Band ('bp', 'rp') -> (n, 1485) packed correlations; only for stores created
            ``with_correlations``.
        positions
            ``{"ra": (n,), "dec": (n,)}`` in degrees; only for stores created ``with_positions``.
        """
        sid = np.asarray(source_id)
        n = sid.shape[0] if sid.ndim == 1 else -1
        if n < 0 or not np.issubdtype(sid.dtype, np.integer):
            raise InputShapeError(
                f"source_id must be a 1-D integer array, got {sid.dtype} {sid.shape}"
            )
        self._check_region(start, n)
        if n and (sid[0] <= 0 or np.any(np.diff(sid) <= 0)):
            raise StoreError(
                f"source_id of rows {start}..{start + n} must be positive and strictly ascending "
                "(sort by source_id and remove duplicates before writing)"
            )
        if input_flags is None:
            input_flags = compute_input_flags(coefficients, coefficient_errors, phot_g_mean_flux)
        values: dict[str, Any] = {
            schema.COEFFICIENTS: coefficients,
            schema.COEFFICIENT_ERRORS: coefficient_errors,
            schema.PHOT_G_MEAN_FLUX: phot_g_mean_flux,
            schema.INPUT_FLAGS: input_flags,
            **self._named_extras(scalars, correlations),
            **self._positions(positions),
            schema.SOURCE_ID: sid,
        }
        group = self._open()
        writes = []
        for spec in self._specs:
            expected = (n, spec.width) if spec.width else (n,)
            array = np.asarray(values[spec.name])
            if array.shape != expected:
                raise InputShapeError(
                    f"{spec.name} for rows {start}..{start + n} must have shape {expected}, "
                    f"got {array.shape}"
                )
            writes.append(
                (
                    zarr_arrays.get_array(group, spec.name, STORE),
                    array.astype(spec.dtype, copy=False),
                )
            )
        # source_id goes last: finalize treats a chunk whose source_id is written as finished.
        sizes: dict[int, list[int]] = {}
        checksums = zarr_arrays.write_chunks(
            self.path, writes, slice(start, start + n), sizes=sizes
        )
        self._record_chunk_files(group, checksums, sizes)

    def _record_chunk_files(
        self,
        group: zarr.Group,
        checksums: Mapping[int, list[int]],
        file_sizes: Mapping[int, list[int]],
    ) -> None:
        """Record the size and the crc32c of each chunk file just written (after all are)."""
        sizes = group.get(schema.CHUNK_FILES)
        crcs = group.get(schema.CHECKSUMS_ARRAY)
        for index, crc in checksums.items():
            if isinstance(sizes, zarr.Array):  # absent in stores created before chunk records
                sizes.with_config({"write_empty_chunks": True})[index] = np.array(
                    file_sizes[index], np.int64
                )
            if isinstance(crcs, zarr.Array):
                crcs.with_config({"write_empty_chunks": True})[index] = np.array(crc, np.int64)

    def _named_extras(
        self,
        scalars: Mapping[str, np.ndarray] | None,
        correlations: Mapping[str, np.ndarray] | None,
    ) -> dict[str, Any]:
        """Scalars and correlations keyed by store variable name, checked against the layout."""
        scalars = dict(scalars or {})
        if set(scalars) != set(self.scalars):
            raise InputShapeError(
                f"this store was created with scalars {sorted(self.scalars)}, but write_rows got "
                f"{sorted(scalars)}; give exactly the columns the store was created with"
            )
        extras: dict[str, Any] = dict(scalars)
        if self.with_correlations != (correlations is not None):
            raise InputShapeError(
                "correlations must be given exactly when the store was created with_correlations "
                f"(with_correlations={self.with_correlations})"
            )
        for band in schema.BANDS if correlations is not None else ():
            if band not in correlations:  # type: ignore[operator]
                raise InputShapeError(f"correlations lacks band {band!r}")
            extras[schema.correlations_name(band)] = correlations[band]  # type: ignore[index]
        return extras

    def _positions(self, positions: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        if self.with_positions != (positions is not None):
            raise InputShapeError(
                "positions (ra, dec) must be given exactly when the store was created "
                f"with_positions (with_positions={self.with_positions})"
            )
        if positions is None:
            return {}
        missing = {schema.RA, schema.DEC} - set(positions)
        if missing:
            raise InputShapeError(f"positions lacks {sorted(missing)}")
        return {name: positions[name] for name in (schema.RA, schema.DEC)}

    # --- finishing ------------------------------------------------------------------------
    def finalize(self, extra_attrs: Mapping[str, Any] | None = None) -> zarr_arrays.Place:
        """Check every chunk was written with ascending unique ids, then mark the store complete.

        Reads ``source_id`` chunk by chunk (8 bytes a row), records each chunk's id range in the
        attributes (so readers check order without reading the column), computes
        :func:`~xpbatch.store.reader.store_id`, sets ``complete = True`` and consolidates the
        metadata so that ``xarray.open_zarr(path)`` opens it with one read.
        """
        group = self._open()
        source_id = zarr_arrays.get_array(group, schema.SOURCE_ID, STORE)
        ranges = store_checks.chunk_ranges(source_id, self.chunk_rows, self.path)
        problems = store_checks.chunk_file_problems(self.path)
        if problems:
            raise StoreError(
                f"{self.path} cannot be finalized: "
                f"{zarr_arrays.describe_chunk_problems(problems)}. The writer of those chunks did "
                "not finish; rerun the command that builds this store."
            )
        attrs: dict[str, Any] = group.attrs.asdict()
        fingerprint = json.dumps([attrs[schema.STORE_ATTR_UUID], self.n_rows, ranges])
        group.attrs.update(
            {
                **(extra_attrs or {}),
                schema.STORE_ATTR_ROW_COUNT: self.n_rows,
                schema.STORE_ATTR_CHUNK_RANGES: ranges,
                schema.STORE_ATTR_STORE_ID: hashlib.sha256(fingerprint.encode()).hexdigest()[:32],
                schema.STORE_ATTR_FINALIZED: zarr_arrays.utc_now(),
                schema.STORE_ATTR_COMPLETE: True,
            }
        )
        zarr_arrays.consolidate(self.path)
        logger.info("finalized store %s (%d rows)", self.path, self.n_rows)
        return self.path


# --- in-memory arrays -> store ----------------------------------------------------------------
def source_id_order(source_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stable order that sorts ``source_id``, and the sorted positions holding a repeat.

    ``repeats`` lists each ``i`` where ``source_id[order][i]`` equals the id before it.
    """
    order = np.argsort(source_id, kind="stable")
    return order, np.flatnonzero(np.diff(source_id[order]) == 0) + 1


def write_xp_store(
    path: PathLike,
    *,
    source_id: np.ndarray,
    coefficients: np.ndarray,
    coefficient_errors: np.ndarray,
    phot_g_mean_flux: np.ndarray,
    input_flags: np.ndarray | None = None,
    scalars: Mapping[str, np.ndarray] | None = None,
    correlations: Mapping[str, np.ndarray] | None = None,
    positions: Mapping[str, np.ndarray] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> zarr_arrays.Place:
    """Write in-memory arrays (e.g. your own cross-match) as an XP store.

    Rows are sorted by ``source_id``; duplicate ids are an error. ``input_flags`` are computed
    when not given.

    Parameters
    ----------
    path
        Output directory (Zarr v3).
    source_id
        (n,) int64 Gaia source identifiers, unique.
    coefficients, coefficient_errors
        (n, 110) float, BP coefficients 0..54 then RP 0..54, in e-/s; NaN for a missing band.
    phot_g_mean_flux
        (n,) float, e-/s.
    input_flags, scalars, correlations, positions
        See :meth:`XPStoreWriter.write_rows`.
    chunk_rows, attrs, overwrite
        See :meth:`XPStoreWriter.create`.

    Returns
    -------
    pathlib.Path or Location
        The store's path (its Location for an ``s3://`` URL).

    Examples
    --------
    >>> import numpy as np, xpbatch
    >>> n = 3
    >>> xpbatch.write_xp_store(
    ...     "mine.zarr", source_id=np.array([3, 1, 2]),
    ...     coefficients=np.ones((n, 110)), coefficient_errors=np.ones((n, 110)),
    ...     phot_g_mean_flux=np.full(n, 1e4))  # doctest: +SKIP
    PosixPath('mine.zarr')
    """
    sid = np.asarray(source_id)
    if sid.ndim != 1 or not np.issubdtype(sid.dtype, np.integer):
        raise InputShapeError(f"source_id must be a 1-D integer array, got {sid.dtype} {sid.shape}")
    order, repeats = source_id_order(sid)
    sorted_ids = sid[order]
    duplicated = sorted_ids[repeats]
    if duplicated.size:
        raise StoreError(
            f"source_id must be unique, but {np.unique(duplicated).size} id(s) repeat, e.g. "
            f"{np.unique(duplicated)[:5].tolist()}; remove the duplicate rows first"
        )
    if input_flags is None:
        input_flags = compute_input_flags(coefficients, coefficient_errors, phot_g_mean_flux)
    columns: dict[str, Any] = {
        schema.COEFFICIENTS: coefficients,
        schema.COEFFICIENT_ERRORS: coefficient_errors,
        schema.PHOT_G_MEAN_FLUX: phot_g_mean_flux,
        schema.INPUT_FLAGS: input_flags,
    }
    for name, value in columns.items():
        if np.shape(value)[:1] != sid.shape:
            raise InputShapeError(
                f"{name} must have {len(sid)} rows like source_id, got {np.shape(value)}"
            )
    writer = XPStoreWriter.create(
        path,
        len(sid),
        chunk_rows=chunk_rows,
        attrs=attrs,
        scalars=list(scalars or {}),
        with_correlations=correlations is not None,
        with_positions=positions is not None,
        overwrite=overwrite,
    )
    for region in writer.chunk_slices():
        rows = order[region]
        writer.write_rows(
            region.start,
            source_id=sorted_ids[region],
            **{name: np.asarray(value)[rows] for name, value in columns.items()},
            scalars={k: np.asarray(v)[rows] for k, v in (scalars or {}).items()},
            correlations=(
                None
                if correlations is None
                else {b: np.asarray(v)[rows] for b, v in correlations.items()}
            ),
            positions=(
                None
                if positions is None
                else {k: np.asarray(v)[rows] for k, v in positions.items()}
            ),
        )
    return writer.finalize()
