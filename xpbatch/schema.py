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
    """phot_g_mean_flux is missing, not finite or not positive (and no G magnitude to fall back on)."""
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


# Input bits that make a row impossible to encode on their own.
UNENCODABLE_INPUT = InputFlag.G_FLUX_MISSING
