"""The on-disk contract: dimension, variable and attribute names, dtypes and flag bits.

Every stage reads and writes through these names; nothing else spells them out.
"""

from __future__ import annotations

import enum

# --- dimensions -----------------------------------------------------------------------------
SOURCE = "source"
COEFF = "coeff"
LATENT = "latent"

# --- coefficients ---------------------------------------------------------------------------
N_BP = 55
N_RP = 55
N_COEFF = N_BP + N_RP
BANDS = ("bp", "rp")
DR3_N_SOURCES = 219_197_643
"""Rows of gaiadr3.xp_continuous_mean_spectrum: what the benchmarks project to."""


def coeff_labels(n_bp: int = N_BP, n_rp: int = N_RP) -> list[str]:
    """Labels of the coefficient axis: ``bp_0 … bp_{n_bp-1}, rp_0 … rp_{n_rp-1}``."""
    return [f"bp_{i}" for i in range(n_bp)] + [f"rp_{i}" for i in range(n_rp)]


# --- the input XP store ---------------------------------------------------------------------
STORE_SCHEMA_VERSION = 1
SOURCE_ID = "source_id"
COEFFICIENTS = "coefficients"
COEFFICIENT_ERRORS = "coefficient_errors"
PHOT_G_MEAN_FLUX = "phot_g_mean_flux"
INPUT_FLAGS = "input_flags"
CORRELATION = "correlation"
"""Dimension of the packed off-diagonal correlations (55·54/2 = 1485 per band)."""


def correlations_name(band: str) -> str:
    """Store variable of one band's packed correlations, e.g. ``bp_coefficient_correlations``."""
    return f"{band}_coefficient_correlations"


# Optional DR3 per-row scalars kept in the store: name -> (dtype, units, description).
# Integer columns hold -1 where the band is missing (DR3 has no value there).
_BAND_SCALAR_SPECS = {
    "basis_function_id": ("int16", "1", "identifier of the set of basis functions"),
    "degrees_of_freedom": ("int16", "1", "degrees of freedom of the fit"),
    "n_parameters": ("int16", "1", "number of coefficients of the fit"),
    "n_measurements": ("int16", "1", "number of epoch spectra used"),
    "n_rejected_measurements": ("int16", "1", "number of epoch spectra rejected"),
    "standard_deviation": ("float32", "1", "standard deviation of the fit"),
    "chi_squared": ("float32", "1", "chi-squared of the fit"),
    "n_relevant_bases": ("int16", "1", "number of bases relevant to the spectrum"),
    "relative_shrinking": ("float32", "1", "relative shrinking of the coefficient vector"),
}
DR3_SCALARS: dict[str, tuple[str, str, str]] = {
    "solution_id": ("int64", "1", "Gaia solution identifier"),
    **{
        f"{band}_{name}": (dtype, units, f"{band.upper()} {text} (Gaia DR3)")
        for band in BANDS
        for name, (dtype, units, text) in _BAND_SCALAR_SPECS.items()
    },
}
"""The DR3 columns besides the arrays that a store may carry (``--scalars``)."""

# Group attributes of a store.
STORE_ATTR_SCHEMA_VERSION = "xpbatch_store_schema_version"
STORE_ATTR_COMPLETE = "complete"
STORE_ATTR_ROW_COUNT = "row_count"
STORE_ATTR_STORE_ID = "store_id"
STORE_ATTR_INPUT_FILES = "input_files"
STORE_ATTR_DATA_RELEASE = "data_release"
STORE_ATTR_PARTITION_RANGES = "partition_ranges"
"""``[[lo, hi], ...]``: the DR3 bulk partitions (HEALPix level-8, inclusive) of the input files,
when their names follow the DR3 pattern; export-parquet splits its files by them."""

FLUX_UNITS = "electron/s"
# G magnitude zero point of Gaia DR3 (Riello et al. 2021), used when only the magnitude is known.
G_ZERO_POINT_MAG = 25.6873668671


class InputFlag(enum.IntFlag):
    """Bits of the store's ``input_flags`` (uint8). They are also the low byte of ``flags``."""

    BP_MISSING = 1
    """No BP spectrum: the 55 BP coefficients are NaN."""
    RP_MISSING = 2
    """No RP spectrum: the 55 RP coefficients are NaN."""
    G_FLUX_MISSING = 4
    """phot_g_mean_flux missing, not finite or not positive, and no G magnitude to fall back on."""
    NON_FINITE = 8
    """Some coefficient or error of a present band is NaN/inf, or an error is <= 0."""
    G_FLUX_FROM_MAG = 16
    """phot_g_mean_flux was missing and was computed from phot_g_mean_mag."""


# --- the output catalogue -------------------------------------------------------------------
CATALOG_SCHEMA_VERSION = 1
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
SCATTER = "scatter"
RMSE = "rmse"
FLAGS = "flags"
RECONSTRUCTION = "reconstruction"


class CatalogFlag(enum.IntFlag):
    """Bits of the catalogue's ``flags`` (uint16). The low byte repeats :class:`InputFlag`."""

    BP_MISSING = InputFlag.BP_MISSING
    RP_MISSING = InputFlag.RP_MISSING
    G_FLUX_MISSING = InputFlag.G_FLUX_MISSING
    NON_FINITE = InputFlag.NON_FINITE
    G_FLUX_FROM_MAG = InputFlag.G_FLUX_FROM_MAG
    NOT_ENCODED = 256
    """No output for this row (all outputs NaN); the input bits say why."""
    LATENT_OUTLIER = 512
    """Some latent mean lies more than 5 training-set standard deviations from the training mean."""
    IN_TRAINING_SET = 1024
    """The model was fitted on this source."""
    IN_VALIDATION_SET = 2048
    """The source was in this model's validation set."""
