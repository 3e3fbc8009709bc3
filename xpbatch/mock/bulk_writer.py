"""Write a mock catalogue as Gaia DR3 bulk files (XpContinuousMeanSpectrum + GaiaSource .csv.gz).

File by file, each under a temporary name until complete, in threads; the ``_MD5SUM.txt``
manifest last, and the labels table beside them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from xpbatch import __version__, dr3
from xpbatch.config import MOCK_ROWS_PER_FILE, MockConfig
from xpbatch.errors import OutputExistsError
from xpbatch.mock.ecsv import (
    GAIA_SOURCE_COLUMNS,
    XP_COLUMNS,
    ecsv_header,
    gaia_source_text,
    xp_text,
)
from xpbatch.mock.labels import LABELS_FILE, LabelsWriter
from xpbatch.mock.plan import BulkFile, bulk_file_plan
from xpbatch.mock.rows import check_size, row_batches
from xpbatch.runtime.executor import Executor
from xpbatch.storage.paths import atomic_path

logger = logging.getLogger(__name__)

TEXT_BATCH = 1024  # rows formatted at once (~40 MB of text)
try:  # ISA-L deflates several times faster than zlib at the same ratio: compression dominates.
    from isal import igzip as _gzip

    _GZIP_LEVEL = 2
except ImportError:  # pragma: no cover - the plain zlib path is exercised where isal is absent
    import gzip as _gzip  # type: ignore[no-redef]

    _GZIP_LEVEL = 1  # zlib's fastest: 2.3x smaller; level 6 gives 2.6x at 1/6 the speed


class _HashingWriter(io.RawIOBase):
    """A binary file that also computes the MD5 of what is written to it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.md5 = hashlib.md5()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.md5.update(data)
        return self.raw.write(data)


