"""The in-memory encode kernel: fidelity, batching/order invariance, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpbatch.encode.kernel import encode_arrays
from xpbatch.errors import InputShapeError
from xpbatch.model.files import import_xpvae
from xpbatch.model.trained import Normalisation, TrainedModel
from xpbatch.schema import CatalogFlag


@pytest.fixture(scope="module")
def reference(reference_dir):
    return dict(np.load(reference_dir / "reference_outputs.npz"))


@pytest.fixture(scope="module")
def published_model(reference_dir, tmp_path_factory):
    """The published checkpoint imported with identity normalisation."""
    tmp = tmp_path_factory.mktemp("published")
    np.savez(tmp / "identity.npz", mu=np.zeros(110), sig=np.ones(110))
    return import_xpvae(reference_dir / "weight.pt", tmp / "identity.npz", tmp / "m.safetensors")


def test_encode_arrays_reproduces_the_published_outputs(published_model, reference):
    ref = reference
    out = encode_arrays(published_model, ref["x"], ref["x_err"], np.ones(len(ref["x"])))
    np.testing.assert_allclose(out.latent_mean, ref["mu"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.latent_std, np.exp(0.5 * ref["log_var"]), rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.reconstruction, ref["xhat"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.scatter, ref["shat"], rtol=0, atol=1e-4)
    # rmse sums up to 110 squared float32 residuals scaled by small errors: CPU kernels of other
    # families move its last ~50 ulps, so it is held to 1e-5 relative as well (rows with rmse > 10).
    np.testing.assert_allclose(out.rmse, ref["rmse"], rtol=1e-5, atol=1e-4)
    assert not np.any(out.flags & np.uint16(CatalogFlag.NOT_ENCODED))


def test_physical_units_follow_the_input_recipe(published_model, reference):
    """Scaling the input by a G flux and a normalisation gives the same model-space answer."""
    rng = np.random.default_rng(0)
    x, e = reference["x"][:256], reference["x_err"][:256]
    mean, std = rng.normal(0, 0.1, 110), rng.uniform(0.5, 2.0, 110)
    g = rng.uniform(1e3, 1e6, 256)
    scaled = published_model.with_updates(normalisation=Normalisation(mean, std))
    phys = ((x * std.astype(np.float32) + mean.astype(np.float32)) * g[:, None]).astype(np.float64)
    phys_err = (e * std.astype(np.float32)) * g[:, None]
    out = encode_arrays(scaled, phys, phys_err, g)
    ref = encode_arrays(published_model, x, e, np.ones(256))
    np.testing.assert_allclose(out.latent_mean, ref.latent_mean, atol=2e-3)
    np.testing.assert_allclose(out.scatter / (std * g[:, None]), ref.scatter, atol=2e-3)
    model_space = (out.reconstruction / g[:, None] - mean) / std
    np.testing.assert_allclose(model_space, ref.reconstruction, atol=2e-3)


@pytest.mark.parametrize("batch_size", [1, 7, 4096], ids=lambda b: f"batch{b}")
def test_results_do_not_depend_on_batching(published_model, reference, batch_size):
    x, e = reference["x"][:600], reference["x_err"][:600]
    base = encode_arrays(published_model, x, e, np.ones(600))
    out = encode_arrays(published_model, x, e, np.ones(600), batch_size=batch_size)
    for name in ("latent_mean", "latent_std", "reconstruction", "scatter", "rmse"):
        np.testing.assert_allclose(getattr(out, name), getattr(base, name), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out.flags, base.flags)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300))
def test_results_do_not_depend_on_row_order(published_model, reference, seed, n):
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(reference["x"]), size=n, replace=False)
    perm = rng.permutation(n)
    x, e = reference["x"][rows], reference["x_err"][rows]
    a = encode_arrays(published_model, x, e, np.ones(n))
    b = encode_arrays(published_model, x[perm], e[perm], np.ones(n))
    # The same up to float32 round-off (a GEMM's last bit can depend on the row's position).
    np.testing.assert_allclose(a.latent_mean[perm], b.latent_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.scatter[perm], b.scatter, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.rmse[perm], b.rmse, rtol=1e-5)
    np.testing.assert_array_equal(a.flags[perm], b.flags)


def _spectra(n: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(n, 110)), rng.uniform(0.1, 1, (n, 110)), np.ones(n)


@pytest.mark.parametrize(
    "coefficients, errors, flux, message",
    [
        pytest.param(
            np.zeros((2, 109)), np.ones((2, 109)), np.ones(2), "110 columns", id="109-cols"
        ),
        pytest.param(np.zeros(110), np.ones(110), np.ones(1), "2-D", id="1-d"),
        pytest.param(np.zeros((2, 110)), np.ones((3, 110)), np.ones(2), "shape", id="err-shape"),
        pytest.param(
            np.zeros((2, 110)), np.ones((2, 110)), np.ones(3), "one value per row", id="g"
        ),
    ],
)
def test_bad_shapes_give_clear_errors(coefficients, errors, flux, message):
    with pytest.raises(InputShapeError, match=message):
        encode_arrays(TrainedModel.untrained(), coefficients, errors, flux)


@pytest.mark.parametrize("g", [0.0, -5.0, np.nan, np.inf], ids=["zero", "negative", "nan", "inf"])
def test_unusable_g_flux_is_flagged_and_outputs_nan(g):
    c, e, flux = _spectra()
    c[1] *= 1e30  # huge values on an unusable row must not overflow (warnings are errors here)
    flux[1] = g
    out = encode_arrays(TrainedModel.untrained(), c, e, flux)
    expected = CatalogFlag.G_FLUX_MISSING | CatalogFlag.NOT_ENCODED
    assert out.flags[1] & expected == expected
    assert np.isnan(out.rmse[1]) and np.isnan(out.latent_mean[1]).all()
    assert np.isnan(out.scatter[1]).all() and np.isnan(out.reconstruction[1]).all()
    others = [0, 2, 3]
    assert np.isfinite(out.rmse[others]).all() and not (out.flags[others] & expected).any()


def test_a_missing_band_still_encodes_on_the_band_it_has():
    c, e, flux = _spectra()
    c[0, :55] = np.nan
    e[0, :55] = np.nan
    model = TrainedModel.untrained()
    out = encode_arrays(model, c, e, flux)
    assert out.flags[0] & CatalogFlag.BP_MISSING
    assert not out.flags[0] & (CatalogFlag.NOT_ENCODED | CatalogFlag.NON_FINITE)
    assert np.isfinite(out.latent_mean[0]).all() and np.isfinite(out.rmse[0])
    # The RMSE is over the 55 RP coefficients only.
    x, xhat, err = c[0, 55:], out.reconstruction[0, 55:], e[0, 55:]
    expected = np.sqrt(np.mean(((x - xhat) / err) ** 2))
    assert out.rmse[0] == pytest.approx(expected, rel=1e-4)


def test_a_non_finite_value_is_masked_and_flagged():
    c, e, flux = _spectra()
    c[2, 10] = np.inf
    e[3, 70] = 0.0
    out = encode_arrays(TrainedModel.untrained(), c, e, flux)
    assert out.flags[2] & CatalogFlag.NON_FINITE and out.flags[3] & CatalogFlag.NON_FINITE
    assert np.isfinite(out.rmse[[2, 3]]).all()


def test_a_row_with_nothing_valid_is_not_encoded():
    c, e, flux = _spectra()
    c[0] = np.nan
    out = encode_arrays(TrainedModel.untrained(), c, e, flux)
    assert out.flags[0] & CatalogFlag.NOT_ENCODED
    assert out.flags[0] & CatalogFlag.BP_MISSING and out.flags[0] & CatalogFlag.RP_MISSING


def test_training_membership_flags():
    model = TrainedModel.untrained().with_updates(
        train_source_id=np.array([5, 1, 9]), validation_source_id=np.array([4])
    )
    flags = model.training_membership(np.array([1, 4, 7, 9, 10]))
    assert [bool(f & CatalogFlag.IN_TRAINING_SET) for f in flags] == [1, 0, 0, 1, 0]
    assert [bool(f & CatalogFlag.IN_VALIDATION_SET) for f in flags] == [0, 1, 0, 0, 0]


@pytest.mark.parametrize(
    "mean, std",
    [
        pytest.param(np.zeros(110), np.zeros(110), id="zero-std"),
        pytest.param(np.full(110, np.nan), np.ones(110), id="nan-mean"),
        pytest.param(np.zeros(110), np.ones(100), id="length-mismatch"),
    ],
)
def test_bad_normalisation_is_refused(mean, std):
    with pytest.raises(InputShapeError):
        Normalisation(mean, std)
