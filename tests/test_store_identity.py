"""A store chunk file is the one written there, or refused: same-size chunk files swapped (with
or without the store's chunk records) are named before any row of theirs is used; verify
compares the catalogue's flags row for row with the store's."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from xpbatch import schema
from xpbatch.catalog.verify import verify_catalog
from xpbatch.cli.main import main
from xpbatch.config import EncodeConfig
from xpbatch.encode.stage import encode_catalog
from xpbatch.errors import StoreError
from xpbatch.model.files import save_model
from xpbatch.model.trained import TrainedModel
from xpbatch.store.reader import ChunkReader, open_xp_store

CHUNK_ROWS = 128
N_ROWS = 4 * CHUNK_ROWS
CONFIG = EncodeConfig(batch_size=128, progress_bar=False, check_fit=False)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, make_xp_store: Callable[..., Path]) -> Path:
    return make_xp_store(tmp_path_factory.mktemp("id") / "s.zarr", N_ROWS, chunk_rows=CHUNK_ROWS)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_model(TrainedModel.untrained(seed=2), path)
    return path


def _swap(store: Path, key_a: str, key_b: str) -> None:
    a, b = store / key_a, store / key_b
    data = a.read_bytes()
    shutil.copyfile(b, a)
    b.write_bytes(data)


SWAPS = {
    "coefficients": ("coefficients/c/1/0", "coefficients/c/3/0"),
    "errors": ("coefficient_errors/c/0/0", "coefficient_errors/c/2/0"),
    "source_id": ("source_id/c/1", "source_id/c/2"),
    "g_flux": ("phot_g_mean_flux/c/0", "phot_g_mean_flux/c/3"),
}


@pytest.mark.parametrize("records", [False, True], ids=["files", "files-and-records"])
@pytest.mark.parametrize("what", sorted(SWAPS))
def test_swapped_store_chunk_files_are_refused_before_encoding(
    pristine: Path, model: Path, tmp_path: Path, what: str, records: bool
) -> None:
    store = Path(shutil.copytree(pristine, tmp_path / "s.zarr"))
    key_a, key_b = SWAPS[what]
    assert (store / key_a).stat().st_size == (store / key_b).stat().st_size
    _swap(store, key_a, key_b)
    if records:  # the chunk records of both chunks swapped too: each file matches its record
        chunk_a, chunk_b = key_a.split("/")[2], key_b.split("/")[2]
        for table in (schema.CHUNK_FILES, schema.CHECKSUMS_ARRAY):
            _swap(store, f"{table}/c/{chunk_a}/0", f"{table}/c/{chunk_b}/0")
    variable = key_a.split("/")[0]
    named = rf"{variable} chunk \d.*not the file written there" if not records else "chunk"
    with pytest.raises(StoreError, match=named):
        encode_catalog(store, model, tmp_path / "c.zarr", config=CONFIG)
    assert not (tmp_path / "c.zarr").exists() or not verify_catalog(tmp_path / "c.zarr").ok


def test_the_chunk_reader_refuses_a_file_swapped_after_opening(
    pristine: Path, tmp_path: Path
) -> None:
    """Checked on every read, not only when the store is opened: names store, variable, chunk."""
    store = Path(shutil.copytree(pristine, tmp_path / "s.zarr"))
    open_xp_store(store)
    reader = ChunkReader(store, [schema.SOURCE_ID, schema.COEFFICIENTS])
    _swap(store, *SWAPS["coefficients"])
    with pytest.raises(StoreError, match=rf"coefficients chunk 1 of store {store}: file .*not the"):
        reader.read(slice(CHUNK_ROWS, 2 * CHUNK_ROWS))
    np.testing.assert_array_equal(  # chunk 0 is untouched and still read
        reader.read(slice(0, CHUNK_ROWS))[schema.SOURCE_ID],
        zarr.open_array(pristine / schema.SOURCE_ID)[:CHUNK_ROWS],
    )


def test_verify_with_the_store_compares_flags_row_for_row(
    pristine: Path, model: Path, tmp_path: Path
) -> None:
    """Two rows' flags swapped (per-chunk counts unchanged, files rewritten with their records,
    as a writer would): caught against the input store's input_flags."""
    from xpbatch.catalog.writer import CatalogWriter
    from xpbatch.catalog.zarr_catalog import open_arrays

    out = tmp_path / "c.zarr"
    encode_catalog(pristine, model, out, config=CONFIG)
    arrays = open_arrays(out, [v.name for v in CatalogWriter(out).layout.variables()])
    outputs = {name: np.asarray(a[0:CHUNK_ROWS]) for name, a in arrays.items()}
    flags = outputs[schema.FLAGS]
    encoded = (flags & schema.CatalogFlag.NOT_ENCODED) == 0
    i = int(np.flatnonzero(encoded)[0])
    j = int(np.flatnonzero(encoded & ((flags & 0xFF) != (flags[i] & 0xFF)))[0])
    flags[[i, j]] = flags[[j, i]]  # two encoded rows with different input flags
    CatalogWriter(out).write_chunk(0, outputs)
    assert verify_catalog(out).ok  # sound on its own: the counts are unchanged
    report = verify_catalog(out, pristine)
    assert any(
        "flags differ from the input store's input_flags in 2 row(s)" in p for p in report.problems
    ), report.problems
    result = CliRunner().invoke(main, ["verify", str(out), "--store", str(pristine)])
    assert result.exit_code != 0 and "flags differ" in result.output
