"""Training: selection, normalisation, feeding, exact resume, NaN/Ctrl-C, CLI, learning labels."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from xpbatch.cli.main import main
from xpbatch.config import TrainConfig
from xpbatch.encode.kernel import encode_arrays
from xpbatch.errors import ConfigError, OutputExistsError, ResumeRefusedError, TrainingError
from xpbatch.mock import read_mock_labels, write_mock_store
from xpbatch.model.files import load_model
from xpbatch.store.reader import open_xp_store
from xpbatch.store.xp_store import write_xp_store
from xpbatch.train import checkpoints as train_checkpoints
from xpbatch.train import loop as train_loop
from xpbatch.train.checkpoints import RunPaths
from xpbatch.train.data import (
    compute_normalisation,
    read_source_id_file,
    row_chunks,
    select_rows,
)
from xpbatch.train.feed import ResidentRows, StreamedRows
from xpbatch.train.stage import train_model

N_SMALL = 3000
FAST = {"learning_rate": 1e-3, "batch_size": 256, "device": "cpu", "checkpoint_every": 1}
"""Settings of the small runs: a larger learning rate than published so a few epochs learn."""


def _spectra(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coefficients, errors (e-/s) and G flux of spectra on a 2-D nonlinear manifold."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1, 1, (n, 2))
    w1, w2 = np.random.default_rng(99).normal(size=(2, 2, 110))
    shape = np.exp(-(np.arange(110) % 55) / 10.0)
    spectrum = shape * (1 + 0.5 * np.tanh(z @ w1) + 0.2 * (z**2) @ w2)  # (n, 110)
    g = 10 ** rng.uniform(3, 5, n)
    c = spectrum * g[:, None]
    e = 0.02 * np.abs(c) + 1e-4 * g[:, None]
    c = c + rng.normal(size=c.shape) * e
    return c.astype(np.float32), e.astype(np.float32), g


def _write_store(path: Path, n: int = N_SMALL, *, seed: int = 0, defects: bool = True) -> Path:
    """A store of manifold spectra; with defects: rows 0-3 lack BP, 4-6 lack G, 7-8 have a NaN."""
    c, e, g = _spectra(n, seed)
    if defects:
        c[0:4, :55] = np.nan
        g[4:7] = np.nan
        c[7:9, 60] = np.nan
    write_xp_store(
        path,
        source_id=np.arange(n, dtype=np.int64) * 10 + 5,
        coefficients=c,
        coefficient_errors=e,
        phot_g_mean_flux=g,
        chunk_rows=700,  # several chunks, the last one short
    )
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One torch thread: on 2 shared cores, two spinning OpenMP threads run up to 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_store(tmp_path_factory.mktemp("train") / "small.zarr")


@pytest.fixture(scope="module")
def reference_run(small_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 4-epoch run on the resident path (the resume tests compare with it)."""
    out = tmp_path_factory.mktemp("reference") / "ref.safetensors"
    train_model(small_store, out, config=TrainConfig(epochs=4, **FAST, progress_bar=False))
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).network.state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:5]}"


# --- selection and normalisation ------------------------------------------------------------
@pytest.mark.parametrize(
    ("partial_rows", "excluded"),
    [
        pytest.param(False, {"g_flux_missing": 3, "bp_missing": 4, "non_finite": 2}, id="complete"),
        pytest.param(True, {"g_flux_missing": 3}, id="partial-rows"),
    ],
)
def test_selection_counts_and_split(
    small_store: Path, partial_rows: bool, excluded: dict[str, int]
) -> None:
    ds = open_xp_store(small_store)
    config = TrainConfig(partial_rows=partial_rows, seed=3)
    sel = select_rows(ds, config)
    n_excluded = sum(excluded.values())
    for name in ("g_flux_missing", "bp_missing", "rp_missing", "non_finite"):
        assert sel.counts[f"excluded_{name}"] == excluded.get(name, 0), name
    assert sel.counts["excluded"] == n_excluded
    assert sel.train.size + sel.validation.size == N_SMALL - n_excluded
    assert sel.validation.size == round(0.1 * (N_SMALL - n_excluded))
    assert np.intersect1d(sel.train_source_id, sel.validation_source_id).size == 0
    np.testing.assert_array_equal(sel.train_source_id, sel.train * 10 + 5)
    assert select_rows(ds, config).fingerprint() == sel.fingerprint()  # seeded
    assert select_rows(ds, TrainConfig(partial_rows=partial_rows, seed=4)).fingerprint() != (
        sel.fingerprint()
    )


