"""A config field's choices are declared once, by its ``Literal[...]`` annotation: the config
checks them in ``__post_init__`` and the CLI offers them, both read from that declaration."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing

import click
import pytest

from xpbatch import config
from xpbatch.cli.main import main
from xpbatch.errors import ConfigError

MODULES = [
    importlib.import_module(f"{config.__name__}.{info.name}")
    for info in pkgutil.iter_modules(config.__path__)
]
"""The modules of the config package."""
CONFIGS = [
    value
    for module in MODULES
    for value in vars(module).values()
    if isinstance(value, type)
    and dataclasses.is_dataclass(value)
    and value.__module__ == module.__name__
]
"""Every config dataclass, wherever in the package it is defined."""
EXPECTED = {
    (config.EncodeConfig, "device"): ("auto", "cpu", "cuda"),
    (config.EncodeConfig, "mc_covariance"): ("auto", "full", "diagonal"),
    (config.IngestConfig, "on_bad_row"): ("error", "skip"),
    (config.MockConfig, "format"): ("store", "dr3-bulk"),
    (config.TrainConfig, "device"): ("auto", "cpu", "cuda"),
    (config.TrainConfig, "precision"): ("fp32", "tf32", "bf16"),
    (config.TrainConfig, "data_placement"): ("auto", "device", "stream"),
}
"""Every field with choices: one that lost its declaration would be missing here."""
COMMANDS = {
    config.EncodeConfig: "encode-catalog",
    config.IngestConfig: "ingest",
    config.MockConfig: "mock",
    config.TrainConfig: "train",
}


def test_every_config_is_imported_from_the_package() -> None:
    assert CONFIGS
    for cls in CONFIGS:
        assert getattr(config, cls.__name__) is cls
        assert cls.__name__ in config.__all__


def test_every_choice_field_is_found_from_its_annotation() -> None:
    found = {
        (cls, name): choices
        for cls in CONFIGS
        for name, choices in config.field_choices(cls).items()
    }
    assert found == EXPECTED
    for (cls, name), choices in EXPECTED.items():
        assert typing.get_args(typing.get_type_hints(cls)[name]) == choices


@pytest.mark.parametrize(("cls", "name"), EXPECTED, ids=[f"{c.__name__}.{n}" for c, n in EXPECTED])
def test_post_init_refuses_a_value_not_among_the_choices(cls: type, name: str) -> None:
    choices = EXPECTED[cls, name]
    typo = choices[-1][:-1] + "X"
    with pytest.raises(ConfigError, match=rf"{name} must be one of {', '.join(choices)}, got"):
        cls(**{name: typo})
    for choice in choices:
        if (cls, name, choice) != (config.TrainConfig, "precision", "tf32"):  # needs no cpu device
            cls(**{name: choice})


@pytest.mark.parametrize(("cls", "name"), EXPECTED, ids=[f"{c.__name__}.{n}" for c, n in EXPECTED])
def test_the_cli_option_offers_the_fields_choices(cls: type, name: str) -> None:
    command = main.commands[COMMANDS[cls]]
    (param,) = [p for p in command.params if p.name == name]
    assert isinstance(param.type, click.Choice)
    assert tuple(param.type.choices) == EXPECTED[cls, name]
