"""The CLI is generated from the configs: every stage option is a config field, with the field's
default and, as help, its docstring; the public API exports every stage, config, summary and error.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import xpbatch
from xpbatch import config as config_module
from xpbatch import errors
from xpbatch.cli.main import main
from xpbatch.cli.options import config_options, options_given
from xpbatch.config import (
    ClusterConfig,
    EncodeConfig,
    HatsExportConfig,
    IngestConfig,
    MockConfig,
    ModelConfig,
    NeighboursConfig,
    OutputOptions,
    ParquetExportConfig,
    SkyMapConfig,
    TrainConfig,
)

STORAGE = "storage_options"
"""--storage-options: JSON of xpbatch.storage.clients.StorageOptions, not a stage config."""
STAGES: dict[str, tuple[tuple[type, ...], set[str]]] = {
    "ingest": ((IngestConfig, ClusterConfig), {"gaia_source", "output", STORAGE}),
    "encode-catalog": ((EncodeConfig, ClusterConfig), {"model", "output", "demo", STORAGE}),
    "train": ((TrainConfig,), {"output", "config_file", "preset", STORAGE}),
    "mock": (
        (MockConfig,),
        {"output", "config_file", "rare", STORAGE},
    ),
    "export-hats": ((HatsExportConfig, ClusterConfig), {"output", STORAGE}),
    "export-parquet": ((ParquetExportConfig,), {"output", "partitions", "store", STORAGE}),
    "neighbours": ((NeighboursConfig, ClusterConfig), {"source_ids", "output", STORAGE}),
    "skymap": ((SkyMapConfig, ClusterConfig), {"output", STORAGE}),
}
"""Stage command -> (the configs its options come from, its options that are not config fields:
inputs, outputs and what the stage function takes besides its config)."""

NOT_OPTIONS = {(TrainConfig, "model")}
"""Fields set only in a TOML file: TrainConfig's [model] table."""


def _docstrings(cls: type) -> dict[str, str]:
    """Field -> docstring, read with a regex from the source (independent of cli_options);
    the fields of a base dataclass from its own source."""
    bases = [base for base in cls.__mro__ if dataclasses.is_dataclass(base)]
    source = "".join(inspect.getsource(base) for base in bases)
    found = re.findall(r'\n    (\w+): [^\n]+\n    """(.*?)"""', source, flags=re.DOTALL)
    return {name: " ".join(text.split()) for name, text in found}


def _options(command: str) -> dict[str, click.Option]:
    group = main
    return {
        p.name: p
        for p in group.commands[command].params
        if isinstance(p, click.Option) and p.name is not None
    }


