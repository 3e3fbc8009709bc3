"""Gaia DR3 bulk partitions: inclusive HEALPix level-8 ranges ``[lo, hi]`` of source_id.

The DR3 bulk files (``XpContinuousMeanSpectrum_000000-003111.csv.gz``,
``GaiaSource_000000-003111.csv.gz``, ...) each hold the sources whose HEALPix level-8 nested
index, ``source_id >> 43``, lies in ``lo..hi``; the 3386 ranges cover the sky contiguously.
xpbatch does not ship that table: it reads the ranges from what the user has, namely the
``_MD5SUM.txt`` of the bulk download, the directory of bulk files, a ``lo hi`` text file, or the
store that ``xpbatch ingest`` wrote from those files (attribute ``partition_ranges``).

NumPy only, so every stage can import it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from xpbatch.errors import ConfigError
from xpbatch.storage.paths import PathLike

HEALPIX_LEVEL = 8
HEALPIX_SHIFT = 43
"""``source_id >> 43`` is the HEALPix level-8 nested index (Gaia's source_id convention)."""
N_PIXELS = 12 * 4**HEALPIX_LEVEL
"""786432 level-8 pixels: indices 0..786431."""
DR3_FILE_NAME = re.compile(r"_(\d{6})-(\d{6})\.")
"""The ``_<lo>-<hi>.`` of a DR3 bulk file name, lo and hi zero-padded to 6 digits."""
EXAMPLE_NAME = "XpContinuousMeanSpectrum_000000-003111.csv.gz"

Range = tuple[int, int]


class PartitionRanges:
    """Sorted, non-overlapping inclusive HEALPix level-8 ranges ``[lo, hi]``.

    Gaps are allowed (a download of some bulk files only); a source in a gap has no partition.

    Parameters
    ----------
    ranges
        (n, 2) integers, one ``[lo, hi]`` per partition, in ascending order.
    origin
        Where the ranges came from, for messages.

    Raises
    ------
    ConfigError
        Not (n, 2) integers, empty, ``lo > hi``, outside 0..786431, unsorted or overlapping.

    Examples
    --------
    >>> ranges = PartitionRanges([[0, 3111], [3112, 5263]])
    >>> ranges.index_of([5, 3112 << 43]).tolist()
    [0, 1]
    """

    __slots__ = ("origin", "ranges")

    def __init__(self, ranges: ArrayLike, origin: str = "the partition ranges") -> None:
        array = _as_ranges(ranges, origin)
        _check_ranges(array, origin)
        array.setflags(write=False)
        self.ranges: np.ndarray = array
        """(n, 2) int64, read-only."""
        self.origin = origin

    def __len__(self) -> int:
        return len(self.ranges)

    def __iter__(self) -> Iterator[Range]:
        return ((int(lo), int(hi)) for lo, hi in self.ranges)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartitionRanges):
            return NotImplemented
        return np.array_equal(self.ranges, other.ranges)

    def __hash__(self) -> int:
        return hash(self.ranges.tobytes())

    def __repr__(self) -> str:
        first = f"[{self.ranges[0, 0]}, {self.ranges[0, 1]}]"
        return f"PartitionRanges({len(self)} ranges from {first}, {self.origin})"

    def to_list(self) -> list[list[int]]:
        """``[[lo, hi], ...]`` as plain ints (what a store attribute holds)."""
        return [[lo, hi] for lo, hi in self]

    def index_of(self, source_id: np.ndarray | Sequence[int]) -> np.ndarray:
        """Index of the range holding each source_id's HEALPix level-8 pixel.

        Raises
        ------
        ConfigError
            A source_id is negative or its pixel is in no range; the message names it.
        """
        sid = np.asarray(source_id, dtype=np.int64)
        pixel = sid >> HEALPIX_SHIFT
        index = np.searchsorted(self.ranges[:, 0], pixel, side="right") - 1
        outside = (sid < 0) | (index < 0) | (pixel > self.ranges[np.maximum(index, 0), 1])
        if outside.any():
            first = int(sid[outside][0])
            raise ConfigError(
                f"source_id {first} (HEALPix level-8 pixel {first >> HEALPIX_SHIFT}) is in none "
                f"of the {len(self)} partition ranges of {self.origin} (pixels "
                f"{self.ranges[0, 0]}..{self.ranges[-1, 1]}; {int(outside.sum())} of these "
                f"{sid.size} source_ids are outside them); give the ranges of every bulk file "
                "the data came from (the DR3 _MD5SUM.txt lists them all)"
            )
        return index


def file_name(prefix: str, lo: int, hi: int, extension: str = ".parquet") -> str:
    """``<prefix>_<lo>-<hi><extension>`` with DR3's zero-padded indices.

    Examples
    --------
    >>> file_name("XpLatent", 0, 3111)
    'XpLatent_000000-003111.parquet'
    """
    return f"{prefix}_{lo:06d}-{hi:06d}{extension}"


