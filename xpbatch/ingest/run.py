"""The ingest run: XP files (or an in-memory table) -> a complete XP store.

1. one task per input file (:func:`~xpbatch.ingest.parts.ingest_file`) writes its part into
   ``<output>.parts/``; ``--resume`` reuses the finished ones (the run's manifest,
   ``<output>.parts/_xpbatch_run.json`` (:mod:`xpbatch.storage.manifest`), records its inputs
   and options, which must match; a finished store records them in its attributes);
2. the parts are laid end to end in source_id order and each store chunk is written by one task;
3. the store is finalized (order and completeness checked) under ``<output>.partial`` and only
   then renamed to ``<output>``.

On object storage (``-o s3://bucket/store.zarr``) there is no rename: the parts are objects
under ``<output>.parts/`` (each with its ``done.json`` last), the store is written in place
under the output's lease and is complete only once its ``complete`` attribute is written, last;
readers refuse it before. ``--overwrite`` there removes the earlier store (only one xpbatch
wrote) when the run starts, not once the new one is complete.

The tasks of steps 1 and 2 go through :class:`xpbatch.runtime.executor.Executor` (bounded,
retried on a cluster; a malformed file is reported at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpbatch import schema
from xpbatch.config import IngestConfig, result_options
from xpbatch.dr3 import GAIA_SOURCE_GLOB, GAIA_SOURCE_NAME, XP_GLOB, XP_NAME
from xpbatch.errors import ConfigError, ParseError, XPBatchError
from xpbatch.ingest.common import ReadRequest
from xpbatch.ingest.parts import (
    FileTask,
    PartInfo,
    chunk_pieces,
    ingest_file,
    is_finished,
    merge_overlapping,
    write_chunk,
)
from xpbatch.runtime.executor import Executor, LazyClient, Progress, storage_credentials
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location, as_location, is_url
from xpbatch.storage.manifest import (
    COMPLETE,
    FINGERPRINT,
    KIND,
    STORE_KIND,
    RunManifest,
    RunRecord,
    ZarrRecord,
    real_place,
    record_inside,
)
from xpbatch.storage.outputs import check_lock, locked_output
from xpbatch.storage.partitions import range_of_file_name, ranges_from_file_names
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import Place
from xpbatch.store.xp_store import XPStoreWriter

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

MAX_RECORDED_BAD_ROWS = 10_000
"""At most this many skipped rows are listed in the store's attributes (all are counted)."""


def pair_files(
    xp_files: Sequence[PathLike], gaia_source_files: Sequence[PathLike]
) -> dict[str, tuple[str, ...]]:
    """The gaia_source files to join with each XP file.

    DR3 bulk names pair by suffix (``XpContinuousMeanSpectrum_000000-003111.csv.gz`` with
    ``GaiaSource_000000-003111.csv.gz``); otherwise every XP file joins against all given files.
    Without companions each XP file must carry its own G flux or magnitude (checked per file).
    """
    for path in [*xp_files, *gaia_source_files]:
        if not Path(path).is_file():
            raise ParseError(
                f"{path}: file not found" if not Path(path).exists() else f"{path}: not a file"
            )
    for path in map(str, xp_files):
        if GAIA_SOURCE_NAME.match(Path(path).name):
            raise ParseError(
                f"{path} is a gaia_source file, given as an XP file: --gaia-source takes one path "
                "per use (a shell glob after it leaves the other files as XP inputs); repeat it "
                "(--gaia-source A --gaia-source B), or give their directory or a quoted glob "
                "(--gaia-source 'gaia/GaiaSource_*.csv.gz')"
            )
    by_suffix: dict[str, str] = {}
    for path in map(str, gaia_source_files):
        match = GAIA_SOURCE_NAME.match(Path(path).name)
        if match:
            by_suffix[match.group(1)] = path
    pairs: dict[str, tuple[str, ...]] = {}
    for path in map(str, xp_files):
        match = XP_NAME.match(Path(path).name)
        if match and by_suffix:
            if match.group(1) not in by_suffix:
                raise ParseError(
                    f"{path}: its gaia_source file GaiaSource_{match.group(1)}.csv.gz is not among "
                    f"the --gaia-source files; add it (the G flux of this file's sources is there)"
                )
            pairs[path] = (by_suffix[match.group(1)],)
        else:
            pairs[path] = tuple(map(str, gaia_source_files))
    return pairs


