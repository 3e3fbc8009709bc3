"""Monte-Carlo latents (``--mc-samples``): the draws, the covariance, the outputs and their rules,
determinism across chunkings, devices' paths and a killed run resumed, what the catalogue says."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from xpbatch import schema
from xpbatch.catalog.zarr_catalog import open_catalog, read_attrs
from xpbatch.cli.info import format_summary, summarize
from xpbatch.config import EncodeConfig
from xpbatch.encode.kernel import EncodeKernel, encode_arrays, encode_chunk
from xpbatch.encode.mc import (
    MonteCarlo,
    correlation_factors,
    mc_outputs,
    standard_normals,
)
from xpbatch.encode.stage import encode_catalog
from xpbatch.errors import ConfigError, InputShapeError, ResumeRefusedError
from xpbatch.mock.instrument import correlation_templates, packed_correlations
from xpbatch.model.files import save_model
from xpbatch.model.trained import TrainedModel
from xpbatch.schema import CatalogFlag
from xpbatch.store.xp_store import write_xp_store

N_ROWS = 1200
BATCH = 256
K = 16


def _spectra(rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The coefficients, their errors and the G flux of :func:`_inputs`' rows."""
    return rows[schema.COEFFICIENTS], rows[schema.COEFFICIENT_ERRORS], rows["phot_g_mean_flux"]


