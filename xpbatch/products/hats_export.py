"""``xpbatch export-hats``: a catalogue as a HATS collection that LSDB opens, searches and joins.

Layout of the output directory (a HATS collection; ``NAME`` is ``--name``, default
``xpbatch_latents``)::

    collection.properties          the collection: primary table, margin, index
    _xpbatch_run.json              the run manifest: which catalogue and options the export
                                   was made from, complete or not
    NAME/                          the catalogue, written by hats-import: hats.properties,
                                   partition_info.csv, point_map.fits, skymap.fits,
                                   dataset/Norder=K/Dir=D/Npix=N.parquet, _metadata, ...
    NAME_source_id/                index on source_id -> partition (Norder, Npix)
    NAME_<W>arcs/                  margin cache (only with --margin-arcsec W)

hats-import (``CollectionArguments`` run with ``pipeline_with_client``) maps, splits and reduces
the rows into adaptive HEALPix partitions (at most ``--pixel-threshold`` rows each) and computes
``_healpix_29`` from ra/dec. Its input "files" are the chunks of the Zarr catalogue, read one at
a time by :class:`ZarrChunkReader`, so no task holds more than one chunk: memory is flat in
catalogue size. hats-import keeps done-markers per task, so ``--resume`` continues an
interrupted export.

The ``source_id`` index is written here, not by hats-import's index pipeline: the catalogue's
rows are already in ascending source_id, so each chunk becomes one sorted index file without a
shuffle (hats-import's index pipeline also refuses Python 3.11 with dask >= 2025.4). Its files
follow hats-import's index layout (``dataset/index/*.parquet`` with source_id, _healpix_29,
Norder, Npix) and hats writes its metadata.

On object storage (``-o s3://bucket/prefix``) hats-import and hats write the collection through
UPath (s3fs) and the index files are single PUTs. hats-import keeps its intermediate files and
done-markers on a local disk (it opens them with ``open``): under
``$TMPDIR/xpbatch-hats/<digest of the URL>``, so ``--resume`` continues on the same machine
(elsewhere hats-import starts over, into the same output). Its tasks take their credentials from
the workers' AWS environment: explicit secrets in the storage options are not sent to them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hats_import.catalog.file_readers import InputReader

from xpbatch import schema
from xpbatch.config import HatsExportConfig, result_options
from xpbatch.errors import CatalogError, ChunkError, XPBatchError
from xpbatch.products.parquet_export import is_whole_parquet
from xpbatch.products.sky_positions import POSITION_FROM_SOURCE_ID, SkySource
from xpbatch.runtime.executor import Executor, LazyClient, started_client
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location, as_location
from xpbatch.storage.manifest import RunManifest, real_place, record_inside
from xpbatch.storage.outputs import check_lock, locked_output
from xpbatch.storage.paths import PathLike, atomic_path

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

logger = logging.getLogger(__name__)

KIND = "HATS export"
CHUNK_MARK = "#chunk="
"""Input "files" of hats-import are ``<catalogue path>#chunk=<k>``: chunk k of the catalogue."""
HEALPIX_29 = "_healpix_29"
INDEX_DIR = ("dataset", "index")


@dataclasses.dataclass(frozen=True)
class HatsExportSummary:
    """What :func:`export_hats` wrote."""

    output_dir: Path | Location
    catalog_dir: Path | Location
    n_rows: int
    n_partitions: int
    n_approximate: int
    """Rows placed at their source_id's level-12 pixel centre (no ra/dec in the catalogue)."""
    margin_dir: Path | Location | None
    index_dir: Path | Location

    def __str__(self) -> str:
        approx = f" ({self.n_approximate:,} at their source_id pixel centre)" * bool(
            self.n_approximate
        )
        margin = f", margin {self.margin_dir.name}" if self.margin_dir else ""
        opener = f"'{self.output_dir}'"
        if isinstance(self.output_dir, Location):  # hats reads a bare s3:// string as public
            opener = f"UPath({opener}, anon=False)"
        return (
            f"wrote {self.n_rows:,} rows{approx} in {self.n_partitions:,} HEALPix partitions to "
            f"{self.output_dir} (catalogue {self.catalog_dir.name}, index {self.index_dir.name}"
            f"{margin}); open it with lsdb.open_catalog({opener})"
        )


def latent_columns(n_latent: int) -> list[str]:
    """Flat column names of the latents: ``latent_mean_0 …``, then ``latent_std_0 …``."""
    return [f"{schema.LATENT_MEAN}_{i}" for i in range(n_latent)] + [
        f"{schema.LATENT_STD}_{i}" for i in range(n_latent)
    ]


