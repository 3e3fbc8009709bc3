"""What a model's latent space holds: active dimensions, the training set's density, anomaly scores.

- **Active dimensions.** The KL divergence of each latent dimension's posterior from the prior,
  averaged over the training set,
  ``KL_k = mean_rows(-1/2 (1 + log_var_k - mu_k^2 - exp(log_var_k)))`` in nats. A collapsed
  dimension (posterior = prior for every input) carries nothing and has ``KL_k ≈ 0``; a
  dimension is *active* when ``KL_k >= ACTIVE_KL_NATS``.
- **Density.** A Gaussian mixture (full covariances, fitted by EM in NumPy, :func:`fit_density`)
  of the training set's latent means on the active dimensions and their ln rmse, in
  *standardised* coordinates ``u = (mu - centre) / scale``, ``v = (ln rmse - a) / b`` (centre,
  scale, a, b: the training rows' means and standard deviations). A model without one (the
  imported published checkpoint) falls back to the prior, N(0, I) on the active dimensions with
  centre 0 and scale 1 and no ``v`` (:meth:`LatentDensity.prior`).
- **Anomaly score** of a source: ``-log p(u, v)`` in nats: a rare latent position, a poor
  reconstruction, or a misfit unusual for stars like it. Defined once for the CPU
  (:func:`score_rows`, numba; :meth:`LatentDensity.score_numpy`); its torch form
  (:meth:`LatentDensity.score`) runs on the encoder's device and is tested equal to it.
  Higher is rarer. LATENT_OUTLIER is set where it exceeds
  ``threshold``, the score that ``1 - outlier_quantile`` of the training set exceeds (for the
  prior: of draws from the prior).

Why a mixture: the latent means of real stars fill a curved, multi-modal region (dwarfs, giants,
the red clump), which one Gaussian (the old per-dimension 5σ cut) describes badly; a dozen
full-covariance components follow it and are cheap to evaluate on 219 M rows. Why
:data:`MIN_WEIGHT`: the training set holds the rare sources too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numba
import numpy as np
import torch

from xpbatch.schema import CatalogFlag

ACTIVE_KL_NATS = 0.05
"""A latent dimension whose mean KL over the training set is below this (nats) is collapsed."""
OUTLIER_QUANTILE = 0.999
"""LATENT_OUTLIER marks scores above this quantile of the training set's scores (1 in 1000)."""
N_COMPONENTS = 12
"""Components of the mixture fitted at training time (at most)."""
MIN_WEIGHT = 0.01
"""EM drops a component whose weight falls below this: the training set holds the rare sources
too, and a mixture free to spend a component on a tight group of them would call them common."""
FIT_ROWS = 100_000
"""At most this many training rows (a seeded random subset) fit the mixture."""
EM_ITERATIONS = 200
EM_TOLERANCE = 1e-5
"""EM stops when the mean log-likelihood per row improves by less than this (nats)."""
COVARIANCE_FLOOR = 1e-4
"""Added to every component's covariance diagonal (standardised units): no singular component."""
PRIOR_SAMPLES = 1_000_000
"""Draws from the prior that set the fallback density's threshold."""


