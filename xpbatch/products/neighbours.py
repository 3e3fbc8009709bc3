"""Similar-spectrum search: the k nearest sources of a catalogue in latent space, exactly.

The distance between two sources is Euclidean between their latent means on the model's active
dimensions, each divided by the training set's spread of latent means in that dimension
(``sqrt(sum_k ((a_k - b_k) / scale_k)^2)``; the catalogue's ``latent_density`` attribute holds
the active dimensions and ``scale``). A query is a source of the catalogue (its own row is not
its neighbour) or a latent vector.

The search is a brute-force scan, chunk by chunk: each task reads one chunk's latent means and
keeps each query's k best rows (ties broken by source_id), and the driver merges the chunks'
k-lists as they arrive, so memory is flat in catalogue size (queries x k rows, plus one chunk per
task). Exact by construction: no index, no approximation. Rows flagged not_encoded are skipped.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xpbatch import schema
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.catalog.layout import CatalogLayout
from xpbatch.config import NeighboursConfig
from xpbatch.errors import CatalogError, InputShapeError
from xpbatch.runtime.executor import Executor, LazyClient
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location, as_location, is_url
from xpbatch.storage.manifest import file_manifest
from xpbatch.storage.outputs import locked_output
from xpbatch.storage.paths import PathLike, atomic_path

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

logger = logging.getLogger(__name__)

DEFAULT_K = 100
BLOCK_VALUES = 2**22
"""Distances computed at once (queries x rows of a block): 32 MB of float64 per temporary."""
_CARRIED = (schema.RMSE, schema.FLAGS, schema.ANOMALY_SCORE)
"""Catalogue variables reported with each neighbour."""


@dataclasses.dataclass(frozen=True)
class LatentMetric:
    """Which latent dimensions count, and the spread that is the unit of distance in each."""

    active: np.ndarray  # (latent,) bool
    scale: np.ndarray  # (latent,) float64

    @classmethod
    def from_catalog(cls, path: PathLike | Location) -> LatentMetric:
        """The metric a catalogue records (attribute ``latent_density``)."""
        attrs = catalog.read_attrs(path)
        described = attrs.get(schema.ATTR_LATENT_DENSITY)
        if not described:
            raise CatalogError(
                f"catalogue {path} has no attribute {schema.ATTR_LATENT_DENSITY!r}: not written "
                "by xpbatch encode-catalog, or damaged; re-encode it"
            )
        kl = described.get("kl")
        active = np.zeros(len(described["scale"]), bool)
        active[described["active_dims"]] = True
        if kl is None:
            active[:] = True
        return cls(active, np.asarray(described["scale"], np.float64))

    def standardise(self, latent: np.ndarray) -> np.ndarray:
        """(rows, active) float64: latent means in units of the training spread, active dims."""
        return (np.asarray(latent, np.float64) / self.scale)[:, self.active]


@dataclasses.dataclass
class _Best:
    """Each query's best rows so far: (queries, k) arrays sorted by (distance, source_id)."""

    source_id: np.ndarray  # int64, -1 where there is no candidate yet
    distance: np.ndarray  # float64, inf where there is no candidate yet
    carried: dict[str, np.ndarray]

    @classmethod
    def empty(cls, n_queries: int, k: int, names: Iterable[str]) -> _Best:
        return cls(
            np.full((n_queries, k), -1, np.int64),
            np.full((n_queries, k), np.inf),
            {name: np.full((n_queries, k), np.nan) for name in names},
        )

    def merge(self, other: _Best) -> _Best:
        """The best k of both, per query (the tie-break makes the result order-independent)."""
        k = self.source_id.shape[1]
        distance = np.concatenate([self.distance, other.distance], axis=1)
        source_id = np.concatenate([self.source_id, other.source_id], axis=1)
        order = _order(distance, source_id)[:, :k]
        return _Best(
            np.take_along_axis(source_id, order, axis=1),
            np.take_along_axis(distance, order, axis=1),
            {
                name: np.take_along_axis(
                    np.concatenate([values, other.carried[name]], axis=1), order, axis=1
                )
                for name, values in self.carried.items()
            },
        )


