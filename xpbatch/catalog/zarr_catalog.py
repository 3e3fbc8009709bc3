"""The output catalogue: template, region writes, completion records, open.

Layout of ``CATALOG.zarr`` (a Zarr v3 group; names from :mod:`xpbatch.schema`)::

    zarr.json                 group attributes: run fingerprint, versions, times, ``complete``
    source_id, latent, coeff  coordinates
    latent_mean, latent_std   (source, latent) float32
    scatter                   (source, coeff) float32, e-/s
    rmse, flags               (source,) float32 / uint16
    anomaly_score             (source,) float32, nats
    ra, dec                   (source,) float64 coordinates in deg (ICRS, J2016.0), if the store has
    reconstruction            (source, coeff) float32, e-/s, only ``with_reconstruction``
    _xpbatch/chunk_records    (chunk, field) int64: one completion record per chunk

How a run stays correct when it is killed at any moment (see ../shared/RELIABILITY.md):

1. :func:`create_catalog` writes every array's metadata first (NaN fill values, a crc32c
   checksum in every codec chain), and the ``_xpbatch`` group last: a template without it is
   unfinished and is rebuilt on resume.
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
   :func:`mark_complete` sets ``complete = true``; :func:`open_catalog` refuses a catalogue
   without it.

The Zarr plumbing the catalogue shares with the input store (specs, codecs, templates, opening,
region writes, chunk files) is :mod:`xpbatch.storage.zarr_arrays`; every name on disk is in
:mod:`xpbatch.schema`.

The catalogue is written to a POSIX filesystem that every worker sees (local disk, NFS, Lustre,
GPFS): records rely on atomic renames and chunk files are fsynced before their record.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numba
import numpy as np
import zarr
import zarr.codecs

from xpbatch import schema
from xpbatch.errors import (
    CatalogError,
    InputShapeError,
)
from xpbatch.schema import CatalogFlag
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.manifest import (
    CATALOG_KIND,
    COMPLETE,
    FINGERPRINT,
    KIND,
    RunManifest,
    RunRecord,
    ZarrRecord,
)
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import CATALOG, ArraySpec, Place, flag_attrs

if TYPE_CHECKING:
    import xarray as xr

logger = logging.getLogger(__name__)


RECORD_FIELDS = ("rows", "rows_encoded", *(f"flag_{str(f.name).lower()}" for f in CatalogFlag))
"""Columns of a completion record: row count, rows encoded, rows with each CatalogFlag bit."""
RECORD_MISSING = -1
"""Fill value of ``chunk_records``: a record still holding it was never written."""
CHECKSUM_MISSING = -1
"""Fill value of ``chunk_checksums``: no checksum was taken (the chunk is not written yet)."""

MAX_WRITE_ATTEMPTS = 8
"""Times a chunk writer rewrites a chunk that another attempt at it overwrote meanwhile."""

# Blosc lz4 with byte shuffle. Measured on encoder outputs (65k rows, one core): ~3 M rows/s to
# write and ~3.7 M rows/s to read, 5-10x faster than zstd for a similar size, so the codec costs
# a few percent of the forward pass.
_SHUFFLE: Final = "shuffle"


# --- layout ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CatalogLayout:
    """Shape of a catalogue: its rows come in the same chunks as the input store's."""

    n_rows: int
    """Rows of the input store (every one appears in the catalogue)."""
    chunk_rows: int
    """Rows per chunk, equal to the input store's: chunk k of the input is chunk k here."""
    latent_dim: int = 6
    """Size of the model's latent space."""
    n_coeff: int = schema.N_COEFF
    """Coefficients per spectrum."""
    with_reconstruction: bool = False
    """Whether the catalogue holds the decoder's reconstruction."""
    with_positions: bool = False
    """Whether the catalogue carries the store's ``ra`` and ``dec`` (copied, as coordinates)."""

    def __post_init__(self) -> None:
        if self.n_rows < 0 or self.chunk_rows < 1:
            raise InputShapeError(
                f"a catalogue needs n_rows >= 0 and chunk_rows >= 1, got {self.n_rows}, "
                f"{self.chunk_rows}"
            )

    @property
    def n_chunks(self) -> int:
        """Number of chunks along ``source``."""
        return -(-self.n_rows // self.chunk_rows)

    def rows(self, index: int) -> slice:
        """The rows of chunk ``index``."""
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} is outside 0..{self.n_chunks - 1}")
        start = index * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.n_rows))

    def variables(self) -> list[ArraySpec]:
        """Every row variable, ``source_id`` first."""
        return _variable_specs(self)

    def to_attrs(self) -> dict[str, Any]:
        """The layout as JSON-friendly attributes."""
        return dataclasses.asdict(self)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> CatalogLayout:
        """Inverse of :meth:`to_attrs`."""
        return cls(**attrs)


