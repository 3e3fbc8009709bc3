"""How ``xpbatch ingest`` runs, and the rows per chunk of an XP store."""

from __future__ import annotations

import dataclasses
from typing import Literal

from xpbatch.config.fields import OutputOptions, check_choices, check_resume_or_overwrite
from xpbatch.errors import ConfigError

# Rows per chunk of an XP store (29 MB per float32 variable): of the sizes measured, it wrote
# and read fastest (docs/performance.md). store.DEFAULT_CHUNK_ROWS re-exports it.
DEFAULT_CHUNK_ROWS = 65536


@dataclasses.dataclass(frozen=True)
class IngestConfig(OutputOptions):
    """How ``xpbatch ingest`` turns DR3 XP files into an XP store."""

    chunk_rows: int = DEFAULT_CHUNK_ROWS
    """Rows per chunk of the output store."""
    on_bad_row: Literal["error", "skip"] = "error"
    """'error': a malformed row stops the ingest; 'skip': leave it out and record it."""
    with_correlations: bool = False
    """Also parse and store the packed BP/RP coefficient correlations (15x the size)."""
    scalars: tuple[str, ...] | None = None
    """DR3 scalar columns to keep when the files have them (e.g. 'bp_chi_squared'); None keeps
    all present. On the command line: comma-separated names, or 'none'."""
    verify_md5: bool = True
    """Check each file against a _MD5SUM.txt beside it, when there is one."""
    resume: bool = False
    """Continue an interrupted ingest of the same files and options: reuse the files already
    parsed (<output>.parts/); refuse when they differ. Without an earlier run, start a new one."""
    progress_bar: bool = True
    """Show a progress bar of XP files parsed on stderr."""
    keep_parts: bool = False
    """Keep the per-file staging parts (<output>.parts/) after a successful ingest."""
    columns: tuple[tuple[str, str], ...] = ()
    """(DR3 name, the file's name) of XP columns named otherwise; '{i}' in the file's name
    stands for the coefficient index of one-column-per-coefficient tables. On the command
    line: comma-separated DR3_NAME=FILE_NAME, e.g.
    'bp_coefficients=BPc{i},bp_coefficient_errors=BPe{i}'."""

    def __post_init__(self) -> None:
        if self.scalars is not None:
            object.__setattr__(self, "scalars", tuple(self.scalars))
        object.__setattr__(self, "columns", tuple((str(a), str(b)) for a, b in self.columns))
        if not 1 <= self.chunk_rows <= 1 << 20:
            raise ConfigError(f"chunk_rows must be in 1..{1 << 20}, got {self.chunk_rows}")
        check_choices(self)
        check_resume_or_overwrite(self, "store")