@dataclasses.dataclass(frozen=True)
class LatentDensity:
    """The training set's distribution of latent means and the anomaly score it defines."""

    kl: np.ndarray | None
    """(latent,) mean KL per dimension over the training set, nats; None when not recorded."""
    centre: np.ndarray
    """(latent,) training mean of the latent means (0 for the prior)."""
    scale: np.ndarray
    """(latent,) training std of the latent means (1 for the prior): the unit of distances."""
    weights: np.ndarray
    """(components,) mixture weights; one component of weight 1 for the prior."""
    means: np.ndarray
    """(components, active) component means, standardised coordinates."""
    precision_cholesky: np.ndarray
    """(components, active, active) upper factors R with R R^T = covariance^-1 (sklearn's form)."""
    threshold: float
    """Score above which LATENT_OUTLIER is set."""
    log_rmse: np.ndarray | None = None
    """[centre, scale] of ln(rmse) over the training set when the mixture has ln(rmse) as its
    last coordinate (the reconstruction's misfit joins the latent position); None: latent only."""
    kind: str = "gaussian_mixture"
    """'gaussian_mixture' (fitted on the training set) or 'prior' (N(0, I), the fallback)."""
    outlier_quantile: float = OUTLIER_QUANTILE

    @property
    def active(self) -> np.ndarray:
        """(latent,) bool: dimensions that carry information (all, when the KL is unknown)."""
        if self.kl is None:
            return np.ones(self.centre.shape, bool)
        return np.asarray(self.kl) >= ACTIVE_KL_NATS

    @property
    def active_dims(self) -> list[int]:
        """Indices of the active dimensions."""
        return [int(i) for i in np.flatnonzero(self.active)]

    @classmethod
    def prior(cls, latent_dim: int, kl: np.ndarray | None = None) -> LatentDensity:
        """N(0, I) on the active dimensions: the fallback when no density was fitted."""
        active = np.ones(latent_dim, bool) if kl is None else np.asarray(kl) >= ACTIVE_KL_NATS
        d = int(active.sum())
        return cls(
            kl=None if kl is None else np.asarray(kl, np.float64),
            centre=np.zeros(latent_dim),
            scale=np.ones(latent_dim),
            weights=np.ones(1),
            means=np.zeros((1, d)),
            precision_cholesky=np.eye(d)[None],
            threshold=_prior_threshold(d),
            kind="prior",
        )

    def score(self, mu: torch.Tensor, rmse: torch.Tensor | None = None) -> torch.Tensor:
        """(rows,) -log p of latent means ``mu`` (rows, latent) [and their ``rmse`` (rows,)].

        In nats, float64; NaN stays NaN. ``rmse`` is needed when the density has ``log_rmse``.
        Torch ops only, on ``mu``'s device, so the kernel can call it where the encoder runs.
        """
        device = mu.device
        active = torch.from_numpy(self.active).to(device)
        centre = torch.from_numpy(np.asarray(self.centre, np.float64)).to(device)
        scale = torch.from_numpy(np.asarray(self.scale, np.float64)).to(device)
        u = ((mu.double() - centre) / scale)[:, active]  # (rows, active)
        if self.log_rmse is not None:
            if rmse is None:
                raise ValueError("this density scores (latent mean, rmse) pairs: pass rmse")
            log_rmse = (torch.log(rmse.double()) - self.log_rmse[0]) / self.log_rmse[1]
            u = torch.cat([u, log_rmse[:, None]], dim=1)  # (rows, active + 1)
        means = torch.from_numpy(self.means).to(device)  # (k, active)
        factor = torch.from_numpy(self.precision_cholesky).to(device)  # (k, active, active)
        y = torch.einsum("nkd,kde->nke", u[:, None, :] - means[None], factor)  # (rows, k, active)
        log_p = -0.5 * (y**2).sum(dim=2) + torch.from_numpy(self.log_norms()).to(device)
        return -torch.logsumexp(log_p, dim=1)

    def log_norms(self) -> np.ndarray:
        """(components,) float64 ``ln weight + ln det R - d/2 ln 2π`` of each component: its
        log density at its own mean (the score's terms that do not depend on the row)."""
        factor = np.asarray(self.precision_cholesky, np.float64)
        log_det = np.log(np.diagonal(factor, axis1=1, axis2=2)).sum(axis=1)
        log_weights = np.log(np.asarray(self.weights, np.float64))
        return log_weights + log_det - 0.5 * factor.shape[1] * math.log(2 * math.pi)

    def score_numpy(self, mu: np.ndarray, rmse: np.ndarray | None = None) -> np.ndarray:
        """(rows,) float64 -log p of latent means ``mu`` (rows, latent) [and ``rmse`` (rows,)].

        The score's one CPU definition, :func:`score_rows` (what the encode kernel runs on the
        CPU); :meth:`score` is its torch form for devices, tested equal to it.
        """
        mu = np.asarray(mu)
        if self.log_rmse is not None and rmse is None:
            raise ValueError("this density scores (latent mean, rmse) pairs: pass rmse")
        misfit = np.ones(len(mu)) if rmse is None else np.asarray(rmse)
        out = np.empty(len(mu))
        no_flags = np.zeros(len(mu), np.uint16)
        score_rows(mu, misfit, *score_terms(self), out, no_flags)
        return out

    # --- storage: tensors and a JSON description (artifact.py writes both into the model file)
    def to_tensors(self) -> dict[str, np.ndarray]:
        """Arrays to store, by name (without prefix)."""
        arrays = {
            "centre": self.centre,
            "scale": self.scale,
            "weights": self.weights,
            "means": self.means,
            "precision_cholesky": self.precision_cholesky,
        }
        if self.kl is not None:
            arrays["kl"] = self.kl
        if self.log_rmse is not None:
            arrays["log_rmse"] = self.log_rmse
        return {k: np.ascontiguousarray(v, np.float64) for k, v in arrays.items()}

    def describe(self) -> dict[str, Any]:
        """JSON-able scalars (stored in the model's description; shown by ``info``)."""
        return {
            "kind": self.kind,
            "components": int(self.weights.size),
            "with_rmse": self.log_rmse is not None,
            "active_dims": self.active_dims,
            "active_kl_nats": ACTIVE_KL_NATS,
            "outlier_quantile": self.outlier_quantile,
            "threshold": self.threshold,
        }

    @classmethod
    def from_stored(
        cls, arrays: dict[str, np.ndarray], description: dict[str, Any]
    ) -> LatentDensity:
        """Inverse of :meth:`to_tensors` and :meth:`describe`."""
        return cls(
            kl=arrays.get("kl"),
            log_rmse=arrays.get("log_rmse"),
            centre=arrays["centre"],
            scale=arrays["scale"],
            weights=arrays["weights"],
            means=arrays["means"],
            precision_cholesky=arrays["precision_cholesky"],
            threshold=float(description["threshold"]),
            kind=str(description["kind"]),
            outlier_quantile=float(description["outlier_quantile"]),
        )

    def attrs(self) -> dict[str, Any]:
        """What a catalogue records about its latent space (neighbours reads it back)."""
        return {
            **self.describe(),
            "kl": None if self.kl is None else [float(v) for v in self.kl],
            "centre": [float(v) for v in self.centre],
            "scale": [float(v) for v in self.scale],
        }