def _variable_specs(layout: CatalogLayout) -> list[ArraySpec]:
    latent, coeff = layout.latent_dim, layout.n_coeff
    rows = (schema.SOURCE,)
    by_latent, by_coeff = (schema.SOURCE, schema.LATENT), (schema.SOURCE, schema.COEFF)
    specs = [
        ArraySpec(
            schema.SOURCE_ID, "int64", rows, -1, "1",
            "Gaia DR3 source identifier; same rows, same order as the input store",
        ),
        ArraySpec(
            schema.LATENT_MEAN, "float32", by_latent, np.nan, "1",
            "posterior mean of the scatter VAE's latent variables; NaN where flags has "
            "not_encoded",
            latent,
        ),
        ArraySpec(
            schema.LATENT_STD, "float32", by_latent, np.nan, "1",
            "posterior standard deviation of the latent variables, exp(log_var / 2); NaN where "
            "flags has not_encoded",
            latent,
        ),
        ArraySpec(
            schema.SCATTER, "float32", by_coeff, np.nan, schema.FLUX_UNITS,
            "intrinsic scatter predicted by the scatter decoder, in the units of "
            "coefficient_errors (compare the two); NaN where flags has not_encoded",
            coeff,
        ),
        ArraySpec(
            schema.RMSE, "float32", rows, np.nan, "1",
            "sqrt(mean over valid coefficients of ((x - xhat) / x_err)^2) in the model's "
            "standardised space: error-weighted reconstruction residual; NaN where not encoded",
        ),
        ArraySpec(
            schema.FLAGS, "uint16", rows, 0, "1",
            "bit mask of xpbatch.schema.CatalogFlag: low byte = the input store's input_flags, "
            "high byte = the model's (not encoded, latent outlier, training/validation member)",
            extra_attrs=flag_attrs(CatalogFlag),
        ),
        ArraySpec(
            schema.ANOMALY_SCORE, "float32", rows, np.nan, "nat",
            "-log density of (latent mean on the active dimensions, ln rmse), standardised, "
            "under the model's training-set density (attribute latent_density); higher is "
            "rarer; NaN where flags has not_encoded",
        ),
    ]  # fmt: skip
    if layout.with_positions:
        units = schema.POSITION_ATTRS[schema.ATTR_UNITS]
        extra = tuple((k, v) for k, v in schema.POSITION_ATTRS.items() if k != schema.ATTR_UNITS)
        specs += [
            ArraySpec(
                name, "float64", rows, np.nan, units,
                f"{text} of the source (gaia_source), ICRS at epoch J2016.0; copied from the "
                "input store (NaN where it had none)",
                extra_attrs=extra,
            )
            for name, text in ((schema.RA, "right ascension"), (schema.DEC, "declination"))
        ]  # fmt: skip
    if layout.with_reconstruction:
        specs.append(
            ArraySpec(
                schema.RECONSTRUCTION, "float32", by_coeff, np.nan, schema.FLUX_UNITS,
                "decoder reconstruction of the coefficients at the posterior mean, in e-/s; NaN "
                "where flags has not_encoded",
                coeff,
            )
        )  # fmt: skip
    return specs