def test_sample_draws_usable_rows(small_store: Path) -> None:
    ds = open_xp_store(small_store)
    sel = select_rows(ds, TrainConfig(sample=500, validation_fraction=0.2))
    assert (sel.train.size, sel.validation.size) == (400, 100)
    rows = np.concatenate([sel.train, sel.validation])
    assert np.unique(rows).size == 500 and rows.min() >= 9  # rows 0-8 are unusable
    assert np.unique(rows // 700).size == 5  # drawn from every chunk


def test_streamed_normalisation_equals_numpy(small_store: Path) -> None:
    ds = open_xp_store(small_store)
    sel = select_rows(ds, TrainConfig())
    norm = compute_normalisation(ds, sel.train, row_chunks(ds))
    c = ds.coefficients.values[sel.train].astype(np.float64)
    g = ds.phot_g_mean_flux.values[sel.train]
    y = c / g[:, None]
    np.testing.assert_allclose(norm.mean, y.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(norm.std, y.std(axis=0), rtol=1e-5)


@pytest.mark.parametrize("placement", ["device", "stream"])
@pytest.mark.parametrize("batch_size", [256, 337], ids=["batch-256", "one-row-left"])
def test_every_row_once_per_epoch(small_store: Path, placement: str, batch_size: int) -> None:
    ds = open_xp_store(small_store)
    sel = select_rows(ds, TrainConfig(partial_rows=True))  # masks on rows 0-3 and 7-8
    chunks = row_chunks(ds)
    norm = compute_normalisation(ds, sel.train, chunks)
    cpu = torch.device("cpu")
    rows = (
        ResidentRows.load(ds, sel.train, chunks, norm, cpu)
        if placement == "device"
        else StreamedRows(ds, sel.train, chunks, norm, cpu, shuffle_chunks=2)
    )
    ordered = list(rows.ordered_batches(1000))
    x_all = torch.cat([b[0] for b in ordered])
    valid_all = torch.cat([b[2] for b in ordered if b[2] is not None])  # type: ignore[misc]
    n_masked = 55 * np.isin(sel.train, [0, 1, 2, 3]).sum() + np.isin(sel.train, [7, 8]).sum()
    assert x_all.shape[0] == sel.train.size and int((~valid_all).sum()) == n_masked

    generator = torch.Generator().manual_seed(1)
    batches = list(rows.shuffled_batches(batch_size, seed=1, generator=generator))
    key = torch.cat([b[0][:, -1] for b in batches])  # last RP coefficient: valid in every row
    expected = sel.train.size - (1 if sel.train.size % batch_size == 1 else 0)
    assert batch_size == 256 or expected == sel.train.size - 1
    assert key.shape[0] == expected and all(b[0].shape[0] >= 2 for b in batches)
    assert torch.unique(key).numel() == expected  # no row twice
    assert torch.isin(key, x_all[:, -1]).all()  # only training rows
    assert not torch.equal(key[:100], x_all[:100, -1])  # shuffled
    for x, _, valid in batches:  # masks travel with their rows
        assert valid is None or bool((x[~valid] == 0).all())


def test_partial_rows_train_on_the_band_they_have(small_store: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, partial_rows=True, data_placement="stream", **FAST)
    history = train_model(
        small_store,
        tmp_path / "m.safetensors",
        config=dataclasses.replace(config, progress_bar=False),
    )
    assert history.counts["excluded"] == 3  # only the rows without G flux
    assert np.isfinite(history.train_loss).all() and np.isfinite(history.validation_loss).all()


# --- exact resume, Ctrl-C, NaN --------------------------------------------------------------
@pytest.mark.parametrize("placement", ["device", "stream"])
def test_resume_reaches_the_same_weights(
    small_store: Path, tmp_path: Path, placement: str, reference_run: Path
) -> None:
    settings = {**FAST, "data_placement": placement}
    whole = tmp_path / "whole.safetensors"
    if placement == "device":
        whole = reference_run
    else:
        train_model(
            small_store, whole, config=TrainConfig(epochs=4, **settings, progress_bar=False)
        )
    split = tmp_path / "split.safetensors"
    train_model(small_store, split, config=TrainConfig(epochs=2, **settings, progress_bar=False))
    history = train_model(
        small_store,
        split,
        config=TrainConfig(epochs=4, **settings, progress_bar=False, resume=True),
    )
    _assert_same_weights(whole, split)
    assert [r.epoch for r in history.records] == [1, 2, 3, 4]
    metrics = [json.loads(line) for line in history.metrics_path.read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]


def test_resume_with_another_data_placement_is_refused_and_says_so(
    small_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.safetensors"
    settings = {**FAST, "data_placement": "device"}
    train_model(small_store, out, config=TrainConfig(epochs=1, **settings, progress_bar=False))
    moved = {**FAST, "data_placement": "stream"}
    with pytest.raises(ResumeRefusedError, match=r"data_placement: 'device' there, 'stream' now"):
        train_model(
            small_store, out, config=TrainConfig(epochs=2, **moved, progress_bar=False, resume=True)
        )


def test_bf16_autocast_keeps_the_output_heads_in_float32() -> None:
    from xpbatch.model.network import ScatterVAE

    network = ScatterVAE().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = network(torch.randn(8, 110))
    assert {t.dtype for t in (out.mu, out.log_var, out.xhat, out.shat)} == {torch.float32}


def test_a_bf16_training_step_computes_the_loss_in_float32_outside_autocast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trainer's own step under precision 'bf16' (autocast on the CPU here): the network's
    outputs reach the loss as float32, the loss runs with autocast off and is float32, and the
    weights and their gradients stay float32."""
    import types

    from xpbatch.train.checkpoints import _TrainingState
    from xpbatch.train.feed import ResidentRows
    from xpbatch.train.loop import _Loop

    config = TrainConfig(precision="bf16", device="cuda", batch_size=64, learning_rate=1e-3)
    state = _TrainingState.new(config, torch.device("cpu"))
    seen: list[tuple[set[torch.dtype], bool, torch.dtype]] = []
    real = train_loop.scatter_vae_loss

    def recording_loss(out, x, x_err, valid, **kwargs):  # type: ignore[no-untyped-def]
        terms = real(out, x, x_err, valid, **kwargs)
        dtypes = {t.dtype for t in (out.mu, out.log_var, out.xhat, out.shat)}
        seen.append((dtypes, torch.is_autocast_enabled("cpu"), terms.total.dtype))
        return terms

    monkeypatch.setattr(train_loop, "scatter_vae_loss", recording_loss)
    loop = types.SimpleNamespace(config=config, state=state, device=torch.device("cpu"))
    loop._autocast = types.MethodType(_Loop._autocast, loop)
    x = torch.randn(256, 110)
    rows = ResidentRows(x, torch.ones_like(x), None)
    loss = _Loop._train(loop, rows, seed=0)  # type: ignore[arg-type]
    assert np.isfinite(loss) and len(seen) == 4
    assert all(s == ({torch.float32}, False, torch.float32) for s in seen), seen
    for parameter in state.network.parameters():
        assert parameter.dtype == torch.float32 and parameter.grad is not None
        assert parameter.grad.dtype == torch.float32


def _loss_failing_at(call: int, failure: str):  # type: ignore[no-untyped-def]
    """scatter_vae_loss that, from its ``call``-th call on, raises Ctrl-C or returns NaN."""
    real = train_loop.scatter_vae_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] >= call:
            if failure == "interrupt":
                raise KeyboardInterrupt
            return type(terms)(terms.total * torch.nan, terms.weighted_mse, terms.kld)
        return terms

    return loss


def _steps_per_epoch(store: Path) -> int:
    sel = select_rows(open_xp_store(store), TrainConfig())
    return -(-sel.train.size // FAST["batch_size"])  # type: ignore[operator]


def test_ctrl_c_leaves_a_resumable_checkpoint(
    small_store: Path, tmp_path: Path, reference_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "m.safetensors"
    steps = _steps_per_epoch(small_store)
    validation_calls = 1  # one validation batch per epoch
    mid_epoch_3 = 2 * (steps + validation_calls) + steps // 2
    with monkeypatch.context() as m:
        m.setattr(train_loop, "scatter_vae_loss", _loss_failing_at(mid_epoch_3, "interrupt"))
        with pytest.raises(KeyboardInterrupt):
            train_model(small_store, out, config=TrainConfig(epochs=4, **FAST, progress_bar=False))
    assert not out.exists()
    checkpoint = RunPaths.for_model(out).checkpoint
    state, _ = train_checkpoints._Snapshot.read(checkpoint)
    assert state.meta["epoch"] == 2
    train_model(
        small_store, out, config=TrainConfig(epochs=4, **FAST, progress_bar=False, resume=True)
    )
    _assert_same_weights(reference_run, out)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    small_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "m.safetensors"
    steps = _steps_per_epoch(small_store)
    monkeypatch.setattr(
        train_loop, "scatter_vae_loss", _loss_failing_at(2 * (steps + 1) + 3, "nan")
    )
    with pytest.raises(TrainingError, match=r"not finite.*epoch 3.*after epoch 2"):
        train_model(small_store, out, config=TrainConfig(epochs=5, **FAST, progress_bar=False))
    assert not out.exists()
    state, run = train_checkpoints._Snapshot.read(RunPaths.for_model(out).checkpoint)
    assert state.meta["epoch"] == 2 and len(run["records"]) == 2
    assert all(torch.isfinite(t).all() for t in state.tensors.values() if t.is_floating_point())


# --- bad input ------------------------------------------------------------------------------
def _no_g_flux_store(path: Path) -> Path:
    c, e, _ = _spectra(50, 0)
    write_xp_store(
        path,
        source_id=np.arange(1, 51, dtype=np.int64),
        coefficients=c,
        coefficient_errors=e,
        phot_g_mean_flux=np.full(50, np.nan),
    )
    return path


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        pytest.param(
            "unknown-ids-only", TrainingError, r"nothing to train on.*3 of them not in", id="empty"
        ),
        pytest.param("no-g-flux", TrainingError, r"50 excluded.*g_flux_missing: 50", id="no-g"),
        pytest.param("sample-too-large", TrainingError, r"sample of 5000 rows", id="sample"),
        pytest.param("bad-id-line", ConfigError, r"line 3: expected a source_id", id="bad-file"),
        pytest.param("exists", OutputExistsError, r"--resume.*--overwrite", id="exists"),
        pytest.param("resume-no-checkpoint", TrainingError, r"no checkpoint", id="resume-missing"),
        pytest.param("foreign-overwrite", OutputExistsError, r"not an xpbatch model", id="notes"),
        pytest.param("foreign-resume", ResumeRefusedError, r"not an xpbatch model", id="notes-r"),
    ],
)
def test_bad_input(
    small_store: Path, tmp_path: Path, case: str, error: type[Exception], match: str
) -> None:
    store, out = small_store, tmp_path / "m.safetensors"
    settings: dict[str, object] = {"epochs": 1, **FAST}
    resume = False
    ids = tmp_path / "ids.txt"
    if case == "unknown-ids-only":
        ids.write_text("1\n2\n3\n")
        settings["source_ids"] = str(ids)
    elif case == "no-g-flux":
        store = _no_g_flux_store(tmp_path / "nog.zarr")
    elif case == "sample-too-large":
        settings["sample"] = 5000
    elif case == "bad-id-line":
        ids.write_text("source_id\n15\nabc\n")
        settings["source_ids"] = str(ids)
    elif case in ("exists", "resume-no-checkpoint"):  # a model of an earlier run
        train_model(store, out, config=TrainConfig(**settings, progress_bar=False))  # type: ignore[arg-type]
        if case == "resume-no-checkpoint":  # a model file alone: nothing to continue from
            RunPaths.for_model(out).checkpoint.unlink()
            resume = True
    elif case.startswith("foreign"):  # a user's file: never replaced, whatever the flags
        out.write_text("my notes")
        resume = case == "foreign-resume"
        settings["overwrite"] = not resume
    with pytest.raises(error, match=match):
        train_model(store, out, config=TrainConfig(**settings, progress_bar=False, resume=resume))  # type: ignore[arg-type]
    if case.startswith("foreign"):
        assert out.read_text() == "my notes"


def test_unknown_source_ids_are_counted_and_reported(small_store: Path, tmp_path: Path) -> None:
    ids = tmp_path / "ids.csv"
    known = np.arange(100, 400) * 10 + 5
    rows = [*map(str, known), "7", "8", str(known[0])]  # two unknown ids, one duplicate
    ids.write_text("source_id,teff\n" + "".join(f"{r},5000\n" for r in rows))
    np.testing.assert_array_equal(read_source_id_file(ids)[:3], known[:3])
    result = CliRunner().invoke(
        main,
        [
            "train",
            str(small_store),
            "-o",
            str(tmp_path / "m.safetensors"),
            "--source-ids",
            str(ids),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 listed source ids are not in the store" in result.output
    model = load_model(tmp_path / "m.safetensors")
    counts = model.provenance["counts"]
    assert (counts["unknown_source_ids"], counts["duplicate_source_ids"]) == (2, 1)
    seen = np.concatenate([model.train_source_id, model.validation_source_id])
    np.testing.assert_array_equal(np.sort(seen), known)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param(
            "epochs = 3\nlearnin_rate = 1e-3\n",
            r"'learnin_rate'.*Did you mean "
            r"'learning_rate'.*Valid keys: .*epochs, learning_rate",
            id="unknown-key",
        ),
        pytest.param("[model]\nlatent = 4\n", r"'latent' in \[model\].*latent_dim", id="model-key"),
        pytest.param("batch_size = 1\n", r"batch_size must be at least 2", id="bad-value"),
        pytest.param("device = 'gpu'\n", r"device must be one of auto, cpu, cuda", id="bad-choice"),
        pytest.param("epochs = \n", r"not valid TOML", id="bad-toml"),
    ],
)
def test_config_file_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "train.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_toml(path)


def test_cli_flags_override_the_config_file(small_store: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text("epochs = 5\nlearning_rate = 2e-3\nsample = 600\n[model]\nlatent_dim = 4\n")
    out = tmp_path / "m.safetensors"
    args = ["train", str(small_store), "-o", str(out), "--config", str(config), "--epochs", "1"]
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    recorded = load_model(out).provenance["config"]
    assert (recorded["epochs"], recorded["learning_rate"], recorded["sample"]) == (1, 2e-3, 600)
    assert load_model(out).config.latent_dim == 4
    again = CliRunner().invoke(main, [*args, "--device", "cpu", "--no-progress"])
    assert again.exit_code == 2 and "--resume" in again.output
    changed = CliRunner().invoke(
        main, [*args, "--epochs", "2", "--seed", "9", "--resume", "--no-progress"]
    )
    assert changed.exit_code == 2 and "from other inputs or options" in changed.output
    assert "seed: 0 there, 9 now" in changed.output


def test_cli_trains_the_same_model_as_the_api_and_resumes_with_resume(
    small_store: Path, reference_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli.safetensors"
    args = ["train", str(small_store), "-o", str(out), "--learning-rate", "1e-3", "--no-progress"]
    args += ["--batch-size", "256", "--device", "cpu", "--checkpoint-every", "1"]
    first = CliRunner().invoke(main, [*args, "--epochs", "2"])
    assert first.exit_code == 0, first.output
    assert "epochs         2 on cpu" in first.output
    resumed = CliRunner().invoke(main, [*args, "--epochs", "4", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "epochs         4 (2 from the checkpoint) on cpu" in resumed.output
    _assert_same_weights(out, reference_run)  # CLI, resumed == API, uninterrupted


# --- it learns ------------------------------------------------------------------------------
LEARN = TrainConfig(
    epochs=25,
    cycle_epochs=25,  # one cosine cycle, annealed by the end
    learning_rate=3e-3,  # 30x the published rate, and
    batch_size=256,  # 4x more steps per epoch than published: a few epochs instead of 5000
    kl_weight=0.1,  # short runs with the full KL term leave latent dimensions unused
    seed=2,
    device="cpu",
    checkpoint_every=25,
)
"""A short run that learns the mock's labels (deterministic on CPU with one torch thread).

Its cost is rows x epochs: 20k rows at 3e-3 for 25 epochs take a third of the steps of the
earlier 100k rows at 1e-3 for 15 and meet the same 0.9 bound; the 2k held-out rows measure |r|
near 0.9 to about 0.005 (one standard error)."""


@pytest.fixture(scope="session")
def mock_store_20k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20k mock spectra with their labels."""
    path = tmp_path_factory.mktemp("mock") / "mock20k.zarr"
    return write_mock_store(path, 20_000, seed=1, chunk_rows=16384)


def _latent_means(model_path: Path, store: Path, source_id: np.ndarray) -> np.ndarray:
    model, ds = load_model(model_path), open_xp_store(store)
    rows = np.searchsorted(ds.source_id.values, source_id)
    inputs = [ds[name].values[rows] for name in _INPUTS]
    return encode_arrays(model, *inputs).latent_mean  # (rows, latent)


_INPUTS = ("coefficients", "coefficient_errors", "phot_g_mean_flux")


@pytest.mark.slow  # a 25-epoch training on 20k rows
def test_learns_the_mock_labels(mock_store_20k: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    history = train_model(
        mock_store_20k, out, config=dataclasses.replace(LEARN, progress_bar=False)
    )
    loss = history.validation_loss
    thirds = [part.mean() for part in np.array_split(loss, 3)]
    assert thirds[0] > thirds[1] > thirds[2], loss  # falls monotonically on average
    assert np.polyfit(np.arange(loss.size), loss, 1)[0] < 0, loss

    model = load_model(out)
    fit_ids = model.train_source_id  # the linear map is fitted on every training row
    held_out = model.validation_source_id  # seen neither by the network nor by the fit
    labels = read_mock_labels(mock_store_20k)
    design_fit = np.c_[np.ones(fit_ids.size), _latent_means(out, mock_store_20k, fit_ids)]
    design_held = np.c_[np.ones(held_out.size), _latent_means(out, mock_store_20k, held_out)]
    for label in ("teff", "m_h"):
        coef, *_ = np.linalg.lstsq(design_fit, labels.loc[fit_ids, label].to_numpy(), rcond=None)
        r = np.corrcoef(design_held @ coef, labels.loc[held_out, label].to_numpy())[0, 1]
        assert abs(r) >= 0.9, f"{label}: |r| = {abs(r):.3f} on {held_out.size} held-out rows"


# --- first runs: the quick preset, early stopping, the summary's hint -------------------------
def test_early_stopping_keeps_the_best_epoch_and_says_so(small_store: Path, tmp_path: Path) -> None:
    settings = {**FAST, "learning_rate": 1e-2, "progress_bar": False}  # diverges after epoch 1
    stopped = train_model(
        small_store,
        tmp_path / "s.safetensors",
        config=TrainConfig(epochs=6, early_stopping=2, **settings),
    )
    assert (
        stopped.stopped_early is not None and "kept the weights of epoch 1" in stopped.stopped_early
    )
    assert [r.epoch for r in stopped.records] == [1]  # the history ends at the kept epoch
    assert "stopped        early stopping after epoch 3" in str(stopped)
    assert len((tmp_path / "s.metrics.jsonl").read_text().splitlines()) == 1
    best = train_model(
        small_store, tmp_path / "b.safetensors", config=TrainConfig(epochs=1, **settings)
    )
    _assert_same_weights(tmp_path / "s.safetensors", tmp_path / "b.safetensors")
    assert best.stopped_early is None


def test_the_summary_hints_when_the_validation_loss_rose() -> None:
    from xpbatch.train.summary import EpochRecord, TrainSummary

    def summary(losses: list[float]) -> TrainSummary:
        records = [
            EpochRecord(i + 1, 1.0, v, v, 0.0, 1e-3, 1.0, 1.0, 1.0) for i, v in enumerate(losses)
        ]
        counts = {"train": 10, "validation": 2}
        return TrainSummary(records, Path("m"), Path("c"), Path("x"), counts, "cpu", "device")

    assert "hint           the validation loss rose after epoch 2 (5 -> 9)" in str(
        summary([7, 5, 9])
    )
    assert summary([7, 5, 4]).hint() is None and summary([-1, -3]).hint() is None


def test_the_quick_preset_is_one_set_of_defaults_under_the_file_and_the_flags(
    tmp_path: Path,
) -> None:
    from xpbatch.config import TRAIN_PRESETS
    from xpbatch.train.demo import DEMO_TRAINING

    quick = TrainConfig.from_toml(None, preset="quick")
    assert quick.early_stopping is not None and quick.epochs < TrainConfig().epochs
    assert {k: getattr(quick, k) for k in TRAIN_PRESETS["quick"]} == TRAIN_PRESETS["quick"]
    (tmp_path / "t.toml").write_text("epochs = 7\nbatch_size = 256\n")
    mixed = TrainConfig.from_toml(tmp_path / "t.toml", {"epochs": 3}, preset="quick")
    assert (mixed.epochs, mixed.batch_size, mixed.cycle_epochs) == (3, 256, quick.cycle_epochs)
    assert TrainConfig.from_toml(None, preset="published") == TrainConfig()
    assert (DEMO_TRAINING.learning_rate, DEMO_TRAINING.batch_size) == (
        quick.learning_rate,
        quick.batch_size,
    )


def test_cli_trains_with_the_quick_preset(small_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    args = ["train", str(small_store), "-o", str(out), "--preset", "quick", "--epochs", "2"]
    result = CliRunner().invoke(main, [*args, "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "epochs         2 on cpu" in result.output
    provenance = load_model(out).provenance["config"]
    assert provenance["learning_rate"] == 2e-3 and provenance["early_stopping"] == 5