def _inputs(n: int = N_ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows like the conftest's stores (every defect included) plus mock correlations."""
    rng = np.random.default_rng(seed)
    g = rng.lognormal(0.0, 0.5, n)
    c = (rng.normal(size=(n, 110)) * g[:, None]).astype(np.float32)
    e = (rng.uniform(0.05, 0.2, (n, 110)) * g[:, None]).astype(np.float32)
    g[3::397] = np.nan  # G_FLUX_MISSING -> not encoded
    c[5::391, :55] = np.nan  # BP missing
    c[7::383, 60] = np.nan  # NON_FINITE
    template = rng.integers(0, 16, n)
    return {
        schema.SOURCE_ID: np.arange(1, n + 1, dtype=np.int64) * 1000 + 17,
        schema.COEFFICIENTS: c,
        schema.COEFFICIENT_ERRORS: e,
        schema.PHOT_G_MEAN_FLUX: g,
        **{schema.correlations_name(b): packed_correlations(b)[template] for b in schema.BANDS},
    }


def _store(path: Path, *, chunk_rows: int = 500, correlations: bool = True) -> Path:
    rows = _inputs()
    corr = {b: rows.pop(schema.correlations_name(b)) for b in schema.BANDS}
    write_xp_store(path, **rows, correlations=corr if correlations else None, chunk_rows=chunk_rows)
    return path


def _chunk(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from xpbatch.store.input_recipe import compute_input_flags

    flags = compute_input_flags(rows[schema.COEFFICIENTS], rows[schema.COEFFICIENT_ERRORS],
                        rows[schema.PHOT_G_MEAN_FLUX])  # fmt: skip
    return {**rows, schema.INPUT_FLAGS: flags}


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    return TrainedModel.untrained(seed=3)


# --- the parts ----------------------------------------------------------------------------------
def test_draws_are_standard_normal_and_depend_on_seed_and_source_id_only() -> None:
    ids = np.array([17, 1017, 17, 5], np.int64)
    out = np.empty((4, 20_000), np.float32)
    standard_normals(ids, 7, out)
    np.testing.assert_array_equal(out[0], out[2])  # same (seed, source_id): same draws
    assert not np.array_equal(out[0], out[1])
    values = out[[0, 1, 3]].ravel()
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02
    assert abs(np.mean(values**4) - 3) < 0.1  # Gaussian tails, not just the right variance
    assert abs(np.corrcoef(out[0], out[1])[0, 1]) < 0.03  # rows are independent streams
    other = np.empty((1, 20_000), np.float32)
    standard_normals(ids[:1], 8, other)
    assert not np.array_equal(out[0], other[0])
    part = np.empty((1, 20_000), np.float32)
    standard_normals(ids[:1], 7, part)  # a row alone draws what it drew among others
    np.testing.assert_array_equal(part[0], out[0])


def test_correlation_factors_reproduce_the_packed_matrices() -> None:
    templates = correlation_templates("bp")[:4].astype(np.float64)
    packed = packed_correlations("bp")[:4]
    missing = np.full((1, packed.shape[1]), np.nan, np.float32)  # a missing band
    not_pd = np.full((1, packed.shape[1]), 0.9, np.float32)
    not_pd[0, :3] = -0.9  # rows 0-2 of a matrix of 0.9s: not positive definite
    out = np.empty((6, 55, 55), np.float32)
    shrunk = correlation_factors(np.concatenate([packed, missing, not_pd]), out)
    lower = out.astype(np.float64)
    np.testing.assert_array_equal(np.triu(out[:4], 1), 0)
    np.testing.assert_allclose(lower[:4] @ lower[:4].transpose(0, 2, 1), templates, atol=1e-5)
    np.testing.assert_array_equal(out[4], np.eye(55))
    assert shrunk == 1 and np.all(np.isfinite(out[5])) and np.all(np.diag(out[5]) > 0)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        EncodeConfig(mc_samples=1)
    with pytest.raises(ConfigError, match="mc_covariance must be one of"):
        EncodeConfig(mc_samples=4, mc_covariance="ful")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mc_seed"):
        EncodeConfig(mc_samples=4, mc_seed=-1)
    options = MonteCarlo(8, seed=3, covariance="full").options()
    assert MonteCarlo.from_options({"batch_size": 1, **options}) == MonteCarlo(8, 3, "full")
    assert MonteCarlo.from_options({"batch_size": 1}) is None


# --- the outputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_mc_outputs_have_their_shape_and_nan_exactly_where_not_encoded(
    model: TrainedModel, covariance: str
) -> None:
    chunk = _chunk(_inputs(400))
    mc = MonteCarlo(K, seed=1, covariance=covariance)  # type: ignore[arg-type]
    out = encode_chunk(model, chunk, batch_size=BATCH, mc=mc)
    dead = (out[schema.FLAGS] & CatalogFlag.NOT_ENCODED) != 0
    assert dead.sum() == 1 and dead[3]
    for name in (schema.LATENT_MEAN_MC, schema.LATENT_STD_MC):
        assert out[name].shape == (400, 6) and out[name].dtype == np.float32
        np.testing.assert_array_equal(np.isnan(out[name]).any(axis=1), dead, err_msg=name)
        np.testing.assert_array_equal(np.isnan(out[name]).all(axis=1), dead, err_msg=name)
    live = ~dead
    std = out[schema.LATENT_STD_MC][live]
    assert np.all(std > 0)
    # The draws scatter around the noiseless input: their mean is the plain mean within a few
    # standard errors of K draws.
    offset = np.abs(out[schema.LATENT_MEAN_MC][live] - out[schema.LATENT_MEAN][live])
    assert np.quantile(offset / (std / np.sqrt(K)), 0.99) < 5


def test_the_spread_follows_the_errors(model: TrainedModel) -> None:
    rows = _inputs(200)
    small = encode_arrays(
        model, rows[schema.COEFFICIENTS], rows[schema.COEFFICIENT_ERRORS] / 10,
        rows[schema.PHOT_G_MEAN_FLUX], mc=MonteCarlo(K), source_id=rows[schema.SOURCE_ID],
    )  # fmt: skip
    large = encode_arrays(
        model, rows[schema.COEFFICIENTS], rows[schema.COEFFICIENT_ERRORS],
        rows[schema.PHOT_G_MEAN_FLUX], mc=MonteCarlo(K), source_id=rows[schema.SOURCE_ID],
    )  # fmt: skip
    assert large.latent_std_mc is not None and small.latent_std_mc is not None
    ratio = np.nanmedian(large.latent_std_mc / small.latent_std_mc)
    assert 8 < ratio < 12  # tenfold errors, tenfold spread (the encoder is near linear there)


def test_full_and_diagonal_differ_with_correlations_and_agree_with_identity(
    model: TrainedModel,
) -> None:
    rows = _inputs(300)
    c, e, g = _spectra(rows)
    ids = rows[schema.SOURCE_ID]
    corr = tuple(rows[schema.correlations_name(b)] for b in schema.BANDS)
    identity = tuple(np.zeros_like(a) for a in corr)

    def draw(covariance: str, correlations: object) -> np.ndarray:
        mc = MonteCarlo(K, covariance=covariance)  # type: ignore[arg-type]
        result = encode_arrays(
            model, c, e, g, batch_size=BATCH, mc=mc, source_id=ids, correlations=correlations
        )  # type: ignore[arg-type]
        assert result.latent_std_mc is not None
        return result.latent_std_mc

    diagonal, full = draw("diagonal", None), draw("full", corr)
    np.testing.assert_allclose(draw("full", identity), diagonal, rtol=1e-6)
    change = np.nanmedian(np.abs(np.log(full / diagonal)))
    assert change > 0.1, f"correlations changed the spread by only {change:.3f} (log)"


def test_a_full_covariance_needs_the_correlations(model: TrainedModel) -> None:
    rows = _inputs(10)
    for band in schema.BANDS:
        del rows[schema.correlations_name(band)]
    with pytest.raises(InputShapeError, match="--with-correlations"):
        encode_chunk(model, _chunk(rows), mc=MonteCarlo(K, covariance="full"))
    c, e, g = _spectra(rows)
    short = (np.zeros((10, 1484), np.float32), np.zeros((10, 1485), np.float32))
    with pytest.raises(InputShapeError, match=r"must be \(10, 1485\) per band"):
        encode_arrays(model, c, e, g, mc=MonteCarlo(K, covariance="full"), correlations=short)
    with pytest.raises(InputShapeError, match="for a diagonal covariance"):
        encode_arrays(model, c, e, g, mc=MonteCarlo(K), correlations=short)


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_the_fused_and_torch_paths_agree(model: TrainedModel, covariance: str) -> None:
    """The torch path (what runs on a GPU) on the CPU against the fused CPU path."""
    rows = _inputs(500)
    c, e, g = _spectra(rows)
    bp, rp = (rows[schema.correlations_name(b)] for b in schema.BANDS)
    mc = MonteCarlo(K, seed=5, covariance=covariance)  # type: ignore[arg-type]
    correlations = (bp, rp) if covariance == "full" else None
    ids = rows[schema.SOURCE_ID]
    results = [
        mc_outputs(kernel, c, e, g, ids, correlations, mc=mc, batch_size=BATCH)
        for kernel in (EncodeKernel(model, "cpu"), EncodeKernel(model, "cpu", fused=False))
    ]
    assert results[0].keys() == {schema.LATENT_MEAN_MC, schema.LATENT_STD_MC}
    for name in results[0]:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-7)


