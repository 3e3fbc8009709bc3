"""The device kernel against the input recipe's one definition, on ordinary and edge rows."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from xpbatch.encode.kernel import EncodeKernel, encode_rows, kernel_for
from xpbatch.model.density import LatentDensity
from xpbatch.model.trained import Normalisation, TrainedModel, standardise
from xpbatch.schema import CatalogFlag
from xpbatch.store.input_recipe import compute_input_flags

N_BP = 55


def _numpy_reference(
    model: TrainedModel, c: np.ndarray, e: np.ndarray, g: np.ndarray
) -> dict[str, np.ndarray]:
    """The recipe's one definition (:func:`standardise`, the CPU's numba loop, over all rows) and
    the score's (:meth:`LatentDensity.score_numpy`) around one unpadded network pass, with
    NumPy outputs (the test oracle)."""
    inp = standardise(c, e, g, model.normalisation)
    with torch.inference_mode():
        out = model.network(torch.from_numpy(inp.x))
    mu, log_var, xhat, shat = (t.numpy().copy() for t in (out.mu, out.log_var, out.xhat, out.shat))
    dead = ~inp.encodable
    for array in (mu, log_var, xhat, shat):
        array[dead] = np.nan
    gg = np.where(dead, np.nan, g.astype(np.float64))[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(inp.valid, (inp.x - xhat) / inp.x_err, np.float32(0))
        rmse = np.sqrt((z**2).sum(axis=1) / inp.valid.sum(axis=1)).astype(np.float32)
    norm = model.normalisation
    assert model.density is not None
    score = model.density.score_numpy(mu, rmse).astype(np.float32)  # NaN where not encoded
    flags = inp.flags.copy()
    with np.errstate(invalid="ignore"):
        flags[score > model.density.threshold] |= np.uint16(CatalogFlag.LATENT_OUTLIER)
    return {
        "latent_mean": mu,
        "latent_std": np.exp(np.float32(0.5) * log_var),
        "scatter": (shat * norm.std * gg).astype(np.float32),
        "reconstruction": ((xhat * norm.std + norm.mean) * gg).astype(np.float32),
        "rmse": rmse,
        "anomaly_score": score,
        "flags": flags,
    }


def _edge_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Ordinary rows followed by one row per edge case; the case names."""
    rng = np.random.default_rng(3)
    cases = [
        "clean",
        "clean-bright",
        "bp-missing",
        "rp-missing",
        "both-missing",
        "g-zero",
        "g-negative",
        "g-nan",
        "g-inf",
        "coefficient-nan",
        "coefficient-inf",
        "error-zero",
        "error-negative",
        "error-nan",
        "all-invalid",
    ]
    n = len(cases)
    g = rng.uniform(1e3, 1e6, n)
    g[1] = 3e8
    x = rng.normal(size=(n, 110)).astype(np.float32)
    c = (x * g[:, None]).astype(np.float32)
    e = (rng.uniform(0.01, 0.1, (n, 110)) * g[:, None]).astype(np.float32)
    row = {name: i for i, name in enumerate(cases)}
    c[row["bp-missing"], :N_BP] = np.nan
    e[row["bp-missing"], :N_BP] = np.nan
    c[row["rp-missing"], N_BP:] = np.nan
    c[row["both-missing"]] = np.nan
    g[row["g-zero"]] = 0.0
    g[row["g-negative"]] = -5.0
    g[row["g-nan"]] = np.nan
    g[row["g-inf"]] = np.inf
    c[row["coefficient-nan"], 7] = np.nan
    c[row["coefficient-inf"], 60] = np.inf
    e[row["error-zero"], 3] = 0.0
    e[row["error-negative"], 90] = -1.0
    e[row["error-nan"], 100] = np.nan
    e[row["all-invalid"]] = 0.0
    return c, e, g, cases


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    """A model with a non-trivial normalisation and a tight latent density (some outliers)."""
    rng = np.random.default_rng(0)
    normalisation = Normalisation(rng.normal(0, 0.1, 110), rng.uniform(0.5, 2.0, 110))
    base = TrainedModel.untrained(seed=4)
    return base.with_updates(
        normalisation=normalisation,
        # the prior squeezed to a spread of 0.05, so some rows are outliers
        density=dataclasses.replace(LatentDensity.prior(6), scale=np.full(6, 0.05)),
    )


