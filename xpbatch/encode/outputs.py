"""What one chunk brings into the encode kernel and what comes out: names, shapes, checks.

The store variables a chunk must carry (and those copied through), the catalogue variables the
kernel returns and their preallocated arrays; :mod:`xpbatch.encode.kernel` fills them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from xpbatch import schema
from xpbatch.errors import InputShapeError

if TYPE_CHECKING:
    from xpbatch.model.trained import TrainedModel

INPUT_VARIABLES = (
    schema.SOURCE_ID,
    schema.COEFFICIENTS,
    schema.COEFFICIENT_ERRORS,
    schema.PHOT_G_MEAN_FLUX,
    schema.INPUT_FLAGS,
)
"""The store variables one chunk must carry."""
PASSTHROUGH_VARIABLES = (schema.RA, schema.DEC)
"""Store variables copied unchanged into the outputs when a chunk carries them (positions)."""

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
        schema.ANOMALY_SCORE,
    )
    return (*names, schema.RECONSTRUCTION) if with_reconstruction else names


def check_chunk(chunk: Chunk) -> int:
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


def empty_outputs(
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
        schema.ANOMALY_SCORE: ((n_rows,), "float32"),
    }
    return {name: np.empty(*shapes[name]) for name in names}