def range_of_file_name(name: str) -> Range | None:
    """``(lo, hi)`` of a DR3 bulk file name (``..._000000-003111.csv.gz``), else None."""
    match = DR3_FILE_NAME.search(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def ranges_from_file_names(names: Iterable[str], *, origin: str = "") -> PartitionRanges:
    """The partition ranges of the DR3 bulk file names among ``names``.

    Names that do not look like ``<Table>_<lo>-<hi>.<ext>`` are ignored; the same range named
    by several files (``XpContinuousMeanSpectrum_`` and ``GaiaSource_``) counts once.

    Raises
    ------
    ConfigError
        No DR3 bulk file name among ``names``, or two ranges overlap.

    Examples
    --------
    >>> ranges_from_file_names(["GaiaSource_003112-005263.csv.gz",
    ...                         "XpContinuousMeanSpectrum_000000-003111.csv.gz",
    ...                         "GaiaSource_000000-003111.csv.gz", "README"]).to_list()
    [[0, 3111], [3112, 5263]]
    """
    names = list(names)
    found = {r for r in map(range_of_file_name, names) if r is not None}
    where = origin or f"{len(names)} file name(s)"
    if not found:
        example = f" (e.g. {names[0]!r})" if names else ""
        raise ConfigError(
            f"{where}: no DR3 bulk file names found{example}; expected names such as "
            f"{EXAMPLE_NAME} (<table>_<lo>-<hi>.<ext>, lo and hi of 6 digits)"
        )
    return PartitionRanges(np.array(sorted(found), dtype=np.int64), origin=where)


def read_partition_ranges(path: PathLike) -> PartitionRanges:
    """Read DR3 partition ranges from a file or directory the user has.

    Parameters
    ----------
    path
        One of:

        - a text file of lines ``lo hi [...]`` (further columns ignored, ``#`` comments), such as
          the list of the 3386 DR3 bulk-file ranges;
        - any text listing DR3 bulk file names, such as the CDN's ``_MD5SUM.txt``
          (``<md5>  XpContinuousMeanSpectrum_000000-003111.csv.gz``);
        - a directory holding DR3 bulk files (``XpContinuousMeanSpectrum_*``,
          ``GaiaSource_*``, ...).

    Returns
    -------
    PartitionRanges

    Raises
    ------
    ConfigError
        The path is missing, holds neither form, or its ranges are invalid (the message says
        which line or range).

    Examples
    --------
    >>> ranges = read_partition_ranges("Gaia/gdr3/Spectroscopy/xp_continuous_mean_spectrum/"
    ...                                "_MD5SUM.txt")  # doctest: +SKIP
    >>> len(ranges)  # doctest: +SKIP
    3386
    """
    path = Path(path)
    if path.is_dir():
        return ranges_from_file_names(
            (entry.name for entry in os.scandir(path)), origin=f"directory {path}"
        )
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such file or directory; expected DR3 partition ranges (a _MD5SUM.txt, "
            "the directory of bulk files, or a text file of 'lo hi' lines)"
        )
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path} is not a text file ({error.reason}); expected a _MD5SUM.txt, a list of DR3 "
            "bulk file names or 'lo hi' lines"
        ) from error
    return _parse_ranges_text(text, str(path))


def _parse_ranges_text(text: str, where: str) -> PartitionRanges:
    """``lo hi`` lines when the first non-comment line starts with two integers, else names."""
    lines = [(n, line.split("#", 1)[0].split()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, fields) for n, fields in lines if fields]
    if not lines:
        raise ConfigError(
            f"{where} lists no partition ranges (empty, or only comments); expected 'lo hi' "
            f"lines or DR3 bulk file names such as {EXAMPLE_NAME}"
        )
    if not _two_ints(lines[0][1]):
        return ranges_from_file_names((" ".join(f) for _, f in lines), origin=where)
    pairs = []
    for n, fields in lines:
        if not _two_ints(fields):
            raise ConfigError(
                f"{where}, line {n}: expected 'lo hi' (two HEALPix level-8 indices, like the "
                f"lines above it), found {' '.join(fields)!r}"
            )
        pairs.append((int(fields[0]), int(fields[1])))
    return PartitionRanges(np.array(pairs, dtype=np.int64), origin=where)


def _two_ints(fields: list[str]) -> bool:
    return len(fields) >= 2 and all(re.fullmatch(r"[-+]?\d+", f) for f in fields[:2])


def _as_ranges(values: object, origin: str) -> np.ndarray:
    """``values`` as an (n, 2) int64 array, or a clear error."""
    try:
        array = np.array(values)
    except ValueError as error:  # ragged lists
        raise ConfigError(f"{origin}: expected [lo, hi] pairs, got {values!r:.200}") from error
    if array.ndim != 2 or array.shape[1] != 2 or not len(array):
        raise ConfigError(
            f"{origin}: expected a non-empty list of [lo, hi] pairs, got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(f"{origin}: lo and hi must be integers, got {array.dtype} values")
    return array.astype(np.int64)


def _check_ranges(ranges: np.ndarray, origin: str) -> None:
    """Each range inside the sky with lo <= hi; ranges ascending and disjoint."""
    lo, hi = ranges[:, 0], ranges[:, 1]
    checks = [
        ((lo < 0) | (hi >= N_PIXELS), f"is outside the level-8 pixels 0..{N_PIXELS - 1}"),
        (lo > hi, "has lo > hi"),
    ]
    for bad, what in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ConfigError(f"{origin}: range [{lo[i]}, {hi[i]}] {what}")
    after = np.flatnonzero(lo[1:] <= hi[:-1])  # i+1 starts before i ends
    if after.size:
        i = int(after[0])
        order = "overlaps" if lo[i + 1] >= lo[i] else "comes before"
        raise ConfigError(
            f"{origin}: range [{lo[i + 1]}, {hi[i + 1]}] {order} [{lo[i]}, {hi[i]}]; partition "
            "ranges must be sorted and must not overlap (each source in exactly one)"
        )
