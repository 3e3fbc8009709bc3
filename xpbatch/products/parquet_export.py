"""``xpbatch export-parquet``: a catalogue as Parquet files, one per Gaia DR3 bulk partition.

Each file holds the sources of one of the DR3 bulk-file partitions (3386 HEALPix level-8
ranges) and is named like the DR3 files: ``XpLatent_<lo>-<hi>.parquet`` holds the sources of
``XpContinuousMeanSpectrum_<lo>-<hi>.csv.gz`` and ``GaiaSource_<lo>-<hi>.csv.gz``, so a join
with other Gaia tables can run file by file. Only partitions with rows get a file.

xpbatch ships no copy of the partition table: the ranges come, in this order, from
``partitions`` (``--partitions``: the ``_MD5SUM.txt`` of the DR3 bulk download, the directory
of bulk files or a ``lo hi`` text file, see
:func:`xpbatch.storage.partitions.read_partition_ranges`),
the catalogue's ``partition_ranges`` attribute, or the ``partition_ranges`` attribute of the
input store (``--store``), which ``xpbatch ingest`` records when it reads DR3 bulk files.

=====================================  =======  =============================================
column                                 type     meaning
=====================================  =======  =============================================
``source_id``                          int64    Gaia DR3 source identifier (rows ascending)
``healpix_8``                          int32    HEALPix level-8 nested index, ``source_id >> 43``
``ra``, ``dec``                        float64  deg, ICRS, epoch J2016.0; only when the
                                                catalogue has positions
``latent_mean_0`` … ``latent_mean_5``  float32  posterior mean of each latent dimension
``latent_std_0`` … ``latent_std_5``    float32  posterior standard deviation
``rmse``                               float32  error-weighted reconstruction RMSE
``anomaly_score``                      float32  -log density of the latent mean and misfit,
                                                nats (higher is rarer)
``flags``                              uint16   :class:`~xpbatch.schema.CatalogFlag` bits
=====================================  =======  =============================================

One flat column per latent dimension rather than a list column: pandas, DuckDB, pyarrow
filters and LSDB/HATS all select, filter and join on plain columns without exploding lists.
Rows that could not be encoded are kept (NaN values, flag ``NOT_ENCODED``), so every catalogue
row is in exactly one file.

Each file is written under a temporary name and renamed when whole, so a file under its final
name is always complete (on object storage, ``-o s3://bucket/prefix``, each file is one PUT:
whole or absent). The run manifest (``_xpbatch_run.json``, see
:mod:`xpbatch.storage.manifest`) ties the directory to its catalogue and partition ranges;
``--resume`` of the same export keeps the whole files and writes the missing ones, and the
manifest says ``complete: true`` only when every row has been written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xpbatch import __version__, schema
from xpbatch.config import ParquetExportConfig
from xpbatch.errors import CatalogError, ConfigError, OutputExistsError
from xpbatch.runtime.executor import Executor, Progress, storage_credentials
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.manifest import RECORD_NAME, RunManifest, real_place, record_inside
from xpbatch.storage.outputs import check_lock, locked_output
from xpbatch.storage.partitions import (
    EXAMPLE_NAME,
    HEALPIX_LEVEL,
    HEALPIX_SHIFT,
    PartitionRanges,
    file_name,
    read_partition_ranges,
)
from xpbatch.storage.paths import TMP_MARK, PathLike, atomic_path

if TYPE_CHECKING:
    import pyarrow as pa
    import zarr

logger = logging.getLogger(__name__)


FILE_PREFIX = "XpLatent"
MANIFEST_NAME = RECORD_NAME
"""The export's run manifest (xpbatch.storage.manifest) in the output directory."""
KIND = "Parquet export"
HEALPIX_COLUMN = "healpix_8"


_NO_PARTITIONS = (
    "export-parquet needs the DR3 partition ranges (the HEALPix level-8 [lo, hi] of the bulk "
    "files) to split {catalog} into files, and found none: the catalogue has no "
    "partition_ranges attribute and no --store was given. Pass one of: --partitions "
    "_MD5SUM.txt (the checksum list of the DR3 bulk download, e.g. cdn.gea.esac.esa.int/Gaia/"
    "gdr3/Spectroscopy/xp_continuous_mean_spectrum/_MD5SUM.txt); --partitions DIR (the "
    "directory of the bulk files, names like {example}); --partitions FILE (a text file of "
    "'lo hi' lines); or --store STORE (the XP store this catalogue was encoded from, when "
    "`xpbatch ingest` made it from DR3 bulk files). In Python: partitions=... or store=..."
)


