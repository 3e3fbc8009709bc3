"""mkdocs hook: writes the docs' reference tables from the code, so that they cannot drift.

A page asks for a table with a marker line ``<!-- generated: KIND [ARG] -->``; this hook
replaces it before the page is rendered. The kinds:

- ``store-variables``, ``store-scalars``, ``catalog-variables``: the row variables (name,
  dimensions, dtype, units, description) exactly as :mod:`xpbatch.store.layout` and
  :mod:`xpbatch.catalog.layout` create them, every optional one included;
- ``input-flags``, ``catalog-flags``: the bits of :class:`xpbatch.schema.InputFlag` and
  :class:`xpbatch.schema.CatalogFlag` with their docstrings;
- ``store-attributes``, ``catalog-attributes``, ``bookkeeping``: the names in
  :mod:`xpbatch.schema` and their docstrings;
- ``cli COMMAND``: the ``--help`` text of ``xpbatch COMMAND`` (``cli bench ingest`` for a
  subcommand);
- ``api-public``: a mkdocstrings block per module of ``xpbatch._MODULES`` with its public names;
  ``api-packages``: one per package, its docstring (which lists its modules).

An unknown kind, or a schema name without a docstring, fails the build.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = re.compile(r"^<!-- generated: ([a-z-]+)((?: [a-z-]+)*) -->$", re.MULTILINE)
PACKAGES = (
    "storage",
    "runtime",
    "store",
    "ingest",
    "mock",
    "model",
    "catalog",
    "train",
    "encode",
    "products",
    "benchmarks",
    "cli",
)
"""The layer packages, bottom up (the order of the import-linter contract, reversed)."""


ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
"""A Sphinx cross-reference role in a docstring (``:data:`NAME```): shown as code."""


def _cell(text: Any) -> str:
    """One Markdown table cell: one line, roles as code, pipes escaped."""
    return ROLE.sub(r"`\1`", " ".join(str(text).split())).replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _docstrings(module: Any) -> dict[str, str]:
    """``NAME`` (or ``Class.NAME``) -> the string literal right after its assignment."""
    tree = ast.parse(inspect.getsource(module))
    found: dict[str, str] = {}

    def scan(body: list[ast.stmt], prefix: str) -> None:
        for stmt, following in zip(body, [*body[1:], None], strict=True):
            if isinstance(stmt, ast.ClassDef):
                scan(stmt.body, f"{stmt.name}.")
            target = None
            if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                target = stmt.targets[0].id
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                target = stmt.target.id
            if (
                target
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                found[prefix + target] = inspect.cleandoc(following.value.value)

    scan(tree.body, "")
    return found


def _variables(specs: list[Any]) -> str:
    return _table(
        ("variable", "dims", "dtype", "units", "description"),
        [(f"`{s.name}`", ", ".join(s.dims), s.dtype, s.units, s.description) for s in specs],
    )


def _store_variables(scalars: bool) -> str:
    from xpbatch import schema
    from xpbatch.store.layout import variable_specs

    everything = variable_specs(list(schema.DR3_SCALARS), True, True)
    specs = [s for s in everything if (s.name in schema.DR3_SCALARS) == scalars]
    return _variables(specs)


def _catalog_variables() -> str:
    from xpbatch.catalog.layout import CatalogLayout

    layout = CatalogLayout(
        n_rows=1,
        chunk_rows=1,
        with_reconstruction=True,
        with_mc=True,
        with_positions=True,
    )
    return _variables(layout.variables())


def _flags(flag: type[enum.IntFlag]) -> str:
    from xpbatch import schema

    docs = _docstrings(schema)
    rows = []
    for member in flag:
        text = docs.get(f"{flag.__name__}.{member.name}")
        if text is None:  # an alias of an InputFlag bit: that bit's docstring
            text = docs.get(f"InputFlag.{member.name}")
            text = text and f"as in the store's `input_flags`: {text}"
        if text is None:
            raise ValueError(f"{flag.__name__}.{member.name} has no docstring in schema.py")
        rows.append((f"`{member.name}`", int(member), text))
    return _table(("bit", "value", "meaning"), rows)


def _schema_names(prefixes: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    from xpbatch import schema

    docs = _docstrings(schema)
    names = [n for n in vars(schema) if n.startswith(prefixes) or n in extra]
    missing = [n for n in names if n not in docs]
    if missing:
        raise ValueError(f"schema.py names without a docstring: {', '.join(missing)}")
    return _table(
        ("name", "in `xpbatch.schema`", "meaning"),
        [(f"`{getattr(schema, n)}`", f"`{n}`", docs[n]) for n in names],
    )


def _cli(words: list[str]) -> str:
    import click

    from xpbatch.cli.main import main

    command: click.Command = main
    path = ["xpbatch"]
    for word in words:
        assert isinstance(command, click.Group), path
        command = command.commands[word]
        path.append(word)
    context = click.Context(command, info_name=" ".join(path), max_content_width=96)
    context.terminal_width = 96
    return f"```text\n{command.get_help(context)}\n```"


def _api_public() -> str:
    import xpbatch

    blocks = []
    for module, names in xpbatch._MODULES.items():
        members = "\n".join(f"        - {name}" for name in names)
        blocks.append(
            f"## `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n"
            f"      members:\n{members}\n"
        )
    return "\n".join(blocks)


def _api_packages() -> str:
    return "\n".join(
        f"## `xpbatch.{name}`\n\n::: xpbatch.{name}\n    options:\n"
        "      show_root_heading: false\n      members: false\n"
        for name in PACKAGES
    )


GENERATORS: dict[str, Callable[[list[str]], str]] = {
    "store-variables": lambda _: _store_variables(scalars=False),
    "store-scalars": lambda _: _store_variables(scalars=True),
    "catalog-variables": lambda _: _catalog_variables(),
    "input-flags": lambda _: _flags(importlib.import_module("xpbatch.schema").InputFlag),
    "catalog-flags": lambda _: _flags(importlib.import_module("xpbatch.schema").CatalogFlag),
    "store-attributes": lambda _: _schema_names(("STORE_ATTR_",)),
    "catalog-attributes": lambda _: _schema_names(("CATALOG_ATTR_",), ("ATTR_LATENT_DENSITY",)),
    "bookkeeping": lambda _: _schema_names(
        (), ("CHUNK_FILES", "RECORDS_ARRAY", "CHECKSUMS_ARRAY", "DEVICES_ARRAY")
    ),
    "cli": _cli,
    "api-public": lambda _: _api_public(),
    "api-packages": lambda _: _api_packages(),
}


def expand(markdown: str, where: str = "a page") -> str:
    """``markdown`` with every marker replaced by its generated table."""

    def replace(match: re.Match[str]) -> str:
        kind, args = match.group(1), match.group(2).split()
        if kind not in GENERATORS:
            raise ValueError(f"{where}: unknown generated table {kind!r}")
        return GENERATORS[kind](args)

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """mkdocs hook: expand the markers of every page."""
    return expand(markdown, page.file.src_path)


if __name__ == "__main__":  # print one page expanded: python docs/gen_reference.py docs/format.md
    import sys

    print(expand(Path(sys.argv[1]).read_text(), sys.argv[1]))
