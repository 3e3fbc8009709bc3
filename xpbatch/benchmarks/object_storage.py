"""``xpbatch bench object-storage``: the same encode written to local disk and to an ``s3://``
URL, alternating, so that both see the same machine load.

The store (mock rows) and the model (untrained) are local; only the output differs. Each run
starts from an empty output (the earlier round's removed outside the timing; a catalogue found
before the first round is replaced only if xpbatch wrote it, by the encode itself) and is the whole
``encode_catalog`` as users run it, serially (template, chunk writes, completion records, the
final verification by checksums). The server is whatever the AWS environment (or the storage
options) points at: against a server on this machine the figures are throughput against a
local S3 server, not a cloud bucket.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from xpbatch.config import EncodeConfig
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location, as_location

CHUNK_ROWS = 16_384
"""Rows per chunk of the benchmark's store (and so of its catalogue)."""


@dataclasses.dataclass(frozen=True)
class ObjectStorageReport:
    """Wall times of the same encode to local disk and to object storage; ``str()`` prints it."""

    rows: int
    url: str
    local_s: tuple[float, ...]
    """Each local run's wall time, in the order run."""
    remote_s: tuple[float, ...]
    """Each object-storage run's wall time, alternating with the local ones."""
    catalogue_bytes: int

    def __str__(self) -> str:
        def line(name: str, times: tuple[float, ...]) -> str:
            runs = ", ".join(f"{t:.1f}" for t in times)
            best = min(times)
            rate = self.rows / best
            return f"{name:<16} best {best:.1f} s, {rate:,.0f} spectra/s (runs: {runs} s)"

        return "\n".join(
            [
                f"encode of {self.rows:,} rows ({self.catalogue_bytes / 1e6:,.1f} MB of "
                "catalogue), serial, alternating",
                line("local disk", self.local_s),
                line("object storage", self.remote_s),
                f"object storage  {self.url}",
            ]
        )


def run_object_storage_benchmark(
    url: str | Location, *, rows: int = 262_144, repeats: int = 3, workdir: str | None = None
) -> ObjectStorageReport:
    """Encode one mock store ``repeats`` times to local disk and to ``url``, alternating.

    Examples
    --------
    >>> print(run_object_storage_benchmark("s3://bucket/bench", rows=65_536))  # doctest: +SKIP
    """
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.mock import write_mock_store
    from xpbatch.model.trained import TrainedModel

    root = Path(workdir or tempfile.mkdtemp(prefix="xpbatch-bench-s3-"))
    store = root / f"store-{rows}.zarr"
    if not (store / "zarr.json").is_file():
        write_mock_store(store, rows, seed=0, chunk_rows=CHUNK_ROWS, overwrite=True)
    model = TrainedModel.untrained()
    config = EncodeConfig(progress_bar=False, check_fit=False)
    local, remote = root / "catalog.zarr", as_location(url) / "catalog.zarr"
    times: dict[str, list[float]] = {"local": [], "remote": []}
    for repeat in range(repeats):
        for name, out in (("local", local), ("remote", remote)):
            if repeat:  # our own catalogue of the last round, removed outside the timing
                zarr_arrays.remove_tree(zarr_arrays.where(out))
            else:  # what is there already is replaced only if it is an xpbatch catalogue
                config = dataclasses.replace(config, overwrite=True)
            started = time.perf_counter()
            encode_catalog(store, model, out, config=config)
            times[name].append(time.perf_counter() - started)
            config = dataclasses.replace(config, overwrite=False)
    return ObjectStorageReport(
        rows=rows,
        url=remote.url,
        local_s=tuple(times["local"]),
        remote_s=tuple(times["remote"]),
        catalogue_bytes=zarr_arrays.nbytes(remote),
    )