def test_rows_get_the_same_draws_whatever_their_batch(model: TrainedModel) -> None:
    rows = _inputs(300)
    c, e, g = _spectra(rows)
    ids = rows[schema.SOURCE_ID]
    mc = MonteCarlo(K)
    whole = encode_arrays(model, c, e, g, batch_size=BATCH, mc=mc, source_id=ids)
    tail = encode_arrays(model, c[37:], e[37:], g[37:], batch_size=BATCH, mc=mc, source_id=ids[37:])
    assert whole.latent_mean_mc is not None and tail.latent_mean_mc is not None
    np.testing.assert_array_equal(whole.latent_mean_mc[37:], tail.latent_mean_mc)


# --- the catalogue ------------------------------------------------------------------------------
CONFIG = EncodeConfig(batch_size=BATCH, progress_bar=False, check_fit=False, mc_samples=K)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mc")
    model = root / "m.safetensors"
    save_model(TrainedModel.untrained(seed=3), model)
    return {
        "root": root,
        "model": model,
        "full": _store(root / "full.zarr"),
        "rechunked": _store(root / "rechunked.zarr", chunk_rows=333),
        "none": _store(root / "none.zarr", correlations=False),
    }


@pytest.fixture(scope="module")
def reference(stores: dict[str, Path]) -> Path:
    out = stores["root"] / "reference.zarr"
    encode_catalog(stores["full"], stores["model"], out, config=CONFIG)
    return out