def resolve_partitions(
    catalog: PathLike | Location,
    catalog_attrs: dict[str, Any],
    *,
    partitions: PartitionRanges | PathLike | None = None,
    store: PathLike | None = None,
) -> PartitionRanges:
    """The DR3 partition ranges to export by: the first of ``partitions``, the catalogue's
    ``partition_ranges`` attribute, the ``partition_ranges`` attribute of ``store``.

    Raises
    ------
    ConfigError
        None of them gives ranges, the ranges are invalid, or ``store`` is not the store the
        catalogue was encoded from.
    """
    if isinstance(partitions, PartitionRanges):
        return partitions
    if partitions is not None:
        return read_partition_ranges(partitions)
    recorded = catalog_attrs.get(schema.STORE_ATTR_PARTITION_RANGES)
    if recorded is not None:
        return PartitionRanges(recorded, origin=f"the partition_ranges attribute of {catalog}")
    if store is not None:
        return _store_partitions(Path(store), catalog_attrs)
    raise ConfigError(_NO_PARTITIONS.format(catalog=catalog, example=EXAMPLE_NAME))


def _store_partitions(store: Path, catalog_attrs: dict[str, Any]) -> PartitionRanges:
    """The ranges a store records, once it is known to be the catalogue's input."""
    from xpbatch.store.reader import open_xp_store, store_id

    ds = open_xp_store(store)
    expected = catalog_attrs.get(schema.CATALOG_ATTR_STORE_ID)
    if store_id(ds) != expected:
        raise ConfigError(
            f"--store {store} has store id {store_id(ds)}, but the catalogue was encoded from "
            f"store {expected}: pass the store that encode-catalog read, or --partitions"
        )
    recorded = ds.attrs.get(schema.STORE_ATTR_PARTITION_RANGES)
    if recorded is None:
        raise ConfigError(
            f"{store} records no partition ranges (its XP files were not named like DR3 bulk "
            f"files, e.g. {EXAMPLE_NAME}); pass --partitions with the _MD5SUM.txt or the "
            "directory of the DR3 bulk files instead"
        )
    return PartitionRanges(recorded, origin=f"the partition_ranges attribute of {store}")


@dataclasses.dataclass(frozen=True)
class ParquetExportSummary:
    """What :func:`export_parquet` did; ``str()`` is what ``xpbatch export-parquet`` prints."""

    output_dir: Path | Location
    partitions: PartitionRanges
    """The ranges the rows were split by (``partitions.origin`` says where they came from)."""
    n_rows: int
    """Rows in all files together (equals the catalogue's rows)."""
    files: dict[str, int]
    """File name -> rows, for every partition with rows."""
    n_reused: int
    """Files found complete from an earlier run and kept (``resume``)."""
    output_bytes: int = 0
    wall_s: float = 0.0

    def __str__(self) -> str:
        reused = f" ({self.n_reused:,} kept from an earlier run)" if self.n_reused else ""
        return "\n".join(
            [
                f"export         {self.output_dir}",
                f"rows           {self.n_rows:,} in {len(self.files):,} files{reused}",
                f"partitions     ranges from {self.partitions.origin}",
                f"wall time      {self.wall_s:.1f} s",
                f"output size    {self.output_bytes / 1e6:,.1f} MB",
                "checks         every catalogue row in exactly one file (row counts); source_id "
                "ascending",
            ]
        )


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where the tasks read the catalogue: its path and latent size (picklable)."""

    path: str | Location
    n_latent: int
    chunk_rows: int
    n_rows: int
    with_positions: bool = False
    """The catalogue has ra/dec (exported as columns)."""


@functools.lru_cache(maxsize=8)
def _group(path: str | Location) -> zarr.Group:
    import zarr

    return zarr.open_group(
        zarr_arrays.zarr_target(zarr_arrays.where(path), read_only=True), mode="r"
    )


def _read(source: _Source, name: str, rows: slice) -> np.ndarray:
    return np.asarray(_group(source.path)[name][rows])  # type: ignore[index]


# --- planning: which rows go to which file --------------------------------------------------
def _block_plan(
    source: _Source, ranges: PartitionRanges, rows: slice
) -> tuple[int, int, np.ndarray, np.ndarray]:
    """One block's first and last source_id and its row count per partition (sparse)."""
    sid = _read(source, schema.SOURCE_ID, rows)
    if sid.size and np.any(np.diff(sid) <= 0):
        raise CatalogError(
            f"source_id is not strictly ascending in rows {rows.start}..{rows.stop} of "
            f"{source.path}; is this an xpbatch catalogue?"
        )
    partitions, counts = np.unique(ranges.index_of(sid), return_counts=True)
    return int(sid[0]), int(sid[-1]), partitions, counts


