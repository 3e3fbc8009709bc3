"""``xpbatch bench anomalies --mc-samples K``: do the Monte-Carlo widths help?

On the anomaly benchmark's mock and model (:mod:`xpbatch.benchmarks.anomalies`), the store is
encoded again with K draws per spectrum, and two uses of ``latent_std_mc`` are measured against
the catalogue's own:

- the anomaly score under the training-set mixture convolved with each source's own width
  (component covariances Σ_k + diag(σ²) in the density's standardised units), against
  ``anomaly_score``, and the same with ``latent_std`` as the width;
- neighbours: each query star's 50 nearest latent neighbours re-ranked by
  χ² = Σ_d Δμ_d² / (σ_q,d² + σ_n,d²) over the active dimensions, the 10 best kept, against the 10
  nearest: the median |ΔTeff| and |Δ[M/H]| between a star and its neighbours.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from xpbatch.model.density import LatentDensity

POOL = 50
"""Nearest latent neighbours of a query that the χ² ranking chooses from."""


@dataclasses.dataclass(frozen=True)
class McWidthsEffect:
    """What the Monte-Carlo widths change on the anomaly benchmark's catalogue."""

    samples: int
    covariance: str
    auc_anomaly_score: float
    auc_mc_widths: float
    """ROC AUC of the score under the mixture convolved with latent_std_mc."""
    auc_posterior_widths: float
    """The same with latent_std as the width."""
    dteff_nearest: float
    dteff_chi2: float
    dmh_nearest: float
    dmh_chi2: float

    def report(self) -> str:
        """A few lines for the terminal."""
        return "\n".join(
            [
                f"Monte-Carlo widths (K = {self.samples}, {self.covariance} covariance):",
                f"  ROC AUC, rare vs normal: anomaly_score {self.auc_anomaly_score:.3f}, density "
                f"convolved with latent_std_mc {self.auc_mc_widths:.3f}, with latent_std "
                f"{self.auc_posterior_widths:.3f}",
                f"  10 neighbours, median |dTeff| / |d[M/H]|: nearest {self.dteff_nearest:.1f} K "
                f"/ {self.dmh_nearest:.3f} dex, best chi2 with latent_std_mc of the {POOL} "
                f"nearest {self.dteff_chi2:.1f} K / {self.dmh_chi2:.3f} dex",
            ]
        )


def convolved_score(
    density: LatentDensity, mu: np.ndarray, rmse: np.ndarray, widths: np.ndarray
) -> np.ndarray:
    """(rows,) -log p of latent means ``mu`` (rows, latent) under ``density`` convolved with a
    per-row Gaussian of standard deviations ``widths`` (rows, latent); the ln(rmse) coordinate,
    when the density has one, gets no width. Widths of 0 give ``density.score_numpy``."""
    active = density.active
    u = ((mu - density.centre) / density.scale)[:, active]  # (rows, active)
    var = ((widths / density.scale)[:, active]) ** 2
    if density.log_rmse is not None:
        log_rmse = (np.log(rmse) - density.log_rmse[0]) / density.log_rmse[1]
        u = np.concatenate([u, log_rmse[:, None]], axis=1)
        var = np.concatenate([var, np.zeros((len(u), 1))], axis=1)
    factor = np.asarray(density.precision_cholesky, np.float64)
    covariance = np.linalg.inv(factor @ factor.transpose(0, 2, 1))  # (k, D, D)
    n_dims = u.shape[1]
    log_p = []
    for k, weight in enumerate(density.weights):
        c = covariance[k][None] + np.eye(n_dims)[None] * var[:, None, :]  # (rows, D, D)
        diff = u - density.means[k]
        solved = np.linalg.solve(c, diff[..., None])[..., 0]
        log_det = np.linalg.slogdet(c)[1]
        mahalanobis = np.einsum("nd,nd->n", diff, solved)
        log_p.append(
            math.log(weight) - 0.5 * (mahalanobis + log_det + n_dims * math.log(2 * math.pi))
        )
    return -np.logaddexp.reduce(np.stack(log_p, axis=1), axis=1)


def measure_mc_widths(
    root: Path, *, samples: int, n_queries: int = 1000, seed: int = 1
) -> McWidthsEffect:
    """Encode the anomaly benchmark's store in ``root`` (its ``workdir``) with ``samples``
    draws and measure (module docstring) on ``n_queries`` normal stars drawn with ``seed``."""
    import pandas as pd

    from xpbatch import schema
    from xpbatch.benchmarks.anomalies import N_NEIGHBOURS, roc_auc
    from xpbatch.catalog.zarr_catalog import open_catalog, read_attrs
    from xpbatch.config import EncodeConfig
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.mock import read_mock_labels
    from xpbatch.model.files import load_model
    from xpbatch.products.neighbours import find_neighbours

    store, model_path, out = root / "mock.zarr", root / "model.safetensors", root / "mc.zarr"
    config = EncodeConfig(overwrite=True, progress_bar=False, mc_samples=samples)
    encode_catalog(store, model_path, out, config=config)
    ds = open_catalog(out).compute()
    labels = read_mock_labels(store).loc[ds.source_id.values]
    encoded = np.isfinite(ds.anomaly_score.values)
    rare = labels["population"].to_numpy()[encoded] > 0
    density = load_model(model_path).density
    assert density is not None
    mu = ds.latent_mean.values[encoded].astype(np.float64)
    rmse = ds.rmse.values[encoded].astype(np.float64)
    width_mc = ds.latent_std_mc.values[encoded].astype(np.float64)
    width_posterior = ds.latent_std.values[encoded].astype(np.float64)

    ids = ds.source_id.values[encoded]
    queries = np.random.default_rng(seed).choice(ids[~rare], n_queries, replace=False)
    found = find_neighbours(out, queries, k=POOL)
    row = pd.Series(np.arange(len(ids)), index=ids)
    query, neighbour = found.query_source_id.to_numpy(), found.source_id.to_numpy()
    qi, ni = row.loc[query].to_numpy(), row.loc[neighbour].to_numpy()
    delta = (mu[qi] - mu[ni]) ** 2 / (width_mc[qi] ** 2 + width_mc[ni] ** 2)
    chi2 = delta[:, density.active].sum(axis=1)
    best = pd.Series(chi2).groupby(query).rank(method="first").to_numpy() <= N_NEIGHBOURS
    nearest = found.groupby("query_source_id").cumcount().to_numpy() < N_NEIGHBOURS

    def median_difference(column: str, pick: np.ndarray) -> float:
        values = labels[column]
        a, b = values.loc[query[pick]].to_numpy(), values.loc[neighbour[pick]].to_numpy()
        return float(np.median(np.abs(a - b)))

    options = read_attrs(out)[schema.CATALOG_ATTR_OPTIONS]
    return McWidthsEffect(
        samples=samples,
        covariance=options[schema.MC_OPTION_COVARIANCE],
        auc_anomaly_score=roc_auc(ds.anomaly_score.values[encoded], rare),
        auc_mc_widths=roc_auc(convolved_score(density, mu, rmse, width_mc), rare),
        auc_posterior_widths=roc_auc(convolved_score(density, mu, rmse, width_posterior), rare),
        dteff_nearest=median_difference("teff", nearest),
        dteff_chi2=median_difference("teff", best),
        dmh_nearest=median_difference("m_h", nearest),
        dmh_chi2=median_difference("m_h", best),
    )