def test_the_catalogue_says_how_it_drew(reference: Path, stores: dict[str, Path]) -> None:
    ds = open_catalog(reference)
    assert ds[schema.LATENT_MEAN_MC].shape == (N_ROWS, 6)
    assert ds[schema.LATENT_STD_MC].attrs["units"] == "1"
    options = read_attrs(reference)[schema.CATALOG_ATTR_OPTIONS]
    assert options == {"batch_size": BATCH, "mc_samples": K, "mc_seed": 0, "mc_covariance": "full"}
    text = format_summary(summarize(reference))
    assert f"monte carlo  {K} draws per spectrum, seed 0, full covariance" in text
    out = stores["root"] / "diag.zarr"
    encode_catalog(stores["none"], stores["model"], out, config=CONFIG)  # 'auto': no correlations
    assert read_attrs(out)[schema.CATALOG_ATTR_OPTIONS]["mc_covariance"] == "diagonal"
    assert "monte carlo  off" in format_summary(summarize(stores["root"] / "plain.zarr"))


@pytest.fixture(scope="module", autouse=True)
def plain(stores: dict[str, Path]) -> Path:
    out = stores["root"] / "plain.zarr"
    config = EncodeConfig(batch_size=BATCH, progress_bar=False, check_fit=False)
    encode_catalog(stores["full"], stores["model"], out, config=config)
    return out


def test_without_mc_samples_nothing_changes(reference: Path, plain: Path) -> None:
    """The plain outputs of an MC run are the plain run's, byte for byte; a plain run has no
    MC variables and records no MC option."""
    with_mc, without = open_catalog(reference), open_catalog(plain)
    assert schema.LATENT_MEAN_MC not in without
    assert read_attrs(plain)[schema.CATALOG_ATTR_OPTIONS] == {"batch_size": BATCH}
    assert "with_mc" not in read_attrs(plain)[schema.CATALOG_ATTR_LAYOUT]
    assert read_attrs(reference)[schema.CATALOG_ATTR_LAYOUT]["with_mc"] is True
    for name in without.data_vars:
        np.testing.assert_array_equal(with_mc[name].values, without[name].values, err_msg=name)


def test_a_rechunked_store_gives_the_same_bytes(reference: Path, stores: dict[str, Path]) -> None:
    out = stores["root"] / "rechunked_c.zarr"
    encode_catalog(stores["rechunked"], stores["model"], out, config=CONFIG)
    a, b = open_catalog(reference), open_catalog(out)
    assert b[schema.LATENT_MEAN_MC].chunks[0][0] == 333
    for name in (schema.LATENT_MEAN_MC, schema.LATENT_STD_MC):
        assert a[name].values.tobytes() == b[name].values.tobytes(), name


def test_a_full_covariance_of_a_store_without_correlations_is_refused_before_writing(
    stores: dict[str, Path],
) -> None:
    out = stores["root"] / "refused.zarr"
    config = EncodeConfig(batch_size=BATCH, progress_bar=False, mc_samples=K, mc_covariance="full")
    with pytest.raises(ConfigError, match="--with-correlations"):
        encode_catalog(stores["none"], stores["model"], out, config=config)
    assert not out.exists()


@pytest.mark.parametrize(
    "change", [{"mc_samples": 8}, {"mc_seed": 1}, {"mc_covariance": "diagonal"}, {"mc_samples": 0}]
)
def test_resume_with_other_draws_is_refused(
    reference: Path, stores: dict[str, Path], tmp_path: Path, change: dict[str, object]
) -> None:
    out = shutil.copytree(reference, tmp_path / "c.zarr")
    config = dataclasses.replace(CONFIG, resume=True, **change)  # type: ignore[arg-type]
    with pytest.raises(ResumeRefusedError):
        encode_catalog(stores["full"], stores["model"], out, config=config)


def test_a_killed_run_resumed_writes_the_same_bytes(
    reference: Path,
    stores: dict[str, Path],
    tmp_path: Path,
    assert_same_catalogue: Callable[[Path, Path], None],
) -> None:
    """The CLI run SIGKILLed after its first chunk, then ``--resume``: the uninterrupted bytes."""
    out = tmp_path / "c.zarr"
    command = [
        *(str(Path(sys.executable).parent / "xpbatch"), "encode-catalog", str(stores["full"])),
        *("--model", str(stores["model"]), "--output", str(out), "--batch-size", str(BATCH)),
        *("--mc-samples", str(K), "--skip-fit-check", "--no-progress-bar"),
        *("--n-workers", "1", "--dashboard-address", ":0"),
    ]
    run = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    records = out / "_xpbatch" / "chunk_records" / "c"
    try:
        while not (records.is_dir() and any(records.iterdir())):
            assert run.poll() is None, run.stderr.read() if run.stderr else ""
            time.sleep(0.02)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)
    summary = encode_catalog(
        stores["full"], stores["model"], out, config=dataclasses.replace(CONFIG, resume=True)
    )
    assert 0 < summary.chunks_skipped < summary.chunks, "the kill came after the run"
    assert_same_catalogue(reference, out)


