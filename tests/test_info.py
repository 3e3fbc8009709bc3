"""`xpbatch info`: the summary of a store, a catalogue and a model file, and its errors."""

from __future__ import annotations

import enum
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from xpbatch import schema
from xpbatch.cli.info import format_summary, human_bytes, summarize
from xpbatch.cli.main import main
from xpbatch.config import EncodeConfig
from xpbatch.encode.stage import encode_catalog
from xpbatch.errors import ModelFileError, StoreError, StoreNotFoundError
from xpbatch.model.files import save_model
from xpbatch.model.trained import TrainedModel
from xpbatch.store.xp_store import XPStoreWriter, write_xp_store

N_ROWS = 700
CHUNK_ROWS = 256


def _store_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    coefficients = rng.normal(100, 10, (N_ROWS, schema.N_COEFF)).astype(np.float32)
    coefficients[:9, : schema.N_BP] = np.nan  # BP missing
    coefficients[20:22, 60] = np.inf  # non-finite
    flux = np.full(N_ROWS, 1e4)
    flux[[5, 300, 699]] = np.nan  # G flux missing, in three different chunks
    return {
        "source_id": np.arange(N_ROWS, dtype=np.int64) * (1 << 38) + 17,
        "coefficients": coefficients,
        "coefficient_errors": np.ones((N_ROWS, schema.N_COEFF), np.float32),
        "phot_g_mean_flux": flux,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("info") / "store.zarr"
    write_xp_store(path, **_store_arrays(), chunk_rows=CHUNK_ROWS)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("info") / "model.safetensors"
    model = TrainedModel.untrained(seed=3)
    model.name = "info-test"
    model.provenance = {"training_store_id": "abc", "epochs": 2}
    model.train_source_id = np.arange(40, dtype=np.int64)
    model.validation_source_id = np.arange(40, 50, dtype=np.int64)
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, make_xp_store) -> Path:
    root = tmp_path_factory.mktemp("info")
    store = make_xp_store(root / "random.zarr", 1500, chunk_rows=500)
    save_model(TrainedModel.untrained(seed=5), root / "identity.safetensors")
    out = root / "catalog.zarr"
    encode_catalog(
        store, root / "identity.safetensors", out, config=EncodeConfig(progress_bar=False)
    )
    return out


def _rows_per_bit(path: Path, name: str, bits: type[enum.IntFlag]) -> dict[str, int]:
    """The expected flag counts, from the whole array read at once with numpy."""
    flags = np.asarray(zarr.open_group(path, mode="r")[name][:])
    counts = {str(bit.name): int(np.count_nonzero(flags & bit)) for bit in bits}
    return {**counts, "none": int(np.count_nonzero(flags == 0))}


def _files_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_store_summary_counts_every_flag_bit(store: Path) -> None:
    summary = summarize(store)
    expected = _rows_per_bit(store, schema.INPUT_FLAGS, schema.InputFlag)

    assert summary["kind"] == "store"
    assert (summary["rows"], summary["chunk_rows"], summary["n_chunks"]) == (700, 256, 3)
    assert summary["flags"] == {"variable": schema.INPUT_FLAGS, "rows": expected}
    assert expected["BP_MISSING"] == 9 and expected["G_FLUX_MISSING"] == 3  # the data we made
    assert summary["source_id_range"] == [17, 699 * (1 << 38) + 17]
    assert summary["complete"] is True
    assert summary["bytes_on_disk"] == _files_size(store)
    by_name = {v["name"]: v for v in summary["variables"]}
    assert by_name[schema.COEFFICIENTS]["shape"] == [N_ROWS, schema.N_COEFF]
    assert by_name[schema.COEFFICIENTS]["bytes_on_disk"] == _files_size(store / schema.COEFFICIENTS)
    json.dumps(summary)  # --json must be able to print it


def test_catalog_summary_counts_every_flag_bit_and_the_finished_chunks(catalog: Path) -> None:
    summary = summarize(catalog)
    expected = _rows_per_bit(catalog, schema.FLAGS, schema.CatalogFlag)

    assert summary["kind"] == "catalog"
    assert (summary["rows"], summary["n_chunks"], summary["chunks_recorded"]) == (1500, 3, 3)
    assert summary["flags"] == {"variable": schema.FLAGS, "rows": expected}
    assert expected["NOT_ENCODED"] == 2  # the two rows without G flux (conftest.make_xp_store)
    assert summary["complete"] is True
    assert (
        summary["attributes"]["model_hash"]
        == summarize(catalog.parent / "identity.safetensors")["content_sha256"]
    )
    assert "chunks done  3 of 3" in format_summary(summary)
    assert summary["chunk_devices"] == {"cpu": 3}  # each chunk records what encoded it
    assert re.search(r"encoded on +cpu \(3 chunks\)", format_summary(summary))