@pytest.fixture(params=[True, False], ids=["fused-cpu", "torch-ops"])
def kernel(request: pytest.FixtureRequest, model: TrainedModel) -> EncodeKernel:
    """Both paths of the kernel: the CPU's fused loops and the torch operations of a GPU."""
    return EncodeKernel(model, "cpu", fused=request.param)


def _kernel_outputs(
    kernel: EncodeKernel,
    c: np.ndarray,
    e: np.ndarray,
    g: np.ndarray,
    names: list[str],
    *,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    n = len(g)
    widths = kernel.widths(names)
    dtypes = {"flags": np.uint16}
    out = {
        name: np.full((n, w) if w > 1 else (n,), 7, dtypes.get(name, np.float32))
        for name, w in widths.items()
    }
    encode_rows(kernel, c, e, g, out, batch_size=batch_size or len(g))
    return out


ALL_OUTPUTS = [
    "latent_mean", "latent_std", "scatter", "reconstruction", "rmse", "anomaly_score", "flags"
]  # fmt: skip


@pytest.mark.parametrize("batch_size", [4, None], ids=["batches-of-4", "one-batch"])
def test_kernel_matches_the_numpy_recipe_on_edge_rows(
    kernel: EncodeKernel, model: TrainedModel, batch_size: int | None
) -> None:
    c, e, g, cases = _edge_rows()
    got = _kernel_outputs(kernel, c, e, g, ALL_OUTPUTS, batch_size=batch_size)
    want = _numpy_reference(model, c, e, g)
    for i, case in enumerate(cases):
        assert int(got["flags"][i]) == int(want["flags"][i]), case
        for name in ALL_OUTPUTS[:-1]:
            a, b = got[name][i], want[name][i]
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{case} {name}")
            relative = ("scatter", "reconstruction", "anomaly_score")
            scale = np.maximum(np.abs(b), 1.0) if name in relative else 1.0
            finite = ~np.isnan(b)
            assert np.all(np.abs(a - b)[finite] / np.broadcast_to(scale, b.shape)[finite] < 1e-4), (
                case,
                name,
            )


@pytest.mark.parametrize(
    ("case", "bits"),
    [
        ("bp-missing", CatalogFlag.BP_MISSING),
        ("rp-missing", CatalogFlag.RP_MISSING),
        ("both-missing", CatalogFlag.BP_MISSING | CatalogFlag.RP_MISSING | CatalogFlag.NOT_ENCODED),
        ("g-zero", CatalogFlag.G_FLUX_MISSING | CatalogFlag.NOT_ENCODED),
        ("g-nan", CatalogFlag.G_FLUX_MISSING | CatalogFlag.NOT_ENCODED),
        ("coefficient-inf", CatalogFlag.NON_FINITE),
        ("error-zero", CatalogFlag.NON_FINITE),
        ("all-invalid", CatalogFlag.NON_FINITE | CatalogFlag.NOT_ENCODED),
    ],
)
def test_edge_rows_carry_their_input_bits(
    kernel: EncodeKernel, case: str, bits: CatalogFlag
) -> None:
    c, e, g, cases = _edge_rows()
    flags = _kernel_outputs(kernel, c, e, g, ["flags"])["flags"]
    row = cases.index(case)
    assert CatalogFlag(int(flags[row])) & ~CatalogFlag.LATENT_OUTLIER == bits


def test_only_the_outputs_asked_for_are_written(kernel: EncodeKernel) -> None:
    c, e, g, _ = _edge_rows()
    got = _kernel_outputs(kernel, c, e, g, ["rmse", "flags"])
    assert set(got) == {"rmse", "flags"}
    full = _kernel_outputs(kernel, c, e, g, ALL_OUTPUTS)
    np.testing.assert_array_equal(got["rmse"], full["rmse"])


def test_a_g_flux_outside_float32_is_not_encoded(kernel: EncodeKernel) -> None:
    """A flux that float32 cannot hold is missing, for the kernel and the store's flags alike."""
    c, e, g, _ = _edge_rows()
    g = g[:3].copy()
    g[0], g[2] = 1e-40, 1e39
    flags = _kernel_outputs(kernel, c[:3], e[:3], g, ["flags"])["flags"]
    for row in (0, 2):
        assert flags[row] & CatalogFlag.NOT_ENCODED and flags[row] & CatalogFlag.G_FLUX_MISSING
    assert not flags[1] & CatalogFlag.NOT_ENCODED
    store_flags = compute_input_flags(c[:3], e[:3], g)
    np.testing.assert_array_equal(store_flags, flags & 0xFF)


def test_the_torch_recipe_equals_the_reference_bit_for_bit(model: TrainedModel) -> None:
    """The device path's recipe (torch) gives the reference's (numba) x, x_err, valid and bits,
    on every edge row; the store's flags are the reference's low byte."""
    c, e, g, cases = _edge_rows()
    want = standardise(c, e, g, model.normalisation)
    kernel = EncodeKernel(model, "cpu", fused=False)
    with torch.inference_mode():
        tensors = kernel._to_device(c, e, g)
        x, x_err, valid, flags = (t.numpy() for t in kernel._recipe(*tensors))
    for i, case in enumerate(cases):
        np.testing.assert_array_equal(x[i], want.x[i], err_msg=case)
        np.testing.assert_array_equal(x_err[i], want.x_err[i], err_msg=case)
        np.testing.assert_array_equal(valid[i], want.valid[i], err_msg=case)
        assert int(flags[i]) == int(want.flags[i]), case
    np.testing.assert_array_equal(compute_input_flags(c, e, g), want.flags & 0xFF)


def test_threads_sharing_one_kernel_get_the_serial_result(kernel: EncodeKernel) -> None:
    rng = np.random.default_rng(5)
    blocks = []
    for _ in range(4):
        g = rng.uniform(1e3, 1e5, 300)
        c = (rng.normal(size=(300, 110)) * g[:, None]).astype(np.float32)
        blocks.append((c, np.abs(c) * 0.05 + 1, g))
    serial = [_kernel_outputs(kernel, *block, ALL_OUTPUTS) for block in blocks]
    results: list[dict[str, np.ndarray] | None] = [None] * len(blocks)

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = _kernel_outputs(kernel, *blocks[i], ALL_OUTPUTS)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(blocks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(serial, results, strict=True):
        assert got is not None
        for name in ALL_OUTPUTS:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_the_fused_and_torch_paths_agree_on_many_rows(model: TrainedModel) -> None:
    rng = np.random.default_rng(6)
    g = rng.uniform(1e3, 1e6, 3000)
    c = (rng.normal(size=(3000, 110)) * g[:, None]).astype(np.float32)
    e = (np.abs(c) * 0.05 + g[:, None] * 0.01).astype(np.float32)
    fused, ops = EncodeKernel(model, fused=True), EncodeKernel(model, fused=False)
    a = _kernel_outputs(fused, c, e, g, ALL_OUTPUTS, batch_size=512)
    b = _kernel_outputs(ops, c, e, g, ALL_OUTPUTS, batch_size=512)
    np.testing.assert_array_equal(a["flags"], b["flags"])
    for name in ("latent_mean", "latent_std", "rmse", "anomaly_score"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5, err_msg=name)
    for name in ("scatter", "reconstruction"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)


def test_the_kernel_is_built_once_per_model_and_device(model: TrainedModel) -> None:
    assert kernel_for(model) is kernel_for(model, "cpu")
    assert isinstance(kernel_for(model), EncodeKernel)
    assert kernel_for(model.with_updates(name="other")) is not kernel_for(model)


def _mixture(rng: np.random.Generator, k: int = 12, latent: int = 6) -> LatentDensity:
    """A full-covariance mixture on five active dimensions plus ln rmse (as train fits)."""
    from xpbatch.model.density import _precision_cholesky

    kl = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])[:latent]  # dimension 2 collapsed
    d = int((kl >= 0.05).sum()) + 1
    a = rng.normal(size=(k, d, d))
    covariances = a @ a.transpose(0, 2, 1) / d + 0.1 * np.eye(d)
    return LatentDensity(
        kl=kl,
        centre=rng.normal(size=latent),
        scale=rng.uniform(0.5, 2.0, latent),
        weights=rng.dirichlet(np.ones(k)),
        means=rng.normal(size=(k, d)),
        precision_cholesky=_precision_cholesky(covariances),
        threshold=9.0,
        log_rmse=np.array([0.1, 0.7]),
    )


