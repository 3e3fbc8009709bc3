"""The most anomalous sources of a catalogue, found chunk by chunk.

``anomaly_score`` (:mod:`xpbatch.model.density`) is ``-log p`` of a source's latent mean and
misfit under the training set's distribution, in nats; higher is rarer. :func:`top_anomalies`
ranks the whole column as ``dask.array.argtopk`` does (each chunk keeps its own top ``n``,
then those are merged), so it reads every chunk once and holds only ``n`` rows per chunk;
equal scores are ranked by row, so the answer does not depend on the chunking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xpbatch import schema
from xpbatch.errors import CatalogError, ConfigError
from xpbatch.schema import CatalogFlag
from xpbatch.storage.paths import PathLike

if TYPE_CHECKING:
    import dask.array as da
    import pandas as pd
    import xarray as xr

LATENT_OUTLIER_COLUMN = "latent_outlier"


def top_anomalies(catalog: xr.Dataset | PathLike, n: int = 20) -> pd.DataFrame:
    """The ``n`` sources with the highest ``anomaly_score``, highest first.

    Rows that were not encoded (NaN score) are never among them, so fewer than ``n`` come
    back when fewer are encoded.

    Parameters
    ----------
    catalog
        A catalogue (path or :func:`xpbatch.open_catalog`).
    n
        How many sources.

    Returns
    -------
    pandas.DataFrame
        Indexed by the catalogue row (``row``, for ``ds.isel(source=...)``), with columns
        ``source_id``, ``anomaly_score`` (nats), ``rmse``, ``flags`` (CatalogFlag bits),
        ``latent_outlier`` (bool: above the model's threshold) and ``ra``, ``dec`` (deg) when
        the catalogue has positions.

    Examples
    --------
    >>> top = xpbatch.top_anomalies("catalog.zarr", 10)  # doctest: +SKIP
    >>> top.source_id.to_list()  # doctest: +SKIP
    """
    import dask.array as da
    import xarray as xr

    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"top_anomalies needs n >= 1 sources, got {n!r}")
    if isinstance(catalog, xr.Dataset):
        ds = catalog
    else:
        from xpbatch.catalog.zarr_catalog import open_catalog

        ds = open_catalog(catalog)
    if schema.ANOMALY_SCORE not in ds:
        raise CatalogError(
            f"this catalogue has no {schema.ANOMALY_SCORE} variable; "
            "is it an xpbatch catalogue (xpbatch encode-catalog)?"
        )
    rows = _top_rows(da.asarray(ds[schema.ANOMALY_SCORE].data), int(n))  # highest first
    columns = [schema.SOURCE_ID, schema.ANOMALY_SCORE, schema.RMSE, schema.FLAGS]
    columns += [c for c in (schema.RA, schema.DEC) if c in ds.variables]
    order = np.argsort(rows, kind="stable")  # read in row order, report in rank order
    picked = ds[[c for c in columns if c in ds.data_vars]].isel(source=rows[order]).compute()
    table = picked.reset_coords().to_dataframe()[columns]
    table.index = np.asarray(rows[order])
    table = table.iloc[np.argsort(order, kind="stable")]  # back to the rank order
    table.index.name = "row"
    latent_outlier = (table[schema.FLAGS].to_numpy() & int(CatalogFlag.LATENT_OUTLIER)) != 0
    table.insert(4, LATENT_OUTLIER_COLUMN, latent_outlier)
    return table


def _top_rows(score: da.Array, n: int) -> np.ndarray:
    """Rows of the ``n`` highest finite scores, highest first (ties: lower row first)."""
    import dask

    offsets = np.cumsum((0, *score.chunks[0]))
    parts = [
        dask.delayed(_chunk_top)(block, int(offset), n)
        for block, offset in zip(score.to_delayed().ravel(), offsets, strict=False)
    ]
    found = dask.compute(*parts)
    rows = np.concatenate([np.zeros(0, np.int64), *(r for r, _ in found)])
    values = np.concatenate([np.zeros(0), *(v for _, v in found)])
    return rows[np.lexsort((rows, -values))[:n]]


def _chunk_top(values: np.ndarray, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's ``n`` highest finite scores: (rows in the catalogue, scores)."""
    values = np.asarray(values, np.float64)
    rows = np.flatnonzero(np.isfinite(values))
    if rows.size > n:
        rows = rows[np.lexsort((rows, -values[rows]))[:n]]
    return rows + offset, values[rows]