class _GzipOutput:
    """A .csv.gz written under a temporary name, published (renamed) only when complete.

    The gzip header carries no name and no time, so the same rows give the same bytes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._partial = path.with_name(path.name + ".partial")
        self._raw = open(self._partial, "wb")  # noqa: SIM115 - closed in close()
        self._hashing = _HashingWriter(self._raw)
        self._gzip = _gzip.GzipFile(
            filename="", mode="wb", fileobj=self._hashing, compresslevel=_GZIP_LEVEL, mtime=0
        )

    def write(self, data: bytes | memoryview) -> None:
        self._gzip.write(data)

    def close(self) -> str:
        """Finish the file, publish it and return its MD5."""
        self._gzip.close()
        self._raw.close()
        os.replace(self._partial, self.path)
        return self._hashing.md5.hexdigest()

    def abandon(self) -> None:
        """Remove the unfinished file after an error."""
        self._gzip.close()
        self._raw.close()
        self._partial.unlink(missing_ok=True)


def _write_bulk_pair(
    out_dir: Path, file: BulkFile, n: int, seed: int, config: MockConfig
) -> tuple[dict[str, str], pa.Table]:
    """Write one XpContinuousMeanSpectrum file and its GaiaSource companion.

    Returns the MD5 of each file by name, and the labels of the file's rows.
    """
    generator = f"xpbatch {__version__} mock (synthetic data), n={n}, seed={seed}"
    outputs = [
        (_GzipOutput(out_dir / file.xp_name), XP_COLUMNS, xp_text),
        (_GzipOutput(out_dir / file.gaia_source_name), GAIA_SOURCE_COLUMNS, gaia_source_text),
    ]
    labels = []
    try:
        for output, columns, _ in outputs:
            output.write(ecsv_header(columns, generator))
        for rows in row_batches(
            n, file.start, file.stop, seed=seed, config=config, batch_rows=TEXT_BATCH
        ):
            for output, _, text in outputs:
                output.write(text(rows))
            labels.append(rows.labels_table())
    except BaseException:
        for output, _, _ in outputs:
            output.abandon()
        raise
    checksums = {output.path.name: output.close() for output, _, _ in outputs}
    logger.info("mock bulk: wrote %s (%d rows)", file.xp_name, file.stop - file.start)
    return checksums, pa.concat_tables(labels)


_OUR_FILES = (
    f"{dr3.XP_GLOB}.csv.gz*",
    f"{dr3.GAIA_SOURCE_GLOB}.csv.gz*",
    dr3.MD5_MANIFEST,
    LABELS_FILE,
)


def _prepare_bulk_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``, or clear our files from it when ``overwrite`` (nothing else)."""
    ours = [p for pattern in _OUR_FILES for p in out_dir.glob(pattern)]
    if ours and not overwrite:
        raise OutputExistsError(
            f"{out_dir} already holds bulk files ({ours[0].name}, ...); pass overwrite=True "
            "(--overwrite) to replace them, or choose another directory"
        )
    for path in ours:
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def write_mock_dr3_bulk(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    rows_per_file: int = MOCK_ROWS_PER_FILE,
    config: MockConfig | None = None,
    overwrite: bool = False,
    workers: int = 1,
) -> list[Path]:
    """Write an ``n``-row mock catalogue as Gaia DR3 bulk files, file by file (memory flat).

    Writes ``XpContinuousMeanSpectrum_<lo>-<hi>.csv.gz`` files in the format of the DR3 CDN
    (ECSV ``#`` header, JSON arrays in double quotes, ``null`` in every field of a missing
    band, the 1485 correlations of each band), same-suffix ``GaiaSource_<lo>-<hi>.csv.gz``
    companions (source_id, ra, dec, phot_g_mean_flux, phot_g_mean_flux_error,
    phot_g_mean_mag; ``null`` where missing), the ``_MD5SUM.txt`` manifest (written last) and
    ``mock_labels.parquet``.

    The rows are exactly those of :func:`write_mock_store` with the same ``(n, seed, config)``:
    coefficients are float32 values written as float64 text, errors and magnitudes as float32
    text, fluxes as float64 text, each with the shortest decimal that reads back exactly, so
    ingesting these files gives the same store. NaN and infinite coefficients are written
    ``NaN`` and ``Infinity`` (as Python's json module does).

    Parameters
    ----------
    out_dir
        Directory for the files (created if needed).
    n
        Number of sources.
    seed
        Non-negative seed, as for :func:`write_mock_store`.
    rows_per_file
        Rows per file, about: files hold whole HEALPix level-8 pixels.
    config
        Populations and defect fractions (:meth:`xpbatch.config.MockConfig.row_settings`);
        the arguments here replace its other fields.
    overwrite
        Replace bulk files already in ``out_dir`` (other files are left alone).
    workers
        Files written at once, by threads (compression and formatting release the GIL):
        about one per free core.

    Returns
    -------
    list of pathlib.Path
        The XpContinuousMeanSpectrum files, in source_id order.

    Examples
    --------
    >>> files = write_mock_dr3_bulk("bulk/", 100_000, rows_per_file=20_000)  # doctest: +SKIP
    >>> [f.name for f in files][:1]  # doctest: +SKIP
    ['XpContinuousMeanSpectrum_000000-236841.csv.gz']
    """
    settings = dataclasses.replace(
        config or MockConfig(),
        n=n,
        seed=seed,
        format="dr3-bulk",
        rows_per_file=rows_per_file,
        overwrite=overwrite,
        workers=workers,
        with_correlations=False,
        scalars=(),
    )
    return write_bulk(out_dir, settings)


def write_bulk(out_dir: str | Path, config: MockConfig) -> list[Path]:
    """:func:`write_mock_dr3_bulk` with every setting from ``config`` (the stage's way in)."""
    n, seed = config.n, config.seed
    check_size(n, seed)
    out_dir = Path(out_dir)
    plan = bulk_file_plan(n, config.rows_per_file)
    _prepare_bulk_dir(out_dir, config.overwrite)
    labels = LabelsWriter(out_dir / LABELS_FILE)
    checksums: dict[str, str] = {}
    write = functools.partial(_write_bulk_pair, out_dir, n=n, seed=seed, config=config)
    # In plan order, so the labels table stays in source_id order.
    executor = Executor(threads=config.workers)
    for sums, table in executor.map(write, plan, name="xpbatch-mock-bulk", ordered=True):
        checksums.update(sums)
        labels.write_table(table)
    labels.close()
    manifest = "".join(f"{md5}  {name}\n" for name, md5 in sorted(checksums.items()))
    with atomic_path(out_dir / dr3.MD5_MANIFEST) as tmp:
        tmp.write_text(manifest)
    return [out_dir / file.xp_name for file in plan]
