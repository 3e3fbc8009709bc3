"""A trained scatter VAE with its input recipe: everything needed to encode real Gaia data.

Encoding itself is the encode layer's: :func:`xpbatch.encode.kernel.encode_arrays` (numpy in,
numpy out, for notebooks) and :func:`xpbatch.encode.kernel.encode_chunk` (one store chunk, what
the stage's tasks run).

The input recipe of the published model (defined once, :mod:`xpbatch.store.input_recipe`):
divide coefficients and errors by ``phot_g_mean_flux``, then standardise coefficient by
coefficient with the training set's mean and standard deviation, ``x = (c / g - mean) / std``
and ``x_err = (e / g) / std``; coefficient order BP 0-54 then RP 0-54.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xpbatch.config import ModelConfig
from xpbatch.errors import InputShapeError
from xpbatch.model.density import LatentDensity
from xpbatch.model.network import ScatterVAE
from xpbatch.schema import CatalogFlag
from xpbatch.store.input_recipe import recipe_rows


@dataclass(frozen=True)
class Normalisation:
    """Per-coefficient mean and standard deviation of G-flux-normalised coefficients."""

    mean: np.ndarray  # (input,) float32
    std: np.ndarray  # (input,) float32

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise InputShapeError(
                f"normalisation mean and std must be 1-D of equal length, got shapes "
                f"{mean.shape} and {std.shape}"
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise InputShapeError(
                "normalisation std must be finite and positive and mean finite for every "
                "coefficient; recompute it from rows without missing values"
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def identity(cls, n: int) -> Normalisation:
        """Mean 0, std 1: inputs already standardised (as in the published reference outputs)."""
        return cls(np.zeros(n, np.float32), np.ones(n, np.float32))


@dataclass(frozen=True)
class StandardisedInput:
    """Model-space inputs and the masks that say what can be used."""

    x: np.ndarray  # (rows, input) float32, 0 where not valid
    x_err: np.ndarray  # (rows, input) float32, 1 where not valid
    valid: np.ndarray  # (rows, input) bool: coefficient and error finite, error > 0
    flags: np.ndarray  # (rows,) uint16 CatalogFlag bits found in the input

    @property
    def encodable(self) -> np.ndarray:
        """(rows,) bool: rows with a usable G flux and at least one valid coefficient."""
        return (self.flags & np.uint16(CatalogFlag.NOT_ENCODED)) == 0


def check_shapes(c: np.ndarray, e: np.ndarray, g: np.ndarray, n_in: int) -> None:
    """InputShapeError unless c and e are (rows, n_in) and g is (rows,)."""
    if c.ndim != 2 or c.shape[1] != n_in:
        raise InputShapeError(
            f"coefficients must be a 2-D array with {n_in} columns (BP 0-{n_in // 2 - 1} then "
            f"RP 0-{n_in - n_in // 2 - 1}), got shape {c.shape}"
        )
    if e.shape != c.shape:
        raise InputShapeError(
            f"coefficient_errors must have the shape of coefficients {c.shape}, got {e.shape}"
        )
    if g.shape != (c.shape[0],):
        raise InputShapeError(
            f"phot_g_mean_flux must have one value per row ({c.shape[0]},), got {g.shape}"
        )


def standardise(
    coefficients: np.ndarray,
    coefficient_errors: np.ndarray,
    phot_g_mean_flux: np.ndarray,
    normalisation: Normalisation,
) -> StandardisedInput:
    """Apply the input recipe and find the missing and unusable values.

    The recipe's one definition, :func:`xpbatch.store.input_recipe.recipe_rows` (the loop the
    encode kernel runs on the CPU), over all rows. A coefficient is valid when it and its error
    are finite and the error is positive. Invalid coefficients are set to 0 (the training mean)
    so the encoder sees a neutral value; the loss and the RMSE ignore them. Rows whose G flux is
    missing or not positive, or that have no valid coefficient, are flagged NOT_ENCODED.
    """
    c = np.asarray(coefficients)
    e = np.asarray(coefficient_errors)
    g = np.asarray(phot_g_mean_flux)
    n_in = normalisation.mean.shape[0]
    check_shapes(c, e, g, n_in)
    n_rows = c.shape[0]
    x = np.empty((n_rows, n_in), np.float32)
    x_err = np.empty((n_rows, n_in), np.float32)
    valid = np.empty((n_rows, n_in), np.bool_)
    flags = np.empty(n_rows, np.uint16)
    recipe_rows(
        c, e, g, normalisation.mean, normalisation.std, n_in // 2,
        x, x_err, valid, np.empty(n_rows, np.float32), flags,
    )  # fmt: skip
    return StandardisedInput(x=x, x_err=x_err, valid=valid, flags=flags)


@dataclass
class TrainedModel:
    """A scatter VAE with everything needed to encode real Gaia data.

    Returned by :func:`xpbatch.load_model`, :func:`xpbatch.import_xpvae` and training; encoded
    by :func:`xpbatch.encode.kernel.encode_arrays`.

    Examples
    --------
    >>> model = TrainedModel.untrained()
    >>> model.config.input_dim, model.config.latent_dim
    (110, 6)
    """

    network: ScatterVAE
    normalisation: Normalisation
    name: str = "unnamed"
    provenance: dict[str, Any] = field(default_factory=dict)
    latent_reference_mean: np.ndarray | None = None  # (latent,) of training-set latent means
    latent_reference_std: np.ndarray | None = None  # (latent,)
    train_source_id: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    validation_source_id: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    content_hash: str = ""
    """sha256 of the saved file's content; empty until the model is saved or loaded."""
    fit_statistics: dict[str, Any] | None = None
    """What the model's training data looked like to it
    (:class:`xpbatch.model.fit_check.FitStatistics`
    as a dict), to check that a store fits before encoding it; None when not measured."""
    density: LatentDensity | None = None
    """Active dimensions and the training latents' density; None: the prior N(0, I) stands in."""

    def __post_init__(self) -> None:
        self.network.eval()
        latent = self.config.latent_dim
        if self.density is None:
            self.density = LatentDensity.prior(latent)
        if self.latent_reference_mean is None:
            self.latent_reference_mean = np.zeros(latent, np.float32)
        if self.latent_reference_std is None:
            self.latent_reference_std = np.ones(latent, np.float32)
        self.latent_reference_mean = np.asarray(self.latent_reference_mean, np.float32)
        self.latent_reference_std = np.asarray(self.latent_reference_std, np.float32)
        self.train_source_id = np.sort(np.asarray(self.train_source_id, np.int64))
        self.validation_source_id = np.sort(np.asarray(self.validation_source_id, np.int64))
        if self.normalisation.mean.shape[0] != self.config.input_dim:
            raise InputShapeError(
                f"normalisation has {self.normalisation.mean.shape[0]} coefficients but the "
                f"network takes {self.config.input_dim}"
            )

    @property
    def config(self) -> ModelConfig:
        """The network's architecture."""
        return self.network.config

    @classmethod
    def untrained(cls, config: ModelConfig | None = None, *, seed: int = 0) -> TrainedModel:
        """A randomly initialised model with identity normalisation (tests and examples)."""
        torch.manual_seed(seed)
        network = ScatterVAE(config)
        return cls(network=network, normalisation=Normalisation.identity(network.config.input_dim))

    def with_updates(self, **changes: Any) -> TrainedModel:
        """A copy with some fields replaced (the network object is shared)."""
        return dataclasses.replace(self, **changes)

    def training_membership(self, source_id: np.ndarray) -> np.ndarray:
        """(rows,) uint16: IN_TRAINING_SET / IN_VALIDATION_SET bits for these source_ids."""
        source_id = np.asarray(source_id, np.int64)
        flags = np.zeros(source_id.shape, np.uint16)
        flags[_isin_sorted(source_id, self.train_source_id)] |= np.uint16(
            CatalogFlag.IN_TRAINING_SET
        )
        flags[_isin_sorted(source_id, self.validation_source_id)] |= np.uint16(
            CatalogFlag.IN_VALIDATION_SET
        )
        return flags


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Membership test against a sorted array, O(n log m) without building a hash set."""
    if sorted_set.size == 0:
        return np.zeros(values.shape, bool)
    pos = np.searchsorted(sorted_set, values).clip(0, sorted_set.size - 1)
    return sorted_set[pos] == values