def test_model_summary_reads_the_header_and_tensor_shapes(model_file: Path) -> None:
    summary = summarize(model_file)
    model = TrainedModel.untrained(seed=3)
    n_parameters = sum(p.numel() for p in model.network.state_dict().values())

    assert summary["kind"] == "model"
    assert summary["name"] == "info-test"
    assert len(summary["content_sha256"]) == 64
    assert summary["architecture"]["latent_dim"] == 6
    assert summary["n_parameters"] == n_parameters
    assert (summary["n_train"], summary["n_validation"]) == (40, 10)
    assert summary["provenance"] == {"epochs": 2, "training_store_id": "abc"}


def test_incomplete_store_is_summarised_as_not_complete(tmp_path: Path) -> None:
    path = tmp_path / "partial.zarr"
    XPStoreWriter.create(path, 10, chunk_rows=4)  # template only: no rows written
    summary = summarize(path)
    assert summary["complete"] is False
    assert "NO (still being written" in format_summary(summary)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        pytest.param(lambda p: p, StoreNotFoundError, "does not exist", id="missing"),
        pytest.param(lambda p: (p.mkdir(), p)[1], StoreError, "no zarr.json", id="plain-dir"),
        pytest.param(
            lambda p: (zarr.open_group(p, mode="w"), p)[1],
            StoreError,
            "neither an XP store",
            id="other-zarr",
        ),
        pytest.param(
            lambda p: (p.write_bytes(b"not a model"), p)[1],
            StoreError,
            "is a file but not a model file",
            id="not-a-model",
        ),
        pytest.param(
            lambda p: (p.write_bytes(b"\x10\x27\0\0\0\0\0\0{"), p)[1],
            ModelFileError,
            "truncated",
            id="truncated-model",
        ),
    ],
)
def test_paths_that_are_not_ours_get_a_clear_error(
    tmp_path: Path, make, error: type[Exception], message: str
) -> None:
    path = make(tmp_path / "thing")
    with pytest.raises(error, match=message):
        summarize(path)


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        pytest.param(
            "store", ["XP store", "rows per flag bit (input_flags)", "BP_MISSING"], id="store"
        ),
        pytest.param("model_file", ["model", "info-test", "parameters"], id="model"),
        pytest.param("catalog", ["catalogue", "NOT_ENCODED", "chunks done"], id="catalog"),
    ],
)
def test_cli_prints_the_summary(
    request: pytest.FixtureRequest, fixture: str, expected: list[str]
) -> None:
    path = request.getfixturevalue(fixture)
    result = CliRunner().invoke(main, ["info", os.fspath(path)])
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output
    as_json = CliRunner().invoke(main, ["info", "--json", os.fspath(path)])
    assert json.loads(as_json.output)["path"] == os.fspath(path)


def test_cli_error_is_one_line_with_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    result = CliRunner().invoke(main, ["info", os.fspath(tmp_path / "d")])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "no zarr.json" in result.output


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (1_234_567, "1.2 MB"),
        (5 * 10**15, "5000.0 TB"),
    ],
    ids=["zero", "bytes", "kilo", "mega", "beyond-tera"],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def _copy_over(source: Path, target: Path) -> None:
    target.write_bytes(source.read_bytes())


@pytest.mark.parametrize(
    ("fixture", "damage", "named"),
    [
        ("store", lambda p: (p / "coefficients/c/1/0").unlink(), "coefficients chunk 1"),
        (
            "store",
            lambda p: _copy_over(p / "phot_g_mean_flux/c/0", p / "phot_g_mean_flux/c/1"),
            "phot_g_mean_flux chunk 1",
        ),
        ("catalog", lambda p: (p / "rmse/c/2").unlink(), "rmse chunk 2"),
        (
            "catalog",
            lambda p: _copy_over(p / "latent_mean/c/0/0", p / "latent_mean/c/1/0"),
            "latent_mean chunk 1",
        ),
    ],
    ids=["store-deleted", "store-copied", "catalogue-deleted", "catalogue-copied"],
)
def test_a_damaged_store_or_catalogue_is_not_called_complete(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, damage, named: str
) -> None:
    import shutil

    path = Path(shutil.copytree(request.getfixturevalue(fixture), tmp_path / "copy.zarr"))
    assert summarize(path)["complete"]
    damage(path)
    summary = summarize(path)
    assert summary["complete"] is False
    assert any(named in problem for problem in summary["damaged_chunks"])
    assert "NO, 1 chunk file(s) damaged" in format_summary(summary)