def _order(distance: np.ndarray, source_id: np.ndarray) -> np.ndarray:
    """(queries, n) column order by distance, then source_id; missing (-1) rows last."""
    missing = source_id < 0
    return np.lexsort((source_id, missing, distance), axis=1)


@dataclasses.dataclass(frozen=True)
class ChunkSearch:
    """One task: each query's k nearest rows of one catalogue chunk (picklable)."""

    path: str | Location
    chunk_rows: int
    n_rows: int
    queries: np.ndarray  # (queries, active) standardised
    query_source_id: np.ndarray  # (queries,) int64; -1 for a latent-vector query
    metric: LatentMetric
    k: int
    carried: tuple[str, ...]

    def __call__(self, index: int) -> _Best:
        rows = slice(index * self.chunk_rows, min((index + 1) * self.chunk_rows, self.n_rows))
        arrays = catalog.open_arrays(
            self.path, (schema.SOURCE_ID, schema.LATENT_MEAN, *self.carried)
        )
        values = {name: np.asarray(array[rows]) for name, array in arrays.items()}
        best = _Best.empty(len(self.queries), self.k, self.carried)
        points = self.metric.standardise(values[schema.LATENT_MEAN])  # (rows, active)
        usable = np.isfinite(points).all(axis=1)
        block = max(1, BLOCK_VALUES // max(len(self.queries), 1))
        for start in range(0, len(points), block):
            part = slice(start, start + block)
            best = best.merge(self._block_best(points[part], usable[part], values, part))
        return best

    def _block_best(
        self,
        points: np.ndarray,
        usable: np.ndarray,
        values: Mapping[str, np.ndarray],
        part: slice,
    ) -> _Best:
        source_id = values[schema.SOURCE_ID][part]
        squared = np.zeros((len(self.queries), len(points)))  # (queries, rows)
        for j in range(points.shape[1]):
            squared += (points[None, :, j] - self.queries[:, j, None]) ** 2
        distance = np.sqrt(squared)
        distance[:, ~usable] = np.inf
        distance[source_id[None, :] == self.query_source_id[:, None]] = np.inf  # not itself
        ids = np.broadcast_to(source_id, distance.shape)
        ids = np.where(np.isfinite(distance), ids, -1)
        if distance.shape[1] > self.k:
            # Rows no further than each query's k-th smallest distance (ties kept), then sorted.
            kth = np.partition(distance, self.k - 1, axis=1)[:, self.k - 1 : self.k]
            distance = np.where(distance <= kth, distance, np.inf)
            ids = np.where(distance <= kth, ids, -1)
        order = _order(distance, ids)[:, : self.k]
        picked = {name: np.asarray(values[name][part], np.float64)[order] for name in self.carried}
        result = _Best(
            np.take_along_axis(ids, order, axis=1),
            np.take_along_axis(distance, order, axis=1),
            picked,
        )
        return result.merge(_Best.empty(len(self.queries), self.k, self.carried))


def find_neighbours(
    path: PathLike | Location,
    queries: Sequence[int] | np.ndarray | pd.DataFrame,
    *,
    k: int = DEFAULT_K,
    client: Client | LazyClient | Executor | None = None,
) -> pd.DataFrame:
    """The ``k`` nearest sources of a catalogue to each query, in latent space.

    Parameters
    ----------
    path
        A complete catalogue (``xpbatch encode-catalog``).
    queries
        Source ids of the catalogue (1-D integers, or a table with a ``source_id`` column), or
        latent vectors (a 2-D float array (queries, latent), or a table with columns
        ``latent_0 … latent_{n-1}``).
    k
        Neighbours per query.
    client
        A ``distributed.Client``: one task per chunk on its workers. None: serially here.

    Returns
    -------
    pandas.DataFrame
        One row per (query, neighbour): ``query_index`` (position in ``queries``),
        ``query_source_id`` (id queries only), ``rank`` (1 = nearest), ``source_id``,
        ``distance`` (training-spread units), ``rmse``, ``flags`` and ``anomaly_score``. Fewer
        than ``k`` rows for a query only if the catalogue has fewer encoded sources.

    Raises
    ------
    InputShapeError
        Queries of the wrong shape, ids not in the catalogue or not encoded there.

    Examples
    --------
    >>> find_neighbours("catalog.zarr", [4295806720], k=10)  # doctest: +SKIP
    """
    if k < 1:
        raise InputShapeError(f"k must be at least 1, got {k}")
    at = zarr_arrays.absolute(path)
    catalog.open_catalog(at)  # refuses an incomplete or foreign catalogue, with its reason
    layout = catalog.read_layout(at)
    metric = LatentMetric.from_catalog(at)
    query_ids, latent = _parse_queries(queries, layout.latent_dim)
    chunks = range(layout.n_chunks)
    executor = Executor.of(client)
    if query_ids is not None:
        latent = _lookup(at, layout, query_ids)  # here: unknown ids cost no cluster start
    search = ChunkSearch(
        at,
        layout.chunk_rows,
        layout.n_rows,
        metric.standardise(latent),
        np.full(len(latent), -1, np.int64) if query_ids is None else query_ids,
        metric,
        k,
        _CARRIED,
    )
    best = _Best.empty(len(latent), k, _CARRIED)
    for found in executor.map(search, chunks, name="xpbatch-neighbours"):
        best = best.merge(found)
    return _table(best, query_ids)


def _parse_queries(
    queries: Sequence[int] | np.ndarray | pd.DataFrame, latent_dim: int
) -> tuple[np.ndarray | None, np.ndarray]:
    """(query ids or None, latent vectors (queries, latent) or an empty placeholder)."""
    import pandas as pd

    if isinstance(queries, pd.DataFrame):
        if schema.SOURCE_ID in queries.columns:
            return _parse_queries(queries[schema.SOURCE_ID].to_numpy(), latent_dim)
        names = [f"latent_{i}" for i in range(latent_dim)]
        missing = [n for n in names if n not in queries.columns]
        if missing:
            raise InputShapeError(
                f"a query table needs a source_id column or columns {names[0]} … {names[-1]}; "
                f"it has {list(queries.columns)}"
            )
        return _parse_queries(queries[names].to_numpy(np.float64), latent_dim)
    array = np.asarray(queries)
    if array.ndim == 1 and array.dtype.kind in "iu":
        if array.size == 0:
            raise InputShapeError("no query source ids given")
        return array.astype(np.int64), np.empty((0, latent_dim))
    if array.ndim == 2 and array.shape[1] == latent_dim and array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InputShapeError("query latent vectors must be finite")
        return None, array.astype(np.float64)
    raise InputShapeError(
        f"queries must be source ids (1-D integers) or latent vectors (queries, {latent_dim}) "
        f"floats; got an array of shape {array.shape} and dtype {array.dtype}"
    )


def _lookup(path: str | Location, layout: CatalogLayout, query_ids: np.ndarray) -> np.ndarray:
    """(queries, latent) latent means of the query ids; InputShapeError if one is missing.

    Found in this process by bisecting the catalogue's source_id (ascending, as in its input
    store) over its chunks: a few chunk reads per id, so unknown ids are refused before the
    search's tasks (and a cluster) start.
    """
    arrays = catalog.open_arrays(path, (schema.SOURCE_ID, schema.LATENT_MEAN))
    source_id, latent_mean = arrays[schema.SOURCE_ID], arrays[schema.LATENT_MEAN]
    firsts: dict[int, int] = {}

    def first(index: int) -> int:
        if index not in firsts:
            firsts[index] = int(np.asarray(source_id[layout.rows(index).start]))
        return firsts[index]

    found: dict[int, np.ndarray] = {}
    for wanted in np.unique(query_ids).tolist():
        lo, hi = 0, layout.n_chunks - 1  # the last chunk whose first id is <= wanted
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if first(mid) <= wanted else (lo, mid - 1)
        if layout.n_chunks == 0 or first(lo) > wanted:
            continue
        rows = layout.rows(lo)
        ids = np.asarray(source_id[rows])
        at = int(np.searchsorted(ids, wanted))
        if at < len(ids) and ids[at] == wanted:
            found[wanted] = np.asarray(latent_mean[rows.start + at], np.float64)
    missing = [int(i) for i in query_ids if int(i) not in found]
    if missing:
        raise InputShapeError(
            f"{len(missing)} query source id(s) are not in catalogue {path}, e.g. {missing[:5]}"
        )
    latent = np.stack([found[int(i)] for i in query_ids])
    bad = ~np.isfinite(latent).all(axis=1)
    if bad.any():
        raise InputShapeError(
            f"query source id(s) {query_ids[bad][:5].tolist()} are flagged not_encoded in {path}: "
            "they have no latent position"
        )
    return latent


def _table(best: _Best, query_ids: np.ndarray | None) -> pd.DataFrame:
    import pandas as pd

    n_queries, k = best.source_id.shape
    keep = (best.source_id >= 0).ravel()
    columns: dict[str, Any] = {"query_index": np.repeat(np.arange(n_queries), k)}
    if query_ids is not None:
        columns["query_source_id"] = np.repeat(query_ids, k)
    columns["rank"] = np.tile(np.arange(1, k + 1), n_queries)
    columns[schema.SOURCE_ID] = best.source_id.ravel()
    columns["distance"] = best.distance.ravel()
    for name, values in best.carried.items():  # float64 while merging (NaN for no candidate)
        columns[name] = values.ravel()
    columns = {name: values[keep] for name, values in columns.items()}
    for name in best.carried:
        columns[name] = columns[name].astype(np.uint16 if name == schema.FLAGS else np.float32)
    return pd.DataFrame(columns)


def write_table(table: pd.DataFrame, out: PathLike | Location) -> None:
    """Write a neighbours table as Parquet (``.parquet``) or CSV (anything else), atomically
    (on object storage, one PUT)."""
    if is_url(out):
        location = as_location(out)
        data = io.BytesIO()
        if location.name.endswith(".parquet"):
            table.to_parquet(data, index=False)
        else:
            data.write(table.to_csv(index=False).encode())
        location.write_bytes(data.getvalue())
        return
    out = out.path if isinstance(out, Location) else Path(out)
    with atomic_path(out) as tmp:
        if out.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)


