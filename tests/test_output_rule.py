"""The one output rule, tried as a careless user would: every command that writes refuses an
existing output unless --overwrite, and --overwrite replaces only an output of the same kind that
xpbatch wrote (never a user's file, a directory it did not write, or another command's output);
one lock per real path, symlinks included; --break-lock through the stage's config.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from xpbatch import schema
from xpbatch.benchmarks.neighbours import synthetic_catalog
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.cli.main import main
from xpbatch.config import EncodeConfig, IngestConfig, MockConfig, NeighboursConfig, SkyMapConfig
from xpbatch.errors import OutputExistsError, OutputLockedError, ResumeRefusedError
from xpbatch.mock import make_mock
from xpbatch.products.neighbours import write_neighbours
from xpbatch.products.sky_maps import write_sky_maps
from xpbatch.storage.outputs import lock_path, output_lock


@pytest.fixture(scope="module")
def cat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_catalog(tmp_path_factory.mktemp("rule") / "CAT.zarr", 600, chunk_rows=256)


def _ids(path: Path) -> list[int]:
    return [int(i) for i in catalog.open_arrays(path, [schema.SOURCE_ID])[schema.SOURCE_ID][:2]]


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) and its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


def test_neighbours_refuses_an_output_unless_overwrite_and_only_its_own(
    cat: Path, tmp_path: Path
) -> None:
    out = tmp_path / "n.csv"
    first = write_neighbours(cat, _ids(cat), out, config=NeighboursConfig(k=3))
    assert len(first) == 6 and (tmp_path / "n.csv.xpbatch.json").is_file()
    with pytest.raises(OutputExistsError, match="--overwrite"):  # a second run: refused
        write_neighbours(cat, _ids(cat), out, config=NeighboursConfig(k=4))
    again = write_neighbours(cat, _ids(cat), out, config=NeighboursConfig(k=4, overwrite=True))
    assert len(again) == 8 and len(out.read_text().splitlines()) == 9
    with pytest.raises(OutputExistsError, match="an xpbatch neighbours table, not the sky map"):
        write_sky_maps(cat, out, config=SkyMapConfig(overwrite=True))


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(lambda tmp, cat: _a_model(tmp / "model.safetensors"), id="a-model"),
        pytest.param(lambda tmp, cat: cat / "zarr.json", id="inside-a-catalogue"),
        pytest.param(lambda tmp, cat: cat, id="a-catalogue"),
        pytest.param(lambda tmp, cat: _notes(tmp / "notes.txt"), id="a-user-file"),
    ],
)
def test_neighbours_and_skymap_never_replace_what_they_did_not_write(
    cat: Path, tmp_path: Path, target: Callable[[Path, Path], Path]
) -> None:
    out = target(tmp_path, cat)
    before = _tree(out)
    with pytest.raises(OutputExistsError, match=r"not an xpbatch neighbours table|not the neigh"):
        write_neighbours(cat, _ids(cat), out, config=NeighboursConfig(k=2, overwrite=True))
    with pytest.raises(OutputExistsError, match=r"not an xpbatch sky map|not the sky map"):
        write_sky_maps(cat, out, config=SkyMapConfig(order=1, overwrite=True))
    assert _tree(out) == before
    assert not lock_path(out).exists()


def _a_model(path: Path) -> Path:
    from xpbatch.model.files import save_model
    from xpbatch.model.trained import TrainedModel

    save_model(TrainedModel.untrained(), path)
    return path


def _notes(path: Path) -> Path:
    path.write_text("my notes")
    return path


def test_the_cli_refuses_a_model_as_a_neighbours_table(cat: Path, tmp_path: Path) -> None:
    model = _a_model(tmp_path / "model.safetensors")
    before = model.read_bytes()
    args = ["neighbours", str(cat), "--source-id", str(_ids(cat)[0]), "-o", str(model)]
    result = CliRunner().invoke(main, [*args, "--overwrite", "--n-workers", "1"])
    assert result.exit_code == 2 and "not an xpbatch neighbours table" in result.output
    assert "Traceback" not in result.output and model.read_bytes() == before


def test_skymap_writes_once_and_replaces_only_its_own(cat: Path, tmp_path: Path) -> None:
    out = tmp_path / "sky.png"
    write_sky_maps(cat, out, config=SkyMapConfig(order=1))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_sky_maps(cat, out, config=SkyMapConfig(order=1))
    write_sky_maps(cat, out, config=SkyMapConfig(order=2, overwrite=True))
    record = json.loads((tmp_path / "sky.png.xpbatch.json").read_text())
    assert record["kind"] == "sky map" and record["complete"] is True and record["order"] == 2


def test_a_second_writer_is_refused_by_the_lock_and_then_by_the_existence_check(
    cat: Path, tmp_path: Path
) -> None:
    out = tmp_path / "n.csv"
    with output_lock(out, command="neighbours"):  # a first run, still writing
        with pytest.raises(OutputLockedError, match="is being written by"):
            write_neighbours(cat, _ids(cat), out, config=NeighboursConfig(k=2))
        assert not out.exists()
    write_neighbours(cat, _ids(cat), out, config=NeighboursConfig(k=2))
    with pytest.raises(OutputExistsError):  # the first run finished: its output is there
        write_neighbours(cat, _ids(cat), out, config=NeighboursConfig(k=2))


def test_the_lock_is_the_real_paths_so_a_symlink_does_not_get_past_it(tmp_path: Path) -> None:
    real = tmp_path / "real.zarr"
    real.mkdir()
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    assert lock_path(link) == lock_path(real) == tmp_path / "real.zarr.lock"
    with (
        output_lock(real, command="first"),
        pytest.raises(OutputLockedError, match="first"),
        output_lock(link),
    ):
        pass


def test_overwrite_through_a_symlink_replaces_the_target_and_keeps_the_link(
    tmp_path: Path, make_xp_store: Callable[..., Path]
) -> None:
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.model.trained import TrainedModel

    store = make_xp_store(tmp_path / "s.zarr", 300, chunk_rows=128)
    config = EncodeConfig(progress_bar=False, check_fit=False)
    real, link = tmp_path / "real.zarr", tmp_path / "link.zarr"
    encode_catalog(store, TrainedModel.untrained(), real, config=config)
    link.symlink_to(real)
    overwrite = EncodeConfig(progress_bar=False, check_fit=False, overwrite=True)
    summary = encode_catalog(store, TrainedModel.untrained(), link, config=overwrite)
    assert summary.verified and link.is_symlink() and link.resolve() == real
    assert catalog.read_attrs(real)[schema.CATALOG_ATTR_COMPLETE] is True
    mock_link = tmp_path / "mock-link.zarr"
    make_mock(tmp_path / "mock.zarr", config=MockConfig(n=50))
    mock_link.symlink_to(tmp_path / "mock.zarr")
    make_mock(mock_link, config=MockConfig(n=60, overwrite=True))
    assert mock_link.is_symlink()
    attrs = json.loads((tmp_path / "mock.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs[schema.STORE_ATTR_ROW_COUNT] == 60


def test_ingest_and_mock_never_replace_a_catalogue(cat: Path, tmp_path: Path) -> None:
    from xpbatch.ingest import ingest_files

    bulk = make_mock(tmp_path / "bulk", config=MockConfig(n=100, format="dr3-bulk"))
    xp = [str(p) for p in bulk.files]
    gs = sorted(str(p) for p in (tmp_path / "bulk").glob("GaiaSource_*"))
    before = _tree(cat)
    with pytest.raises(OutputExistsError, match="an xpbatch catalogue, not the XP store"):
        ingest_files(xp, gs, cat, config=IngestConfig(overwrite=True, progress_bar=False))
    with pytest.raises(ResumeRefusedError, match="an xpbatch catalogue, not the XP store"):
        ingest_files(xp, gs, cat, config=IngestConfig(resume=True, progress_bar=False))
    with pytest.raises(OutputExistsError, match="an xpbatch catalogue, not the XP store"):
        make_mock(cat, config=MockConfig(n=50, overwrite=True))
    assert _tree(cat) == before
    store = tmp_path / "store.zarr"
    ingest_files(xp, gs, store, config=IngestConfig(progress_bar=False))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        ingest_files(xp, gs, store, config=IngestConfig(progress_bar=False))
    again = ingest_files(xp, gs, store, config=IngestConfig(overwrite=True, progress_bar=False))
    assert again.rows == 100


def test_mock_bulk_overwrite_never_removes_bulk_files_it_did_not_write(tmp_path: Path) -> None:
    downloads = tmp_path / "dr3"
    make_mock(downloads, config=MockConfig(n=100, format="dr3-bulk"))
    (downloads / "_xpbatch_run.json").unlink()  # as if these were the user's DR3 downloads
    before = _tree(downloads)
    with pytest.raises(OutputExistsError, match="not an xpbatch mock DR3 bulk directory"):
        make_mock(downloads, config=MockConfig(n=100, format="dr3-bulk", overwrite=True))
    assert _tree(downloads) == before
    ours = tmp_path / "mock"
    make_mock(ours, config=MockConfig(n=100, format="dr3-bulk"))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        make_mock(ours, config=MockConfig(n=100, format="dr3-bulk"))
    make_mock(ours, config=MockConfig(n=120, format="dr3-bulk", overwrite=True))


def test_train_never_replaces_a_users_file(tmp_path: Path) -> None:
    store = make_mock(tmp_path / "s.zarr", config=MockConfig(n=200)).path
    notes = _notes(tmp_path / "notes.txt")
    result = CliRunner().invoke(main, ["train", str(store), "-o", str(notes), "--overwrite"])
    assert result.exit_code == 2 and "not an xpbatch model" in result.output
    assert notes.read_text() == "my notes" and "Traceback" not in result.output


def test_break_lock_reaches_the_stage_through_its_config(cat: Path, tmp_path: Path) -> None:
    out = tmp_path / "n.csv"
    lock = lock_path(out)
    holder = {"run_id": "r0", "command": "neighbours", "host": "node-elsewhere", "pid": 1}
    lock.write_text(json.dumps(holder))
    with pytest.raises(OutputLockedError, match=r"node-elsewhere.*--break-lock"):
        write_neighbours(cat, _ids(cat), out, config=NeighboursConfig(k=2))
    assert socket.gethostname() != "node-elsewhere"
    table = write_neighbours(cat, _ids(cat), out, config=NeighboursConfig(k=2, break_lock=True))
    assert len(table) == 4 and not lock.exists()
    np.testing.assert_array_equal(sorted(set(table.query_source_id)), sorted(_ids(cat)))


def test_import_xpvae_never_replaces_a_file_it_did_not_write(
    reference_dir: Path, tmp_path: Path
) -> None:
    """``import-xpvae -o`` follows the output rule: a user's file is never replaced, a model
    file only with ``--overwrite``."""
    import numpy as np

    norm = tmp_path / "norm.npz"
    np.savez(norm, mu=np.zeros(110), sig=np.ones(110))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    base = ["import-xpvae", str(reference_dir / "weight.pt"), "--norm", str(norm)]
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(main, [*base, "-o", str(notes), *extra])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert notes.read_text() == "my notes"
    model = tmp_path / "m.safetensors"
    assert CliRunner().invoke(main, [*base, "-o", str(model)]).exit_code == 0
    again = CliRunner().invoke(main, [*base, "-o", str(model)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(main, [*base, "-o", str(model), "--overwrite"]).exit_code == 0
