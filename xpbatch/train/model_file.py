"""The model file a training run ends with: the trained network with its normalisation,
split and provenance, the density of its training rows' latents and their fit statistics."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xpbatch.config import TrainConfig, result_options
from xpbatch.model import fit_check as fit
from xpbatch.model.density import LatentDensity, fit_density, latent_kl
from xpbatch.model.files import runtime_versions, save_model
from xpbatch.model.network import ScatterVAE, reconstruction_rmse
from xpbatch.model.trained import Normalisation, TrainedModel
from xpbatch.store.reader import store_id
from xpbatch.train.checkpoints import _json_roundtrip
from xpbatch.train.data import Selection
from xpbatch.train.loop import EVAL_BATCH_SIZE, Rows
from xpbatch.train.summary import EpochRecord

if TYPE_CHECKING:
    import xarray as xr


logger = logging.getLogger(__name__)


@torch.no_grad()
def _latent_density(network: ScatterVAE, rows: Rows, *, seed: int) -> LatentDensity:
    """Per-dimension KL and the density of the training rows' (latent mean, rmse) pairs."""
    network.eval()
    device = next(network.parameters()).device
    kl = torch.zeros(network.config.latent_dim, dtype=torch.float64, device=device)
    means, rmse = [], []
    for x, x_err, valid in rows.ordered_batches(EVAL_BATCH_SIZE):
        out = network(x)  # at the posterior mean, like encode-catalog
        kl += latent_kl(out.mu, out.log_var)
        means.append(out.mu.float().cpu().numpy())  # (batch, latent)
        rmse.append(reconstruction_rmse(x, out.xhat, x_err, valid).float().cpu().numpy())
    if not means:
        return LatentDensity.prior(network.config.latent_dim)
    kl_per_row = (kl / rows.n_rows).cpu().numpy()
    return fit_density(np.concatenate(means), kl_per_row, np.concatenate(rmse), seed=seed)


def _fit_statistics(model: TrainedModel, rows: Rows) -> dict[str, Any] | None:
    """What the first training rows look like to the trained model
    (:mod:`xpbatch.model.fit_check`)."""
    x, x_err, valid = next(iter(rows.ordered_batches(fit.SAMPLE_ROWS)))  # (rows, input) each
    x_np, x_err_np = x.float().cpu().numpy(), x_err.float().cpu().numpy()
    valid_np = np.ones(x_np.shape, bool) if valid is None else valid.cpu().numpy()
    stats = fit.measure(model, x_np, x_err_np, valid_np, source=fit.SOURCE_TRAINING)
    return None if stats is None else stats.to_dict()


def _write_model(
    network: ScatterVAE,
    normalisation: Normalisation,
    path: Path,
    train_rows: Rows,
    selection: Selection,
    records: list[EpochRecord],
    *,
    config: TrainConfig,
    store: xr.Dataset,
    device: torch.device,
    timings: dict[str, float],
) -> TrainedModel:
    """Save the trained network with its normalisation, split and provenance."""
    density = _latent_density(network, train_rows, seed=config.seed)
    last = records[-1] if records else None
    provenance = {
        "source": "trained",
        "store_id": store_id(store),
        "epochs": len(records),
        "seed": config.seed,
        "config": _json_roundtrip(result_options(config)),
        "counts": dict(selection.counts),
        "split_sha256": selection.fingerprint(),
        "final_train_loss": None if last is None else last.train_loss,
        "final_validation_loss": None if last is None else last.validation_loss,
        "device": str(device),
        "data_placement": train_rows.placement,
        "timings": timings,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": runtime_versions(),
    }
    model = TrainedModel(
        network=network.cpu(),
        normalisation=normalisation,
        name=path.name.removesuffix(".safetensors"),
        provenance=provenance,
        latent_reference_mean=density.centre,
        latent_reference_std=density.scale,
        density=density,
        train_source_id=selection.train_source_id,
        validation_source_id=selection.validation_source_id,
    )
    model.fit_statistics = _fit_statistics(model, train_rows)
    save_model(model, path)
    logger.info("wrote %s (%d epochs)", path, len(records))
    return model
