"""A store knows its own chunks: a chunk file deleted, cut short or altered after it was written
is refused or reported by every reader (encode-catalog, train, verify --store, info,
open_xp_store), naming the array, the chunk, its rows and the remedy; never read as fill values."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from xpbatch.cli.info import summarize
from xpbatch.cli.main import main
from xpbatch.config import EncodeConfig
from xpbatch.encode.stage import encode_catalog
from xpbatch.errors import StoreError
from xpbatch.model.files import save_model
from xpbatch.model.trained import TrainedModel
from xpbatch.schema import CHUNK_FILES
from xpbatch.store.checks import chunk_file_problems
from xpbatch.store.reader import open_xp_store

CHUNK_ROWS = 256
N_ROWS = 8 * CHUNK_ROWS
CONFIG = EncodeConfig(batch_size=128, progress_bar=False)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, make_xp_store: Callable[..., Path]) -> Path:
    return make_xp_store(
        tmp_path_factory.mktemp("damage") / "s.zarr", N_ROWS, chunk_rows=CHUNK_ROWS
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_model(TrainedModel.untrained(seed=2), path)
    return path


def _delete(file: str) -> Callable[[Path], None]:
    return lambda store: (store / file).unlink()


def _truncate(file: str) -> Callable[[Path], None]:
    def cut(store: Path) -> None:
        data = (store / file).read_bytes()
        (store / file).write_bytes(data[: len(data) // 2])

    return cut


# (how the store is damaged, what the message must name)
DAMAGES = {
    "coefficients-deleted": (
        _delete("coefficients/c/7/0"),
        "coefficients chunk 7 (rows 1792..2048): file coefficients/c/7/0 is missing",
    ),
    "source_id-deleted": (
        _delete("source_id/c/3"),
        "source_id chunk 3 (rows 768..1024): file source_id/c/3 is missing",
    ),
    "errors-cut-short": (
        _truncate("coefficient_errors/c/2/0"),
        "coefficient_errors chunk 2 (rows 512..768): file coefficient_errors/c/2/0 has",
    ),
}


@pytest.fixture(params=sorted(DAMAGES))
def damaged(request: pytest.FixtureRequest, pristine: Path, tmp_path: Path) -> tuple[Path, str]:
    damage, message = DAMAGES[request.param]
    store = Path(shutil.copytree(pristine, tmp_path / "s.zarr"))
    damage(store)
    return store, message


def test_every_reader_refuses_a_damaged_store_naming_array_chunk_and_rows(
    damaged: tuple[Path, str], model: Path, tmp_path: Path
) -> None:
    store, message = damaged
    with pytest.raises(StoreError, match="rebuild the store") as refused:
        open_xp_store(store)
    assert message in str(refused.value)

    with pytest.raises(StoreError) as refused:
        encode_catalog(store, model, tmp_path / "c.zarr", config=CONFIG)
    assert message in str(refused.value)
    assert not (tmp_path / "c.zarr").exists()

    summary = summarize(store)
    assert summary["complete"] is False and message in summary["damaged_chunks"][0]


def test_the_cli_gives_one_message_for_encode_train_verify_and_info(
    damaged: tuple[Path, str], model: Path, tmp_path: Path
) -> None:
    store, message = damaged
    runner = CliRunner()
    commands = {
        "encode-catalog": [
            "encode-catalog",
            str(store),
            "-m",
            str(model),
            "-o",
            str(tmp_path / "c"),
        ],
        "train": ["train", str(store), "-o", str(tmp_path / "t.safetensors"), "--epochs", "1"],
        "verify": ["verify", str(tmp_path / "c"), "--store", str(store)],
    }
    for name, args in commands.items():
        result = runner.invoke(
            main, [*args, "--n-workers", "1"] if name == "encode-catalog" else args
        )
        assert result.exit_code != 0, name
        if name != "verify":  # no catalogue exists to verify; the store is named for the others
            assert message in result.output, (name, result.output)
        assert "Traceback" not in result.output, name
    info = runner.invoke(main, ["info", str(store)])
    assert info.exit_code == 0 and "complete   NO" in info.output and message in info.output


def test_verify_store_reports_a_store_damaged_after_the_catalogue_was_made(
    pristine: Path, model: Path, tmp_path: Path
) -> None:
    store = Path(shutil.copytree(pristine, tmp_path / "s.zarr"))
    encode_catalog(store, model, tmp_path / "c.zarr", config=CONFIG)
    (store / "coefficients/c/5/0").unlink()
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "c.zarr"), "--store", str(store)])
    assert result.exit_code != 0
    assert "coefficients chunk 5 (rows 1280..1536)" in result.output


def test_a_store_without_its_chunk_records_is_damaged(pristine: Path, tmp_path: Path) -> None:
    store = Path(shutil.copytree(pristine, tmp_path / "s.zarr"))
    shutil.rmtree(store / CHUNK_FILES.split("/")[0])
    assert chunk_file_problems(store) == [f"the chunk file table {CHUNK_FILES} is missing"]
    with pytest.raises(StoreError, match=r"chunk file table .* is missing"):
        open_xp_store(store)


def test_a_sound_store_has_a_size_record_for_every_chunk_file(pristine: Path) -> None:
    import zarr

    records = zarr.open_group(pristine, mode="r")[CHUNK_FILES]
    assert records.shape[0] == N_ROWS // CHUNK_ROWS
    assert (records[:] > 0).all()
    assert chunk_file_problems(pristine) == []


def test_a_flipped_byte_in_a_store_chunk_names_the_array_and_file(
    pristine: Path, model: Path, tmp_path: Path
) -> None:
    store = Path(shutil.copytree(pristine, tmp_path / "s.zarr"))
    chunk = store / "coefficients/c/2/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the crc32c checksum can tell
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError) as refused:
        encode_catalog(store, model, tmp_path / "c.zarr", config=CONFIG)
    message = str(refused.value)
    assert "coefficients chunk 2 (rows 512..768)" in message and str(chunk) in message
    assert "checksum" in message


def test_an_output_inside_the_input_store_is_refused(pristine: Path, model: Path) -> None:
    from xpbatch.errors import ConfigError

    with pytest.raises(ConfigError, match="inside the input store"):
        encode_catalog(pristine, model, pristine / "cat.zarr", config=CONFIG)
    assert not (pristine / "cat.zarr").exists()


def test_a_complete_catalogue_missing_a_chunk_file_is_not_opened_nor_exported(
    pristine: Path, model: Path, tmp_path: Path
) -> None:
    from xpbatch.catalog.zarr_catalog import open_catalog
    from xpbatch.errors import CatalogError
    from xpbatch.products.parquet_export import export_parquet

    out = tmp_path / "c.zarr"
    encode_catalog(pristine, model, out, config=CONFIG)
    (out / "latent_mean/c/4/0").unlink()
    message = "latent_mean chunk 4 (rows 1024..1280): file latent_mean/c/4/0 is missing"
    with pytest.raises(CatalogError, match="damaged") as refused:
        open_catalog(out)
    assert message in str(refused.value)
    with pytest.raises(CatalogError, match="damaged"):
        export_parquet(out, tmp_path / "parquet", store=pristine)
