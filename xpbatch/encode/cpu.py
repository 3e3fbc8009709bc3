"""The encode kernel's outputs, fused into one numba loop per row, for the CPU.

On a GPU :class:`xpbatch.encode.kernel.EncodeKernel` computes the outputs as torch operations. On
the CPU whole-array operations pass over a block's (rows, 110) arrays many times; this loop reads
each row while it is in cache (a few rows at a time) and writes straight into the caller's output
arrays. It releases the GIL, so several task threads of a worker run it at the same time.
``error_model="numpy"`` makes a division IEEE, as torch's (a division by zero gives inf or NaN,
as on the GPU path) instead of a branch that raises ZeroDivisionError, so the loops vectorise.
Its siblings on the CPU path: the input recipe (:func:`xpbatch.store.input_recipe.recipe_rows`)
and the anomaly score (:func:`xpbatch.model.density.score_rows`).

The arithmetic is the torch path's, step for step (float32; G flux rounded to float32 first).
"""

from __future__ import annotations

import numba
import numpy as np

from xpbatch.schema import CatalogFlag

_NOT_ENCODED = np.uint16(CatalogFlag.NOT_ENCODED)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def output_rows(
    x: np.ndarray,  # (rows, input) float32 standardised input
    x_err: np.ndarray,  # (rows, input) float32
    valid: np.ndarray,  # (rows, input) bool
    g32: np.ndarray,  # (rows,) float32
    mu: np.ndarray,  # (rows, latent) network outputs, float32
    log_var: np.ndarray,  # (rows, latent)
    xhat: np.ndarray,  # (rows, input)
    shat: np.ndarray,  # (rows, input)
    mean: np.ndarray,  # (input,)
    std: np.ndarray,  # (input,)
    latent_mean: np.ndarray,  # out (rows, latent) or (0, 0) when not wanted
    latent_std: np.ndarray,  # out (rows, latent) or (0, 0)
    scatter: np.ndarray,  # out (rows, input) or (0, 0)
    reconstruction: np.ndarray,  # out (rows, input) or (0, 0)
    rmse: np.ndarray,  # out (rows,) or (0,)
    flags: np.ndarray,  # (rows,) uint16 input bits (NOT_ENCODED marks rows left NaN)
) -> None:
    """The stored outputs in e-/s, NaN on rows flagged NOT_ENCODED; an empty out is skipped."""
    n_rows, n_in = x.shape
    latent = mu.shape[1]
    nan, half = np.float32(np.nan), np.float32(0.5)
    squares = np.empty((_RMSE_ROWS, n_in), np.float32)  # the rmse's scratch
    counts = np.zeros(_RMSE_ROWS, np.int64)
    for start in range(0, n_rows, _RMSE_ROWS):
        stop = min(start + _RMSE_ROWS, n_rows)
        for i in range(start, stop):
            dead = (flags[i] & _NOT_ENCODED) != 0
            gi = g32[i]
            for k in range(latent):
                m = mu[i, k]
                if latent_mean.shape[0]:
                    latent_mean[i, k] = nan if dead else m
                if latent_std.shape[0]:
                    latent_std[i, k] = nan if dead else np.exp(half * log_var[i, k])
            if scatter.shape[0]:
                for j in range(n_in):
                    scatter[i, j] = nan if dead else shat[i, j] * std[j] * gi
            if reconstruction.shape[0]:
                for j in range(n_in):
                    reconstruction[i, j] = nan if dead else (xhat[i, j] * std[j] + mean[j]) * gi
        if rmse.shape[0]:  # while these rows are in cache
            _rmse_group(x, x_err, valid, xhat, flags, start, stop, squares, counts, rmse)


_RMSE_ROWS = 4
"""Rows whose rmse sums :func:`_rmse_group` runs side by side."""


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _rmse_group(
    x: np.ndarray,  # (rows, input) float32 standardised input
    x_err: np.ndarray,  # (rows, input) float32
    valid: np.ndarray,  # (rows, input) bool
    xhat: np.ndarray,  # (rows, input) float32 reconstruction
    flags: np.ndarray,  # (rows,) uint16 (NOT_ENCODED rows get NaN)
    start: int,
    stop: int,  # at most _RMSE_ROWS rows after start
    squares: np.ndarray,  # scratch (_RMSE_ROWS, input) float32
    counts: np.ndarray,  # scratch (_RMSE_ROWS,) int64
    rmse: np.ndarray,  # out (rows,) float32
) -> None:
    """``sqrt(mean over valid j of ((x - xhat) / x_err)^2)`` of rows ``start:stop``, NaN where
    not encoded or nothing is valid.

    Each row's sum runs over ascending ``j`` in float32 (as torch's). The squares are computed
    first (loops that vectorise), then four rows are summed side by side, so that four
    independent chains of additions overlap instead of each waiting on its own last sum.
    Adding zero where a value is not valid leaves a sum as skipping it.
    """
    n_in = x.shape[1]
    zero = np.float32(0)
    for r in range(stop - start):
        i, n_valid = start + r, 0
        for j in range(n_in):
            z = (x[i, j] - xhat[i, j]) / x_err[i, j]
            squares[r, j] = z * z if valid[i, j] else zero
            n_valid += valid[i, j]
        counts[r] = n_valid
    if stop - start == 4:
        t0, t1, t2, t3 = zero, zero, zero, zero
        for j in range(n_in):
            t0 += squares[0, j]
            t1 += squares[1, j]
            t2 += squares[2, j]
            t3 += squares[3, j]
        rmse[start] = _rms(t0, counts[0], flags[start])
        rmse[start + 1] = _rms(t1, counts[1], flags[start + 1])
        rmse[start + 2] = _rms(t2, counts[2], flags[start + 2])
        rmse[start + 3] = _rms(t3, counts[3], flags[start + 3])
        return
    for r in range(stop - start):
        total = zero
        for j in range(n_in):
            total += squares[r, j]
        rmse[start + r] = _rms(total, counts[r], flags[start + r])


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _rms(total: np.float32, n_valid: int, flags: np.uint16) -> np.float32:
    """sqrt(total / n_valid) in float32; NaN on a row not encoded or without a valid value."""
    if (flags & _NOT_ENCODED) != 0 or n_valid == 0:
        return np.float32(np.nan)
    return np.sqrt(total / np.float32(n_valid))
