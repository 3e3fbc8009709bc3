"""The latent density: EM fit, scores, the prior fallback, active dimensions, the model file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from xpbatch.cli.main import main
from xpbatch.encode.kernel import encode_arrays
from xpbatch.model import files as artifact
from xpbatch.model.density import (
    ACTIVE_KL_NATS,
    OUTLIER_QUANTILE,
    LatentDensity,
    fit_density,
    latent_kl,
)
from xpbatch.model.files import load_model, save_model
from xpbatch.model.trained import TrainedModel
from xpbatch.schema import CatalogFlag


def _two_clumps(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) latent means: 70 % around (+3, 0, 1), 30 % around (-3, 0, 1), dim 1 constant."""
    rng = np.random.default_rng(seed)
    left = rng.random(n) < 0.3
    mu = rng.normal(0.0, 0.5, (n, 3))
    mu[:, 0] += np.where(left, -3.0, 3.0)
    mu[:, 1] = 0.0
    mu[:, 2] += 1.0
    return mu


def test_em_recovers_a_known_mixture_and_scores_its_log_density() -> None:
    mu = _two_clumps(20_000)
    kl = np.array([1.0, 0.0, 0.5])  # dim 1 collapsed
    density = fit_density(mu, kl, n_components=2)
    assert density.active_dims == [0, 2]
    assert sorted(np.round(density.weights, 2)) == pytest.approx([0.3, 0.7], abs=0.02)
    # The score is -log of the fitted density in standardised coordinates: check it against
    # the closed form of the true mixture at a few points.
    points = np.array([[3.0, 0.0, 1.0], [-3.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    u = (points - density.centre) / density.scale
    sd = 0.5 / density.scale[[0, 2]]
    centres = (np.array([[3.0, 1.0], [-3.0, 1.0]]) - density.centre[[0, 2]]) / density.scale[[0, 2]]
    true = np.zeros(len(points))
    for weight, centre in zip((0.7, 0.3), centres, strict=True):
        z = (u[:, [0, 2]] - centre) / sd
        true += weight * np.exp(-0.5 * (z**2).sum(axis=1)) / (2 * math.pi * sd.prod())
    np.testing.assert_allclose(density.score_numpy(points)[:2], -np.log(true[:2]), atol=0.05)
    assert density.score_numpy(points)[2] > density.threshold  # between the clumps: an outlier
    flagged = (density.score_numpy(mu) > density.threshold).mean()
    assert flagged == pytest.approx(1 - OUTLIER_QUANTILE, abs=2e-4)


def test_score_is_torch_and_keeps_nan() -> None:
    density = fit_density(_two_clumps(5000), np.ones(3), n_components=3)
    mu = torch.tensor([[3.0, 0.0, 1.0], [float("nan"), 0.0, 0.0]], dtype=torch.float32)
    score = density.score(mu)
    assert score.dtype == torch.float64 and torch.isnan(score[1]) and torch.isfinite(score[0])


def test_prior_fallback_is_the_standard_normal_on_active_dims() -> None:
    prior = LatentDensity.prior(4, np.array([1.0, 0.0, 2.0, 1.0]))
    assert prior.kind == "prior" and prior.active_dims == [0, 2, 3]
    mu = np.array([[0.0, 50.0, 0.0, 0.0], [1.0, -9.0, 2.0, 0.5]])
    expected = 0.5 * (mu[:, [0, 2, 3]] ** 2).sum(axis=1) + 1.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(prior.score_numpy(mu), expected, rtol=1e-12)
    draws = np.random.default_rng(5).standard_normal((400_000, 4))
    assert (prior.score_numpy(draws) > prior.threshold).mean() == pytest.approx(1e-3, abs=2e-4)


def test_latent_kl_is_zero_for_the_prior_and_positive_otherwise() -> None:
    mu = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    log_var = torch.tensor([[0.0, math.log(0.25)], [0.0, math.log(0.25)]])
    kl = latent_kl(mu, log_var) / 2
    assert kl[0] == 0 and kl[1] == pytest.approx(-0.5 * (1 + math.log(0.25) - 1 - 0.25))
    assert kl[1] > ACTIVE_KL_NATS


def test_the_model_file_keeps_the_density(tmp_path: Path) -> None:
    density = fit_density(_two_clumps(3000), np.array([1.0, 0.0, 0.5]), n_components=2)
    model = TrainedModel.untrained(_config(3)).with_updates(density=density)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.density is not None and loaded.density.kind == "gaussian_mixture"
    np.testing.assert_array_equal(loaded.density.precision_cholesky, density.precision_cholesky)
    np.testing.assert_array_equal(loaded.density.kl, density.kl)  # type: ignore[arg-type]
    assert loaded.density.threshold == density.threshold
    text = CliRunner().invoke(main, ["info", str(tmp_path / "m.safetensors")]).output
    assert "active dims     [0, 2]" in text and "Gaussian mixture of 2 components" in text


def test_encode_flags_latent_outliers_by_the_score() -> None:
    model = TrainedModel.untrained()
    assert model.density is not None
    x = np.random.default_rng(0).normal(size=(64, 110))
    result = encode_arrays(model, x, np.full_like(x, 0.1), np.ones(64))
    flagged = (result.flags & np.uint16(CatalogFlag.LATENT_OUTLIER)) != 0
    np.testing.assert_array_equal(flagged, result.anomaly_score > model.density.threshold)
    expected = model.density.score_numpy(result.latent_mean)
    np.testing.assert_allclose(result.anomaly_score, expected, rtol=1e-6)


def test_import_finds_the_collapsed_dimensions(reference_dir: Path, tmp_path: Path) -> None:
    norm = tmp_path / "norm.npz"
    np.savez(norm, mu=np.zeros(110), sig=np.ones(110))
    model = artifact.import_xpvae(reference_dir / "weight.pt", norm, tmp_path / "pub.safetensors")
    assert model.density is not None and model.density.kind == "prior"
    assert model.density.active_dims == [0, 2, 3, 4]  # dims 1 and 5 are collapsed (docs/format.md)
    loaded = load_model(tmp_path / "pub.safetensors")
    assert loaded.density is not None and loaded.density.active_dims == [0, 2, 3, 4]
    assert "generated by the model" in loaded.provenance["latent_kl_source"]


def _config(latent_dim: int):  # type: ignore[no-untyped-def]
    from xpbatch.config import ModelConfig

    return ModelConfig(latent_dim=latent_dim)


def test_the_joint_density_counts_a_misfit_unusual_for_the_latent_position(
    tmp_path: Path,
) -> None:
    mu = _two_clumps(20_000, seed=3)
    rng = np.random.default_rng(4)
    rmse = np.exp(rng.normal(np.where(mu[:, 0] > 0, 0.0, 1.0), 0.1))  # clump-dependent misfit
    density = fit_density(mu, np.array([1.0, 0.0, 0.5]), rmse, n_components=4)
    assert density.log_rmse is not None
    point = np.array([[3.0, 0.0, 1.0]])  # the middle of the right clump
    usual, unusual = (density.score_numpy(point, np.array([r])) for r in (1.0, np.e))
    assert usual < density.threshold < unusual  # the other clump's misfit, here: an outlier
    with pytest.raises(ValueError, match="rmse"):
        density.score(torch.from_numpy(point))
    model = TrainedModel.untrained(_config(3)).with_updates(density=density)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors").density
    assert loaded is not None and loaded.score_numpy(point, np.array([np.e])) == unusual
