"""The encode kernel's outputs, fused into one numba loop per row, for the CPU.

On a GPU :class:`xpbatch.encode.kernel.EncodeKernel` computes the outputs as torch operations. On
the CPU whole-array operations pass over a block's (rows, 110) arrays many times; this loop reads
each row once while it is in cache and writes straight into the caller's output arrays. It
releases the GIL, so several task threads of a worker run it at the same time.
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
    nan, half, zero = np.float32(np.nan), np.float32(0.5), np.float32(0)
    for i in range(n_rows):
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
        if rmse.shape[0]:
            total, n_valid = zero, 0
            for j in range(n_in):
                if valid[i, j]:
                    z = (x[i, j] - xhat[i, j]) / x_err[i, j]
                    total += z * z
                    n_valid += 1
            rmse[i] = nan if dead or n_valid == 0 else np.sqrt(total / np.float32(n_valid))
