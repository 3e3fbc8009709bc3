"""The demo's inputs: built once, reused after, rebuilt when half-built."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from xpbatch import demo
from xpbatch.store import open_xp_store


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


@pytest.mark.usefixtures("tiny_demo")
def test_encode_catalog_demo_command_needs_no_input(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from xpbatch.catalog import open_catalog
    from xpbatch.cli import main

    monkeypatch.setenv(demo.DEMO_DIR_ENV, str(tmp_path))
    command = ["encode-catalog", "--demo", "--n-workers", "1", "--dashboard-address", ":0"]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert "rows           3,000 in 3 chunks" in result.output
    assert "xpbatch.open_catalog(" in result.output
    assert open_catalog(tmp_path / "demo-catalog.zarr").attrs["complete"] is True


def test_demo_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(demo.DEMO_DIR_ENV, str(tmp_path / "cache"))
    assert demo.demo_dir() == tmp_path / "cache"