NEIGHBOURS_KIND = "neighbours table"
"""The kind of output :func:`write_neighbours` records (xpbatch.storage.manifest)."""


@locked_output("out", "neighbours")
def write_neighbours(
    catalog_path: PathLike,
    queries: Sequence[int] | np.ndarray | pd.DataFrame,
    out: PathLike | Location,
    *,
    client: Client | LazyClient | Executor | None = None,
    config: NeighboursConfig | None = None,
) -> pd.DataFrame:
    """:func:`find_neighbours` of ``queries``, written to ``out`` (``xpbatch neighbours -o``).

    ``out`` follows the one output rule (:mod:`xpbatch.storage.manifest`): an existing file is
    replaced only with ``config.overwrite`` and only when it is a neighbours table xpbatch wrote
    (its record ``OUT.xpbatch.json`` beside it); it is checked before the search starts.

    Examples
    --------
    >>> write_neighbours("catalog.zarr", [4295806720], "n.csv")  # doctest: +SKIP
    """
    config = config or NeighboursConfig()
    run = file_manifest(out, kind=NEIGHBOURS_KIND)
    run.claim(resume=False, overwrite=config.overwrite, remove=lambda: None)  # replaced whole
    table = find_neighbours(catalog_path, queries, k=config.k, client=client)
    run.begin(catalog=str(zarr_arrays.absolute(catalog_path)), k=config.k)
    write_table(table, run.output)
    run.mark_complete(rows=len(table))
    return table
