"""Write a mock catalogue as an XP store, chunk by chunk, with its labels beside it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

from xpbatch import schema
from xpbatch.config import MOCK_ROWS_PER_FILE, MockConfig
from xpbatch.mock.labels import LabelsWriter, labels_path
from xpbatch.mock.plan import bulk_file_plan
from xpbatch.mock.rows import BLOCK_ROWS, check_size, mock_rows
from xpbatch.storage.location import Location
from xpbatch.storage.outputs import check_lock
from xpbatch.store.xp_store import DEFAULT_CHUNK_ROWS, XPStoreWriter

logger = logging.getLogger(__name__)


def mock_attrs(n: int, seed: int, config: MockConfig) -> dict[str, Any]:
    """What a mock catalogue records about itself (store attributes, bulk-file header)."""
    return {
        "data_release": "Gaia DR3 (synthetic: xpbatch mock)",
        "mock": {
            "n": n,
            "seed": seed,
            "block_rows": BLOCK_ROWS,
            "config": config.row_settings(),
        },
    }


def write_mock_store(
    path: str | Path | Location,
    n: int,
    *,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    config: MockConfig | None = None,
    scalars: Collection[str] = (),
    with_correlations: bool = False,
    rows_per_file: int = MOCK_ROWS_PER_FILE,
    overwrite: bool = False,
) -> Path | Location:
    """Write an ``n``-row mock catalogue as an XP store, chunk by chunk (memory flat in ``n``).

    The labels go beside the store, to ``<path>.labels.parquet`` (``mock.zarr`` ->
    ``mock.zarr.labels.parquet``); read them with :func:`read_mock_labels`. The store records
    the partition ranges of the bulk files :func:`write_mock_dr3_bulk` would write (attribute
    ``partition_ranges``, as ``xpbatch ingest`` records them from DR3 file names).

    Parameters
    ----------
    path
        Directory of the new store.
    n
        Number of sources.
    seed
        Non-negative seed; the same ``(n, seed, config)`` always gives the same rows, whatever
        ``chunk_rows`` is, and the same rows as :func:`write_mock_dr3_bulk`.
    chunk_rows
        Rows per store chunk.
    config
        Populations and defect fractions (:meth:`xpbatch.config.MockConfig.row_settings`);
        the arguments here replace its other fields.
    scalars, with_correlations
        Also store these DR3 scalar columns / the packed correlations, like ``xpbatch ingest``
        with ``--scalars`` / ``--with-correlations``.
    rows_per_file
        Rows per bulk file, about, of the partition ranges recorded (see
        :func:`bulk_file_plan`).
    overwrite
        Replace an existing store at ``path``.

    Returns
    -------
    pathlib.Path or Location
        The store's path (its Location for an ``s3://`` URL).

    Examples
    --------
    >>> write_mock_store("mock.zarr", 10_000, seed=1)  # doctest: +SKIP
    PosixPath('mock.zarr')
    >>> read_mock_labels("mock.zarr").head()  # doctest: +SKIP
    """
    settings = dataclasses.replace(
        config or MockConfig(),
        n=n,
        seed=seed,
        format="store",
        chunk_rows=chunk_rows,
        scalars=tuple(scalars),
        with_correlations=with_correlations,
        rows_per_file=rows_per_file,
        overwrite=overwrite,
    )
    return write_store(path, settings)


def write_store(path: str | Path | Location, config: MockConfig) -> Path | Location:
    """:func:`write_mock_store` with every setting from ``config`` (the stage's way in)."""
    n, seed = config.n, config.seed
    check_size(n, seed)
    partitions = [[file.lo, file.hi] for file in bulk_file_plan(n, config.rows_per_file)]
    writer = XPStoreWriter.create(
        path,
        n,
        chunk_rows=config.chunk_rows,
        attrs={**mock_attrs(n, seed, config), schema.STORE_ATTR_PARTITION_RANGES: partitions},
        scalars=config.scalars,
        with_correlations=config.with_correlations,
        with_positions=True,
        overwrite=config.overwrite,
    )
    labels = LabelsWriter(labels_path(path))
    for region in writer.chunk_slices():
        rows = mock_rows(n, region.start, region.stop, seed=seed, config=config)
        writer.write_rows(
            region.start,
            source_id=rows.source_id,
            coefficients=rows.coefficients,
            coefficient_errors=rows.coefficient_errors,
            phot_g_mean_flux=rows.phot_g_mean_flux,
            scalars={name: rows.scalars[name] for name in config.scalars},
            correlations=(
                {band: rows.correlations(band) for band in schema.BANDS}
                if config.with_correlations
                else None
            ),
            positions={schema.RA: rows.ra, schema.DEC: rows.dec},
        )
        labels.write_table(rows.labels_table())
        logger.debug("mock store %s: wrote rows %d..%d", writer.path, region.start, region.stop)
    labels.close()
    check_lock(path)  # never mark complete what another writer may have touched
    writer.finalize()
    return writer.path
