"""The Gaia DR3 XP format facts, in one place.

Columns of ``gaiadr3.xp_continuous_mean_spectrum`` and of the GaiaSource companions (dtype, UCD
and the archive's description), the basis of each band, the null tokens of its text encodings,
the bulk file names, and the names the DPAC AVRO records use. The
readers (:mod:`xpbatch.ingest`), the mock writer (:mod:`xpbatch.mock`) and the store schema
(:mod:`xpbatch.schema`) read them from here. Standard library only, so importing it is instant.
"""

from __future__ import annotations

import re
from typing import NamedTuple

BANDS = ("bp", "rp")
N_COEFFICIENTS = {"bp": 55, "rp": 55}
"""Coefficients per band in DR3 (DR4's BP uses fewer: never mix them into a DR3 store)."""
BASIS_FUNCTION_ID = {"bp": 56, "rp": 57}
"""``*_basis_function_id`` of DR3's spectra: any other basis is not a DR3 spectrum."""

SOURCE_ID = "source_id"
SOLUTION_ID = "solution_id"
ARRAYS = ("coefficients", "coefficient_errors", "coefficient_correlations")
"""Per-band array columns (``bp_coefficients`` ...)."""


class Column(NamedTuple):
    """A column of a DR3 table: its dtype, and the UCD and description the archive gives it."""

    dtype: str
    ucd: str
    description: str


# Per-band columns in file order; arrays are float64[55], float32[55] and float32[1485] (the
# 55·54/2 packed off-diagonal correlations). {B} in a description stands for BP or RP.
BAND_COLUMN_SPECS: dict[str, Column] = {
    "basis_function_id": Column("int16", "meta.id", "Identifier defining the set of basis "
                                "functions for the {B} spectrum representation"),
    "degrees_of_freedom": Column("int16", "stat.fit.dof", "Degrees of freedom for the {B} "
                                 "spectrum representation"),
    "n_parameters": Column("int16", "stat.fit.param", "Number of parameters for the {B} "
                           "spectrum representation"),
    "n_measurements": Column("int16", "meta.number", "Number of measurements used for the {B} "
                             "spectrum generation"),
    "n_rejected_measurements": Column("int16", "meta.number", "Number of rejected measurements "
                                      "in the {B} spectrum generation"),
    "standard_deviation": Column("float32", "stat.stdev", "Standard deviation for the {B} "
                                 "spectrum representation"),
    "chi_squared": Column("float32", "stat.fit.chi2", "Chi squared for the {B} spectrum "
                          "representation"),
    "coefficients": Column("float64", "stat.fit.param", "Basis function coefficients for the "
                           "{B} spectrum representation"),
    "coefficient_errors": Column("float32", "stat.error", "Basis function coefficient errors "
                                 "for the {B} spectrum representation"),
    "coefficient_correlations": Column("float32", "stat.correlation", "Correlation matrix for "
                                       "{B} coefficients"),
    "n_relevant_bases": Column("int16", "meta.number", "Number of bases that are relevant for "
                               "the representation of this mean {B} spectrum"),
    "relative_shrinking": Column("float32", "stat.fit.param", "Measure of the relative "
                                 "shrinking of the coefficient vector when truncation is "
                                 "applied for the mean {B} spectrum"),
}  # fmt: skip
BAND_COLUMNS: dict[str, str] = {name: column.dtype for name, column in BAND_COLUMN_SPECS.items()}
"""Per-band columns in file order: name -> dtype."""
KEY_COLUMN_SPECS: dict[str, Column] = {
    SOURCE_ID: Column("int64", "meta.id;meta.main",
                      "Unique source identifier (unique within a particular Data Release)"),
    SOLUTION_ID: Column("int64", "meta.version", "Solution Identifier"),
}  # fmt: skip
"""The XP table's columns before the bands'."""
COLUMNS: dict[str, str] = {
    **{name: column.dtype for name, column in KEY_COLUMN_SPECS.items()},
    **{f"{band}_{name}": dtype for band in BANDS for name, dtype in BAND_COLUMNS.items()},
}
"""The 26 columns of the archive table, in order, with their dtypes."""
SCALARS: dict[str, str] = {
    name: dtype
    for name, dtype in COLUMNS.items()
    if name != SOURCE_ID and not name.endswith(ARRAYS)
}
"""The 20 columns besides source_id and the arrays."""