@functools.cache
def _prior_threshold(d: int) -> float:
    """The OUTLIER_QUANTILE of -log N(u; 0, I_d) over seeded draws from N(0, I_d)."""
    draws = np.random.default_rng(0).standard_normal((PRIOR_SAMPLES, d))
    scores = 0.5 * (draws**2).sum(axis=1) + 0.5 * d * math.log(2 * math.pi)
    return float(np.quantile(scores, OUTLIER_QUANTILE))


# --- the score on the CPU ---------------------------------------------------------------------
_LATENT_OUTLIER = np.uint16(CatalogFlag.LATENT_OUTLIER)
_NOT_ENCODED = np.uint16(CatalogFlag.NOT_ENCODED)


SCORE_BLOCK_ROWS = 256
"""Rows :func:`score_rows` takes through the mixture together (its scratch: a few KiB)."""


@numba.njit(cache=True, nogil=True, error_model="numpy")
def score_rows(
    mu: np.ndarray,  # (rows, latent) float32 latent means
    rmse: np.ndarray,  # (rows,) float32
    centre: np.ndarray,  # (latent,) float64
    scale: np.ndarray,  # (latent,) float64
    active: np.ndarray,  # (active,) int64 indices of the active latent dimensions
    log_rmse: np.ndarray,  # (2,) float64 centre and scale of ln rmse, or (0,): latent only
    means: np.ndarray,  # (components, d) float64
    factor: np.ndarray,  # (components, d, d) float64 precision Cholesky factors R
    stops: np.ndarray,  # (components, d) int64: R[c, j, e] == 0 for every j >= stops[c, e]
    log_norms: np.ndarray,  # (components,) float64 (LatentDensity.log_norms)
    threshold: np.float32,  # LATENT_OUTLIER above it (float32, as the torch path compares)
    score: np.ndarray,  # out (rows,) float32 (or float64), NaN on rows not encoded; or (0,)
    flags: np.ndarray,  # (rows,) uint16: NOT_ENCODED read, LATENT_OUTLIER set
) -> None:
    """The anomaly score (its CPU definition) and LATENT_OUTLIER, row by row.

    In float64 like the torch form :meth:`LatentDensity.score` (only the order of the sums
    differs), so both give the same float32 scores and the same outlier decisions; it needs no
    (rows, components, d) temporaries. Each row's sums run in the same order whatever the
    block: ``y_e = sum_j (u - m)_j R_je`` over ascending ``j``, then ``sum_e y_e^2``. The terms
    past ``stops`` (the factor's zeros, half of a triangular one) are skipped: adding them adds
    only zeros, unless a difference is infinite or NaN, and such a row is summed in full again.
    """
    n_rows = mu.shape[0]
    n_components, d = means.shape
    n_active = active.shape[0]
    block = max(1, min(SCORE_BLOCK_ROWS, n_rows))
    u = np.empty((d, block))  # (coordinate, row): the standardised points, rows innermost
    log_p = np.empty((n_components, block))
    finite = np.empty(block)  # 0 where every difference is finite, else NaN
    full = np.full((n_components, d), d, np.int64)  # every term, as einsum sums them
    nan = np.float32(np.nan)
    for start in range(0, n_rows, block):
        nb = min(block, n_rows - start)
        for a in range(n_active):
            k = active[a]
            for b in range(nb):
                u[a, b] = (np.float64(mu[start + b, k]) - centre[k]) / scale[k]
        if log_rmse.shape[0]:
            for b in range(nb):
                u[n_active, b] = (np.log(np.float64(rmse[start + b])) - log_rmse[0]) / log_rmse[1]
        _mixture_terms(u[:, :nb], means, factor, stops, log_norms, log_p[:, :nb], finite[:nb])
        for b in range(nb):
            i = start + b
            if flags[i] & _NOT_ENCODED:
                if score.shape[0]:
                    score[i] = nan
                continue
            if finite[b] != 0.0:  # an infinite or NaN difference: every term counts (NaN * 0)
                _mixture_terms(
                    u[:, b : b + 1], means, factor, full, log_norms, log_p[:, b : b + 1],
                    finite[b : b + 1],
                )  # fmt: skip
            value = _neg_log_sum_exp(log_p[:, b])
            if score.shape[0]:
                score[i] = value  # rounded to the array's dtype (float32 in the catalogue)
            if np.float32(value) > threshold:
                flags[i] |= _LATENT_OUTLIER


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _mixture_terms(
    u: np.ndarray,  # (d, rows) standardised points
    means: np.ndarray,  # (components, d)
    factor: np.ndarray,  # (components, d, d)
    stops: np.ndarray,  # (components, d) terms summed into y_e: j < stops[c, e]
    log_norms: np.ndarray,  # (components,)
    log_p: np.ndarray,  # out (components, rows): -q/2 + log_norms, q = |(u - m) R|^2
    finite: np.ndarray,  # out (rows,): 0 where every difference u - m is finite, else NaN
) -> None:
    """Each row's log density under each component, rows innermost (so the loops vectorise
    across rows; each row's sums keep their order)."""
    d, nb = u.shape
    diff = np.empty((d, nb))
    y = np.empty(nb)
    q = np.empty(nb)
    finite[:] = 0.0
    for c in range(means.shape[0]):
        for j in range(d):
            m = means[c, j]
            for b in range(nb):
                diff[j, b] = u[j, b] - m
                finite[b] += diff[j, b] * 0.0  # NaN once a difference is infinite or NaN
        q[:] = 0.0
        for e in range(d):
            y[:] = 0.0
            for j in range(stops[c, e]):
                r = factor[c, j, e]
                for b in range(nb):
                    y[b] += diff[j, b] * r
            for b in range(nb):
                q[b] += y[b] * y[b]
        for b in range(nb):
            log_p[c, b] = -0.5 * q[b] + log_norms[c]


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _neg_log_sum_exp(log_p: np.ndarray) -> float:
    """-log sum_c exp(log_p[c]), as ``-torch.logsumexp``: NaN if any term is NaN, inf if every
    term is -inf."""
    top, broken = -np.inf, False
    for c in range(log_p.shape[0]):
        broken = broken or np.isnan(log_p[c])
        top = max(top, log_p[c])
    if broken:
        return np.nan
    if top == -np.inf:  # every component infinitely far: torch.logsumexp gives -inf
        return np.inf
    total = 0.0
    for c in range(log_p.shape[0]):
        total += np.exp(log_p[c] - top)
    return -(top + np.log(total))


