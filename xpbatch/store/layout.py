"""The variables of an XP store: names, dtypes, dimensions, fill values and attributes.

What :mod:`xpbatch.store.xp_store` creates, writes and checks; see its docstring for the layout.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from xpbatch import schema
from xpbatch.errors import StoreError
from xpbatch.schema import InputFlag
from xpbatch.storage.zarr_arrays import ArraySpec, flag_attrs

MAX_CHUNK_ROWS = 1 << 20
"""Largest chunk a reader accepts (461 MB per float32 coefficient chunk)."""

SOURCE_ID_FILL = -1
"""Fill value of ``source_id``: a chunk still holding it was never written."""
INT_MISSING = -1
"""Value of DR3 integer scalars where the band is missing."""


def n_correlations(n_coeff: int) -> int:
    """Number of packed off-diagonal correlations of one band with ``n_coeff`` coefficients."""
    return n_coeff * (n_coeff - 1) // 2


def position_specs() -> list[ArraySpec]:
    """``ra`` and ``dec``: the gaia_source position of each source (NaN where unknown)."""
    units = schema.POSITION_ATTRS[schema.ATTR_UNITS]
    extra = tuple((k, v) for k, v in schema.POSITION_ATTRS.items() if k != schema.ATTR_UNITS)
    return [
        ArraySpec(name, "float64", (schema.SOURCE,), np.nan, units, text, extra_attrs=extra)
        for name, text in (
            (schema.RA, "right ascension (gaia_source ra), ICRS at epoch J2016.0"),
            (schema.DEC, "declination (gaia_source dec), ICRS at epoch J2016.0"),
        )
    ]


def variable_specs(
    scalars: Collection[str], with_correlations: bool, with_positions: bool = False
) -> list[ArraySpec]:
    """Every row variable of a store with these options; ``source_id`` comes last on purpose."""
    rows = (schema.SOURCE,)
    table = (schema.SOURCE, schema.COEFF)
    specs = [
        ArraySpec(
            schema.COEFFICIENTS,
            "float32",
            table,
            np.nan,
            schema.FLUX_UNITS,
            "BP then RP continuous-spectrum coefficients (Gaia DR3); NaN where a band is missing",
            schema.N_COEFF,
        ),
        ArraySpec(
            schema.COEFFICIENT_ERRORS,
            "float32",
            table,
            np.nan,
            schema.FLUX_UNITS,
            "errors of the coefficients, including the standard-deviation scaling (Gaia DR3)",
            schema.N_COEFF,
        ),
        ArraySpec(
            schema.PHOT_G_MEAN_FLUX,
            "float64",
            rows,
            np.nan,
            schema.FLUX_UNITS,
            "G-band mean flux from gaia_source (from phot_g_mean_mag where input_flags says so)",
        ),
        ArraySpec(
            schema.INPUT_FLAGS,
            "uint8",
            rows,
            0,
            "1",
            "bit mask of xpbatch.schema.InputFlag: why a row may not be usable",
            extra_attrs=flag_attrs(InputFlag),
        ),
    ]
    if with_positions:
        specs.extend(position_specs())
    for name in scalars:
        dtype, units, description = schema.DR3_SCALARS[name]
        fill = INT_MISSING if dtype.startswith("int") else np.nan
        if fill == INT_MISSING:
            description += f"; {INT_MISSING} where the band is missing"
        specs.append(ArraySpec(name, dtype, rows, fill, units, description))
    if with_correlations:
        width = n_correlations(schema.N_BP)
        for band in schema.BANDS:
            specs.append(
                ArraySpec(
                    schema.correlations_name(band),
                    "float32",
                    (schema.SOURCE, schema.CORRELATION),
                    np.nan,
                    "1",
                    f"{band.upper()} coefficient correlations, strictly lower triangle in "
                    "row-major order (numpy.tril_indices(55, k=-1)), as in Gaia DR3",
                    width,
                )
            )
    specs.append(
        ArraySpec(
            schema.SOURCE_ID,
            "int64",
            rows,
            SOURCE_ID_FILL,
            "1",
            "Gaia DR3 source identifier, ascending and unique",
        )
    )
    return specs


def check_scalar_names(scalars: Collection[str]) -> list[str]:
    """``scalars`` as a list, after checking each is a DR3 scalar a store can carry."""
    unknown = [s for s in scalars if s not in schema.DR3_SCALARS]
    if unknown:
        raise StoreError(
            f"unknown DR3 scalar column(s) {unknown}; a store can carry "
            f"{', '.join(schema.DR3_SCALARS)}"
        )
    return list(scalars)