# --- creating, resuming, overwriting ------------------------------------------------------------
def create_catalog(
    path: PathLike | Location,
    layout: CatalogLayout,
    *,
    attrs: Mapping[str, Any],
    coeff_labels: list[str] | None = None,
) -> None:
    """Write the metadata of the whole catalogue (no rows yet) at a path that must not exist.

    Parameters
    ----------
    path
        Directory of the new Zarr v3 group.
    layout
        Rows, chunking and which variables.
    attrs
        Group attributes of the run; must contain the fingerprint attributes
        (:data:`xpbatch.schema.CATALOG_FINGERPRINT_ATTRS`) other than
        the layout and schema version (which are added here).
    coeff_labels
        Labels of the coefficient axis; default ``bp_0 … bp_{n/2-1}, rp_0 …``.
    """
    path = zarr_arrays.where(path)
    # Attributes in the same write as the group: from its first file on, it is recognisably ours.
    group = zarr.open_group(
        zarr_arrays.zarr_target(path),
        mode="w-",
        zarr_format=3,
        attributes={
            **attrs,
            schema.CATALOG_ATTR_SCHEMA_VERSION: schema.CATALOG_SCHEMA_VERSION,
            schema.CATALOG_ATTR_LAYOUT: layout.to_attrs(),
            schema.CATALOG_ATTR_COMPLETE: False,
            schema.CATALOG_ATTR_START_TIME: zarr_arrays.utc_now(),
            schema.CATALOG_ATTR_END_TIME: None,
        },
    )
    coordinates = [schema.SOURCE_ID]
    if layout.with_positions:
        coordinates += [schema.RA, schema.DEC]
    zarr_arrays.create_row_arrays(
        group,
        layout.variables(),
        n_rows=layout.n_rows,
        chunk_rows=layout.chunk_rows,
        compressors=zarr_arrays.blosc_crc32c(_SHUFFLE),
        coordinates=coordinates,
    )
    zarr_arrays.write_axis(
        group, schema.LATENT, np.arange(layout.latent_dim, dtype=np.int16), "latent dimension"
    )
    n_bp = layout.n_coeff // 2
    labels = np.array(coeff_labels or schema.coeff_labels(n_bp, layout.n_coeff - n_bp))
    if labels.shape != (layout.n_coeff,):
        raise InputShapeError(f"need {layout.n_coeff} coefficient labels, got {labels.shape}")
    zarr_arrays.write_axis(group, schema.COEFF, labels, "coefficient label: band and order")
    records = group.create_group(
        schema.BOOKKEEPING_GROUP,
        attributes={
            schema.ATTR_DESCRIPTION: "xpbatch bookkeeping: one completion record per chunk"
        },
    )
    records.create_array(
        _basename(schema.DEVICES_ARRAY),
        shape=(layout.n_chunks,),
        chunks=(1,),
        dtype=str,
        fill_value="",
        compressors=(zarr.codecs.Crc32cCodec(),),
        dimension_names=["chunk"],
        attributes={
            schema.ATTR_DESCRIPTION: "device that encoded each chunk ('' until it is written)"
        },
        config={"write_empty_chunks": True},
    )
    zarr_arrays.create_chunk_table(
        group,
        schema.CHECKSUMS_ARRAY,
        n_chunks=layout.n_chunks,
        variables=[spec.name for spec in layout.variables()],
        description="the crc32c each chunk file carried when its writer wrote it (-1: not taken)",
    )
    # Created last: a catalogue without this array has an unfinished template.
    records.create_array(
        _basename(schema.RECORDS_ARRAY),
        shape=(layout.n_chunks, len(RECORD_FIELDS)),
        chunks=(1, len(RECORD_FIELDS)),
        dtype="int64",
        fill_value=RECORD_MISSING,
        compressors=(zarr.codecs.Crc32cCodec(),),
        dimension_names=["chunk", "field"],
        attributes={
            schema.ATTR_RECORD_FIELDS: list(RECORD_FIELDS),
            schema.ATTR_RECORD_MISSING: RECORD_MISSING,
        },
        config={"write_empty_chunks": True},
    )
    logger.info("created catalogue %s: %d rows in %d chunks", path, layout.n_rows, layout.n_chunks)


def _basename(name: str) -> str:
    """The last part of an array's path in the group, e.g. ``chunk_records``."""
    return name.rsplit("/", 1)[-1]


