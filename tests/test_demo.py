"""The demo's inputs: built once, reused after, rebuilt when half-built."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from xpbatch.store.reader import open_xp_store
from xpbatch.train import demo


@pytest.fixture
def tiny_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "DEMO_ROWS", 3000)
    monkeypatch.setattr(demo, "DEMO_CHUNK_ROWS", 1024)
    tiny = dataclasses.replace(demo.DEMO_TRAINING, epochs=1, sample=1000, cycle_epochs=1)
    monkeypatch.setattr(demo, "DEMO_TRAINING", tiny)


@pytest.mark.usefixtures("tiny_demo")
def test_demo_inputs_are_built_once_and_a_broken_one_is_rebuilt(tmp_path: Path) -> None:
    said: list[str] = []
    inputs = demo.demo_inputs(tmp_path, echo=said.append)
    assert len(said) == 2  # built the store, trained the model
    assert open_xp_store(inputs.store).sizes["source"] == 3000
    model_bytes = inputs.model.read_bytes()

    said.clear()
    assert demo.demo_inputs(tmp_path, echo=said.append) == inputs
    assert said == [] and inputs.model.read_bytes() == model_bytes

    (inputs.store / "zarr.json").unlink()  # e.g. killed while building
    demo.demo_inputs(tmp_path, echo=said.append)
    assert said == [f"building the demo store {inputs.store} (3,000 mock spectra, once)…"]


def test_demo_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(demo.DEMO_DIR_ENV, str(tmp_path / "cache"))
    assert demo.demo_dir() == tmp_path / "cache"


@pytest.mark.slow  # builds the demo, then two CLI clusters
@pytest.mark.usefixtures("tiny_demo")
def test_encode_catalog_demo_needs_no_input_and_its_skymap_counts_every_row(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from xpbatch.catalog.zarr_catalog import open_catalog
    from xpbatch.cli.main import main

    monkeypatch.setenv(demo.DEMO_DIR_ENV, str(tmp_path))
    cluster = ["--n-workers", "1", "--dashboard-address", ":0"]
    encoded = CliRunner().invoke(main, ["encode-catalog", "--demo", *cluster])
    assert encoded.exit_code == 0, encoded.output
    assert "rows           3,000 in 3 chunks" in encoded.output
    assert "xpbatch.open_catalog(" in encoded.output
    catalog = tmp_path / "demo-catalog.zarr"
    assert open_catalog(catalog).attrs["complete"] is True

    png = tmp_path / "maps.png"
    result = CliRunner().invoke(
        main, ["skymap", str(catalog), "-o", str(png), "--order", "3", *cluster]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {png}: 3,000 sources on 768 pixels" in result.output
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("where", ["", "notebooks", "notebooks/deeper"])
def test_demo_dir_is_the_checkouts_wherever_jupyter_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str
) -> None:
    monkeypatch.delenv(demo.DEMO_DIR_ENV, raising=False)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "xpbatch"\n')
    start = tmp_path / where
    start.mkdir(parents=True, exist_ok=True)
    assert demo.demo_dir(start) == tmp_path / "xpbatch-demo"
    repo = Path(__file__).resolve().parents[1]
    assert demo.demo_dir(repo / "notebooks") == repo / "xpbatch-demo"
