"""How ``xpbatch mock`` draws its synthetic catalogue and writes it."""

from __future__ import annotations

import dataclasses
from typing import Literal

from xpbatch.config.fields import OutputOptions, check_choices, field_choices
from xpbatch.config.ingest import DEFAULT_CHUNK_ROWS
from xpbatch.errors import ConfigError

# Rows per mock bulk file: DR3's 3386 XpContinuousMeanSpectrum files hold 64.7k rows on average.
MOCK_ROWS_PER_FILE = 65_000


@dataclasses.dataclass(frozen=True)
class MockConfig(OutputOptions):
    """How ``xpbatch mock`` draws its synthetic catalogue and writes it.

    The fields from ``giant_fraction`` on decide the rows' values (with ``n`` and ``seed``);
    the others only say how they are written (:meth:`row_settings` tells them apart).
    """

    n: int = 10_000
    """Number of sources."""
    seed: int = 0
    """Random seed: the same n, seed and row settings give the same rows in both formats."""
    format: Literal["store", "dr3-bulk"] = "store"
    """'store' (an XP store) or 'dr3-bulk' (Gaia DR3 bulk files: XpContinuousMeanSpectrum_*.csv.gz
    + GaiaSource companions + _MD5SUM.txt, to feed `xpbatch ingest`)."""
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    """Rows per store chunk (store)."""
    rows_per_file: int = MOCK_ROWS_PER_FILE
    """Rows per bulk file, about: files hold whole HEALPix pixels (dr3-bulk; a store records the
    partition ranges of these files)."""
    workers: int = 1
    """Bulk files written at once, in threads (dr3-bulk)."""
    with_correlations: bool = False
    """Also store the packed correlation arrays, like `xpbatch ingest --with-correlations`
    (store)."""
    scalars: tuple[str, ...] = ()
    """DR3 scalar columns to store too (e.g. 'bp_chi_squared'), like `xpbatch ingest --scalars`
    (store; bulk files always hold them all)."""
    giant_fraction: float = 0.3
    """Fraction of stars on the giant branch (red clump included); the rest are dwarfs."""
    metallicity_mean: float = -0.1
    """Mean [M/H] (dex) of the normal distribution stars are drawn from."""
    metallicity_std: float = 0.3
    """Standard deviation of [M/H] (dex); draws are clipped to [-2.5, 0.6]."""
    extinction_plane: float = 1.2
    """Mean A_V (mag, exponential distribution) in the Galactic plane; it falls with |b|."""
    extinction_pole: float = 0.05
    """Mean A_V (mag) towards the Galactic poles."""
    g_mag_min: float = 3.0
    """Brightest G magnitude drawn."""
    g_mag_limit: float = 17.65
    """G magnitude up to which the number counts rise (DR3's XP selection limit)."""
    counts_slope: float = 0.35
    """Slope of log10 number counts per magnitude (stars per 0.1 mag grow by 10**slope per mag);
    0 gives counts flat in G between g_mag_min and g_mag_limit."""
    faint_fraction: float = 0.005
    """Fraction of sources fainter than g_mag_limit (down to G = 20.5), like DR3's few."""
    bp_missing_fraction: float = 0.001
    """Fraction of rows without a BP spectrum (DR3 has one; more here so the path is exercised)."""
    rp_missing_fraction: float = 0.0002
    """Fraction of rows without an RP spectrum."""
    non_finite_fraction: float = 0.001
    """Fraction of rows with a NaN/inf coefficient or a zero error in a present band."""
    g_flux_missing_fraction: float = 0.001
    """Fraction of rows without phot_g_mean_flux and without phot_g_mean_mag."""
    add_noise: bool = True
    """Add Gaussian noise with the coefficient errors; False gives the noiseless spectra."""
    binary_fraction: float = 0.0
    """Fraction of unresolved binaries: the sum of two stars' spectra (population 'binary')."""
    emission_line_fraction: float = 0.0
    """Fraction of stars with Hα and Hβ in emission (population 'emission_line')."""
    white_dwarf_fraction: float = 0.0
    """Fraction of DA white dwarfs, 7000-30000 K with broad Balmer lines ('white_dwarf')."""
    repeats: int = 1
    """Observations of each star: above 1, consecutive rows come in groups of this many that are
    one star (labels, spectrum, errors) observed with independent noise, each with its own
    source_id (the labels' star_id names the group); for calibrating uncertainties."""

    def __post_init__(self) -> None:
        if isinstance(self.scalars, list):  # from a TOML file
            object.__setattr__(self, "scalars", tuple(self.scalars))
        kinds: dict[str, tuple[type, ...]] = {
            "bool": (bool,),
            "int": (int,),
            "float": (int, float),
            "str": (str,),
            "tuple[str, ...]": (tuple,),
        }
        check_choices(self)
        choices = field_choices(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            is_flag = field.type == "bool"
            if field.name in choices:
                continue
            if isinstance(value, bool) != is_flag or not isinstance(value, kinds[str(field.type)]):
                raise ConfigError(
                    f"{field.name} must be {field.type}, got {value!r} ({type(value).__name__})"
                )
        if self.n < 1:
            raise ConfigError(f"a mock catalogue needs at least 1 row, got n={self.n}")
        for name in ("chunk_rows", "rows_per_file", "workers", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if self.format != "store" and (self.with_correlations or self.scalars):
            raise ConfigError(
                "with_correlations and scalars apply to format 'store' only (bulk files always "
                f"hold the correlations and every scalar), got format {self.format!r}"
            )
        fractions = {
            "giant_fraction": self.giant_fraction,
            "faint_fraction": self.faint_fraction,
            "bp_missing_fraction": self.bp_missing_fraction,
            "rp_missing_fraction": self.rp_missing_fraction,
            "non_finite_fraction": self.non_finite_fraction,
            "g_flux_missing_fraction": self.g_flux_missing_fraction,
            **self.rare_fractions,
        }
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a fraction in [0, 1], got {value}")
        defects = sum(v for k, v in fractions.items() if k.endswith("missing_fraction"))
        defects += self.non_finite_fraction
        if defects > 0.5:
            raise ConfigError(
                f"the defect fractions (missing BP, RP, G flux, non-finite) add up to {defects}; "
                "they are exclusive per row and must add up to at most 0.5"
            )
        if sum(self.rare_fractions.values()) > 1.0:
            raise ConfigError(
                f"the rare-population fractions {self.rare_fractions} add up to more than 1"
            )
        if self.metallicity_std < 0 or self.extinction_plane < 0 or self.extinction_pole < 0:
            raise ConfigError(
                "metallicity_std, extinction_plane and extinction_pole must be >= 0, got "
                f"{self.metallicity_std}, {self.extinction_plane}, {self.extinction_pole}"
            )
        if not self.g_mag_min < self.g_mag_limit:
            raise ConfigError(
                f"g_mag_min ({self.g_mag_min}) must be brighter (smaller) than g_mag_limit "
                f"({self.g_mag_limit})"
            )

    def row_settings(self) -> dict[str, float | bool]:
        """The settings besides n and seed that decide the rows' values (what a mock records)."""
        how_written = {"n", "seed", "format", "chunk_rows", "rows_per_file", "workers"}
        how_written |= {"with_correlations", "scalars", "overwrite", "break_lock"}
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in how_written
        }

    @property
    def rare_fractions(self) -> dict[str, float]:
        """The rare populations' fractions by field name (binary, emission_line, white_dwarf)."""
        return {
            "binary_fraction": self.binary_fraction,
            "emission_line_fraction": self.emission_line_fraction,
            "white_dwarf_fraction": self.white_dwarf_fraction,
        }
