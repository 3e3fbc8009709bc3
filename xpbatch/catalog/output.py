"""Claiming the output catalogue: create it, resume it or overwrite it, and mark it complete.

A catalogue is its own run manifest (:mod:`xpbatch.storage.manifest`): its group attributes hold
the kind, the fingerprint and ``complete``, its ``chunk_records`` what is done.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr

from xpbatch import schema
from xpbatch.catalog.layout import CatalogLayout, create_catalog
from xpbatch.catalog.zarr_catalog import chunk_file_problems, completed_chunks
from xpbatch.errors import CatalogError
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.manifest import (
    CATALOG_KIND,
    COMPLETE,
    FINGERPRINT,
    KIND,
    RunManifest,
    RunRecord,
    ZarrRecord,
)
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import CATALOG, Place

logger = logging.getLogger(__name__)


class CatalogRecord(RunRecord):
    """A catalogue's run manifest is the catalogue itself: its group attributes hold the kind
    (its schema version), the fingerprint and ``complete``; ``chunk_records`` what is done."""

    def __init__(self, path: Place) -> None:
        self.where = path / "zarr.json"
        self.path = path

    def read(self) -> dict[str, Any] | None:
        zarr_record = ZarrRecord(self.path)
        found, attrs = zarr_record.read(), zarr_record.attrs() or {}
        if found is None or found[KIND] != CATALOG_KIND:
            return found
        fingerprint = {k: attrs.get(k) for k in _fingerprint_keys(attrs)}
        return {**found, FINGERPRINT: fingerprint}

    def write(self, fields: Mapping[str, Any]) -> None:
        """Set ``complete`` (and the end time) in the attributes; the template and the chunk
        records hold the rest."""
        group = zarr_arrays.open_group(self.path, CATALOG, mode="r+")
        if fields.get(COMPLETE):
            end = fields.get("finished") or zarr_arrays.utc_now()
            complete = {schema.CATALOG_ATTR_COMPLETE: True, schema.CATALOG_ATTR_END_TIME: end}
            group.attrs.update(complete)


def _fingerprint_keys(attrs: Mapping[str, Any]) -> list[str]:
    """The attributes a resumed catalogue must match (model, input store, layout, options)."""
    keys = [k for k in schema.CATALOG_FINGERPRINT_ATTRS if k in attrs]
    return [*keys, schema.CATALOG_ATTR_SCHEMA_VERSION, schema.CATALOG_ATTR_LAYOUT]


def catalog_manifest(
    path: PathLike | Location,
    layout: CatalogLayout | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> RunManifest:
    """The run manifest of the catalogue at ``path``; with ``layout`` and ``attrs``, the
    fingerprint a run with them must match to resume it."""
    fingerprint = None
    if layout is not None and attrs is not None:
        fingerprint = {
            **{k: attrs[k] for k in schema.CATALOG_FINGERPRINT_ATTRS if k in attrs},
            schema.CATALOG_ATTR_SCHEMA_VERSION: schema.CATALOG_SCHEMA_VERSION,
            schema.CATALOG_ATTR_LAYOUT: layout.to_attrs(),
        }
    path = zarr_arrays.where(path)
    return RunManifest(path, kind=CATALOG_KIND, record=CatalogRecord(path), fingerprint=fingerprint)


def prepare_output(
    path: PathLike | Location,
    layout: CatalogLayout,
    *,
    attrs: Mapping[str, Any],
    resume: bool,
    overwrite: bool,
) -> set[int]:
    """Create the catalogue or reopen it for ``--resume``; return the chunks already done.

    The one output rule (:mod:`xpbatch.storage.manifest`): without ``resume`` or ``overwrite``
    an existing path is never touched (:class:`~xpbatch.errors.OutputExistsError`).
    ``overwrite`` replaces an existing catalogue (never a directory that is not one, nor another
    command's output). ``resume`` continues a catalogue whose fingerprint (model hash, input
    store id, layout, options) equals this run's, or refuses with
    :class:`~xpbatch.errors.ResumeRefusedError`.
    """
    path = zarr_arrays.where(path)
    exists = path.exists()
    run = catalog_manifest(path, layout, attrs)
    if exists and _unfinished_template(path):
        # The records array is created last: without it the template was never finished, and
        # nothing was recorded yet (whatever its fingerprint).
        run.fingerprint = None
    elif exists and resume:
        _refuse_another_format(path)
    run.claim(
        resume=resume,
        overwrite=overwrite,
        exists=exists,
        found=_describe_existing(path) if exists else "",
        remove=lambda: zarr_arrays.remove_tree(path),
    )
    if run.resumed:
        if _unfinished_template(path):
            logger.warning("%s has an unfinished template (killed at creation); rebuilding", path)
            zarr_arrays.remove_tree(path)
        else:
            if not run.complete:  # a complete catalogue is left as it is
                remove_interrupted_writes(path)
                group = zarr_arrays.open_group(path, CATALOG, mode="r+")
                found: dict[str, Any] = group.attrs.asdict()
                times = [*found.get(schema.CATALOG_ATTR_RESUMED, []), zarr_arrays.utc_now()]
                group.attrs.update({schema.CATALOG_ATTR_RESUMED: times})
            done = completed_chunks(path)
            return done - set(chunk_file_problems(path, sorted(done)))  # re-derive those
    create_catalog(path, layout, attrs=attrs)
    return set()


def _refuse_another_format(path: Place) -> None:
    """Before the fingerprint is compared: a catalogue of another format version is named as
    such (re-encode it), not as another run; anything else is left to the claim to describe."""
    try:
        found: dict[str, Any] = zarr_arrays.open_group(path, CATALOG).attrs.asdict()
    except (CatalogError, FileNotFoundError):
        return
    if schema.CATALOG_ATTR_SCHEMA_VERSION in found:
        zarr_arrays.check_format_version(found, path, CATALOG)


def _unfinished_template(path: Place) -> bool:
    """An empty directory, or a catalogue killed while its template was created."""
    if _is_empty_dir(path):
        return True
    try:
        group = zarr_arrays.open_group(path, CATALOG)
    except CatalogError:
        return False
    return not isinstance(group.get(schema.RECORDS_ARRAY), zarr.Array)


def _is_empty_dir(path: Place) -> bool:
    """An empty local directory (object storage has none: an empty prefix does not exist)."""
    return isinstance(path, Path) and path.is_dir() and not any(path.iterdir())


def _describe_existing(path: Place) -> str:
    if (CatalogRecord(path).read() or {}).get(KIND) != CATALOG_KIND:
        return "an empty directory" if _is_empty_dir(path) else "files of another kind"
    attrs: dict[str, Any] = zarr_arrays.open_group(path, CATALOG).attrs.asdict()
    if attrs.get(schema.CATALOG_ATTR_COMPLETE) is True:
        return "a complete catalogue"
    try:
        done = len(completed_chunks(path))
        total = CatalogLayout.from_attrs(attrs[schema.CATALOG_ATTR_LAYOUT]).n_chunks
    except (CatalogError, KeyError, TypeError):
        return "an incomplete catalogue"
    return f"an incomplete catalogue, {done} of {total} chunks done"


def remove_interrupted_writes(path: PathLike | Location) -> None:
    """Delete the temporary files of chunk writes that a kill interrupted (never valid data).

    Zarr writes each chunk to ``<key>.<uuid>.partial`` and renames it; a worker killed in
    between leaves the temporary file behind. Call only while this run is the one writer.
    On object storage there are none: a PUT is atomic, an interrupted one leaves nothing.
    """
    place = zarr_arrays.where(path)
    if isinstance(place, Location):
        return
    for partial in place.rglob("*.partial"):
        partial.unlink(missing_ok=True)


def mark_complete(path: PathLike | Location, *, end_time: str | None = None) -> None:
    """Set ``complete = true`` and the end time (the run manifest's completion), and
    consolidate the metadata for fast opens."""
    path = zarr_arrays.where(path)
    run = catalog_manifest(path)
    run.mark_complete(**({"finished": end_time} if end_time else {}))
    zarr_arrays.consolidate(path)