def expand_inputs(paths: Sequence[PathLike], pattern: str) -> list[str]:
    """Files as given, with each directory replaced by its files matching ``pattern`` and each
    glob (``'gaia/*.csv'``, quoted so the shell leaves it) by the files it matches, sorted.

    Lets ``xpbatch ingest dr3/ --gaia-source gaia_source/`` name the 3386 DR3 files without
    overflowing the shell's argument list.
    """
    files: list[str] = []
    for path in map(Path, paths):
        if not path.exists() and set("*?[") & set(str(path)):
            found = sorted(p for p in glob.glob(str(path)) if Path(p).is_file())
            if not found:
                raise ParseError(f"{path}: no file matches this pattern")
            files.extend(found)
        elif path.is_dir():
            found = sorted(str(p) for p in path.glob(pattern) if p.is_file())
            if not found:
                raise ParseError(f"{path}: the directory has no {pattern} files")
            files.extend(found)
        else:
            files.append(str(path))
    return files


def _part_dir(staging: Place, xp_file: str) -> str | Location:
    key = hashlib.sha256(str(Path(xp_file).resolve()).encode()).hexdigest()[:12]
    part = staging / f"{Path(xp_file).name}-{key}"
    return part if isinstance(part, Location) else str(part)


def _beside(out: Place, suffix: str) -> Place:
    """``<out><suffix>`` beside ``out`` (its parts, its unfinished local store)."""
    if isinstance(out, Location):
        return out.sibling(out.name + suffix)
    return out.with_name(out.name + suffix)


SHOWN_BAD_ROWS = 5
"""Skipped rows that the summary lists (all are counted; the store lists up to 10,000)."""


@dataclasses.dataclass(frozen=True)
class IngestSummary:
    """What :func:`ingest_files` did; ``str()`` is what ``xpbatch ingest`` prints."""

    path: Path | Location
    rows: int
    """Rows in the store (every parsed row; skipped malformed rows are not rows)."""
    xp_files: int
    files_reused: int
    """XP files whose parts an earlier run had finished (``--resume``); not parsed again."""
    skipped_rows: int
    """Malformed rows left out (``on_bad_row='skip'``), all recorded in the store's attributes."""
    skipped_examples: tuple[dict[str, Any], ...]
    """The first few skipped rows: file, line and reason."""
    output_bytes: int
    wall_s: float
    checks: str
    """What was checked before the store was renamed into place (marked complete)."""

    def __str__(self) -> str:
        reused = f" ({self.files_reused:,} parsed before, reused)" if self.files_reused else ""
        lines = [
            f"store          {self.path}",
            f"rows           {self.rows:,} from {self.xp_files:,} XP file(s){reused}",
            f"rows skipped   {self.skipped_rows:,} malformed",
            *(
                f"  {row['file']}, line {row['line']}: {row['reason']}"
                for row in self.skipped_examples
            ),
            f"wall time      {self.wall_s:.1f} s",
            f"output size    {self.output_bytes / 1e6:,.1f} MB",
            f"checks         {self.checks}",
        ]
        return "\n".join(lines)


def _fingerprint(
    xp_files: Sequence[str], gaia_source_files: Sequence[str], config: IngestConfig
) -> dict[str, Any]:
    """What an interrupted ingest must match to be resumed: its inputs and the options that
    shape the store (not keep_parts or verify_md5)."""
    options = result_options(config)
    for name in ("keep_parts", "verify_md5"):
        options.pop(name)
    return {
        "xp_files": sorted(str(Path(f).resolve()) for f in xp_files),
        "gaia_source_files": sorted(str(Path(f).resolve()) for f in gaia_source_files),
        **options,
    }


