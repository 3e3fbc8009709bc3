"""The glue between the XP text reader and the compiled scanner (:mod:`xpbatch.ingest.fastscan`).

:class:`FastLayout` says where the scanner puts each column of a file, and unpacks a block it
read into the columns the general reader gives
(:func:`xpbatch.ingest.array_cells.parse_xp_batch`), or hands the block back (None) when a row
needs the general reader's checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from xpbatch import dr3, schema
from xpbatch.ingest.array_cells import n_coefficients
from xpbatch.ingest.common import EXTRAS, ReadRequest, in_range
from xpbatch.store.xp_store import INT_MISSING, n_correlations

try:  # the compiled fast path; without numba every block goes through the pyarrow reader
    from xpbatch.ingest import fastscan
except ImportError:  # pragma: no cover - numba is a dependency
    fastscan = None  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class FastLayout:
    """How the compiled scanner lays out an XP file's columns, and how to unpack its output."""

    layout: fastscan.Layout
    """Where the scanner puts each column."""
    integers: list[str]
    """Names of the scanner's integer slots: source_id, both n_parameters, basis ids, integer
    scalars."""
    floats: list[str]
    """Names of its float slots (float scalars)."""
    scalars: Sequence[str]
    with_correlations: bool

    @classmethod
    def of(
        cls, columns: Sequence[str], wanted: Sequence[str], request: ReadRequest
    ) -> FastLayout | None:
        """The layout for a file with these columns (``wanted`` of them read); None without
        numba, or for a file the scanner does not cover: without n_parameters, with G or
        positions (read as float64, the scanner's floats are float32), or without the
        correlations asked for."""
        n_parameters = [f"{band}_n_parameters" for band in schema.BANDS]
        with_correlations = request.with_correlations
        correlations = [schema.correlations_name(band) for band in schema.BANDS]
        if (
            fastscan is None
            or not set(n_parameters) <= set(wanted)
            or set(EXTRAS) & set(wanted)
            or (with_correlations and not set(correlations) <= set(wanted))
        ):
            return None
        scalars = [s for s in request.scalars if s in wanted]
        basis = [f"{band}_basis_function_id" for band in schema.BANDS]
        integers = [schema.SOURCE_ID, *n_parameters, *(b for b in basis if b in wanted)]
        integers += [s for s in scalars if _is_integer(s) and s not in integers]
        floats = [s for s in scalars if not _is_integer(s)]
        # BP then RP side by side, so coefficients (and errors) are one (rows, 110) slice.
        arrays = [f"{band}_{schema.COEFFICIENTS}" for band in schema.BANDS]
        arrays += [f"{band}_{schema.COEFFICIENT_ERRORS}" for band in schema.BANDS]
        if with_correlations:
            arrays += [schema.correlations_name(band) for band in schema.BANDS]
        missing = {schema.SOURCE_ID: 0, **dict.fromkeys(integers[1:], INT_MISSING)}
        layout = fastscan.make_layout(
            columns,
            integers=[(name, missing[name]) for name in integers],
            floats=floats,
            arrays=[(name, _band_width(name)) for name in arrays],
        )
        return cls(layout, integers, floats, scalars, with_correlations)

    def parse(self, buffer: np.ndarray, quotes: np.ndarray) -> dict[str, np.ndarray] | None:
        """The columns of :func:`~xpbatch.ingest.array_cells.parse_xp_batch` for this block;
        None when the block (or one of its rows) needs the general reader."""
        block = fastscan.scan_block(buffer, quotes, self.layout)  # type: ignore[union-attr]
        if block is None:
            return None
        integer = {name: block.integers[:, i] for i, name in enumerate(self.integers)}
        if (integer[schema.SOURCE_ID] <= 0).any():
            return None
        for band_index, band in enumerate(schema.BANDS):
            # an array present needs its band's n_parameters to be the store's width
            present = block.present[:, band_index :: len(schema.BANDS)].any(axis=1)
            if (integer[f"{band}_n_parameters"][present] != n_coefficients(band)).any():
                return None
            basis = integer.get(f"{band}_basis_function_id")
            if basis is not None and (basis[present] != dr3.BASIS_FUNCTION_ID[band]).any():
                return None
        n_coeff = schema.N_BP + schema.N_RP
        out = {
            schema.SOURCE_ID: integer[schema.SOURCE_ID].copy(),
            schema.COEFFICIENTS: block.values[:, :n_coeff],
            schema.COEFFICIENT_ERRORS: block.values[:, n_coeff : 2 * n_coeff],
        }
        start = 2 * n_coeff
        for band in schema.BANDS if self.with_correlations else ():
            width = n_correlations(n_coefficients(band))
            out[schema.correlations_name(band)] = block.values[:, start : start + width]
            start += width
        for name in self.scalars:
            dtype = np.dtype(schema.DR3_SCALARS[name][0])
            if name in integer:
                if not in_range(integer[name], dtype).all():
                    return None
                out[name] = integer[name].astype(dtype)
            else:
                out[name] = block.floats[:, self.floats.index(name)].astype(dtype)
        return out


def _is_integer(scalar: str) -> bool:
    return np.dtype(schema.DR3_SCALARS[scalar][0]).kind == "i"


def _band_width(array_name: str) -> int:
    """Values per row of a DR3 array column (coefficients, errors or correlations of a band)."""
    width = n_coefficients(array_name[:2])
    return n_correlations(width) if array_name.endswith("correlations") else width
