"""The ingest run: XP files (or an in-memory table) -> a complete XP store.

1. one task per input file (:func:`~xpbatch.ingest.parts.ingest_file`) writes its part into
   ``<output>.parts/``; a rerun reuses the finished ones;
2. the parts are laid end to end in source_id order and each store chunk is written by one task;
3. the store is finalized (order and completeness checked) under ``<output>.partial`` and only
   then renamed to ``<output>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpbatch import schema
from xpbatch.config import IngestConfig
from xpbatch.dr3 import GAIA_SOURCE_GLOB, GAIA_SOURCE_NAME, XP_GLOB, XP_NAME
from xpbatch.errors import ConfigError, ParseError
from xpbatch.ingest.common import ReadRequest
from xpbatch.ingest.parts import (
    FileTask,
    PartInfo,
    chunk_pieces,
    ingest_file,
    merge_overlapping,
    write_chunk,
)
from xpbatch.outputs import locked_output
from xpbatch.partitions import range_of_file_name, ranges_from_file_names
from xpbatch.paths import PathLike
from xpbatch.store import XPStoreWriter, check_overwritable

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
    """Files as given, with each directory replaced by its files matching ``pattern``, sorted.

    Lets ``xpbatch ingest dr3/ --gaia-source gaia_source/`` name the 3386 DR3 files without
    overflowing the shell's argument list.
    """
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(str(p) for p in path.glob(pattern) if p.is_file())
            if not found:
                raise ParseError(f"{path}: the directory has no {pattern} files")
            files.extend(found)
        else:
            files.append(str(path))
    return files


def _part_dir(staging: Path, xp_file: str) -> Path:
    key = hashlib.sha256(str(Path(xp_file).resolve()).encode()).hexdigest()[:12]
    return staging / f"{Path(xp_file).name}-{key}"


def _run(client: Client | None, func: Callable[..., Any], *iterables: Sequence[Any]) -> list[Any]:
    """``map(func, *iterables)`` serially or on the cluster; the first failure is re-raised."""
    if client is None:
        return [func(*args) for args in zip(*iterables, strict=True)]
    futures = client.map(func, *iterables, pure=False)
    try:
        return client.gather(futures)
    finally:
        client.cancel(futures)


@locked_output("out", "ingest")
def ingest_files(
    xp_files: Sequence[PathLike],
    gaia_source_files: Sequence[PathLike],
    out: PathLike,
    *,
    client: Client | None = None,
    config: IngestConfig = IngestConfig(),  # noqa: B008 - frozen, so a shared default is safe
) -> Path:
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
        The store to write (Zarr v3 directory).
    client
        A ``distributed.Client`` to parse files and write chunks in parallel; None runs serially.
        Workers read and write ``<out>.parts/`` and ``out``: on several machines both must be
        on a filesystem they share.
    config
        Options; see :class:`~xpbatch.config.IngestConfig`.

    Returns
    -------
    pathlib.Path
        ``out``, complete. A failed ingest leaves ``out`` untouched; rerunning it reuses the
        files already parsed (``<out>.parts/``).

    Examples
    --------
    >>> ingest_files(["XpContinuousMeanSpectrum_000000-003111.csv.gz"],
    ...              ["GaiaSource_000000-003111.csv.gz"], "dr3.zarr")  # doctest: +SKIP
    PosixPath('dr3.zarr')
    """
    out = Path(out)
    check_overwritable(out, config.overwrite)  # out itself is only replaced once all went well
    xp_files = expand_inputs(xp_files, XP_GLOB)
    pairs = pair_files(xp_files, expand_inputs(gaia_source_files, GAIA_SOURCE_GLOB))
    staging = out.with_name(out.name + ".parts")
    scalars = tuple(schema.DR3_SCALARS) if config.scalars is None else config.scalars
    request = ReadRequest(
        scalars, config.with_correlations, config.on_bad_row, config.verify_md5, config.columns
    )
    tasks = [FileTask(xp, gs, str(_part_dir(staging, xp)), request) for xp, gs in pairs.items()]
    logger.info("parsing %d XP file(s) into %s", len(tasks), staging)
    parts: list[PartInfo] = _run(client, ingest_file, tasks)
    ordered = merge_overlapping(parts, staging)
    present = {name for part in parts for name in part.optional}
    kept = [name for name in schema.DR3_SCALARS if name in present]  # what any input file had
    n_rows = sum(p.rows for p in ordered)
    partial = out.with_name(out.name + ".partial")
    writer = XPStoreWriter.create(
        partial,
        n_rows,
        chunk_rows=config.chunk_rows,
        attrs={"ingest_options": {"on_bad_row": config.on_bad_row}},
        scalars=kept,
        with_correlations=config.with_correlations,
        with_positions=schema.RA in present,
        overwrite=True,  # a leftover .partial is ours, from a failed run
    )
    regions = writer.chunk_slices()
    chunks = chunk_pieces(ordered, regions)
    _run(client, write_chunk, [writer] * len(chunks), [r.start for r in regions], chunks)
    writer.finalize(extra_attrs={**_provenance(parts), **_partition_attrs(xp_files)})
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    if not config.keep_parts:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s: %d rows from %d file(s)", out, n_rows, len(tasks))
    return out


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
    out: PathLike,
    *,
    gaia_source_files: Sequence[PathLike] = (),
    client: Client | None = None,
    config: IngestConfig = IngestConfig(),  # noqa: B008 - frozen, so a shared default is safe
) -> Path:
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
    pathlib.Path
        ``out``, complete.

    Examples
    --------
    >>> from astroquery.gaia import Gaia  # doctest: +SKIP
    >>> tables = Gaia.load_data([5405570973190252288], retrieval_type="XP_CONTINUOUS",
    ...                         data_structure="RAW", dump_to_file=False)  # doctest: +SKIP
    >>> ingest_table(list(tables.values())[0][0], "xp.zarr",
    ...              gaia_source_files=["gaia_source.csv"])  # doctest: +SKIP
    PosixPath('xp.zarr')
    """
    import pyarrow.parquet as pq

    from xpbatch.ingest.table import arrow_table

    out = Path(out)
    check_overwritable(out, config.overwrite)
    staged = out.with_name(out.name + ".table.parquet")
    pq.write_table(arrow_table(table), staged)
    try:
        return ingest_files([staged], gaia_source_files, out, client=client, config=config)
    finally:
        staged.unlink(missing_ok=True)