class _IngestRecord(RunRecord):
    """An ingest's manifest: in ``<output>.parts/`` while it runs, the store's own attributes
    once it is complete (a store xpbatch wrote carries its schema version; one written in place
    on object storage says whether it is complete)."""

    where: Path | Location

    def __init__(self, out: Place, staging: Place) -> None:
        self.out, self.staging = out, staging
        self.json = record_inside(staging)
        self.where = self.json.where

    def read(self) -> dict[str, Any] | None:
        store = ZarrRecord(self.out, fingerprint=schema.STORE_ATTR_INGEST_OPTIONS).read()
        if self.out.exists() and (store or {}).get(KIND) != STORE_KIND:
            return store or {KIND: None}
        if self.staging.exists():
            return self.json.read() or {KIND: STORE_KIND, FINGERPRINT: {}}
        return None if store is None else {**store, COMPLETE: store.get(COMPLETE) is not False}

    def write(self, fields: Mapping[str, Any]) -> None:
        self.json.write(fields)


def _claim(
    out: Place, staging: Place, build: Place, fingerprint: dict[str, Any], config: IngestConfig
) -> RunManifest:
    """The ingest's run manifest, the store and its staging parts claimed under the one output
    rule (:mod:`xpbatch.storage.manifest`); ``build`` is where the store is built."""
    in_place = zarr_arrays.same_place(build, out)
    if out.exists() and not (in_place and staging.exists()):
        store = ZarrRecord(out).read()
        complete = store is not None and store.get(COMPLETE) is not False
        found = "a complete XP store" if complete else "an unfinished XP store"
        found = found if store is not None else "not a Zarr store"
    else:
        n_parts = _finished_parts(staging)
        found = f"an interrupted ingest, {n_parts} file(s) parsed in {staging}"
        if n_parts == 0 and (in_place or not build.exists()) and _is_ours(staging):
            # e.g. every file was refused: nothing of value is lost, so a corrected rerun (other
            # inputs or options) starts afresh instead of asking for --resume or --overwrite
            logger.info("%s: an earlier ingest parsed no file; starting afresh", staging)
            zarr_arrays.remove_tree(staging)
    run = RunManifest(
        out, kind=STORE_KIND, record=_IngestRecord(out, staging), fingerprint=fingerprint
    )
    run.claim(
        resume=config.resume,
        overwrite=config.overwrite,
        exists=out.exists() or staging.exists() or build.exists(),
        found=found,
        remove=functools.partial(_remove_staging, staging, build),
    )
    return run


def _finished_parts(staging: Place) -> int:
    """How many parts an earlier run finished in ``staging``."""
    if isinstance(staging, Location):
        return sum(1 for name in staging.list() if name.endswith("/done.json"))
    return sum(1 for p in staging.glob("*/done.json")) if staging.is_dir() else 0


def _is_ours(staging: Place) -> bool:
    """Whether ``staging`` holds an ingest's run manifest (and so is ours to remove)."""
    return (record_inside(staging).read() or {}).get(KIND) == STORE_KIND


def _remove_staging(staging: Place, build: Place) -> None:
    """What ``--overwrite`` removes at once: an earlier run's parts and unfinished store. A
    local store is replaced only once the new one is complete; one on object storage, built in
    place, now."""
    zarr_arrays.remove_tree(staging)
    zarr_arrays.remove_tree(build)


def _store_attrs(path: Place) -> dict[str, Any]:
    """The attributes of the Zarr group at ``path``; {} when it is not one."""
    import zarr

    try:
        return zarr.open_group(zarr_arrays.zarr_target(path), mode="r").attrs.asdict()
    except (OSError, ValueError, zarr.errors.BaseZarrError):
        return {}


def _write_region(writer: XPStoreWriter, region: tuple[int, list[Any]]) -> int:
    """Write one store chunk (a task): ``region`` is (first row, pieces of parts)."""
    return write_chunk(writer, *region)


