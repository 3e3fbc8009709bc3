"""How the products of a catalogue are made: Parquet and HATS exports, neighbours, sky maps."""

from __future__ import annotations

import dataclasses

from xpbatch.config.fields import OutputOptions, check_resume_or_overwrite
from xpbatch.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ParquetExportConfig(OutputOptions):
    """How ``export-parquet`` writes a catalogue as Parquet files, one per DR3 partition."""

    threads: int | None = None
    """Threads of the local pool when no Dask client is given; default one per core."""
    resume: bool = False
    """Continue an interrupted export of the same catalogue split by the same partition ranges:
    keep the whole files, write the missing ones; refuse when they differ. Without an earlier
    export, start a new one."""
    progress_bar: bool = True
    """Show a progress bar of the files written on stderr."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        check_resume_or_overwrite(self, "export")


@dataclasses.dataclass(frozen=True)
class HatsExportConfig(OutputOptions):
    """How ``export-hats`` writes a catalogue as a HATS collection (hats-import does the work)."""

    name: str = "xpbatch_latents"
    """Name of the HATS catalogue in the collection (its index and margin are named after it)."""
    pixel_threshold: int = 1_000_000
    """Most rows of one partition: denser sky gets smaller (higher-order) HEALPix partitions."""
    highest_order: int = 10
    """Highest HEALPix order a partition may have."""
    margin_arcsec: float | None = None
    """Also write a margin cache of this width (arcsec), for cross-matches across partition
    edges; None writes none."""
    with_scatter: bool = False
    """Also export the predicted scatter, one column per coefficient (110 float32 columns)."""
    positions_from_source_id: bool = False
    """For a catalogue without ra/dec: place every row at the centre of its source_id's
    HEALPix level-12 pixel (about 0.86 arcmin across), marked in the column
    position_from_source_id."""
    resume: bool = False
    """Continue an interrupted export of the same catalogue with the same options (refused
    when they differ). Without an earlier export, start a new one."""
    progress_bar: bool = True
    """Show hats-import's progress bars on stderr."""

    def __post_init__(self) -> None:
        if self.pixel_threshold < 1:
            raise ConfigError(f"pixel_threshold must be at least 1, got {self.pixel_threshold}")
        if not 0 <= self.highest_order <= 19:
            raise ConfigError(f"highest_order must be in 0..19, got {self.highest_order}")
        if self.margin_arcsec is not None and not self.margin_arcsec > 0:
            raise ConfigError(f"margin_arcsec must be positive, got {self.margin_arcsec}")
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"name may hold letters, digits, '_' and '-' only, got {self.name!r}")
        check_resume_or_overwrite(self, "export")


@dataclasses.dataclass(frozen=True)
class NeighboursConfig(OutputOptions):
    """How ``neighbours`` searches; its ``--output`` table follows the one output rule."""

    k: int = 100
    """Neighbours of each query source."""


@dataclasses.dataclass(frozen=True)
class SkyMapConfig(OutputOptions):
    """How ``skymap`` draws; its PNG follows the one output rule."""

    order: int | None = None
    """HEALPix order, 0 to 12; default: the finest (up to 5) with 20+ sources a pixel on average."""