def test_the_fused_score_equals_the_float64_torch_score() -> None:
    """score_rows (the CPU path) gives density.score's float32 values and outliers,
    also on rows the network never gives: NaN or huge latents, zero or infinite rmse."""
    from xpbatch.model.density import score_rows, score_terms

    rng = np.random.default_rng(11)
    density = _mixture(rng)
    mu = rng.normal(size=(5000, 6)).astype(np.float32) * 2
    rmse = rng.lognormal(0.1, 0.7, 5000).astype(np.float32)
    mu[0, 1], mu[1, 2], mu[2, 0] = np.nan, np.nan, 1e30  # a NaN in a collapsed dim is ignored
    rmse[3], rmse[4], rmse[5] = 0.0, np.inf, np.nan
    flags = np.zeros(5000, np.uint16)
    flags[6] = CatalogFlag.NOT_ENCODED
    score = np.full(5000, 7, np.float32)
    score_rows(mu, rmse, *score_terms(density), score, flags)

    expected = density.score(torch.from_numpy(mu), torch.from_numpy(rmse)).float().numpy()
    expected[6] = np.nan
    np.testing.assert_array_equal(score, expected)
    with np.errstate(invalid="ignore"):
        outlier = expected > density.threshold
    assert 100 < outlier.sum() < 4900  # the threshold splits the rows
    np.testing.assert_array_equal((flags & CatalogFlag.LATENT_OUTLIER) != 0, outlier)
    assert flags[6] == CatalogFlag.NOT_ENCODED