ScoreTerms = tuple[
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.float32,
]


def score_terms(density: LatentDensity) -> ScoreTerms:
    """The arguments of :func:`score_rows` that describe ``density``."""
    as64 = np.ascontiguousarray
    factor = as64(density.precision_cholesky, np.float64)  # (components, d, d)
    # stops[c, e]: 1 + the last j with factor[c, j, e] != 0 (e + 1 for a triangular factor).
    j_plus_1 = np.arange(1, factor.shape[1] + 1)[None, :, None]
    stops = np.where(factor != 0, j_plus_1, 0).max(axis=1, initial=0).astype(np.int64)
    return (
        as64(density.centre, np.float64),
        as64(density.scale, np.float64),
        np.flatnonzero(density.active).astype(np.int64),
        as64(np.empty(0) if density.log_rmse is None else density.log_rmse, np.float64),
        as64(density.means, np.float64),
        factor,
        stops,
        density.log_norms(),
        np.float32(density.threshold),
    )


# --- fitting --------------------------------------------------------------------------------
def latent_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """(latent,) KL of each dimension's posterior from N(0, 1), summed over the rows (float64)."""
    mu, log_var = mu.double(), log_var.double()
    return (-0.5 * (1 + log_var - mu**2 - torch.exp(log_var))).sum(dim=0)


