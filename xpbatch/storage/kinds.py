"""Which of xpbatch's two Zarr outputs a group is (the XP store or the catalogue): what errors
call it, what to do when it is missing, and its format version."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from xpbatch import schema
from xpbatch.errors import CatalogError, StoreError
from xpbatch.storage.location import Location
from xpbatch.storage.paths import PathLike


@dataclasses.dataclass(frozen=True)
class Kind:
    """Which xpbatch output a Zarr group is, for error messages that name it."""

    noun: str
    """E.g. 'XP store': starts the sentence '... does not exist'."""
    article_noun: str
    """E.g. 'an XP store': ends the question 'is it ...?'."""
    error: type[StoreError] | type[CatalogError]
    """Raised for a group or array that is not what it should be."""
    remedy: str
    """What to do when it does not exist."""
    version_attr: str
    """The group attribute recording its format version."""
    version: int
    """The format version this xpbatch writes and reads."""
    redo: str
    """What to do with one of another format version."""


STORE = Kind(
    "XP store",
    "an XP store",
    StoreError,
    "build one with `xpbatch ingest` or `xpbatch mock`",
    schema.STORE_ATTR_SCHEMA_VERSION,
    schema.STORE_SCHEMA_VERSION,
    "re-ingest it (`xpbatch ingest ... --overwrite`, or `xpbatch mock` for mock data)",
)
CATALOG = Kind(
    "catalogue",
    "an xpbatch catalogue",
    CatalogError,
    "write one with `xpbatch encode-catalog`",
    schema.CATALOG_ATTR_SCHEMA_VERSION,
    schema.CATALOG_SCHEMA_VERSION,
    "re-encode it (`xpbatch encode-catalog ... --overwrite`)",
)


def check_format_version(attrs: Mapping[str, Any], path: PathLike | Location, kind: Kind) -> None:
    """Refuse (``kind.error``) a store or catalogue of another format version than this one."""
    problem = schema.format_version_problem(
        attrs.get(kind.version_attr), kind.version, what=f"{kind.noun} {path}", redo=kind.redo
    )
    if problem:
        raise kind.error(problem)
