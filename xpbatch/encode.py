"""The pure per-chunk kernel of ``encode-catalog``: one input chunk in, its output rows out.

No I/O and no cluster: :func:`encode_chunk` runs the same in a test, a notebook and a Dask
worker (the rechunker habit). Reading the input chunk and writing the result are
:mod:`xpbatch.pipeline`'s and :mod:`xpbatch.catalog`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from xpbatch import schema
from xpbatch.errors import InputShapeError
from xpbatch.trained import DEFAULT_BATCH_SIZE, TrainedModel

INPUT_VARIABLES = (
    schema.SOURCE_ID,
    schema.COEFFICIENTS,
    schema.COEFFICIENT_ERRORS,
    schema.PHOT_G_MEAN_FLUX,
    schema.INPUT_FLAGS,
)
"""The store variables one chunk must carry."""

BATCHES_PER_BLOCK = 8
"""The kernel works through a chunk in blocks of this many forward passes, so the float64
temporaries of the input recipe are bounded by the block, not the chunk (memory flat in chunk
size). Blocks are whole batches, so results stay bitwise identical to one call on the chunk."""

Chunk = Mapping[str, np.ndarray]
"""Variable name -> numpy array of one chunk's rows (the store's names, see INPUT_VARIABLES)."""


def output_variables(*, with_reconstruction: bool) -> tuple[str, ...]:
    """Row variables the kernel returns (and the catalogue stores), ``source_id`` first."""
    names = (
        schema.SOURCE_ID,
        schema.LATENT_MEAN,
        schema.LATENT_STD,
        schema.SCATTER,
        schema.RMSE,
        schema.FLAGS,
    )
    return (*names, schema.RECONSTRUCTION) if with_reconstruction else names


def _check_chunk(chunk: Chunk) -> int:
    """Number of rows of ``chunk``; an InputShapeError naming what is missing or ragged."""
    missing = [name for name in INPUT_VARIABLES if name not in chunk]
    if missing:
        raise InputShapeError(
            f"an input chunk must carry {', '.join(INPUT_VARIABLES)}; missing {', '.join(missing)}"
        )
    n_rows = len(chunk[schema.SOURCE_ID])
    ragged = {k: np.shape(chunk[k]) for k in INPUT_VARIABLES if len(chunk[k]) != n_rows}
    if ragged:
        raise InputShapeError(f"every input variable must have {n_rows} rows, got {ragged}")
    return n_rows


def encode_chunk(
    model: TrainedModel,
    chunk: Chunk,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    with_reconstruction: bool = False,
) -> dict[str, np.ndarray]:
    """Encode the rows of one input chunk into the catalogue's variables.

    Parameters
    ----------
    model
        The trained scatter VAE.
    chunk
        ``source_id`` (n,), ``coefficients`` and ``coefficient_errors`` (n, 110) in e-/s,
        ``phot_g_mean_flux`` (n,) and ``input_flags`` (n,) uint8, as stored.
    batch_size
        Rows per forward pass (padded, so results do not depend on the chunking).
    device
        Torch device of the forward pass.
    with_reconstruction
        Also return the decoder's reconstruction in e-/s.

    Returns
    -------
    dict of numpy.ndarray
        The names of :func:`output_variables`: ``source_id`` (copied), ``latent_mean`` and
        ``latent_std`` (n, latent) float32, ``scatter`` (n, 110) float32 in e-/s, ``rmse`` (n,)
        float32 and ``flags`` (n,) uint16 = the store's input flags in the low byte, the model's
        flags and the training/validation membership bits. Rows flagged NOT_ENCODED are NaN.

    Examples
    --------
    >>> import numpy as np
    >>> from xpbatch.trained import TrainedModel
    >>> chunk = {"source_id": np.array([7, 9]), "coefficients": np.ones((2, 110), np.float32),
    ...          "coefficient_errors": np.full((2, 110), 0.1, np.float32),
    ...          "phot_g_mean_flux": np.array([1.0, np.nan]),
    ...          "input_flags": np.array([0, 4], np.uint8)}
    >>> out = encode_chunk(TrainedModel.untrained(), chunk)
    >>> out["latent_mean"].shape, int(out["flags"][1])  # G_FLUX_MISSING | NOT_ENCODED
    ((2, 6), 260)
    """
    n_rows = _check_chunk(chunk)
    names = output_variables(with_reconstruction=with_reconstruction)
    out = _empty_outputs(model, n_rows, names)
    block = batch_size * BATCHES_PER_BLOCK
    for start in range(0, n_rows, block):
        rows = slice(start, min(start + block, n_rows))
        result = model.encode_arrays(
            chunk[schema.COEFFICIENTS][rows],
            chunk[schema.COEFFICIENT_ERRORS][rows],
            chunk[schema.PHOT_G_MEAN_FLUX][rows],
            batch_size=batch_size,
            device=device,
        )
        out[schema.LATENT_MEAN][rows] = result.latent_mean
        out[schema.LATENT_STD][rows] = result.latent_std
        out[schema.SCATTER][rows] = result.scatter
        out[schema.RMSE][rows] = result.rmse
        out[schema.FLAGS][rows] = result.flags
        if with_reconstruction:
            out[schema.RECONSTRUCTION][rows] = result.reconstruction
    source_id = np.asarray(chunk[schema.SOURCE_ID], np.int64)
    out[schema.SOURCE_ID][:] = source_id
    # The low byte repeats the store's InputFlag bits (some, like G_FLUX_FROM_MAG, are known
    # only to the store); the high byte holds the model's own bits.
    out[schema.FLAGS] |= np.asarray(chunk[schema.INPUT_FLAGS]).astype(np.uint16)
    out[schema.FLAGS] |= model.training_membership(source_id)
    return out


def _empty_outputs(
    model: TrainedModel, n_rows: int, names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Preallocated output arrays of one chunk, keyed by catalogue variable."""
    latent, n_coeff = model.config.latent_dim, model.config.input_dim
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        schema.SOURCE_ID: ((n_rows,), "int64"),
        schema.LATENT_MEAN: ((n_rows, latent), "float32"),
        schema.LATENT_STD: ((n_rows, latent), "float32"),
        schema.SCATTER: ((n_rows, n_coeff), "float32"),
        schema.RMSE: ((n_rows,), "float32"),
        schema.FLAGS: ((n_rows,), "uint16"),
        schema.RECONSTRUCTION: ((n_rows, n_coeff), "float32"),
    }
    return {name: np.empty(*shapes[name]) for name in names}