class CatalogRecord(RunRecord):
    """A catalogue's run manifest is the catalogue itself: its group attributes hold the kind
    (its schema version), the fingerprint and ``complete``; ``chunk_records`` what is done."""

    def __init__(self, path: Place) -> None:
        self.where = path / "zarr.json"
        self.path = path

    def read(self) -> dict[str, Any] | None:
        zarr_record = ZarrRecord(self.path)
        found, attrs = zarr_record.read(), zarr_record.attrs() or {}
        if found is None or found[KIND] != CATALOG_KIND:
            return found
        fingerprint = {k: attrs.get(k) for k in _fingerprint_keys(attrs)}
        return {**found, FINGERPRINT: fingerprint}

    def write(self, fields: Mapping[str, Any]) -> None:
        """Set ``complete`` (and the end time) in the attributes; the template and the chunk
        records hold the rest."""
        group = zarr_arrays.open_group(self.path, CATALOG, mode="r+")
        if fields.get(COMPLETE):
            end = fields.get("finished") or zarr_arrays.utc_now()
            complete = {schema.CATALOG_ATTR_COMPLETE: True, schema.CATALOG_ATTR_END_TIME: end}
            group.attrs.update(complete)


def _fingerprint_keys(attrs: Mapping[str, Any]) -> list[str]:
    """The attributes a resumed catalogue must match (model, input store, layout, options)."""
    keys = [k for k in schema.CATALOG_FINGERPRINT_ATTRS if k in attrs]
    return [*keys, schema.CATALOG_ATTR_SCHEMA_VERSION, schema.CATALOG_ATTR_LAYOUT]