NULL_TOKENS = ("", "null", "NULL", "nan", "NaN")
"""How the text encodings write a missing value (bulk ``null``, archive empty field, ECSV nan)."""

# gaia_source columns an XP file may also carry, and the ones a companion file supplies.
PHOT_G_MEAN_FLUX = "phot_g_mean_flux"
PHOT_G_MEAN_FLUX_ERROR = "phot_g_mean_flux_error"
PHOT_G_MEAN_MAG = "phot_g_mean_mag"
RA = "ra"
DEC = "dec"
GAIA_SOURCE_COLUMN_SPECS: dict[str, Column] = {
    SOURCE_ID: KEY_COLUMN_SPECS[SOURCE_ID],
    RA: Column("float64", "pos.eq.ra;meta.main", "Right ascension (deg)"),
    DEC: Column("float64", "pos.eq.dec;meta.main", "Declination (deg)"),
    PHOT_G_MEAN_FLUX: Column("float64", "phot.flux;stat.mean;em.opt",
                             "G-band mean flux (electron/s)"),
    PHOT_G_MEAN_FLUX_ERROR: Column("float32", "stat.error;phot.flux;em.opt",
                                   "Error on G-band mean flux (electron/s)"),
    PHOT_G_MEAN_MAG: Column("float32", "phot.mag;stat.mean;em.opt", "G-band mean magnitude"),
}  # fmt: skip
"""The gaia_source columns of a GaiaSource companion file, as the mock writes them."""
G_ZERO_POINT_MAG = 25.6873668671
"""G magnitude zero point of Gaia DR3 (Riello et al. 2021): flux = 10**((ZP - G) / 2.5)."""

# Bulk (CDN) file names: <lo>-<hi> are inclusive, zero-padded HEALPix level-8 indices.
XP_NAME = re.compile(r"^XpContinuousMeanSpectrum_(\d+-\d+)\.", re.IGNORECASE)
GAIA_SOURCE_NAME = re.compile(r"^GaiaSource_(\d+-\d+)\.", re.IGNORECASE)
XP_PREFIX = "XpContinuousMeanSpectrum"
GAIA_SOURCE_PREFIX = "GaiaSource"
XP_GLOB = f"{XP_PREFIX}_*"
GAIA_SOURCE_GLOB = f"{GAIA_SOURCE_PREFIX}_*"
MD5_MANIFEST = "_MD5SUM.txt"

# The DPAC AVRO records (MeanSpectrumSolutionWithCov, read by GaiaXPy): camelCase, nested.
AVRO_SOURCE_ID = "sourceId"
AVRO_SOLUTION_ID = "solutionId"
AVRO_BAND = {"bp": "bpSpec", "rp": "rpSpec"}
AVRO_BAND_FIELDS = {  # under bpSpec / rpSpec
    "basisFunctionSetDefId": "basis_function_id",
    "NRelevantBases": "n_relevant_bases",
    "relativeShrinking": "relative_shrinking",
}
AVRO_SOLUTION_FIELDS = {  # under bpSpec.solution / rpSpec.solution
    "numberOfParameters": "n_parameters",
    "degreesOfFreedom": "degrees_of_freedom",
    "numberOfMeasurements": "n_measurements",
    "numberOfRejectedMeasurements": "n_rejected_measurements",
    "standardDeviation": "standard_deviation",
    "chiSquared": "chi_squared",
}
AVRO_PARAMETERS = "parameters"
AVRO_COVARIANCE = "covariance"
"""Lower triangle with the diagonal, row-major (numpy.tril_indices(n)), without the
standard-deviation scaling: the DR3 error is sqrt(diag) * standardDeviation."""


def band_column(band: str, name: str) -> str:
    """``band_column('bp', 'coefficients') == 'bp_coefficients'``."""
    return f"{band}_{name}"


def n_correlations(n_coefficients: int) -> int:
    """Packed off-diagonal correlations of ``n_coefficients`` (1485 for 55)."""
    return n_coefficients * (n_coefficients - 1) // 2
