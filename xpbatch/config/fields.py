"""What every config shares: building one from a mapping or a TOML file, choices declared by
``Literal[...]``, the run-control fields, and :class:`OutputOptions` (every writing command's)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from xpbatch.errors import ConfigError

C = TypeVar("C")


def did_you_mean(name: str, valid: list[str]) -> str:
    """A ' Did you mean X?' suffix for an unknown name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, valid, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def from_mapping(cls: type[C], values: Mapping[str, Any], *, where: str = "configuration") -> C:
    """Build a config dataclass from a mapping, naming the valid keys when one is unknown."""
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in valid:
            raise ConfigError(
                f"unknown key {key!r} in {where}.{did_you_mean(key, valid)} "
                f"Valid keys: {', '.join(valid)}."
            )
    return cls(**values)


def field_choices(cls: type) -> dict[str, tuple[str, ...]]:
    """The choices of each field of ``cls`` annotated ``Literal[...]``: the one declaration that
    ``__post_init__`` checks (:func:`check_choices`) and the CLI offers (``click.Choice``)."""
    hints = typing.get_type_hints(cls).items()
    return {name: typing.get_args(h) for name, h in hints if typing.get_origin(h) is Literal}


def check_choices(config: Any) -> None:
    """Raise ConfigError naming the valid choices (and the closest one) for a field of
    ``config`` whose value is not one of its :func:`field_choices`."""
    for name, choices in field_choices(type(config)).items():
        value = getattr(config, name)
        if value not in choices:
            raise ConfigError(
                f"{name} must be one of {', '.join(choices)}, got {value!r}."
                f"{did_you_mean(str(value), list(choices))}"
            )


RUN_CONTROL_FIELDS = ("resume", "overwrite", "break_lock", "progress_bar")
"""Config fields that steer one run without changing its result: never part of a fingerprint
or of the provenance an output records, so a resumed output equals an uninterrupted one."""


def result_options(config: Any) -> dict[str, Any]:
    """The fields of a stage config that shape its output (all but :data:`RUN_CONTROL_FIELDS`)."""
    options = dataclasses.asdict(config)
    return {name: value for name, value in options.items() if name not in RUN_CONTROL_FIELDS}


def check_resume_or_overwrite(config: Any, what: str) -> None:
    """One of ``--resume`` (continue) and ``--overwrite`` (start again), never both."""
    if config.resume and config.overwrite:
        raise ConfigError(
            f"--resume continues an existing {what} and --overwrite replaces it; give one"
        )


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """Options of every command that writes: an output already there, and the output's lock."""

    overwrite: bool = False
    """Replace an output this command wrote earlier (xpbatch recognises its own record of it);
    never a file or directory xpbatch did not write, nor another command's output."""
    break_lock: bool = False
    """Take over the output's lock from a run on another host that you checked is gone (a dead
    run on this host is recognised by itself)."""


Device = Literal["auto", "cpu", "cuda"]
"""Where torch runs (:func:`xpbatch.model.device.resolve_device`)."""
DEVICES: tuple[str, ...] = typing.get_args(Device)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML configuration file; errors name the file and say what is wrong."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"configuration file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"configuration file {path} is not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"configuration file {path} is not text (byte {e.start} is not UTF-8); give a TOML "
            "file of settings"
        ) from None
