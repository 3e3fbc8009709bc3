"""``xpbatch bench neighbours``: the exact latent search on a large catalogue, against NumPy.

Writes a synthetic catalogue (latent means drawn from a few Gaussian clumps, every 97th row not
encoded; written with the catalogue's own template and chunk writer, so it is a real one), runs
:func:`xpbatch.products.neighbours.find_neighbours` for some of its sources on the given cluster
while
sampling the resident memory of the driver and of every worker, and compares the result with a
brute-force NumPy answer over the whole catalogue held in memory.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xpbatch import schema
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.catalog.layout import CatalogLayout, create_catalog
from xpbatch.catalog.output import mark_complete
from xpbatch.catalog.writer import CatalogWriter
from xpbatch.model.density import LatentDensity
from xpbatch.schema import CatalogFlag

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

LATENT_DIM = 6
ACTIVE_KL = np.array([2.0, 0.0, 1.5, 1.0, 3.0, 0.0])
"""Dimensions 1 and 5 collapsed, like the published checkpoint's."""


def synthetic_catalog(path: Path, n_rows: int, *, chunk_rows: int = 65536, seed: int = 0) -> Path:
    """Write a complete catalogue of ``n_rows`` random latent means (see the module docstring)."""
    density = dataclasses.replace(
        LatentDensity.prior(LATENT_DIM, ACTIVE_KL), scale=np.linspace(0.5, 2.0, LATENT_DIM)
    )
    layout = CatalogLayout(n_rows=n_rows, chunk_rows=chunk_rows, latent_dim=LATENT_DIM)
    attrs = {
        schema.CATALOG_ATTR_MODEL_HASH: "synthetic",
        schema.CATALOG_ATTR_STORE_ID: "synthetic",
        schema.CATALOG_ATTR_OPTIONS: {},
        "run_id": "synthetic",
        schema.ATTR_LATENT_DENSITY: density.attrs(),
    }
    create_catalog(path, layout, attrs=attrs)
    writer = CatalogWriter(path)
    for index in range(layout.n_chunks):
        writer.write_chunk(index, _chunk(layout, index, seed))
    mark_complete(path)
    return path


def _chunk(layout: CatalogLayout, index: int, seed: int) -> dict[str, np.ndarray]:
    rows = np.arange(layout.rows(index).start, layout.rows(index).stop)
    n = rows.size
    rng = np.random.default_rng([seed, index])
    clumps = np.random.default_rng(seed).normal(0.0, 2.0, (8, LATENT_DIM))
    latent = clumps[rng.integers(0, 8, n)] + rng.normal(0.0, 0.5, (n, LATENT_DIM))
    dead = rows % 97 == 5
    values: dict[str, np.ndarray] = {
        schema.SOURCE_ID: rows.astype(np.int64) * 256 + 4_295_000_000,
        schema.LATENT_MEAN: latent.astype(np.float32),
        schema.LATENT_STD: np.full((n, LATENT_DIM), 0.1, np.float32),
        schema.SCATTER: np.full((n, layout.n_coeff), 1.0, np.float32),
        schema.RMSE: rng.uniform(0.5, 2.0, n).astype(np.float32),
        schema.FLAGS: np.select(
            [dead, rows % 3 == 0], [CatalogFlag.NOT_ENCODED, CatalogFlag.IN_TRAINING_SET], 0
        ).astype(np.uint16),
        schema.ANOMALY_SCORE: rng.uniform(0.0, 20.0, n).astype(np.float32),
    }
    for name in (schema.LATENT_MEAN, schema.LATENT_STD, schema.SCATTER, schema.RMSE):
        values[name][dead] = np.nan
    values[schema.ANOMALY_SCORE][dead] = np.nan
    return values


def brute_force(path: Path, query_source_id: np.ndarray, k: int) -> pd.DataFrame:
    """The same answer from the whole catalogue in memory, with NumPy: the reference."""
    import pandas as pd

    ds = catalog.open_catalog(path)
    source_id = ds[schema.SOURCE_ID].values
    latent = ds[schema.LATENT_MEAN].values.astype(np.float64)
    described = ds.attrs[schema.ATTR_LATENT_DENSITY]
    active = np.array(described["active_dims"])
    scale = np.asarray(described["scale"])[active]
    points = latent[:, active] / scale
    parts = []
    for number, query in enumerate(query_source_id):
        here = points[np.flatnonzero(source_id == query)[0]]
        distance = np.sqrt(((points - here) ** 2).sum(axis=1))
        distance[~np.isfinite(distance) | (source_id == query)] = np.inf
        order = np.lexsort((source_id, distance))[:k]
        parts.append(
            pd.DataFrame(
                {
                    "query_index": number,
                    "query_source_id": query,
                    "rank": np.arange(1, k + 1),
                    schema.SOURCE_ID: source_id[order],
                    "distance": distance[order],
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


class MemorySampler:
    """Peak resident memory of this process and of the cluster's workers, sampled every 0.2 s."""

    def __init__(self, client: Client | None) -> None:
        self.client = client
        self.driver_peak = 0
        self.worker_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            if self.client is not None:
                rss = self.client.run(lambda: psutil.Process().memory_info().rss)
                for worker, value in rss.items():
                    self.worker_peak[worker] = max(self.worker_peak.get(worker, 0), value)
            time.sleep(0.2)


def run_neighbours_benchmark(
    rows: int, *, client: Client | None, queries: int = 10, k: int = 100, workdir: Any = None
) -> str:
    """Write the catalogue, search, compare with NumPy; a report of sizes, times and memory."""
    from xpbatch.products.neighbours import find_neighbours

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        path = root / f"synthetic{rows}.zarr"
        if not (path / "zarr.json").is_file():
            synthetic_catalog(path, rows)
        ids = catalog.open_arrays(path, [schema.SOURCE_ID])[schema.SOURCE_ID]
        chosen = np.random.default_rng(1).choice(rows, queries, replace=False) // 97 * 97
        query_ids = np.asarray(ids[np.sort(chosen)])
        started = time.perf_counter()
        with MemorySampler(client) as memory:
            found = find_neighbours(path, query_ids, k=k, client=client)
        seconds = time.perf_counter() - started
        reference = brute_force(path, query_ids, k)
        same_ids = np.array_equal(found[schema.SOURCE_ID], reference[schema.SOURCE_ID])
        worst = float(np.max(np.abs(found["distance"] - reference["distance"])))
        workers = ", ".join(f"{v / 1e6:.0f}" for v in memory.worker_peak.values()) or "-"
        size = catalog.catalog_nbytes(path)
        return "\n".join(
            [
                f"catalogue      {rows:,} rows, {size / 1e6:,.0f} MB on disk",
                f"search         {queries} queries x k={k}: {seconds:.1f} s",
                f"peak RSS       driver {memory.driver_peak / 1e6:.0f} MB (before the NumPy "
                f"reference); workers {workers} MB",
                f"brute force    same source_ids in the same order: {same_ids}; "
                f"max |distance difference| {worst:.2e}",
            ]
        )
