"""How a mock catalogue is cut into DR3 bulk files: whole HEALPix level-8 pixels per file.

Both writers use it: the bulk writer writes these files, the store writer records their pixel
ranges (``partition_ranges``) as ``xpbatch ingest`` would from the files' names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpbatch import dr3
from xpbatch.config import MOCK_ROWS_PER_FILE
from xpbatch.errors import ConfigError
from xpbatch.mock.sky import row_bounds
from xpbatch.storage.partitions import N_PIXELS, file_name


@dataclass(frozen=True)
class BulkFile:
    """One bulk file pair: HEALPix level-8 range ``lo..hi`` (inclusive) and its rows."""

    lo: int
    hi: int
    start: int
    stop: int

    @property
    def xp_name(self) -> str:
        """The XpContinuousMeanSpectrum file's name."""
        return file_name(dr3.XP_PREFIX, self.lo, self.hi, ".csv.gz")

    @property
    def gaia_source_name(self) -> str:
        """The GaiaSource companion's name."""
        return file_name(dr3.GAIA_SOURCE_PREFIX, self.lo, self.hi, ".csv.gz")


def bulk_file_plan(n: int, rows_per_file: int = MOCK_ROWS_PER_FILE) -> list[BulkFile]:
    """How ``n`` rows are cut into bulk files: whole pixels, about ``rows_per_file`` rows each.

    Like DR3's partition, the files' pixel ranges are contiguous and cover all 786432 level-8
    pixels, and every file has at least one row.
    """
    if rows_per_file < 1:
        raise ConfigError(f"rows_per_file must be at least 1, got {rows_per_file}")
    bounds = row_bounds(n)
    targets = np.arange(rows_per_file, n, rows_per_file, dtype=np.int64)
    cuts = np.unique(np.searchsorted(bounds, targets - 1, side="right"))  # pixel of each target
    cuts = cuts[bounds[cuts] < n]  # a cut after the last row would leave an empty file
    his = [*cuts.tolist(), N_PIXELS - 1]
    los = [0, *(cuts + 1).tolist()]
    return [
        BulkFile(lo, hi, int(bounds[lo - 1]) if lo else 0, int(bounds[hi]))
        for lo, hi in zip(los, his, strict=True)
    ]
