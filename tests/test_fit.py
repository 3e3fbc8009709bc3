"""The model must fit the data before any work: statistics recorded at training and import time,
checked on the store's first rows. Both directions: foreign data refused, our own never."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from xpbatch import schema
from xpbatch.cli.main import main
from xpbatch.config import EncodeConfig, IngestConfig, TrainConfig
from xpbatch.encode.stage import encode_catalog
from xpbatch.errors import ModelMismatchError
from xpbatch.ingest import ingest_files
from xpbatch.mock import write_mock_store
from xpbatch.model import fit_check as fit
from xpbatch.model.files import import_xpvae, load_model, save_model
from xpbatch.model.trained import TrainedModel
from xpbatch.store.xp_store import write_xp_store
from xpbatch.train.stage import train_model

CONFIG = EncodeConfig(batch_size=256, progress_bar=False)
ROWS = 2048


def _scaled(store: Path, out: Path, factor: float) -> Path:
    """The store with coefficients and errors multiplied by ``factor`` (G flux kept)."""
    group = zarr.open_group(store, mode="r")
    return write_xp_store(
        out,
        source_id=group[schema.SOURCE_ID][:],
        coefficients=group[schema.COEFFICIENTS][:] * np.float32(factor),
        coefficient_errors=group[schema.COEFFICIENT_ERRORS][:] * np.float32(factor),
        phot_g_mean_flux=group[schema.PHOT_G_MEAN_FLUX][:],
        chunk_rows=1024,
    )


class Data:
    """Mock stores (normal, x30, x1e6) and models really trained on the normal and x1e6 ones."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.normal = write_mock_store(root / "normal.zarr", ROWS, seed=1, chunk_rows=1024)
        self.other_normal = write_mock_store(root / "other.zarr", ROWS, seed=2, chunk_rows=1024)
        self.x30 = _scaled(self.normal, root / "x30.zarr", 30)
        self.x1e6 = _scaled(self.normal, root / "x1e6.zarr", 1e6)
        train = TrainConfig(epochs=1, batch_size=256, device="cpu")
        self.model = root / "normal.safetensors"
        train_model(self.normal, self.model, config=dataclasses.replace(train, progress_bar=False))
        self.big_model = root / "big.safetensors"
        train_model(
            self.x1e6, self.big_model, config=dataclasses.replace(train, progress_bar=False)
        )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    return Data(tmp_path_factory.mktemp("fit"))


@pytest.mark.slow  # the module's two trainings run before it
def test_training_records_the_statistics_in_the_model_file(data: Data) -> None:
    stats = load_model(data.model).fit_statistics
    assert stats is not None and stats["source"] == fit.SOURCE_TRAINING
    assert stats["rows"] > 1000
    assert 0.2 < stats["input_spread"] < 2  # standardised with its own training rows
    assert stats["latent_spread"] > 0 and stats["rmse_median"] > 0