_FATAL = (XPBatchError,)
"""Errors of a malformed or unreadable input: reported at once, a rerun would not mend them."""


@locked_output("out", "ingest")
def ingest_files(
    xp_files: Sequence[PathLike],
    gaia_source_files: Sequence[PathLike],
    out: PathLike | Location,
    *,
    client: Client | LazyClient | None = None,
    config: IngestConfig = IngestConfig(),  # noqa: B008 - frozen, so a shared default is safe
) -> IngestSummary:
    """Ingest DR3 XP continuous-spectrum files into an XP store.

    Parameters
    ----------
    xp_files
        XP files in any supported encoding (:data:`xpbatch.ingest.reader.FORMATS`: bulk
        ``XpContinuousMeanSpectrum_*.csv.gz``, archive CSV/ECSV/VOTable/FITS, DPAC AVRO,
        Parquet, zip bundles); a directory stands for its ``XpContinuousMeanSpectrum_*`` files.
    gaia_source_files
        Companions with source_id and phot_g_mean_flux/phot_g_mean_mag, optionally ra/dec
        (CSV(.gz) or Parquet); a directory stands for its ``GaiaSource_*`` files. May be empty
        when every XP file carries phot_g_mean_flux or phot_g_mean_mag itself.
    out
        The store to write: a Zarr v3 directory, or an ``s3://bucket/store.zarr`` URL (written
        in place, its parts beside it; see the module docstring).
    client
        A ``distributed.Client`` to parse files and write chunks in parallel; None runs serially.
        A :class:`~xpbatch.runtime.executor.LazyClient` not yet started is started after the
        inputs are checked, the output claimed and the first file parsed here. Workers read and
        write ``<out>.parts/`` and ``out``: on several machines both must be on a filesystem
        they share, or on object storage.
    config
        Options; see :class:`~xpbatch.config.IngestConfig`.

    Returns
    -------
    IngestSummary
        Rows, files (reused ones counted), skipped rows, size, wall time and the checks run;
        ``out`` is complete. A failed ingest leaves ``out`` untouched; rerunning it with
        ``config.resume`` reuses the files already parsed (``<out>.parts/``).

    Raises
    ------
    ParseError, ChecksumError
        An input file is malformed or damaged (named with its line), at once.
    OutputExistsError, ResumeRefusedError
        ``out`` (or an interrupted run's ``<out>.parts/``) exists without ``resume`` or
        ``overwrite``, or ``resume`` was asked for with other inputs or options.

    Examples
    --------
    >>> summary = ingest_files(["XpContinuousMeanSpectrum_000000-003111.csv.gz"],
    ...                        ["GaiaSource_000000-003111.csv.gz"], "dr3.zarr")  # doctest: +SKIP
    >>> summary.rows  # doctest: +SKIP
    """
    return _ingest_files(xp_files, gaia_source_files, out, client=client, config=config)


def _ingest_files(
    xp_files: Sequence[PathLike],
    gaia_source_files: Sequence[PathLike],
    out: PathLike | Location,
    *,
    client: Client | LazyClient | None,
    config: IngestConfig,
) -> IngestSummary:
    """:func:`ingest_files` without taking the lock (its caller holds it)."""
    started = time.perf_counter()
    place = real_place(out)
    xp_files = expand_inputs(xp_files, XP_GLOB)
    gaia_source_files = expand_inputs(gaia_source_files, GAIA_SOURCE_GLOB)
    pairs = pair_files(xp_files, gaia_source_files)
    staging = _beside(place, ".parts")
    build = place if isinstance(place, Location) else _beside(place, ".partial")
    interrupted = staging.exists()
    fingerprint = _fingerprint(xp_files, gaia_source_files, config)
    run = _claim(place, staging, build, fingerprint, config)
    if run.complete and not interrupted:  # the store, from these inputs and options
        zarr_arrays.remove_tree(staging)
        return _summary(place, len(pairs), len(pairs), started, checks="none (already complete)")
    run.begin()
    scalars = tuple(schema.DR3_SCALARS) if config.scalars is None else config.scalars
    request = ReadRequest(
        scalars, config.with_correlations, config.on_bad_row, config.verify_md5, config.columns
    )
    tasks = [FileTask(xp, gs, _part_dir(staging, xp), request) for xp, gs in pairs.items()]
    plan = run.plan(tasks, is_finished)
    logger.info("parsing %d of %d XP file(s) into %s", len(plan.todo), len(tasks), staging)
    executor = Executor.of(client)  # without a cluster, one file at a time
    with storage_credentials(executor, place):
        return _build(tasks, plan, run, xp_files, place, staging, build, executor, config, started)