def catalog_manifest(
    path: PathLike | Location,
    layout: CatalogLayout | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> RunManifest:
    """The run manifest of the catalogue at ``path``; with ``layout`` and ``attrs``, the
    fingerprint a run with them must match to resume it."""
    fingerprint = None
    if layout is not None and attrs is not None:
        fingerprint = {
            **{k: attrs[k] for k in schema.CATALOG_FINGERPRINT_ATTRS if k in attrs},
            schema.CATALOG_ATTR_SCHEMA_VERSION: schema.CATALOG_SCHEMA_VERSION,
            schema.CATALOG_ATTR_LAYOUT: layout.to_attrs(),
        }
    path = zarr_arrays.where(path)
    return RunManifest(path, kind=CATALOG_KIND, record=CatalogRecord(path), fingerprint=fingerprint)


def prepare_output(
    path: PathLike | Location,
    layout: CatalogLayout,
    *,
    attrs: Mapping[str, Any],
    resume: bool,
    overwrite: bool,
) -> set[int]:
    """Create the catalogue or reopen it for ``--resume``; return the chunks already done.

    The one output rule (:mod:`xpbatch.storage.manifest`): without ``resume`` or ``overwrite``
    an existing path is never touched (:class:`~xpbatch.errors.OutputExistsError`).
    ``overwrite`` replaces an existing catalogue (never a directory that is not one, nor another
    command's output). ``resume`` continues a catalogue whose fingerprint (model hash, input
    store id, layout, options) equals this run's, or refuses with
    :class:`~xpbatch.errors.ResumeRefusedError`.
    """
    path = zarr_arrays.where(path)
    exists = path.exists()
    run = catalog_manifest(path, layout, attrs)
    if exists and _unfinished_template(path):
        # The records array is created last: without it the template was never finished, and
        # nothing was recorded yet (whatever its fingerprint).
        run.fingerprint = None
    elif exists and resume:
        _refuse_another_format(path)
    run.claim(
        resume=resume,
        overwrite=overwrite,
        exists=exists,
        found=_describe_existing(path) if exists else "",
        remove=lambda: zarr_arrays.remove_tree(path),
    )
    if run.resumed:
        if _unfinished_template(path):
            logger.warning("%s has an unfinished template (killed at creation); rebuilding", path)
            zarr_arrays.remove_tree(path)
        else:
            if not run.complete:  # a complete catalogue is left as it is
                remove_interrupted_writes(path)
                group = zarr_arrays.open_group(path, CATALOG, mode="r+")
                found: dict[str, Any] = group.attrs.asdict()
                times = [*found.get(schema.CATALOG_ATTR_RESUMED, []), zarr_arrays.utc_now()]
                group.attrs.update({schema.CATALOG_ATTR_RESUMED: times})
            done = completed_chunks(path)
            return done - set(chunk_file_problems(path, sorted(done)))  # re-derive those
    create_catalog(path, layout, attrs=attrs)
    return set()


def _refuse_another_format(path: Place) -> None:
    """Before the fingerprint is compared: a catalogue of another format version is named as
    such (re-encode it), not as another run; anything else is left to the claim to describe."""
    try:
        found: dict[str, Any] = zarr_arrays.open_group(path, CATALOG).attrs.asdict()
    except (CatalogError, FileNotFoundError):
        return
    if schema.CATALOG_ATTR_SCHEMA_VERSION in found:
        check_format_version(found, path)


def _unfinished_template(path: Place) -> bool:
    """An empty directory, or a catalogue killed while its template was created."""
    if _is_empty_dir(path):
        return True
    try:
        group = zarr_arrays.open_group(path, CATALOG)
    except CatalogError:
        return False
    return not isinstance(group.get(schema.RECORDS_ARRAY), zarr.Array)


def _is_empty_dir(path: Place) -> bool:
    """An empty local directory (object storage has none: an empty prefix does not exist)."""
    return isinstance(path, Path) and path.is_dir() and not any(path.iterdir())


def _describe_existing(path: Place) -> str:
    if (CatalogRecord(path).read() or {}).get(KIND) != CATALOG_KIND:
        return "an empty directory" if _is_empty_dir(path) else "files of another kind"
    attrs: dict[str, Any] = zarr_arrays.open_group(path, CATALOG).attrs.asdict()
    if attrs.get(schema.CATALOG_ATTR_COMPLETE) is True:
        return "a complete catalogue"
    try:
        done = len(completed_chunks(path))
        total = CatalogLayout.from_attrs(attrs[schema.CATALOG_ATTR_LAYOUT]).n_chunks
    except (CatalogError, KeyError, TypeError):
        return "an incomplete catalogue"
    return f"an incomplete catalogue, {done} of {total} chunks done"


def remove_interrupted_writes(path: PathLike | Location) -> None:
    """Delete the temporary files of chunk writes that a kill interrupted (never valid data).

    Zarr writes each chunk to ``<key>.<uuid>.partial`` and renames it; a worker killed in
    between leaves the temporary file behind. Call only while this run is the one writer.
    On object storage there are none: a PUT is atomic, an interrupted one leaves nothing.
    """
    place = zarr_arrays.where(path)
    if isinstance(place, Location):
        return
    for partial in place.rglob("*.partial"):
        partial.unlink(missing_ok=True)


# --- writing one chunk --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChunkRecord:
    """What a finished chunk recorded: its rows and how many rows carry each flag."""

    index: int
    rows: int
    rows_encoded: int
    flag_counts: dict[str, int]
    """CatalogFlag name (lower case) -> rows with that bit."""

    @classmethod
    def from_outputs(cls, index: int, outputs: Mapping[str, np.ndarray]) -> ChunkRecord:
        """Count the rows and flags of one chunk's outputs."""
        flags = np.asarray(outputs[schema.FLAGS])
        counts = {
            str(f.name).lower(): int(np.count_nonzero(flags & np.uint16(f))) for f in CatalogFlag
        }
        return cls(index, int(flags.size), int(flags.size) - counts["not_encoded"], counts)

    def to_row(self) -> np.ndarray:
        """The record as one row of ``chunk_records`` (see :data:`RECORD_FIELDS`)."""
        values = [self.rows, self.rows_encoded, *self.flag_counts.values()]
        return np.array(values, np.int64)

    @classmethod
    def from_row(cls, index: int, row: np.ndarray) -> ChunkRecord:
        """Inverse of :meth:`to_row`."""
        names = [str(f.name).lower() for f in CatalogFlag]
        return cls(
            index, int(row[0]), int(row[1]), dict(zip(names, map(int, row[2:]), strict=True))
        )


class CatalogWriter:
    """Writes whole chunks of a catalogue created by :func:`create_catalog`, then their records.

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


def recorded_checksums(path: PathLike | Location) -> tuple[list[str], np.ndarray] | None:
    """The variables and the (chunk, variable) crc32c table of ``_xpbatch/chunk_checksums``;
    None for a catalogue written before xpbatch recorded them."""
    node = zarr_arrays.open_group(zarr_arrays.where(path), CATALOG).get(schema.CHECKSUMS_ARRAY)
    if not isinstance(node, zarr.Array):
        return None
    attrs: dict[str, Any] = node.attrs.asdict()
    names = [str(name) for name in attrs.get(schema.ATTR_CHUNK_FILE_VARIABLES, [])]
    return names, np.asarray(node[:])


def chunk_file_problems(
    path: PathLike | Location, chunks: Iterable[int] | None = None
) -> dict[int, list[str]]:
    """Chunk -> each of its files that is missing or not the file its writer recorded, for the
    chunks with recorded checksums (all, or those of ``chunks``); one small read per file.

    A chunk file copied over another chunk's is a valid file with a valid crc32c: only its
    record tells that it does not belong there.
    """
    path = zarr_arrays.where(path)
    found = recorded_checksums(path)
    if found is None:
        return {}
    names, table = found
    arrays = open_arrays(path, names)
    problems: dict[int, list[str]] = {}
    for index in range(len(table)) if chunks is None else chunks:
        row = table[index]
        if np.any(row == CHECKSUM_MISSING):
            continue  # not written, or by an xpbatch that took no checksums
        for name, recorded in zip(names, map(int, row), strict=True):
            array = arrays[name]
            file = zarr_arrays.chunk_file(path, array, index)
            why = zarr_arrays.record_mismatch(file, array, recorded)
            if why:
                where = f"{name} chunk {index}: file {zarr_arrays.relative(file, path)}"
                problems.setdefault(index, []).append(f"{where} {why}")
    return problems


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


# --- reading records, marking complete ------------------------------------------------------------
def open_arrays(path: PathLike | Location, names: Iterable[str]) -> dict[str, zarr.Array]:
    """Read-only arrays of the Zarr group at ``path``, by name (CatalogError if one is missing)."""
    group = zarr_arrays.open_group(zarr_arrays.where(path), CATALOG)
    return {name: zarr_arrays.get_array(group, name, CATALOG) for name in names}


def read_attrs(path: PathLike | Location) -> dict[str, Any]:
    """The group attributes of a catalogue (a CatalogError when it is not one)."""
    path = zarr_arrays.where(path)
    attrs: dict[str, Any] = zarr_arrays.open_group(path, CATALOG).attrs.asdict()
    check_format_version(attrs, path)
    return attrs


def check_format_version(attrs: Mapping[str, Any], path: PathLike | Location) -> None:
    """Refuse (CatalogError) a catalogue of another format version than this xpbatch writes."""
    problem = schema.format_version_problem(
        attrs.get(schema.CATALOG_ATTR_SCHEMA_VERSION),
        schema.CATALOG_SCHEMA_VERSION,
        what=f"catalogue {path}",
        redo="re-encode it (`xpbatch encode-catalog ... --overwrite`)",
    )
    if problem:
        raise CatalogError(problem)


def read_layout(path: PathLike | Location) -> CatalogLayout:
    """The layout recorded in a catalogue's attributes."""
    return CatalogLayout.from_attrs(read_attrs(path)[schema.CATALOG_ATTR_LAYOUT])


def read_records(path: PathLike | Location) -> list[ChunkRecord]:
    """Every completion record written so far (one read of a small array)."""
    group = zarr_arrays.open_group(zarr_arrays.where(path), CATALOG)
    table = np.asarray(
        zarr_arrays.get_array(group, schema.RECORDS_ARRAY, CATALOG)[:]
    )  # (chunk, field)
    return [
        ChunkRecord.from_row(int(i), table[i])
        for i in np.flatnonzero(table[:, 0] != RECORD_MISSING)
    ]


def chunk_devices(path: PathLike | Location) -> dict[str, int]:
    """Device -> chunks it encoded."""
    node = zarr_arrays.open_arrays(zarr_arrays.where(path), [schema.DEVICES_ARRAY], CATALOG)[
        schema.DEVICES_ARRAY
    ]
    counts = collections.Counter(str(name) for name in np.asarray(node[:]).tolist())
    return {name: n for name, n in sorted(counts.items()) if name}


def completed_chunks(path: PathLike | Location) -> set[int]:
    """Indices of the chunks whose completion record is written."""
    return {record.index for record in read_records(path)}


def mark_complete(path: PathLike | Location, *, end_time: str | None = None) -> None:
    """Set ``complete = true`` and the end time (the run manifest's completion), and
    consolidate the metadata for fast opens."""
    path = zarr_arrays.where(path)
    run = catalog_manifest(path)
    run.mark_complete(**({"finished": end_time} if end_time else {}))
    zarr_arrays.consolidate(path)


def catalog_nbytes(path: PathLike | Location) -> int:
    """Bytes on disk (or in objects) under ``path``."""
    return zarr_arrays.nbytes(zarr_arrays.where(path))


# --- opening ------------------------------------------------------------------------------------
def open_catalog(path: PathLike | Location, *, allow_incomplete: bool = False) -> xr.Dataset:
    """Open a catalogue lazily (Dask-backed) after checking that its run completed.

    Parameters
    ----------
    path
        A catalogue written by ``xpbatch encode-catalog``: a local path or an ``s3://`` URL
        (settings from the AWS environment, or a Location carrying its options).
    allow_incomplete
        Open a catalogue whose run did not finish (with a warning): rows of unfinished
        chunks read as NaN with flags 0.

    Raises
    ------
    CatalogError
        Not a catalogue, incomplete without ``allow_incomplete``, or complete but missing a
        chunk file (deleted since; it would read as fill values).

    Examples
    --------
    >>> ds = open_catalog("dr3_catalog.zarr")  # doctest: +SKIP
    >>> ds.latent_mean.sel(latent=0)  # doctest: +SKIP
    """
    import xarray as xr

    path = zarr_arrays.where(path)
    attrs = read_attrs(path)
    if attrs.get(schema.CATALOG_ATTR_COMPLETE) is not True:
        layout = CatalogLayout.from_attrs(attrs[schema.CATALOG_ATTR_LAYOUT])
        message = (
            f"catalogue {path} is incomplete: {len(completed_chunks(path))} of "
            f"{layout.n_chunks} chunks were recorded and it was not verified. Finish it with "
            "`xpbatch encode-catalog ... --resume` (same store, model and options)"
        )
        if not allow_incomplete:
            raise CatalogError(message + ", or pass allow_incomplete=True to read what is there.")
        warnings.warn(
            message + "; rows of unfinished chunks read as NaN. (Silence this warning by "
            "finishing the run.)",
            UserWarning,
            stacklevel=2,
        )
    else:
        _refuse_missing_chunk_files(
            path, CatalogLayout.from_attrs(attrs[schema.CATALOG_ATTR_LAYOUT])
        )
    consolidated = zarr_arrays.open_group(path, CATALOG).metadata.consolidated_metadata is not None
    target = path.zarr_store(read_only=True) if isinstance(path, Location) else path
    return xr.open_zarr(target, consolidated=consolidated)


def _refuse_missing_chunk_files(path: Path | Location, layout: CatalogLayout) -> None:
    """A complete catalogue with a chunk file deleted since would read fill values: refuse it."""
    group = zarr_arrays.open_group(path, CATALOG)
    missing = [
        f"{where} is missing"
        for spec in layout.variables()
        for _, where, size in zarr_arrays.chunk_file_sizes(
            path, zarr_arrays.get_array(group, spec.name, CATALOG)
        )
        if size < 0
    ]
    if missing:
        raise CatalogError(
            f"catalogue {path} is damaged: {zarr_arrays.describe_chunk_problems(missing)}. Zarr "
            "would read fill values in their place. Encode it again with --overwrite, or restore "
            "the files."
        )