REFUSED = {
    "x30-store": ("x30", "model", "input_spread is"),
    "x1e6-store": ("x1e6", "model", "input_spread is"),
    "model-of-a-x1e6-store": ("normal", "big_model", "rmse_median is"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_foreign_data_is_refused_before_any_work_naming_found_and_expected(
    data: Data, tmp_path: Path, case: str
) -> None:
    store, model, statistic = REFUSED[case]
    with pytest.raises(ModelMismatchError, match="does not fit") as refused:
        encode_catalog(getattr(data, store), getattr(data, model), tmp_path / "c", config=CONFIG)
    message = str(refused.value)
    assert statistic in message and "expected" in message and "--skip-fit-check" in message
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("store", "model"),
    [("normal", "model"), ("other_normal", "model"), ("x1e6", "big_model")],
    ids=["training-store", "another-mock-store", "x1e6-model-on-x1e6"],
)
def test_data_like_the_training_data_is_encoded(
    data: Data, tmp_path: Path, store: str, model: str
) -> None:
    summary = encode_catalog(
        getattr(data, store), getattr(data, model), tmp_path / "c", config=CONFIG
    )
    assert summary.verified and summary.rows == ROWS


@pytest.mark.slow  # two CLI runs, each with its own cluster
def test_the_override_flag_encodes_anyway(data: Data, tmp_path: Path) -> None:
    args = ["encode-catalog", str(data.x30), "-m", str(data.model), "-o", str(tmp_path / "c")]
    runner = CliRunner()
    refused = runner.invoke(main, [*args, "--n-workers", "1"])
    assert refused.exit_code == 2 and "input_spread is" in refused.output
    assert "Traceback" not in refused.output
    forced = runner.invoke(main, [*args, "--n-workers", "1", "--skip-fit-check"])
    assert forced.exit_code == 0, forced.output
    assert "verified complete" in forced.output


def test_the_published_reference_case_is_never_refused(reference_dir: Path, tmp_path: Path) -> None:
    ref = np.load(reference_dir / "reference_outputs.npz")
    norm = tmp_path / "identity.npz"
    np.savez(norm, mu=np.zeros(110, np.float32), sig=np.ones(110, np.float32))
    model = import_xpvae(reference_dir / "weight.pt", norm, tmp_path / "published.safetensors")
    assert model.fit_statistics == fit.FitStatistics.from_normalisation().to_dict()
    found = fit.measure_physical(
        model, ref["x"], ref["x_err"], np.ones(len(ref["x"])), source="reference"
    )
    assert found is not None and fit.fit_problems(found, fit.expected_statistics(model)) == []
    fit.check_fit(model, found, where="the reference inputs")


def _real_sample_store(samples: Path, tmp_path: Path, mock_store: Path) -> Path:
    """The real DR3 sample rows, with G fluxes on the mock's scale (the samples carry none)."""
    group = zarr.open_group(mock_store, mode="r")
    rp0_per_g = float(
        np.nanmedian(group[schema.COEFFICIENTS][:, schema.N_BP] / group[schema.PHOT_G_MEAN_FLUX][:])
    )
    xp = samples / "XP_CONTINUOUS_bulk_style_null.ecsv"
    rows = csv.DictReader(line for line in xp.read_text().splitlines() if not line.startswith("#"))
    gaia = tmp_path / "gaia_source.csv"
    lines = ["source_id,phot_g_mean_flux"]
    for row in rows:
        rp0 = float(row["rp_coefficients"].strip("[]()").split(",")[0])
        lines.append(f"{row['source_id']},{rp0 / rp0_per_g}")
    gaia.write_text("\n".join(lines) + "\n")
    return ingest_files(
        [xp], [gaia], tmp_path / "real.zarr", config=IngestConfig(verify_md5=False)
    ).path


def test_real_dr3_rows_are_not_refused_by_a_model_trained_on_mock_rows(
    data: Data, dr3_samples_dir: Path, tmp_path: Path
) -> None:
    store = _real_sample_store(dr3_samples_dir, tmp_path, data.normal)
    summary = encode_catalog(store, data.model, tmp_path / "c", config=CONFIG)
    assert summary.verified and summary.rows >= 3
    # ... while the model of a x1e6 store is refused on them
    with pytest.raises(ModelMismatchError, match="rmse_median"):
        encode_catalog(store, data.big_model, tmp_path / "c2", config=CONFIG)


def test_a_model_file_without_statistics_is_checked_against_its_normalisation(
    tmp_path: Path, make_xp_store: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    store = make_xp_store(tmp_path / "s.zarr", 1024, chunk_rows=512)
    old = tmp_path / "old.safetensors"
    save_model(TrainedModel.untrained(seed=1), old)  # never trained: no fit_statistics
    assert load_model(old).fit_statistics is None
    with caplog.at_level("INFO", logger="xpbatch.model.fit_check"):
        encode_catalog(store, old, tmp_path / "c", config=CONFIG)
    assert "records no training statistics" in caplog.text
    with pytest.raises(ModelMismatchError, match="normalisation"):
        encode_catalog(
            _scaled(store, tmp_path / "x30.zarr", 30), old, tmp_path / "d", config=CONFIG
        )


def test_statistics_are_part_of_the_model_files_content_hash(data: Data, tmp_path: Path) -> None:
    model = load_model(data.model)
    copy = tmp_path / "copy.safetensors"
    assert save_model(model, copy) == model.content_hash  # saved again: the same content
    changed = model.with_updates(fit_statistics={**(model.fit_statistics or {}), "rows": 1})
    assert save_model(changed, tmp_path / "changed.safetensors") != model.content_hash


def test_a_late_chunk_scaled_x1e6_is_refused(data: Data, tmp_path: Path) -> None:
    """The fit check samples every chunk, not the first rows: one late chunk in other units is
    refused, naming it."""
    group = zarr.open_group(data.normal, mode="r")
    coefficients = group[schema.COEFFICIENTS][:]
    errors = group[schema.COEFFICIENT_ERRORS][:]
    coefficients[1792:] *= np.float32(1e6)  # the last of 8 chunks only
    errors[1792:] *= np.float32(1e6)
    store = write_xp_store(
        tmp_path / "late.zarr",
        source_id=group[schema.SOURCE_ID][:],
        coefficients=coefficients,
        coefficient_errors=errors,
        phot_g_mean_flux=group[schema.PHOT_G_MEAN_FLUX][:],
        chunk_rows=256,
    )
    with pytest.raises(ModelMismatchError, match=r"does not fit 1 chunk\(s\).*chunk 7 ") as refused:
        encode_catalog(store, data.model, tmp_path / "c", config=CONFIG)
    assert "chunk 0 " not in str(refused.value) and "--skip-fit-check" in str(refused.value)
    assert not (tmp_path / "c").exists()