def _build(
    tasks: list[FileTask],
    plan: Any,
    run: RunManifest,
    xp_files: list[str],
    out: Place,
    staging: Place,
    build: Place,
    executor: Executor,
    config: IngestConfig,
    started: float,
) -> IngestSummary:
    """Parse the files left, lay out the store at ``build``, write its chunks, finalize it and
    put it at ``out`` (:func:`_ingest_files` once the output is claimed)."""
    client = executor.client
    here = _parse_before_cluster(plan.todo, client)
    todo = plan.todo[len(here) :]
    progress = Progress(
        len(tasks),
        desc="ingest",
        unit="files",
        initial=len(tasks) - len(todo),
        enabled=config.progress_bar,
    )
    parsed = executor.map(
        ingest_file, todo, name="xpbatch-ingest-parse", fatal=_FATAL, progress=progress
    )
    by_dir = {part.part_dir: part for part in [*here, *parsed]}
    parts = [by_dir.get(t.part_dir) or PartInfo.load(t.part_dir) for t in tasks]  # in order
    ordered = merge_overlapping(parts, staging)
    present = {name for part in parts for name in part.optional}
    kept = [name for name in schema.DR3_SCALARS if name in present]  # what any input file had
    n_rows = sum(p.rows for p in ordered)
    writer = XPStoreWriter.create(
        build,
        n_rows,
        chunk_rows=config.chunk_rows,
        attrs={schema.STORE_ATTR_INGEST_OPTIONS: dict(run.fingerprint or {})},
        scalars=kept,
        with_correlations=config.with_correlations,
        with_positions=schema.RA in present,
        overwrite=True,  # a leftover .partial (or unfinished store in place) is ours
    )
    regions = writer.chunk_slices()
    chunks = chunk_pieces(ordered, regions)
    write = functools.partial(_write_region, writer)
    starts = [r.start for r in regions]
    for _ in executor.map(
        write, list(zip(starts, chunks, strict=True)), name="xpbatch-ingest-write", fatal=_FATAL
    ):
        pass
    check_lock(out)  # never mark complete what another writer may have touched
    writer.finalize(extra_attrs={**_provenance(parts), **_partition_attrs(xp_files)})
    if isinstance(build, Path) and isinstance(out, Path):
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)
    run.mark_complete(rows=n_rows)
    if not config.keep_parts:
        with contextlib.suppress(OSError):
            zarr_arrays.remove_tree(staging)
    logger.info("wrote %s: %d rows from %d file(s)", out, n_rows, len(tasks))
    return _summary(
        out,
        len(tasks),
        len(plan.done),
        started,
        checks="every chunk written, source_id ascending and unique (before the store was "
        + ("marked complete)" if isinstance(out, Location) else "renamed into place)"),
    )


def _parse_before_cluster(todo: Sequence[FileTask], client: Any) -> list[PartInfo]:
    """The first file's part, parsed in this process when the cluster is yet to start.

    A file every run would refuse (no G flux, an unknown format, a missing column) is then
    reported in seconds, before a cluster starts for the other files.
    """
    if not todo or not isinstance(client, LazyClient) or client.started:
        return []
    return [ingest_file(todo[0])]