@pytest.mark.parametrize("factor", ["triangular", "full"])
def test_skipping_the_factors_zeros_changes_no_bit_of_the_score(factor: str) -> None:
    """score_rows skips the terms past each column's last nonzero (half of a triangular factor)
    and sums rows in blocks; every row's float64 score is bit for bit what summing every term
    gives, also where a difference is infinite or NaN (there NaN * 0 counts)."""
    from xpbatch.model.density import SCORE_BLOCK_ROWS, score_rows, score_terms

    rng = np.random.default_rng(5)
    density = _mixture(rng)
    if factor == "full":
        noise = np.tril(rng.normal(size=density.precision_cholesky.shape), -1)  # below diagonal
        density = dataclasses.replace(
            density, precision_cholesky=density.precision_cholesky + noise
        )
    n = 3 * SCORE_BLOCK_ROWS + 7  # several blocks and a short one
    mu = (rng.normal(size=(n, 6)) * 3).astype(np.float32)
    rmse = rng.lognormal(0.1, 0.7, n).astype(np.float32)
    mu[0, 0], mu[1, 3], mu[2, 4], mu[3, 1] = np.inf, -np.inf, np.nan, 3e38
    rmse[4], rmse[5], rmse[6] = 0.0, np.inf, np.nan
    centre, scale, active, log_rmse, means, factors, stops, log_norms, threshold = score_terms(
        density
    )
    assert (stops < stops.shape[1]).any() == (factor == "triangular")
    scores = {}
    for name, used in (("skipping", stops), ("every-term", np.full_like(stops, stops.shape[1]))):
        scores[name] = np.empty(n)
        flags = np.zeros(n, np.uint16)
        score_rows(
            mu, rmse, centre, scale, active, log_rmse, means, factors, used, log_norms,
            threshold, scores[name], flags,
        )  # fmt: skip
    np.testing.assert_array_equal(
        scores["skipping"].view(np.uint64), scores["every-term"].view(np.uint64)
    )
    if factor == "triangular":  # an infinite difference times a skipped zero: NaN, as einsum
        assert np.isnan(scores["skipping"][:7]).sum() >= 4
