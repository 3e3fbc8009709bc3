"""Click options generated from the config dataclasses of :mod:`xpbatch.config`.

A field ``batch_size`` becomes ``--batch-size`` (a bool ``with_x`` becomes ``--with-x/--no-with-x``)
with the field's type, its default and, as help, its attribute docstring; a field annotated
``Literal[...]`` becomes a ``click.Choice`` of its values (:func:`xpbatch.config.field_choices`).
So a field added to a config is an option of its command with no more code, and every default
has one home. Only a given option reaches the config: the rest keep the
field's default, or a TOML file's value where the command reads one (``--config``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from xpbatch.config import ClusterConfig, field_choices, from_mapping

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command's exception to a field's generated option, where its name or check must differ."""

    names: tuple[str, ...] = ()
    """The option's names, e.g. ``("--check-fit/--skip-fit-check",)`` or ``("-n", "--rows")``."""
    type: click.ParamType | None = None
    """A click type that checks more than the annotation says (``click.Path(exists=True)``)."""
    metavar: str | None = None
    """How the value is written in ``--help``."""


class CommaList(click.ParamType):
    """``tuple[str, ...]`` as comma-separated names; 'none' for none."""

    name = "NAMES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default, already a tuple
        return tuple(n for n in (s.strip() for s in value.split(",")) if n and n != "none")


class PairList(click.ParamType):
    """``tuple[tuple[str, str], ...]`` as comma-separated ``KEY=VALUE`` pairs."""

    name = "KEY=VALUE,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        pairs = []
        for item in filter(str.strip, value.split(",")):
            key, sep, given = (s.strip() for s in item.partition("="))
            if not sep or not key or not given:
                self.fail(f"{item!r} is not {param.metavar if param else self.name}", param, ctx)
            pairs.append((key, given))
        return tuple(pairs)


_SCALAR_TYPES: dict[Any, click.ParamType] = {
    int: click.INT,
    float: click.FLOAT,
    str: click.STRING,
    tuple[str, ...]: CommaList(),
    tuple[tuple[str, str], ...]: PairList(),
}
"""Click type per (non-optional) field annotation; a field of another type needs ``exclude``."""


@functools.cache
def _class_body(cls: type) -> list[ast.stmt]:
    """The statements of the class ``cls``, parsed once from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return tree.body[0].body  # type: ignore[attr-defined, no-any-return]


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal after it), whitespace folded; a
    field of a base dataclass (``OutputOptions``) has its docstring there."""
    bases = [base for base in reversed(cls.__mro__) if dataclasses.is_dataclass(base)]
    body = [node for base in bases for node in _class_body(base)]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _field_option(cls: type, field: dataclasses.Field[Any], flag: Flag) -> Callable[[F], F]:
    """The click option of one config field."""
    hint = typing.get_type_hints(cls)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) and len(args) == 1:
        hint = args[0]  # X | None: None is the default, not a value one types
    name = "--" + field.name.replace("_", "-")
    kwargs: dict[str, Any] = {
        "default": field.default,
        "show_default": field.default is not None,
        "help": field_docs(cls).get(field.name),
        "metavar": flag.metavar,
    }
    if field.default is dataclasses.MISSING:
        raise TypeError(f"{cls.__name__}.{field.name} has no plain default to show")
    if hint is bool:
        names = flag.names or (f"{name}/--no-{name[2:]}",)
        kwargs["show_default"] = field.default  # 'off' needs no saying: the flag is absent
        return click.option(*names, field.name, **kwargs)
    choices = field_choices(cls).get(field.name)
    kind = flag.type or (click.Choice(choices) if choices else _SCALAR_TYPES.get(hint))
    if kind is None:
        raise TypeError(
            f"{cls.__name__}.{field.name}: no option for type {hint}; exclude it or give a Flag"
        )
    return click.option(*(flag.names or (name,)), field.name, type=kind, **kwargs)


def config_options(
    cls: type, *, exclude: tuple[str, ...] = (), flags: Mapping[str, Flag] | None = None
) -> Callable[[F], F]:
    """Decorate a command with one option per field of the config class ``cls``.

    ``exclude`` names fields that are not options (set by a TOML file only, say); ``flags``
    gives the exceptions, by field name. Read the values back with :func:`config_from_options`.
    """
    flags = flags or {}
    fields = dataclasses.fields(cls)
    unknown = (set(flags) | set(exclude)) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    options = [
        _field_option(cls, f, flags.get(f.name, Flag())) for f in fields if f.name not in exclude
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def options_given(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the options of ``cls``'s fields from a command's kwargs; return those given by the user.

    An option left out keeps the field's default (or the TOML file's value), so the default
    shown in ``--help`` and the one used are the same value, from one place.
    """
    ctx = click.get_current_context()
    given = {}
    for field in dataclasses.fields(cls):
        if field.name in kwargs:
            value = kwargs.pop(field.name)
            if ctx.get_parameter_source(field.name) is not ParameterSource.DEFAULT:
                given[field.name] = value
    return given


def config_from_options(
    cls: type[C],
    kwargs: dict[str, Any],
    *,
    base: Mapping[str, Any] | None = None,
    where: str = "configuration",
) -> C:
    """The config built from ``base`` (a TOML file's settings) with the options given on top."""
    return from_mapping(cls, {**(base or {}), **options_given(cls, kwargs)}, where=where)


cluster_options = config_options(
    ClusterConfig,
    flags={
        "cluster": Flag(metavar="local-cuda|tcp://HOST:PORT"),
        "scheduler_file": Flag(type=click.Path(dir_okay=False)),
    },
)
"""The ``--cluster`` family of options, shared by every command that uses Dask."""


def cluster_config(kwargs: dict[str, Any]) -> ClusterConfig:
    """Pop the ``cluster_options`` from a command's kwargs into a :class:`ClusterConfig`."""
    return config_from_options(ClusterConfig, kwargs)


class PathOrURL(click.ParamType):
    """A local path (checked to exist when ``exists``) or an object-storage URL (``s3://``),
    which is checked when the command opens it (settings come with ``--storage-options``)."""

    name = "PATH|URL"

    def __init__(self, *, exists: bool = False, file_okay: bool = True) -> None:
        self.local = click.Path(exists=exists, file_okay=file_okay)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and "://" in value and not value.startswith("file://"):
            return value
        return self.local.convert(value, param, ctx)


def storage_option(func: F) -> F:
    """The ``--storage-options`` option shared by every command that reads or writes a store, a
    catalogue or an output."""
    return click.option(
        "--storage-options",
        "storage_options",
        default=None,
        metavar="JSON",
        help='Object-storage settings over the AWS environment, e.g. {"endpoint_url": '
        '"http://127.0.0.1:8333", "allow_http": true} (see docs/clusters.md); '
        "better keep credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.",
    )(func)


def located(target: str | None, options: str | Mapping[str, Any] | None) -> Any:
    """``target`` as the stages take it: an ``s3://`` URL as a Location carrying the storage
    options (JSON text or a ``[storage]`` table), a local path as it is."""
    if target is None or "://" not in target or target.startswith("file://"):
        return target
    from xpbatch.storage.location import as_location

    return as_location(target, storage_options=options)


def check_output_storage(target: Any) -> None:
    """For an output on object storage: prove the credentials, the bucket and conditional
    writes now (once per process), so a mistake is one line before any cluster starts."""
    from xpbatch.storage.lease import check_conditional_writes
    from xpbatch.storage.location import Location

    if isinstance(target, Location) and not target.is_local:
        check_conditional_writes(target)