def _summary(
    out: Place, xp_files: int, reused: int, started: float, *, checks: str
) -> IngestSummary:
    """The summary of the store at ``out`` (its attributes count rows and skipped rows)."""
    attrs = _store_attrs(out)
    return IngestSummary(
        path=out,
        rows=int(attrs[schema.STORE_ATTR_ROW_COUNT]),
        xp_files=xp_files,
        files_reused=reused,
        skipped_rows=int(attrs[schema.STORE_ATTR_SKIPPED_ROW_COUNT]),
        skipped_examples=tuple(attrs[schema.STORE_ATTR_SKIPPED_ROWS][:SHOWN_BAD_ROWS]),
        output_bytes=zarr_arrays.nbytes(out),
        wall_s=time.perf_counter() - started,
        checks=checks,
    )


def _partition_attrs(xp_files: Sequence[str]) -> dict[str, Any]:
    """The DR3 partition ranges of the XP files, when every one is named like a bulk file.

    Recorded so that ``export-parquet`` can split the catalogue like the files it came from.
    """
    names = [Path(path).name for path in xp_files]
    if not all(range_of_file_name(name) for name in names):
        return {}
    try:
        ranges = ranges_from_file_names(names, origin="the XP file names")
    except ConfigError as error:  # overlapping names: not a DR3 partition, so none recorded
        logger.warning("no partition ranges recorded in the store: %s", error)
        return {}
    return {schema.STORE_ATTR_PARTITION_RANGES: ranges.to_list()}


def _provenance(parts: list[PartInfo]) -> dict[str, Any]:
    """Store attributes: input files with checksums and the skipped rows."""
    files: dict[str, dict[str, Any]] = {}
    for part in parts:
        for f in part.files:
            files.setdefault(f["path"], f)
    bad = [dataclasses.asdict(b) for p in parts for b in p.bad_rows]
    return {
        schema.STORE_ATTR_INPUT_FILES: list(files.values()),
        schema.STORE_ATTR_SKIPPED_ROW_COUNT: len(bad),
        schema.STORE_ATTR_SKIPPED_ROWS: bad[:MAX_RECORDED_BAD_ROWS],
    }


@locked_output("out", "ingest")
def ingest_table(
    table: Any,
    out: PathLike | Location,
    *,
    gaia_source_files: Sequence[PathLike] = (),
    client: Client | None = None,
    config: IngestConfig = IngestConfig(),  # noqa: B008 - frozen, so a shared default is safe
) -> IngestSummary:
    """Build an XP store from an in-memory table of XP spectra.

    The table goes through the same reader as the files: it is written as Parquet beside
    ``out`` (``<out>.table.parquet``, removed afterwards) and ingested from there.

    Parameters
    ----------
    table
        An astropy Table (what ``Gaia.load_data(..., dump_to_file=False)`` returns), a pandas
        DataFrame or a pyarrow Table, in any layout :func:`ingest_files` reads.
    out
        The store to write.
    gaia_source_files, client, config
        As for :func:`ingest_files`.

    Returns
    -------
    IngestSummary
        As for :func:`ingest_files`.

    Examples
    --------
    >>> from astroquery.gaia import Gaia  # doctest: +SKIP
    >>> tables = Gaia.load_data([5405570973190252288], retrieval_type="XP_CONTINUOUS",
    ...                         data_structure="RAW", dump_to_file=False)  # doctest: +SKIP
    >>> ingest_table(list(tables.values())[0][0], "xp.zarr",
    ...              gaia_source_files=["gaia_source.csv"])  # doctest: +SKIP
    """
    import pyarrow.parquet as pq

    from xpbatch.ingest.table import arrow_table

    with contextlib.ExitStack() as stack:
        if is_url(out):  # no local place beside it: a temporary directory
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            staged = Path(tmp, as_location(out).name + ".table.parquet")
        else:
            local = as_location(out).path
            staged = local.with_name(local.name + ".table.parquet")
        pq.write_table(arrow_table(table), staged)
        try:
            return _ingest_files([staged], gaia_source_files, out, client=client, config=config)
        finally:
            staged.unlink(missing_ok=True)