def _partition_rows(
    plans: Sequence[tuple[int, int, np.ndarray, np.ndarray]], n_partitions: int
) -> np.ndarray:
    """Rows per partition, after checking ids ascend across blocks (rows are sorted)."""
    per_partition = np.zeros(n_partitions, dtype=np.int64)
    previous_last = -1
    for first, last, partitions, counts in plans:
        if first <= previous_last:
            raise CatalogError(
                f"source_id {first} follows {previous_last}: the catalogue's rows are not in "
                "ascending source_id order across chunks"
            )
        previous_last = last
        np.add.at(per_partition, partitions, counts)
    return per_partition


# --- writing one file -----------------------------------------------------------------------
def _arrow_schema(source: _Source, provenance: dict[str, Any]) -> pa.Schema:
    import pyarrow as pa

    def field(name: str, kind: pa.DataType, text: str) -> pa.Field:
        return pa.field(name, kind, nullable=False, metadata={"description": text})

    n = source.n_latent
    fields = [
        field(schema.SOURCE_ID, pa.int64(), "Gaia DR3 source_id"),
        field(HEALPIX_COLUMN, pa.int32(), "HEALPix level-8 nested index, source_id >> 43"),
        *(
            [
                field(schema.RA, pa.float64(), "right ascension, deg (ICRS, epoch J2016.0)"),
                field(schema.DEC, pa.float64(), "declination, deg (ICRS, epoch J2016.0)"),
            ]
            if source.with_positions
            else []
        ),
        *[field(f"latent_mean_{i}", pa.float32(), f"latent mean {i}") for i in range(n)],
        *[field(f"latent_std_{i}", pa.float32(), f"latent std {i}") for i in range(n)],
        field(schema.RMSE, pa.float32(), "error-weighted reconstruction RMSE"),
        field(schema.ANOMALY_SCORE, pa.float32(), "-log density of latent mean and misfit, nats"),
        field(schema.FLAGS, pa.uint16(), "CatalogFlag bits (xpbatch.schema)"),
    ]
    return pa.schema(fields, metadata={"xpbatch": json.dumps(provenance, sort_keys=True)})


def _table(source: _Source, rows: slice, arrow_schema: pa.Schema) -> pa.Table:
    """The Parquet columns of catalogue ``rows``, read from Zarr."""
    import pyarrow as pa

    sid = _read(source, schema.SOURCE_ID, rows)
    mean = _read(source, schema.LATENT_MEAN, rows)  # (rows, latent)
    std = _read(source, schema.LATENT_STD, rows)  # (rows, latent)
    columns = [
        sid,
        (sid >> HEALPIX_SHIFT).astype(np.int32),
        *(
            [_read(source, name, rows).astype(np.float64) for name in (schema.RA, schema.DEC)]
            if source.with_positions
            else []
        ),
        *[mean[:, i].astype(np.float32) for i in range(source.n_latent)],
        *[std[:, i].astype(np.float32) for i in range(source.n_latent)],
        _read(source, schema.RMSE, rows).astype(np.float32),
        _read(source, schema.ANOMALY_SCORE, rows).astype(np.float32),
        _read(source, schema.FLAGS, rows).astype(np.uint16),
    ]
    return pa.Table.from_arrays([pa.array(c) for c in columns], schema=arrow_schema)


def _write_partition(
    source: _Source, arrow_schema: pa.Schema, task: tuple[slice, Path | Location]
) -> tuple[str, int]:
    """Write one partition's rows to its path atomically (temporary file, then rename; on
    object storage one PUT)."""
    import pyarrow.parquet as pq

    rows, path = task
    table = _table(source, rows, arrow_schema)
    if isinstance(path, Location):
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        path.write_bytes(buffer.getvalue())
        return path.name, table.num_rows
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path.name, table.num_rows


def _is_written(task: tuple[slice, Path | Location]) -> bool:
    """Whether an earlier run wrote this task's file whole."""
    rows, path = task
    return path.is_file() and is_whole_parquet(path, rows.stop - rows.start)


def is_whole_parquet(path: Path | Location, n_rows: int) -> bool:
    """A file from an earlier run is kept when its footer has the expected row count (read
    with ranged GETs on object storage)."""
    import pyarrow.parquet as pq

    try:
        if isinstance(path, Location):
            with contextlib.closing(path.open_reader()) as f:
                return bool(pq.read_metadata(f).num_rows == n_rows)
        return bool(pq.read_metadata(path).num_rows == n_rows)
    except (OSError, ValueError):
        return False