class ZarrChunkReader(InputReader):
    """A hats-import ``InputReader`` whose input "files" are chunks of an xpbatch catalogue.

    ``read("<catalogue>#chunk=<k>")`` yields one pandas DataFrame: source_id, ra, dec, the flat
    latent columns, rmse, anomaly_score, flags, position_from_source_id and (``with_scatter``) one
    ``scatter_<coeff>`` column per coefficient.
    """

    def __init__(self, source: SkySource, *, with_scatter: bool = False) -> None:
        self.source = source
        self.with_scatter = with_scatter

    def read(self, input_file: Any, read_columns: list[str] | None = None) -> Any:
        """Yield chunk k of the catalogue as one DataFrame (hats-import's reader protocol)."""
        path, _, index = str(input_file).rpartition(CHUNK_MARK)
        if path != str(self.source.path) or not index.isdigit():
            raise ValueError(f"{input_file} is not a chunk of {self.source.path}")
        frame = chunk_frame(self.source, int(index), with_scatter=self.with_scatter)
        yield frame if read_columns is None else frame[read_columns]


def chunk_frame(source: SkySource, index: int, *, with_scatter: bool = False) -> pd.DataFrame:
    """Chunk ``index`` of the catalogue as the flat columns of the export."""
    import pandas as pd

    names = (schema.LATENT_MEAN, schema.LATENT_STD, schema.RMSE, schema.ANOMALY_SCORE, schema.FLAGS)
    values = source.read(index, names + ((schema.SCATTER,) if with_scatter else ()))
    n_latent = source.layout.latent_dim
    columns: dict[str, np.ndarray] = {
        schema.SOURCE_ID: values[schema.SOURCE_ID].astype(np.int64),
        schema.RA: values[schema.RA],
        schema.DEC: values[schema.DEC],
    }
    for name in (schema.LATENT_MEAN, schema.LATENT_STD):
        for i in range(n_latent):
            columns[f"{name}_{i}"] = values[name][:, i]  # (rows,) of (rows, latent)
    columns[schema.RMSE] = values[schema.RMSE]
    columns[schema.ANOMALY_SCORE] = values[schema.ANOMALY_SCORE]
    columns[schema.FLAGS] = values[schema.FLAGS]
    columns[POSITION_FROM_SOURCE_ID] = values[POSITION_FROM_SOURCE_ID]
    if with_scatter:
        labels = schema.coeff_labels(source.layout.n_coeff // 2, source.layout.n_coeff // 2)
        for i, label in enumerate(labels):
            columns[f"{schema.SCATTER}_{label}"] = values[schema.SCATTER][:, i]
    return pd.DataFrame(columns)


# --- output directory: new, resumed or replaced ---------------------------------------------
def _claim(source: SkySource, out: Path | Location, config: HatsExportConfig) -> RunManifest:
    """Create the output, or check that ``--resume`` continues the same export (the one output
    rule, :mod:`xpbatch.storage.manifest`)."""
    from xpbatch.catalog.zarr_catalog import read_attrs

    fingerprint = {
        "catalog": source.path,
        "catalog_run_id": read_attrs(source.path).get(schema.CATALOG_ATTR_RUN_ID),
        "options": result_options(config),
    }
    run = RunManifest(out, kind=KIND, record=record_inside(out), fingerprint=fingerprint)
    run.claim(
        resume=config.resume,
        overwrite=config.overwrite,
        exists=out.exists()
        and (isinstance(out, Location) or not out.is_dir() or any(out.iterdir())),
        remove=functools.partial(zarr_arrays.remove_tree, out),
    )
    if isinstance(out, Path):
        out.mkdir(parents=True, exist_ok=True)
    run.begin()
    return run


def _local_tmp(out: Path | Location) -> Path | None:
    """Where hats-import keeps its intermediate files for an output on object storage (a local
    directory named after the URL, so a rerun here finds them); None beside a local output."""
    if isinstance(out, Path):
        return None
    digest = hashlib.sha256(out.url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir(), "xpbatch-hats", digest)


def hats_path(place: Path | Location) -> Any:
    """``place`` as hats and hats-import take it: a local path, or a UPath of the URL with its
    storage settings (never the explicit secrets: the UPath travels in hats-import's tasks).
    hats reads an ``s3://`` string as a public bucket (``anon``), so the UPath says otherwise."""
    if isinstance(place, Path):
        return place
    from upath import UPath

    public = as_location(place.url, storage_options=place.options.without_secrets())
    return UPath(place.url, **{"anon": False, **public.storage_options()})


# --- the export -------------------------------------------------------------------------------
@locked_output("output_dir", "export-hats")
def export_hats(
    catalog: PathLike | Location,
    output_dir: PathLike | Location,
    *,
    client: Client | LazyClient,
    config: HatsExportConfig | None = None,
) -> HatsExportSummary:
    """Write a complete catalogue as a HATS collection (catalogue, source_id index, margin).

    Parameters
    ----------
    catalog
        A complete catalogue (``xpbatch encode-catalog``), with ra/dec unless
        ``config.positions_from_source_id``.
    output_dir
        The collection directory to write (on a filesystem every worker sees), or an
        ``s3://`` URL.
    client
        The ``distributed.Client`` whose workers run hats-import's tasks.
    config
        Partitioning, margin, scatter columns, resume/overwrite; see
        :class:`~xpbatch.config.HatsExportConfig`.

    Returns
    -------
    HatsExportSummary
        Rows, partitions and the paths written.

    Raises
    ------
    CatalogError
        The catalogue is incomplete, or has no positions and the fallback was not asked for.
    OutputExistsError, ResumeRefusedError
        ``output_dir`` exists without ``resume``/``overwrite``, or holds another export.

    Examples
    --------
    >>> export_hats("catalog.zarr", "catalog_hats", client=client)  # doctest: +SKIP
    >>> import lsdb
    >>> lsdb.open_catalog("catalog_hats").cone_search(270.0, -30.0, 60.0)  # doctest: +SKIP
    """
    from hats_import.collection.arguments import CollectionArguments
    from hats_import.pipeline import pipeline_with_client

    config = config or HatsExportConfig()
    source = SkySource.open(catalog, positions_from_source_id=config.positions_from_source_id)
    place = real_place(output_dir)
    out = place.resolve() if isinstance(place, Path) else place
    run = _claim(source, out, config)
    collection = hats_path(out)
    args = CollectionArguments(
        output_path=collection.parent,
        output_artifact_name=out.name,
        tmp_dir=_local_tmp(out),
        resume=True,  # our manifest decided above whether this is a new or a resumed export
        progress_bar=config.progress_bar,
        simple_progress_bar=True,
        addl_hats_properties={"obs_title": "Gaia DR3 XP scatter-VAE latents (xpbatch)"},
    ).catalog(
        output_artifact_name=config.name,
        input_file_list=[f"{source.path}{CHUNK_MARK}{i}" for i in range(source.n_chunks)],
        file_reader=ZarrChunkReader(source, with_scatter=config.with_scatter),
        ra_column=schema.RA,
        dec_column=schema.DEC,
        sort_columns=schema.SOURCE_ID,
        pixel_threshold=config.pixel_threshold,
        highest_healpix_order=config.highest_order,
        expected_total_rows=source.layout.n_rows,
    )
    if config.margin_arcsec is not None:
        args = args.add_margin(margin_threshold=config.margin_arcsec, is_default=True)
    with _stage_failures_named(), _collection_checked_as_a_collection():
        pipeline_with_client(args, started_client(client))  # a lazy client starts here
    if (tmp := _local_tmp(out)) is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # hats-import finished with it
    catalog_dir = out / config.name
    index_dir = out / f"{config.name}_{schema.SOURCE_ID}"
    executor = Executor.of(client)
    n_approximate = write_source_id_index(source, catalog_dir, index_dir, executor=executor)
    _add_index_to_collection(collection, index_dir.name)
    margin = [out / str(m) for m in (args.margin_paths or [])]
    check_lock(out)  # never mark complete what another writer may have touched
    run.mark_complete()
    return HatsExportSummary(
        output_dir=out,
        catalog_dir=catalog_dir,
        n_rows=source.layout.n_rows,
        n_partitions=_n_partitions(catalog_dir),
        n_approximate=n_approximate,
        margin_dir=margin[0] if margin else None,
        index_dir=index_dir,
    )


@contextlib.contextmanager
def _stage_failures_named() -> Iterator[None]:
    """hats-import's "Some mapping stages failed. See above Exceptions." with its cause.

    The exceptions it means are in the workers' logs (silenced); while the stage's futures are
    still held, the first failed one's error is raised instead: xpbatch's own errors and OS
    errors (a full disk) as they are, anything else as a ChunkError naming the stage.
    """
    from hats_import.pipeline_resume_plan import PipelineResumePlan

    original = PipelineResumePlan.wait_for_futures

    def wait_for_futures(self: Any, futures: Any, stage_name: str, fail_fast: bool = False) -> Any:
        futures = list(futures)
        try:
            return original(self, futures, stage_name, fail_fast=fail_fast)
        except RuntimeError:
            failed = [f for f in futures if f.status == "error"]
            if not failed:
                raise
            cause = failed[0].exception()
            if isinstance(cause, XPBatchError | OSError):
                raise cause from None
            raise ChunkError(
                f"export-hats: {len(failed)} of {len(futures)} {stage_name} tasks failed; the "
                f"first: {type(cause).__name__}: {cause}"
            ) from cause

    PipelineResumePlan.wait_for_futures = wait_for_futures  # type: ignore[method-assign]
    try:
        yield
    finally:
        PipelineResumePlan.wait_for_futures = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _collection_checked_as_a_collection() -> Iterator[None]:
    """hats-import's last step checks the collection it wrote with hats' check for a catalogue,
    which says "Looking for catalog - found collection." on the root logger (a user's session
    without logging set up then gets a stderr handler for every later record) and hands over
    to the check for a collection. For the duration of the pipeline that step calls the
    collection check itself: the same answer, without the message."""
    import hats_import.collection.run_import as collection_import
    from hats.io.validation import is_valid_collection

    original = collection_import.is_valid_catalog
    collection_import.is_valid_catalog = is_valid_collection
    try:
        yield
    finally:
        collection_import.is_valid_catalog = original


def _n_partitions(catalog_dir: Path | Location) -> int:
    return len(_partitions(catalog_dir))


def _partitions(catalog_dir: Path | Location) -> list[Any]:
    """The HEALPix pixels (``HealpixPixel``) of the HATS catalogue hats-import wrote."""
    from hats import read_hats
    from hats.catalog import Catalog

    catalog = read_hats(hats_path(catalog_dir))
    if not isinstance(catalog, Catalog):
        raise CatalogError(f"{catalog_dir} is not a HATS catalogue (hats-import did not finish?)")
    return list(catalog.get_healpix_pixels())


# --- the source_id index ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _IndexTask:
    """Writes the index file of one catalogue chunk (picklable)."""

    source: SkySource
    index_dir: str | Location
    starts: np.ndarray
    """_healpix_29 where each partition starts, ascending."""
    orders: np.ndarray
    pixels: np.ndarray

    def __call__(self, chunk: int) -> int:
        """Write ``part.<chunk>.parquet`` unless a whole one is there; return the rows placed
        at their source_id's pixel centre."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from hats.pixel_math.spatial_index import compute_spatial_index

        values = self.source.read(chunk, ())
        name = "/".join((*INDEX_DIR, f"part.{chunk:06d}.parquet"))
        at = self.index_dir
        path = at / name if isinstance(at, Location) else Path(at, name)
        n_rows = len(values[schema.SOURCE_ID])
        if not is_whole_parquet(path, n_rows):
            healpix_29 = compute_spatial_index(values[schema.RA], values[schema.DEC])
            where = np.searchsorted(self.starts, healpix_29, side="right") - 1  # its partition
            table = pa.table(
                {
                    schema.SOURCE_ID: values[schema.SOURCE_ID].astype(np.int64),
                    HEALPIX_29: healpix_29.astype(np.int64),
                    "Norder": self.orders[where].astype(np.uint8),
                    "Npix": self.pixels[where].astype(np.uint64),
                }
            )
            if isinstance(path, Location):  # one PUT: whole or absent
                buffer = io.BytesIO()
                pq.write_table(table, buffer, compression="zstd")
                path.write_bytes(buffer.getvalue())
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    pq.write_table(table, tmp, compression="zstd")
        return int(values[POSITION_FROM_SOURCE_ID].sum())


def write_source_id_index(
    source: SkySource,
    catalog_dir: Path | Location,
    index_dir: Path | Location,
    *,
    executor: Executor,
) -> int:
    """Write the source_id index of the HATS catalogue at ``catalog_dir``, one file per chunk.

    Returns the number of rows placed at their source_id's pixel centre.
    """
    from hats.catalog import TableProperties
    from hats.io.parquet_metadata import write_parquet_metadata

    pixels = sorted(_partitions(catalog_dir))
    starts = np.array([p.pixel << (2 * (29 - p.order)) for p in pixels], np.int64)
    order = np.argsort(starts)
    task = _IndexTask(
        source,
        index_dir if isinstance(index_dir, Location) else str(index_dir),
        starts[order],
        np.array([p.order for p in pixels])[order],
        np.array([p.pixel for p in pixels])[order],
    )
    n_approximate = sum(executor.map(task, range(source.n_chunks), name="xpbatch-index"))
    properties: dict[str, Any] = {
        "catalog_name": index_dir.name,
        "catalog_type": "index",
        "total_rows": source.layout.n_rows,
        "primary_catalog": str(catalog_dir),
        "indexing_column": schema.SOURCE_ID,
    }
    TableProperties(**properties).to_properties_file(hats_path(index_dir))
    write_parquet_metadata(hats_path(index_dir), order_by_healpix=False)
    return n_approximate


def _add_index_to_collection(collection: Any, index_name: str) -> None:
    from hats.catalog.dataset.collection_properties import CollectionProperties

    properties = CollectionProperties.read_from_dir(collection)
    updated = properties.model_copy(
        update={"all_indexes": {schema.SOURCE_ID: index_name}, "default_index": None}
    )
    updated.to_properties_file(collection)
