"""Model files: round trip, no pickle, tamper/truncation detection, import of the checkpoint."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from xpbatch.cli.main import main
from xpbatch.config import ModelConfig
from xpbatch.encode.kernel import encode_arrays
from xpbatch.errors import ModelFileError
from xpbatch.model.files import import_xpvae, load_model, read_model_metadata, save_model
from xpbatch.model.trained import Normalisation, TrainedModel


@pytest.fixture
def model() -> TrainedModel:
    rng = np.random.default_rng(2)
    return TrainedModel.untrained(seed=3).with_updates(
        name="test-model",
        normalisation=Normalisation(rng.normal(0, 1, 110), rng.uniform(0.5, 2, 110)),
        provenance={"store_id": "abc", "epochs": 3, "seed": 7},
        train_source_id=np.array([10, 30, 20], np.int64),
        validation_source_id=np.array([40], np.int64),
    )


@pytest.fixture
def saved(model, tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    return path


def _spectra(n: int = 50):
    rng = np.random.default_rng(4)
    g = rng.uniform(1e3, 1e5, n)
    return rng.normal(size=(n, 110)) * g[:, None], rng.uniform(0.1, 1, (n, 110)) * g[:, None], g


def test_round_trip_gives_identical_outputs(model, saved):
    loaded = load_model(saved)
    a, b = encode_arrays(model, *_spectra()), encode_arrays(loaded, *_spectra())
    for name in ("latent_mean", "latent_std", "reconstruction", "scatter", "rmse", "flags"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert loaded.name == "test-model"
    assert loaded.provenance == {"store_id": "abc", "epochs": 3, "seed": 7}
    np.testing.assert_array_equal(loaded.train_source_id, [10, 20, 30])
    assert loaded.content_hash == model.content_hash and len(loaded.content_hash) == 64


def test_hash_is_stable_and_content_addressed(model, tmp_path):
    h1 = save_model(model, tmp_path / "a.safetensors")
    h2 = save_model(model, tmp_path / "b.safetensors")
    assert h1 == h2
    other = model.with_updates(name="another")
    assert save_model(other, tmp_path / "c.safetensors") != h1


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a model file")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    load_model(saved)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = (
        json.dumps(header, separators=(",", ":")).encode().ljust(n)
    )  # keep the same length so offsets stay valid
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n :])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated|corrupt", id="truncated"
        ),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:5]), "truncated", id="tiny"),
        pytest.param(lambda p: p.write_bytes(b""), "truncated", id="empty"),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes()[:-8] + b"\x01" * 8), "modified", id="weights"
        ),
        pytest.param(
            lambda p: _rewrite_header(
                p,
                lambda h: h["__metadata__"].update(
                    xpbatch=h["__metadata__"]["xpbatch"].replace("test-model", "test-modem")
                ),
            ),
            "modified",
            id="metadata",
        ),
        pytest.param(
            lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update(format="other-fmt")),
            "not an xpbatch model",
            id="foreign",
        ),
    ],
)
def test_tampered_or_truncated_files_are_refused(saved, corrupt, message):
    corrupt(saved)
    with pytest.raises(ModelFileError, match=message):
        load_model(saved)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_a_model_of_another_architecture_is_refused(tmp_path):
    small = TrainedModel.untrained(ModelConfig(hidden_widths=(64, 8), latent_dim=4))
    save_model(small, tmp_path / "small.safetensors")
    with pytest.raises(ModelFileError, match="architecture"):
        load_model(tmp_path / "small.safetensors", expect_config=ModelConfig())
    assert load_model(tmp_path / "small.safetensors").config.latent_dim == 4


def test_metadata_reads_without_weights(saved, model):
    meta = read_model_metadata(saved)
    assert meta["name"] == "test-model"
    assert meta["architecture"]["hidden_widths"] == [90, 70, 50, 30, 10]
    assert meta["input_recipe"]["normaliser"] == "phot_g_mean_flux"
    assert meta["content_sha256"] == model.content_hash


@pytest.fixture
def identity_norm(tmp_path):
    path = tmp_path / "identity.npz"
    np.savez(path, mu=np.zeros(110), sig=np.ones(110))
    return path


def test_import_xpvae_cli_reproduces_the_reference(reference_dir, identity_norm, tmp_path):
    out = tmp_path / "published.safetensors"
    result = CliRunner().invoke(
        main,
        [
            "import-xpvae",
            str(reference_dir / "weight.pt"),
            "--norm",
            str(identity_norm),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.provenance["epochs"] == 5000 and model.provenance["source"] == "imported"
    ref = np.load(reference_dir / "reference_outputs.npz")
    res = encode_arrays(model, ref["x"], ref["x_err"], np.ones(len(ref["x"])))
    np.testing.assert_allclose(res.latent_mean, ref["mu"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(res.rmse, ref["rmse"], atol=1e-4, rtol=1e-5)  # see test_trained


@pytest.mark.parametrize(
    "arrays, message",
    [
        pytest.param({"mu": np.zeros(110)}, "'mu' and 'sig'", id="no-sig"),
        pytest.param({"mu": np.zeros(55), "sig": np.ones(55)}, "110 values", id="short"),
        pytest.param({"mu": np.zeros(110), "sig": np.zeros(110)}, "positive", id="zero-std"),
    ],
)
def test_import_refuses_bad_normalisation(reference_dir, tmp_path, arrays, message):
    np.savez(tmp_path / "norm.npz", **arrays)
    with pytest.raises((ModelFileError, ValueError), match=message):
        import_xpvae(reference_dir / "weight.pt", tmp_path / "norm.npz", tmp_path / "m.st")


class NotATensor:
    """An arbitrary class: unpickling it would run code we do not control."""


def test_import_refuses_a_pickled_object(identity_norm, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": NotATensor()}, evil)
    with pytest.raises(ModelFileError, match="safely"):
        import_xpvae(evil, identity_norm, tmp_path / "m.safetensors")


def test_cli_reports_errors_without_traceback(identity_norm, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(
        main, ["import-xpvae", str(bad), "--norm", str(identity_norm), "-o", str(tmp_path / "m")]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