def fit_density(
    latent_mean: np.ndarray,
    kl: np.ndarray,
    rmse: np.ndarray | None = None,
    *,
    n_components: int = N_COMPONENTS,
    seed: int = 0,
) -> LatentDensity:
    """Fit the Gaussian mixture of a training set's latent means (rows, latent) [and ln rmse].

    The centres and scales come from every row; the mixture from at most :data:`FIT_ROWS` of
    them; the threshold is the :data:`OUTLIER_QUANTILE` of the scores of every row.
    """
    mu = np.asarray(latent_mean, np.float64)
    ok = np.isfinite(mu).all(axis=1)
    if rmse is not None:
        ok &= np.isfinite(rmse) & (np.asarray(rmse) > 0)
    mu = mu[ok]
    centre, scale = mu.mean(axis=0), mu.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    active = np.asarray(kl) >= ACTIVE_KL_NATS
    if not active.any() or not len(mu):  # nothing learned: the score is that of the prior
        return LatentDensity.prior(latent_mean.shape[1], kl)
    features = ((mu - centre) / scale)[:, active]
    log_rmse = None
    if rmse is not None:
        ln = np.log(np.asarray(rmse, np.float64)[ok])
        log_rmse = np.array([ln.mean(), ln.std() or 1.0])
        features = np.column_stack([features, (ln - log_rmse[0]) / log_rmse[1]])
    rng = np.random.default_rng(seed)
    fit = (
        features[rng.choice(len(features), FIT_ROWS, replace=False)]
        if len(mu) > FIT_ROWS
        else features
    )
    weights, means, covariances = _em(fit, min(n_components, len(fit)), rng)
    density = LatentDensity(
        kl=np.asarray(kl, np.float64),
        centre=centre,
        scale=scale,
        weights=weights,
        means=means,
        precision_cholesky=_precision_cholesky(covariances),
        threshold=math.inf,
        log_rmse=log_rmse,
    )
    scores = density.score_numpy(mu, None if rmse is None else np.asarray(rmse)[ok])
    return dataclasses.replace(density, threshold=float(np.quantile(scores, OUTLIER_QUANTILE)))


