"""The Gaia DR3 XP format facts, in one place (``shared/dr3/FORMAT.md``).

Columns and dtypes of ``gaiadr3.xp_continuous_mean_spectrum``, the basis of each band, the null
tokens of its text encodings, the bulk file names, and the names the DPAC AVRO records use. The
readers (:mod:`xpbatch.ingest`), the mock writer (:mod:`xpbatch.mock`) and the store schema
(:mod:`xpbatch.schema`) read them from here. Standard library only, so importing it is instant.
"""

from __future__ import annotations

import re

BANDS = ("bp", "rp")
N_COEFFICIENTS = {"bp": 55, "rp": 55}
"""Coefficients per band in DR3 (DR4's BP uses fewer: never mix them into a DR3 store)."""
BASIS_FUNCTION_ID = {"bp": 56, "rp": 57}
"""``*_basis_function_id`` of DR3's spectra: any other basis is not a DR3 spectrum."""

SOURCE_ID = "source_id"
SOLUTION_ID = "solution_id"
ARRAYS = ("coefficients", "coefficient_errors", "coefficient_correlations")
"""Per-band array columns (``bp_coefficients`` ...)."""

# Per-band columns in file order (name -> dtype); arrays are float64[55], float32[55] and
# float32[1485] (the 55·54/2 packed off-diagonal correlations).
BAND_COLUMNS: dict[str, str] = {
    "basis_function_id": "int16",
    "degrees_of_freedom": "int16",
    "n_parameters": "int16",
    "n_measurements": "int16",
    "n_rejected_measurements": "int16",
    "standard_deviation": "float32",
    "chi_squared": "float32",
    "coefficients": "float64",
    "coefficient_errors": "float32",
    "coefficient_correlations": "float32",
    "n_relevant_bases": "int16",
    "relative_shrinking": "float32",
}
COLUMNS: dict[str, str] = {
    SOURCE_ID: "int64",
    SOLUTION_ID: "int64",
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
PHOT_G_MEAN_MAG = "phot_g_mean_mag"
RA = "ra"
DEC = "dec"
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
