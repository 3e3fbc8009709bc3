"""The mock stage: ``make_mock(out, config=...)`` writes a catalogue and says what it wrote."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np

from xpbatch import dr3
from xpbatch.config import MockConfig
from xpbatch.errors import ConfigError
from xpbatch.mock.bulk_writer import write_bulk
from xpbatch.mock.labels import labels_path
from xpbatch.mock.plan import bulk_file_plan
from xpbatch.mock.populations import POPULATIONS
from xpbatch.mock.store_writer import write_store
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location, as_location
from xpbatch.storage.manifest import (
    STORE_KIND,
    JsonRecord,
    RunManifest,
    RunRecord,
    ZarrRecord,
    real_place,
)
from xpbatch.storage.outputs import locked_output

BULK_KIND = "mock DR3 bulk directory"
"""What ``mock --format dr3-bulk`` writes (its run manifest inside the directory)."""


@dataclasses.dataclass(frozen=True)
class MockSummary:
    """What :func:`mock` wrote; ``str()`` of it is what ``xpbatch mock`` prints."""

    path: Path | Location
    """The store, or the directory of bulk files."""
    format: str
    """'store' or 'dr3-bulk' (:attr:`xpbatch.config.MockConfig.format`)."""
    rows: int
    """Sources written (each exactly once)."""
    files: tuple[Path | Location, ...]
    """The XpContinuousMeanSpectrum files in source_id order (dr3-bulk; each has a GaiaSource
    companion), or the store itself."""
    bytes_on_disk: int
    """Size of everything written: the store or the bulk files, the manifest and the labels."""
    rare_counts: dict[str, int]
    """Rows of each rare population (binary, emission_line, white_dwarf), from the labels."""
    labels: Path | Location
    """The labels table (read it with :func:`xpbatch.mock.read_mock_labels`)."""

    def __str__(self) -> str:
        rare = ", ".join(f"{count:,} {name}" for name, count in self.rare_counts.items() if count)
        if self.format == "store":
            where = f"to {self.path}"
        else:
            where = (
                f"in {len(self.files):,} {dr3.XP_PREFIX} files (+ {dr3.GAIA_SOURCE_PREFIX} "
                f"companions, {dr3.MD5_MANIFEST}) to {self.path}"
            )
        return (
            f"wrote {self.rows:,} mock sources {where}: {self.bytes_on_disk / 1e6:,.1f} MB"
            f"{f'; rare: {rare}' if rare else ''}; labels {self.labels}"
        )


@locked_output("out", "mock")
def make_mock(out: str | Path | Location, *, config: MockConfig | None = None) -> MockSummary:
    """Write a mock catalogue of ``config.n`` sources to ``out``, in ``config.format``.

    Parameters
    ----------
    out
        The store to write ('store'), or the directory of bulk files ('dr3-bulk').
    config
        Everything else: size, seed, format, chunking, populations, defects, ``overwrite``
        (which replaces only an XP store, or the bulk files of an earlier mock: the one output
        rule of :mod:`xpbatch.storage.manifest`).

    Returns
    -------
    MockSummary
        What was written, with the rare populations counted from the labels.

    Examples
    --------
    >>> summary = make_mock("mock.zarr", config=MockConfig(n=10_000, seed=1))  # doctest: +SKIP
    >>> summary.rows, summary.labels.name  # doctest: +SKIP
    (10000, 'mock.zarr.labels.parquet')
    """
    config = config or MockConfig()
    place = real_place(out)
    bulk = config.format != "store"
    if isinstance(place, Location):
        if bulk:
            raise ConfigError(
                f"mock --format {config.format} writes local files for `xpbatch ingest` to read; "
                f"got {place}: give a local directory, or --format store for object storage"
            )
        return _mock_store_at(place, config)
    out = place
    record: RunRecord = JsonRecord.inside(out) if bulk else ZarrRecord(out)
    run = RunManifest(out, kind=BULK_KIND if bulk else STORE_KIND, record=record)
    exists = any(out.glob(f"{dr3.XP_PREFIX}*")) if bulk and out.is_dir() else None
    run.claim(resume=False, overwrite=config.overwrite, exists=exists, remove=lambda: None)
    if not bulk:  # the writer replaces the store (its overwrite)
        path = out
        write_store(out, config)
        files: tuple[Path | Location, ...] = (path,)
        written = [path]
    else:
        path = out
        run.begin(n=config.n, seed=config.seed)  # first: an interrupted mock is ours to replace
        files = tuple(write_bulk(path, config))
        plan = bulk_file_plan(config.n, config.rows_per_file)
        written = [path / name for file in plan for name in (file.xp_name, file.gaia_source_name)]
        run.mark_complete()
        written += [path / dr3.MD5_MANIFEST, JsonRecord.inside(path).where]
    labels = as_location(labels_path(path)).path
    return MockSummary(
        path=path,
        format=config.format,
        rows=config.n,
        files=files,
        bytes_on_disk=sum(_size(p) for p in [*written, labels]),
        rare_counts=_rare_counts(labels),
        labels=labels,
    )


def _mock_store_at(out: Location, config: MockConfig) -> MockSummary:
    """:func:`make_mock` of a store on object storage (under its lease; written in place, its
    ``complete`` attribute last: no rename there)."""
    run = RunManifest(out, kind=STORE_KIND, record=ZarrRecord(out))
    run.claim(resume=False, overwrite=config.overwrite, remove=lambda: None)
    write_store(out, config)
    labels = as_location(labels_path(out))
    return MockSummary(
        path=out,
        format=config.format,
        rows=config.n,
        files=(out,),
        bytes_on_disk=zarr_arrays.nbytes(out) + labels.size(),
        rare_counts=_rare_counts(labels),
        labels=labels,
    )


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _rare_counts(labels: Path | Location) -> dict[str, int]:
    """Rows of each rare population in a labels table, read a batch at a time (memory flat)."""
    import pyarrow.parquet as pq

    counts = np.zeros(len(POPULATIONS), np.int64)
    with contextlib.closing(as_location(labels).open_reader()) as f:
        for batch in pq.ParquetFile(f).iter_batches(columns=["population"]):
            column = batch.column(0).to_numpy()
            counts += np.bincount(column, minlength=len(POPULATIONS))
    return {name: int(count) for name, count in zip(POPULATIONS[1:], counts[1:], strict=True)}