@pytest.mark.parametrize("command", list(STAGES))
def test_help_shows_each_config_fields_docstring(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"], max_content_width=10_000)
    assert result.exit_code == 0, result.output
    shown = "".join(result.output.split())
    options = _options(command)
    for cls in STAGES[command][0]:
        docs = _docstrings(cls)
        for field in dataclasses.fields(cls):
            if (cls, field.name) in NOT_OPTIONS:
                continue
            assert field.name in docs, f"{cls.__name__}.{field.name} has no docstring"
            assert "".join(docs[field.name].split()) in shown, (command, field.name)
            option = options[field.name]
            assert option.help == docs[field.name], (command, field.name)
            assert option.default == field.default, (command, field.name)


@pytest.mark.parametrize("command", list(STAGES))
def test_every_option_maps_to_a_config_field(command: str) -> None:
    configs, others = STAGES[command]
    fields = {f.name for cls in configs for f in dataclasses.fields(cls)}
    unmapped = set(_options(command)) - fields - {"help"}
    assert unmapped == others, f"{command}: options that are not config fields: {unmapped}"


CONFIGS = {
    obj
    for obj in vars(config_module).values()
    if isinstance(obj, type)
    and dataclasses.is_dataclass(obj)
    and obj.__module__.startswith(f"{config_module.__name__}.")
}
"""Every config class of xpbatch.config (each defined in one of its modules)."""


def test_every_config_is_the_options_of_a_command() -> None:
    configs = CONFIGS
    used = {cls for stage_configs, _ in STAGES.values() for cls in stage_configs}
    # the architecture (TrainConfig's [model] table) and the base of every writing command's
    assert configs - used == {ModelConfig, OutputOptions}


def test_field_docstrings_are_plain_text_for_help() -> None:
    for cls in CONFIGS:
        for name, text in _docstrings(cls).items():
            assert "``" not in text and ":data:" not in text, f"{cls.__name__}.{name}: {text}"


def _config_seen(args: list[str], toml: str | None, tmp_path: Path) -> TrainConfig:
    """The TrainConfig a command with the generated options builds from ``args``."""
    seen: list[TrainConfig] = []

    @click.command()
    @config_options(TrainConfig, exclude=("model",))
    def command(**options: Any) -> None:
        path = None
        if toml is not None:
            path = tmp_path / "train.toml"
            path.write_text(toml)
        seen.append(TrainConfig.from_toml(path, options_given(TrainConfig, options)))

    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize(
    ("args", "toml", "expected"),
    [
        ([], None, TrainConfig()),
        (["--epochs", "7", "--device", "cpu"], None, TrainConfig(epochs=7, device="cpu")),
        (["--partial-rows"], None, TrainConfig(partial_rows=True)),
        ([], "epochs = 9\npartial_rows = true\n", TrainConfig(epochs=9, partial_rows=True)),
        (["--epochs", "3"], "epochs = 9\nseed = 4\n", TrainConfig(epochs=3, seed=4)),
        (["--no-partial-rows"], "partial_rows = true\n", TrainConfig()),
    ],
    ids=["defaults", "flags", "bool-flag", "toml", "flag-over-toml", "no-flag-over-toml"],
)  # fmt: skip
def test_only_given_options_reach_the_config(
    args: list[str], toml: str | None, expected: TrainConfig, tmp_path: Path
) -> None:
    assert _config_seen(args, toml, tmp_path) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu"], "'gpu' is not one of 'auto', 'cpu', 'cuda'"),
        (["--epochs", "many"], "'many' is not a valid integer"),
    ],
    ids=["choice", "type"],
)
def test_option_values_are_checked_by_click(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["train", ".", "-o", "m.safetensors", *args])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (TrainConfig, r"TrainConfig\.model has no plain default"),
        (ModelConfig, r"ModelConfig\.hidden_widths: no option for type"),
    ],
    ids=["default-factory", "unknown-type"],
)
def test_a_field_that_cannot_be_an_option_is_refused_at_definition(cls: type, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        config_options(cls)


def test_ingest_list_options_parse_into_the_config(tmp_path: Path) -> None:
    seen: list[IngestConfig] = []

    @click.command()
    @config_options(IngestConfig)
    def command(**options: Any) -> None:
        seen.append(IngestConfig(**options_given(IngestConfig, options)))

    args = ["--scalars", "bp_chi_squared,rp_n_transits", "--columns", "bp_coefficients=BPc{i}"]
    assert CliRunner().invoke(command, args).exit_code == 0
    assert seen[-1].scalars == ("bp_chi_squared", "rp_n_transits")
    assert seen[-1].columns == (("bp_coefficients", "BPc{i}"),)
    assert CliRunner().invoke(command, ["--scalars", "none"]).exit_code == 0
    assert seen[-1].scalars == ()


# --- the public API -------------------------------------------------------------------------------


def test_the_public_api_resolves_every_name() -> None:
    for name in xpbatch.__all__:
        assert getattr(xpbatch, name) is not None, name


def test_every_error_and_config_is_public() -> None:
    error_classes = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type)
        and issubclass(obj, Exception)
        and obj.__module__ == errors.__name__
    }
    configs = {cls.__name__ for cls in CONFIGS}
    assert (error_classes | configs) - set(xpbatch.__all__) == set()


def test_what_every_public_function_returns_is_public() -> None:
    missing = set()
    for name in xpbatch.__all__:
        obj = getattr(xpbatch, name)
        if not inspect.isfunction(obj):
            continue
        returned = str(inspect.signature(obj).return_annotation)  # a string: annotations
        namespace = vars(sys.modules[obj.__module__])
        for word in re.findall(r"\w+", returned):
            kind = namespace.get(word)
            ours = isinstance(kind, type) and kind.__module__.startswith("xpbatch")
            if ours and word not in xpbatch.__all__:
                missing.add(f"{word} (returned by {name})")
    assert not missing, f"add to xpbatch/__init__.py: {sorted(missing)}"


def test_notebooks_import_stages_and_configs_from_xpbatch() -> None:
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    for path in sorted(notebooks.glob("*.ipynb")):
        text = path.read_text()
        for name in xpbatch.__all__:
            assert not re.search(rf"from xpbatch\.[\w.]+ import [^\n]*\b{name}\b", text), (
                f"{path.name} imports {name} from a submodule; use xpbatch.{name}"
            )