# --- the output directory and its manifest --------------------------------------------------
def _fingerprint(value: Any) -> str:
    """Identifies the catalogue an export came from (its attributes record model, input, run),
    or the partition ranges it was split by."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _names(out: Path | Location) -> list[str]:
    """The names directly in the output directory (every object below it on object storage:
    a nested one is never ours)."""
    if isinstance(out, Location):
        return out.list()
    return [p.name for p in out.iterdir()] if out.is_dir() else []


def _claim(
    out: Path | Location, fingerprint: dict[str, str], config: ParquetExportConfig
) -> RunManifest:
    """The export's run manifest, its output claimed under the one output rule.

    The directory is ours when it holds our manifest and our files only (or nothing);
    ``--overwrite`` removes only our files."""
    if out.is_file() if isinstance(out, Location) else out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another -o")
    run = RunManifest(out, kind=KIND, record=record_inside(out), fingerprint=fingerprint)
    names = _names(out)
    patterns = (f"{FILE_PREFIX}_*.parquet", f".*{TMP_MARK}*")
    ours = [out / n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    others = sorted(n for n in names if (out / n) not in ours)
    previous = run.record.read() or {}
    if previous.get("kind"):
        state = "marked complete" if previous.get("complete") else "unfinished"
        found = f"an export of {previous.get('catalog')}, {state}"
    else:
        found = f"no {MANIFEST_NAME}; e.g. {[*others, *(p.name for p in ours)][:1]}"
    run.claim(
        resume=config.resume,
        overwrite=config.overwrite,
        exists=bool(ours or others),
        found=found,
        foreign=any(name != MANIFEST_NAME for name in others),
        remove=functools.partial(_remove_files, [*ours, out / MANIFEST_NAME]),
    )
    if isinstance(out, Location):
        return run  # no directories, no temporary names there
    if run.resumed:
        for tmp in out.glob(f".*{TMP_MARK}*"):  # left by a killed run
            tmp.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return run


def _remove_files(paths: Sequence[Path | Location]) -> None:
    for path in paths:
        if isinstance(path, Location):
            path.remove_tree()
        else:
            path.unlink(missing_ok=True)


def _catalog_source(path: Path | Location) -> tuple[_Source, dict[str, Any]]:
    """Check the catalogue (complete, schema) and describe it for the tasks."""
    from xpbatch.catalog.zarr_catalog import open_catalog

    ds = open_catalog(path)
    where = path if isinstance(path, Location) else str(path)
    sid = _group(where)[schema.SOURCE_ID]
    source = _Source(
        path=where,
        n_latent=int(ds.sizes[schema.LATENT]),
        chunk_rows=int(sid.chunks[0]),  # type: ignore[union-attr]
        n_rows=int(ds.sizes[schema.SOURCE]),
        with_positions=schema.RA in ds.variables and schema.DEC in ds.variables,
    )
    return source, dict(ds.attrs)


@locked_output("output_dir", "export-parquet")
def export_parquet(
    catalog: PathLike | Location,
    output_dir: PathLike | Location,
    *,
    partitions: PartitionRanges | PathLike | None = None,
    store: PathLike | None = None,
    config: ParquetExportConfig | None = None,
    client: Any = None,
) -> ParquetExportSummary:
    """Write a catalogue's latents, rmse, anomaly_score, flags (and ra/dec) as Parquet, one file
    per DR3 partition.

    Streams: each task reads one block of ``source_id`` to plan, then one partition's rows
    (about 65k in DR3) to write, so memory stays flat in the catalogue's size.

    Parameters
    ----------
    catalog
        A complete catalogue written by ``xpbatch encode-catalog``.
    output_dir
        Directory (or ``s3://`` prefix) for the ``XpLatent_<lo>-<hi>.parquet`` files
        (created if needed). With
        ``config.resume``, an earlier export of the same catalogue and partition ranges there
        is continued: the whole files are kept and only the missing ones are written.
    partitions
        The DR3 partition ranges: a :class:`~xpbatch.storage.partitions.PartitionRanges`, or a path
        for :func:`~xpbatch.storage.partitions.read_partition_ranges` (the ``_MD5SUM.txt`` of the
        DR3
        bulk download, the directory of bulk files, or a text file of ``lo hi`` lines). By
        default the catalogue's ``partition_ranges`` attribute, else ``store``'s.
    store
        The XP store the catalogue was encoded from, to take its ``partition_ranges``
        attribute (recorded by ``xpbatch ingest`` from DR3 bulk file names) when neither
        ``partitions`` nor the catalogue gives them. Its store id must match the catalogue's.
    config
        Options (resume, overwrite, threads of the local pool, progress bar); see
        :class:`~xpbatch.config.ParquetExportConfig`.
    client
        A ``distributed.Client`` to run the tasks on; by default a local thread pool.

    Returns
    -------
    ParquetExportSummary
        Output directory, partition ranges used, rows written, files and rows per file;
        ``str()`` gives a readable summary.

    Raises
    ------
    ConfigError
        No partition ranges (the message lists where they can come from), invalid ranges,
        a ``store`` that is not the catalogue's input, or a source in no range.
    OutputExistsError, ResumeRefusedError
        ``output_dir`` holds an export without ``resume``/``overwrite`` or files xpbatch did
        not write, or ``resume`` finds an export of another catalogue or partition ranges.

    Examples
    --------
    >>> result = export_parquet("catalog.zarr", "catalog-parquet",
    ...                         partitions="dr3/_MD5SUM.txt")  # doctest: +SKIP
    >>> import pandas as pd
    >>> df = pd.read_parquet("catalog-parquet")  # doctest: +SKIP
    """
    config = config or ParquetExportConfig()
    started = time.perf_counter()
    catalog_path = zarr_arrays.where(catalog)
    out = real_place(output_dir)
    source, attrs = _catalog_source(catalog_path)
    ranges = resolve_partitions(catalog_path, attrs, partitions=partitions, store=store)
    logger.info("exporting by %r", ranges)
    fingerprint = _fingerprint(attrs)
    run = {
        "catalog_fingerprint": fingerprint,
        "partitions_fingerprint": _fingerprint(ranges.to_list()),
    }
    manifest = _claim(out, run, config)
    manifest.begin(
        catalog=str(zarr_arrays.absolute(catalog_path)),
        partitions_origin=ranges.origin,
        n_rows=source.n_rows,
    )

    blocks = [
        slice(start, min(start + source.chunk_rows, source.n_rows))
        for start in range(0, source.n_rows, source.chunk_rows)
    ]
    executor = Executor.of(client, threads=config.threads)
    plan_block = functools.partial(_block_plan, source, ranges)
    plans = list(executor.map(plan_block, blocks, name="xpbatch-export-plan", ordered=True))
    per_partition = _partition_rows(plans, len(ranges))
    starts = np.concatenate([[0], np.cumsum(per_partition)[:-1]])

    provenance: dict[str, Any] = {
        "catalog": str(zarr_arrays.absolute(catalog_path)),
        "catalog_fingerprint": fingerprint,
        "xpbatch_version": __version__,
        "healpix_level": HEALPIX_LEVEL,
        "partitions_origin": ranges.origin,
        **{k: attrs[k] for k in ("model_name", "model_hash", "input_store_id") if k in attrs},
    }
    arrow_schema = _arrow_schema(source, provenance)
    tasks: list[tuple[slice, Path | Location]] = []
    for p in np.flatnonzero(per_partition):
        lo, hi = (int(v) for v in ranges.ranges[p])
        rows = slice(int(starts[p]), int(starts[p] + per_partition[p]))
        tasks.append((rows, out / file_name(FILE_PREFIX, lo, hi)))
    plan = manifest.plan(tasks, _is_written)
    files = {path.name: rows.stop - rows.start for rows, path in plan.done}
    n_reused = len(files)
    write = functools.partial(_write_partition, source, arrow_schema)
    progress = Progress(
        len(tasks),
        desc="export-parquet",
        unit="files",
        initial=len(tasks) - len(plan.todo),
        enabled=config.progress_bar,
    )
    with storage_credentials(executor, out):
        done = executor.map(
            write, plan.todo, name="xpbatch-export", ordered=True, progress=progress
        )
        files.update(done)
    n_rows = sum(files.values())
    if n_rows != source.n_rows:  # every row in exactly one file, or we say so
        raise CatalogError(f"wrote {n_rows} rows but {catalog_path} has {source.n_rows}")
    check_lock(out)  # never mark complete what another writer may have touched
    manifest.mark_complete(files=dict(sorted(files.items())))
    logger.info(
        "exported %d rows of %s into %d files in %s (%d kept from an earlier run)",
        n_rows, catalog_path, len(files), out, n_reused,
    )  # fmt: skip
    return ParquetExportSummary(
        output_dir=out,
        partitions=ranges,
        n_rows=n_rows,
        files=files,
        n_reused=n_reused,
        output_bytes=(
            zarr_arrays.nbytes(out)
            if isinstance(out, Location)
            else sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        ),
        wall_s=time.perf_counter() - started,
    )