def test_memory_is_flat_in_the_number_of_draws(model: TrainedModel) -> None:
    """A pass holds batch_size draws whatever K: the host's peak is the same for 4 and 64."""
    import tracemalloc

    rows = _inputs(1000)
    c, e, g = _spectra(rows)
    corr = tuple(rows[schema.correlations_name(b)] for b in schema.BANDS)
    kernel = EncodeKernel(model, "cpu")
    peaks = {}
    for k in (4, 64):
        mc = MonteCarlo(k, covariance="full")
        mc_outputs(kernel, c, e, g, rows[schema.SOURCE_ID], corr, mc=mc, batch_size=BATCH)  # type: ignore[arg-type]
        tracemalloc.start()
        mc_outputs(kernel, c, e, g, rows[schema.SOURCE_ID], corr, mc=mc, batch_size=BATCH)  # type: ignore[arg-type]
        peaks[k] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[64] < 1.2 * peaks[4], peaks
    assert peaks[64] < 1000 * 4 * 110 * 64 / 4, "a pass held a chunk's K copies"


def test_the_convolved_score_is_the_score_at_zero_width_and_widens_the_prior() -> None:
    from xpbatch.benchmarks.anomalies_mc import convolved_score
    from xpbatch.model.density import LatentDensity, fit_density

    rng = np.random.default_rng(4)
    latent = rng.normal(size=(3000, 4)) * [1.0, 2.0, 0.5, 1.0] + [0.0, 1.0, 0.0, -1.0]
    rmse = rng.lognormal(0.0, 0.3, 3000)
    density = fit_density(latent, np.ones(4), rmse)
    mu, r = latent[:50], rmse[:50]
    np.testing.assert_allclose(
        convolved_score(density, mu, r, np.zeros_like(mu)), density.score_numpy(mu, r), rtol=1e-9
    )
    prior = LatentDensity.prior(4)
    width = np.full_like(mu, 0.5)
    expected = 0.5 * ((mu**2 / 1.25).sum(axis=1) + 4 * np.log(2 * np.pi * 1.25))
    np.testing.assert_allclose(convolved_score(prior, mu, r, width), expected, rtol=1e-9)


def test_the_device_draws_equal_the_hosts() -> None:
    """The torch path's normals (SplitMix64 in int64) and factors (batched Cholesky) against
    the host's: the same uniforms, so normals equal to float32 round-off."""
    import torch

    from xpbatch.encode import mc_device
    from xpbatch.encode.mc import SHRINKAGE

    ids = np.array([17, 1017, 2**62 + 5, 0], np.int64)
    host = np.empty((4, 3520), np.float32)
    standard_normals(ids, 2**40 + 3, host)
    device = mc_device.standard_normals(torch.from_numpy(ids), 2**40 + 3, 3520).numpy()
    np.testing.assert_allclose(device, host, rtol=2e-6, atol=2e-6)
    packed = np.concatenate([packed_correlations("rp")[:3], np.full((1, 1485), np.nan, np.float32)])
    factors = np.empty((4, 55, 55), np.float32)
    correlation_factors(packed, factors)
    found = mc_device.correlation_factors(torch.from_numpy(packed), 55, SHRINKAGE).numpy()
    np.testing.assert_allclose(found, factors, atol=2e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_the_gpu_agrees_with_the_fused_cpu_path(model: TrainedModel, covariance: str) -> None:
    rows = _inputs(3000)
    c, e, g = _spectra(rows)
    bp, rp = (rows[schema.correlations_name(b)] for b in schema.BANDS)
    mc = MonteCarlo(32, seed=9, covariance=covariance)  # type: ignore[arg-type]
    correlations = (bp, rp) if covariance == "full" else None
    ids = rows[schema.SOURCE_ID]
    cpu, gpu = (
        mc_outputs(EncodeKernel(model, device), c, e, g, ids, correlations, mc=mc, batch_size=4096)
        for device in ("cpu", "cuda")
    )
    for name in cpu:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-3, atol=1e-5, err_msg=name)
