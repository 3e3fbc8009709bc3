"""Tests of xpbatch.benchmarks.uncertainty: std(z) of repeat pairs on numbers with a known answer,
the pairing, the bar, and ``xpbatch bench uncertainty`` end to end on a small mock."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from xpbatch.benchmarks.uncertainty import (
    BAR,
    G_EDGES,
    ZTable,
    comparable_pairs,
    pair_rows,
    repeat_z,
    robust_std,
    z_table,
)
from xpbatch.cli.main import main
from xpbatch.schema import CatalogFlag

N = 40_000


def _pairs(sigma: np.ndarray, seed: int = 0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two noisy measurements of the same true latents (rows, dims) with noise ``sigma``."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0.0, 1.0, sigma.shape)  # the star: the same for both observations
    return true + rng.normal(0.0, sigma) + shift, true + rng.normal(0.0, sigma)


@pytest.mark.parametrize(
    ("claimed", "expected"),
    [(1.0, 1.0), (2.0, 0.5), (0.5, 2.0)],
    ids=["right", "twice-too-large", "twice-too-small"],
)
def test_std_z_is_the_true_over_the_claimed_uncertainty(claimed: float, expected: float) -> None:
    g_mag = np.linspace(9.0, 17.6, N, endpoint=False)
    sigma = 0.05 * 10 ** (0.2 * (g_mag - 9.0))[:, None] * np.ones((1, 3))  # fainter: noisier
    mu_a, mu_b = _pairs(sigma)
    table = z_table("s", repeat_z(mu_a, mu_b, claimed * sigma, claimed * sigma), g_mag)
    assert table.std.shape == (3, len(G_EDGES))  # 9 bins and 'all'
    np.testing.assert_allclose(table.std, expected, rtol=0.06)
    np.testing.assert_allclose(table.robust, expected, rtol=0.1)
    assert table.passes() == (expected == 1.0)


def test_a_width_that_ignores_the_magnitude_fails_at_both_ends() -> None:
    g_mag = np.linspace(9.0, 17.6, N, endpoint=False)
    sigma = 0.05 * 10 ** (0.2 * (g_mag - 9.0))[:, None]
    mu_a, mu_b = _pairs(sigma, seed=1)
    flat = np.full_like(sigma, np.sqrt(np.mean(sigma**2)))  # right on average over all stars
    table = z_table("flat", repeat_z(mu_a, mu_b, flat, flat), g_mag)
    assert 0.95 < table.std[0, -1] < 1.05  # the bins show what 'all' hides
    assert table.std[0, 0] < 0.5 and table.std[0, -2] > 1.5
    assert not table.passes() and table.worst() in (table.std[0, 0], table.std[0, -2])


def test_unequal_widths_of_the_two_observations_combine_in_quadrature() -> None:
    rng = np.random.default_rng(2)
    sigma_a, sigma_b = rng.uniform(0.1, 1.0, (N, 2)), rng.uniform(0.1, 1.0, (N, 2))
    true = rng.normal(0.0, 1.0, (N, 2))
    z = repeat_z(true + rng.normal(0.0, sigma_a), true + rng.normal(0.0, sigma_b), sigma_a, sigma_b)
    assert abs(z_table("q", z, np.full(N, 12.0)).std[:, -1] - 1.0).max() < 0.03


def test_robust_std_ignores_a_few_wild_pairs() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 1.0, (N, 1))
    z[:200] = 50.0  # 0.5 % wild
    assert z.std() > 3.0
    assert abs(robust_std(z)[0] - 1.0) < 0.03


def test_bins_with_too_few_stars_and_non_finite_pairs_do_not_count() -> None:
    rng = np.random.default_rng(4)
    g_mag = np.r_[np.full(2000, 16.5), np.full(100, 9.5), 20.0]  # 9-10 sparse; 20 outside
    z = rng.normal(0.0, 1.0, (len(g_mag), 2))
    z[2000:2100] *= 3.0  # the sparse bin is badly off, but holds fewer than 500 stars
    z[0, 1] = np.nan  # a pair not encoded
    table = z_table("t", z, g_mag, dims=(1,))
    assert table.dims == (1,) and table.counts[0] == 100 and table.counts[7] == 1999
    assert table.counts[-1] == 2100 and np.isnan(table.std[0, 3])  # 'all' keeps G = 20
    assert table.counted().tolist() == [False] * 7 + [True, False]
    assert table.passes() and BAR[0] <= table.worst() <= BAR[1]
    text = "\n".join(table.lines())
    assert "1,999*" in text and "100 " in text and " -" in text


def test_a_table_without_counted_bins_does_not_pass() -> None:
    table = z_table("few", np.zeros((10, 1)), np.full(10, 12.0))
    assert not table.passes() and np.isnan(table.worst())
    assert isinstance(table, ZTable)


@pytest.mark.parametrize(
    ("star_id", "a", "b"),
    [
        ([5, 5, 7, 7], [0, 2], [1, 3]),
        ([7, 5, 7, 5], [1, 0], [3, 2]),  # by star, each pair in row order
        ([1, 2, 2, 2, 3], [1], [2]),  # a single is left out; a triple gives its first two
        ([1, 2, 3], [], []),
    ],
    ids=["pairs", "interleaved", "single-and-triple", "no-repeats"],
)
def test_pair_rows_finds_the_first_two_observations_of_each_star(
    star_id: list[int], a: list[int], b: list[int]
) -> None:
    got_a, got_b = pair_rows(np.array(star_id))
    assert got_a.tolist() == a and got_b.tolist() == b


def test_pairs_with_an_incomplete_or_unencoded_row_are_not_compared() -> None:
    star_id = np.array([1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    latent = np.zeros((10, 2))
    latent[5, 1] = np.nan  # star 3: not encoded
    flags = np.zeros(10, np.uint16)
    flags[2] = CatalogFlag.BP_MISSING  # star 2: one observation without BP
    flags[6] = CatalogFlag.NON_FINITE  # star 4
    flags[8] = flags[9] = CatalogFlag.LATENT_OUTLIER  # star 5: an output flag, still compared
    a, b = comparable_pairs(star_id, latent, flags)
    assert a.tolist() == [0, 8] and b.tolist() == [1, 9]


@pytest.mark.slow
def test_bench_uncertainty_runs_end_to_end(tmp_path: Path) -> None:
    args = ["bench", "uncertainty", "--stars", "600", "--train-rows", "2000", "--epochs", "6",
            "--mc-samples", "4", "--workdir", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "600 mock stars observed twice" in out and "sigma = latent_std" in out
    assert re.search(r"^dim \d+ +\d\.\d\d \(\d\.\d\d\)", out, re.M), out  # a learned dim's row
    assert "G bin" in out and "17-17.6" in out
    assert "recommended: sigma = latent_std_mc (MC spread)" in out
    assert "shown beside: sigma = latent_std (posterior width)" in out
    assert "the bar 0.9 <= std(z) <= 1.15" in out and "4 Monte-Carlo draws" in out
    assert (tmp_path / "model-2000-6ep-seed1.safetensors").is_file()
    again = CliRunner().invoke(main, args)  # the model is reused
    assert again.exit_code == 0 and "(reused)" in again.output
