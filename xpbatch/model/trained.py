"""A trained scatter VAE with its input recipe, and the in-memory encode kernel.

The kernel (:meth:`TrainedModel.encode_arrays`) is numpy in, numpy out. It is what a notebook
calls directly and what every Dask task calls on its chunk (via :mod:`xpbatch.encode.kernel`).

The input recipe of the published model: divide coefficients and errors by
``phot_g_mean_flux``, then standardise coefficient by coefficient with the training set's mean
and standard deviation, ``x = (c / g - mean) / std`` and ``x_err = (e / g) / std``; coefficient
order BP 0-54 then RP 0-54.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xpbatch.config import EncodeConfig, ModelConfig
from xpbatch.errors import InputShapeError
from xpbatch.model.density import LatentDensity
from xpbatch.model.network import ScatterVAE
from xpbatch.schema import CatalogFlag
from xpbatch.store.xp_store import compute_input_flags

DEFAULT_BATCH_SIZE = EncodeConfig.batch_size
"""Rows per forward pass (its home: the EncodeConfig field). Every pass is padded to exactly this
many rows, so the same kernels run whatever the chunk size (results then agree to float32
round-off; the same chunking gives the same bytes)."""


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


def _check_shapes(c: np.ndarray, e: np.ndarray, g: np.ndarray, n_in: int) -> None:
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

    A coefficient is valid when it and its error are finite and the error is positive. Invalid
    coefficients are set to 0 (the training mean) so the encoder sees a neutral value; the loss and
    the RMSE ignore them. Rows whose G flux is missing or not positive, or that have no valid
    coefficient, are flagged NOT_ENCODED.
    """
    c = np.asarray(coefficients)
    e = np.asarray(coefficient_errors)
    g = np.asarray(phot_g_mean_flux, dtype=np.float64)
    n_in = normalisation.mean.shape[0]
    _check_shapes(c, e, g, n_in)
    # The same bits as the store's input_flags (one definition), widened to the catalogue's.
    flags = compute_input_flags(c, e, g, n_bp=n_in // 2).astype(np.uint16)
    g_ok = np.isfinite(g) & (g > 0)
    g_safe = np.where(g_ok, g, 1.0)[:, None]
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(c) & np.isfinite(e) & (e > 0)
    flags[~g_ok | ~valid.any(axis=1)] |= np.uint16(CatalogFlag.NOT_ENCODED)

    # Computed in float64 then rounded once, like the published numpy preprocessing.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        x = ((c / g_safe - normalisation.mean) / normalisation.std).astype(np.float32)
        x_err = ((e / g_safe) / normalisation.std).astype(np.float32)
    usable = valid & ((flags & np.uint16(CatalogFlag.NOT_ENCODED)) == 0)[:, None]
    x = np.where(usable, x, np.float32(0))  # neutral input for whatever cannot be used
    x_err = np.where(valid, x_err, np.float32(1))
    return StandardisedInput(x=x, x_err=x_err, valid=valid, flags=flags)


@dataclass(frozen=True)
class EncodeResult:
    """Outputs of :meth:`TrainedModel.encode_arrays`; NaN on rows flagged NOT_ENCODED."""

    latent_mean: np.ndarray  # (rows, latent) float32, posterior mean
    latent_std: np.ndarray  # (rows, latent) float32, exp(log_var / 2)
    reconstruction: np.ndarray  # (rows, input) float32, e-/s (input units)
    scatter: np.ndarray  # (rows, input) float32, e-/s (input units)
    rmse: np.ndarray  # (rows,) float32, sqrt(mean over valid j of ((x - xhat) / x_err)^2)
    flags: np.ndarray  # (rows,) uint16 CatalogFlag bits
    anomaly_score: np.ndarray  # (rows,) float32, -log p(latent mean), nats (xpbatch.model.density)


@dataclass
class TrainedModel:
    """A scatter VAE with everything needed to encode real Gaia data.

    Returned by :func:`xpbatch.load_model`, :func:`xpbatch.import_xpvae` and training.

    Examples
    --------
    >>> import numpy as np
    >>> model = TrainedModel.untrained()
    >>> out = model.encode_arrays(np.ones((2, 110)), np.full((2, 110), 0.1), np.ones(2))
    >>> out.latent_mean.shape, out.scatter.shape, out.rmse.shape
    ((2, 6), (2, 110), (2,))
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

    def encode_arrays(
        self,
        coefficients: np.ndarray,
        coefficient_errors: np.ndarray,
        phot_g_mean_flux: np.ndarray,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | torch.device = "cpu",
    ) -> EncodeResult:
        """Encode spectra given in physical units (e-/s), deterministically.

        Parameters
        ----------
        coefficients, coefficient_errors
            (rows, 110) arrays, BP 0-54 then RP 0-54, in e-/s as in DR3. NaN marks a missing
            value (e.g. a missing band); such coefficients are ignored.
        phot_g_mean_flux
            (rows,) G-band mean flux in e-/s; rows where it is missing or not positive are
            flagged G_FLUX_MISSING and NOT_ENCODED, and their outputs are NaN.
        batch_size
            Rows per forward pass; each pass is padded to this size so results depend on how
            rows are grouped into chunks only at float32 round-off.
        device
            Torch device for the forward pass.

        Returns
        -------
        EncodeResult
            Posterior mean and std of the latents; reconstruction and scatter converted back to
            e-/s; RMSE = sqrt(mean_j ((x_j - xhat_j) / sigma_j)^2) over the valid coefficients
            (a unitless, error-weighted residual); CatalogFlag bits.

        Examples
        --------
        >>> import numpy as np
        >>> model = TrainedModel.untrained()
        >>> r = model.encode_arrays(np.zeros((1, 110)), np.ones((1, 110)), np.array([-1.0]))
        >>> bool(r.flags[0] & 256), bool(np.isnan(r.rmse[0]))  # NOT_ENCODED, NaN output
        (True, True)
        """
        from xpbatch.encode.kernel import (  # the kernel builds on this module
            encode_rows,
            kernel_for,
        )

        c = np.asarray(coefficients)
        e = np.asarray(coefficient_errors)
        g = np.asarray(phot_g_mean_flux)
        _check_shapes(c, e, g, self.config.input_dim)
        n_rows, n_in = c.shape
        latent = self.config.latent_dim
        result = EncodeResult(
            latent_mean=np.empty((n_rows, latent), np.float32),
            latent_std=np.empty((n_rows, latent), np.float32),
            reconstruction=np.empty((n_rows, n_in), np.float32),
            scatter=np.empty((n_rows, n_in), np.float32),
            rmse=np.empty(n_rows, np.float32),
            flags=np.empty(n_rows, np.uint16),
            anomaly_score=np.empty(n_rows, np.float32),
        )
        outputs = {field.name: getattr(result, field.name) for field in dataclasses.fields(result)}
        encode_rows(kernel_for(self, device), c, e, g, outputs, batch_size=batch_size)
        return result


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Membership test against a sorted array, O(n log m) without building a hash set."""
    if sorted_set.size == 0:
        return np.zeros(values.shape, bool)
    pos = np.searchsorted(sorted_set, values).clip(0, sorted_set.size - 1)
    return sorted_set[pos] == values