def _precision_cholesky(covariances: np.ndarray) -> np.ndarray:
    """(k, d, d) R = inv(L)^T for covariances L L^T, so that (x - m) R ~ N(0, I)."""
    lower = np.linalg.cholesky(covariances)
    eye = np.eye(covariances.shape[1])
    return np.stack([np.linalg.solve(chol, eye).T for chol in lower])


def _log_resp(
    u: np.ndarray, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray
) -> tuple[np.ndarray, float]:
    """Log responsibilities (rows, k) and the mean log-likelihood per row."""
    factor = _precision_cholesky(covariances)
    y = np.einsum("nkd,kde->nke", u[:, None, :] - means[None], factor)
    log_det = np.log(np.diagonal(factor, axis1=1, axis2=2)).sum(axis=1)
    log_p = -0.5 * (y**2).sum(axis=2) + log_det + np.log(weights)
    log_p -= 0.5 * u.shape[1] * math.log(2 * math.pi)
    top = log_p.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(log_p - top).sum(axis=1))
    return log_p - log_norm[:, None], float(log_norm.mean())


def _em(
    u: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EM for a full-covariance Gaussian mixture, k-means++ start; (weights, means, covariances)."""
    n, d = u.shape
    means = _kmeans_plus_plus(u, k, rng)
    nearest = ((u[:, None, :] - means[None]) ** 2).sum(axis=2).argmin(axis=1)
    resp = np.eye(k)[nearest]
    floor = COVARIANCE_FLOOR * np.eye(d)
    previous = -math.inf
    for _ in range(EM_ITERATIONS):
        counts = resp.sum(axis=0) + 1e-12  # (k,)
        weights = counts / n
        means = resp.T @ u / counts[:, None]
        diff = u[:, None, :] - means[None]  # (n, k, d)
        covariances = np.einsum("nk,nkd,nke->kde", resp, diff, diff) / counts[:, None, None]
        covariances += floor
        keep = weights >= MIN_WEIGHT
        weights, means, covariances = (
            weights[keep] / weights[keep].sum(),
            means[keep],
            covariances[keep],
        )
        log_resp, mean_log_likelihood = _log_resp(u, weights, means, covariances)
        resp = np.exp(log_resp)
        if mean_log_likelihood - previous < EM_TOLERANCE:
            break
        previous = mean_log_likelihood
    return weights, means, covariances


def _kmeans_plus_plus(u: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k starting means: each next one drawn with probability proportional to squared distance."""
    centres = [u[rng.integers(len(u))]]
    distance = ((u - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = distance.sum()
        pick = rng.integers(len(u)) if total <= 0 else rng.choice(len(u), p=distance / total)
        centres.append(u[pick])
        distance = np.minimum(distance, ((u - u[pick]) ** 2).sum(axis=1))
    return np.array(centres)
