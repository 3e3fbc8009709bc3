"""The input recipe: what each row's inputs are worth (flags) and how they become the network's.

The rules, once: a coefficient is *valid* when it and its error are finite and the error is
positive; a band is *missing* when all its coefficients are NaN, *NON_FINITE* when present with
some coefficient not valid; the G flux is *missing* when not finite or not positive. The model's
input is ``x = (c / g - mean) / std`` and ``x_err = (e / g) / std``, coefficient order BP then RP.

:func:`recipe_rows` (numba) is the one definition: the encode kernel runs it on the CPU,
:func:`xpbatch.model.trained.standardise` (training, fit checks) runs it on whole arrays and
:func:`compute_input_flags` (the store's flags) takes its bits. The device path
(:class:`xpbatch.encode.kernel.EncodeKernel` on a GPU) is torch, tested equal to it.
"""

from __future__ import annotations

import numba
import numpy as np

from xpbatch import schema
from xpbatch.errors import InputShapeError
from xpbatch.schema import CatalogFlag, InputFlag

_BP_MISSING = np.uint16(CatalogFlag.BP_MISSING)
_RP_MISSING = np.uint16(CatalogFlag.RP_MISSING)
_G_FLUX_MISSING = np.uint16(CatalogFlag.G_FLUX_MISSING)
_NON_FINITE = np.uint16(CatalogFlag.NON_FINITE)
_NOT_ENCODED = np.uint16(CatalogFlag.NOT_ENCODED)
FLOAT32_TINY = np.float32(np.finfo(np.float32).tiny)
"""Smallest normal float32; a G flux below it (or not finite) counts as missing."""


@numba.njit(cache=True, nogil=True, error_model="numpy")
def recipe_rows(
    c: np.ndarray,  # (rows, input) float32 e-/s
    e: np.ndarray,  # (rows, input) float32 e-/s
    g: np.ndarray,  # (rows,) G flux, any float dtype
    mean: np.ndarray,  # (input,) float32
    std: np.ndarray,  # (input,) float32
    n_bp: int,
    x: np.ndarray,  # out (rows, input) float32
    x_err: np.ndarray,  # out (rows, input) float32
    valid: np.ndarray,  # out (rows, input) bool: coefficient and error finite, error > 0
    g32: np.ndarray,  # out (rows,) float32 G flux used (1 where missing)
    flags: np.ndarray,  # out (rows,) uint16
) -> None:
    """The input recipe: standardised x and x_err (0 / 1 where unusable) and the input bits.

    The inner loops count instead of short-circuiting and select instead of branching, and run
    over whole rows where they can (the bands are only counted), so LLVM vectorises them (faster
    than the branchy or band-by-band form, bit for bit the same values).
    """
    n_rows, n_in = c.shape
    zero, one = np.float32(0), np.float32(1)
    for i in range(n_rows):
        gi = np.float32(g[i])
        g_ok = np.isfinite(gi) and gi >= FLOAT32_TINY
        bits = np.uint16(0) if g_ok else _G_FLUX_MISSING
        scale = gi if g_ok else one
        for j in range(n_in):
            cj, ej = c[i, j], e[i, j]
            ok = np.isfinite(cj) & np.isfinite(ej) & (ej > zero)
            valid[i, j] = ok
            scaled_error = ej / scale / std[j]
            x_err[i, j] = scaled_error if ok else one
        n_valid = 0
        for band in range(2):
            lo, hi = (0, n_bp) if band == 0 else (n_bp, n_in)
            n_nan, n_ok = 0, 0
            for j in range(lo, hi):
                n_nan += np.isnan(c[i, j])
                n_ok += valid[i, j]
            if n_nan == hi - lo:
                bits |= _BP_MISSING if band == 0 else _RP_MISSING
            elif n_ok != hi - lo:
                bits |= _NON_FINITE
            n_valid += n_ok
        encodable = g_ok and n_valid > 0
        if not encodable:
            bits |= _NOT_ENCODED
        for j in range(n_in):
            standardised = (c[i, j] / scale - mean[j]) / std[j]
            x[i, j] = standardised if encodable and valid[i, j] else zero
        flags[i] = bits
        g32[i] = scale


FLAG_BLOCK_ROWS = 8192
"""Rows per pass of :func:`compute_input_flags` (bounds its scratch arrays)."""


# --- the store's flags ------------------------------------------------------------------------
def compute_input_flags(
    coefficients: np.ndarray,
    coefficient_errors: np.ndarray,
    phot_g_mean_flux: np.ndarray,
    *,
    flux_from_mag: np.ndarray | None = None,
    flux_from_xp_file: np.ndarray | None = None,
    n_bp: int = schema.N_BP,
) -> np.ndarray:
    """The :class:`~xpbatch.schema.InputFlag` bits of each row: :func:`recipe_rows`'s bits.

    Parameters
    ----------
    coefficients, coefficient_errors
        (n, n_bp + n_rp), BP columns first.
    phot_g_mean_flux
        (n,) G flux; missing when not finite or not positive (as float32: below its smallest
        normal value, or beyond its range).
    flux_from_mag
        (n,) bool, rows whose flux was computed from ``phot_g_mean_mag``.
    flux_from_xp_file
        (n,) bool, rows whose flux (or magnitude) came from the XP file, not a companion.
    n_bp
        Number of BP columns.

    Returns
    -------
    numpy.ndarray
        (n,) uint8. A band is missing when all its coefficients are NaN; NON_FINITE marks a
        present band with some NaN/inf coefficient or error, or an error <= 0.

    Examples
    --------
    >>> c = np.ones((1, 110), np.float32); c[0, :55] = np.nan
    >>> int(compute_input_flags(c, np.ones_like(c), np.array([1e4]))[0])
    1
    """
    coeff = np.asarray(coefficients)
    err = np.asarray(coefficient_errors)
    flux = np.asarray(phot_g_mean_flux)
    if coeff.ndim != 2 or err.shape != coeff.shape or flux.shape != coeff.shape[:1]:
        raise InputShapeError(
            f"coefficients and errors must be (n, {schema.N_COEFF}) and the flux (n,), got "
            f"{coeff.shape}, {err.shape}, {flux.shape}"
        )
    bits = np.empty(len(coeff), np.uint16)
    block = max(1, min(FLAG_BLOCK_ROWS, len(coeff)))
    scratch = np.empty((block, coeff.shape[1]), np.float32)
    valid = np.empty((block, coeff.shape[1]), np.bool_)
    identity = np.zeros(coeff.shape[1], np.float32), np.ones(coeff.shape[1], np.float32)
    for start in range(0, len(coeff), block):
        rows = slice(start, start + block)
        n = len(bits[rows])
        recipe_rows(
            coeff[rows], err[rows], flux[rows], *identity, n_bp,
            scratch[:n], scratch[:n], valid[:n], np.empty(n, np.float32), bits[rows],
        )  # fmt: skip
    flags = (bits & np.uint16(0xFF)).astype(np.uint8)  # the input bits (not NOT_ENCODED)
    if flux_from_mag is not None:
        flags[np.asarray(flux_from_mag, dtype=bool)] |= np.uint8(InputFlag.G_FLUX_FROM_MAG)
    if flux_from_xp_file is not None:
        flags[np.asarray(flux_from_xp_file, dtype=bool)] |= np.uint8(InputFlag.G_FLUX_FROM_XP_FILE)
    return flags
