"""Opening and reading a catalogue: its attributes and layout, its completion records, its
chunk files against their recorded checksums, and the lazy xarray view (:func:`open_catalog`).

The catalogue's variables and template are :mod:`xpbatch.catalog.layout`; claiming the output
(create, resume, overwrite, mark complete) is :mod:`xpbatch.catalog.output`; writing its chunks,
and how a run stays correct when it is killed at any moment, is :mod:`xpbatch.catalog.writer`.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from xpbatch import schema
from xpbatch.catalog.layout import CHECKSUM_MISSING, RECORD_MISSING, CatalogLayout, ChunkRecord
from xpbatch.errors import CatalogError
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import CATALOG

if TYPE_CHECKING:
    import xarray as xr


# --- attributes and records ---------------------------------------------------------------------
def open_arrays(path: PathLike | Location, names: Iterable[str]) -> dict[str, zarr.Array]:
    """Read-only arrays of the Zarr group at ``path``, by name (CatalogError if one is missing)."""
    group = zarr_arrays.open_group(zarr_arrays.where(path), CATALOG)
    return {name: zarr_arrays.get_array(group, name, CATALOG) for name in names}


def read_attrs(path: PathLike | Location) -> dict[str, Any]:
    """The group attributes of a catalogue (a CatalogError when it is not one)."""
    path = zarr_arrays.where(path)
    attrs: dict[str, Any] = zarr_arrays.open_group(path, CATALOG).attrs.asdict()
    zarr_arrays.check_format_version(attrs, path, CATALOG)
    return attrs


def read_layout(path: PathLike | Location) -> CatalogLayout:
    """The layout recorded in a catalogue's attributes."""
    return CatalogLayout.from_attrs(read_attrs(path)[schema.CATALOG_ATTR_LAYOUT])


def read_records(path: PathLike | Location) -> list[ChunkRecord]:
    """Every completion record written so far (one read of a small array)."""
    group = zarr_arrays.open_group(zarr_arrays.where(path), CATALOG)
    table = np.asarray(
        zarr_arrays.get_array(group, schema.RECORDS_ARRAY, CATALOG)[:]
    )  # (chunk, field)
    return [
        ChunkRecord.from_row(int(i), table[i])
        for i in np.flatnonzero(table[:, 0] != RECORD_MISSING)
    ]


def chunk_devices(path: PathLike | Location) -> dict[str, int]:
    """Device -> chunks it encoded."""
    node = zarr_arrays.open_arrays(zarr_arrays.where(path), [schema.DEVICES_ARRAY], CATALOG)[
        schema.DEVICES_ARRAY
    ]
    counts = collections.Counter(str(name) for name in np.asarray(node[:]).tolist())
    return {name: n for name, n in sorted(counts.items()) if name}


def completed_chunks(path: PathLike | Location) -> set[int]:
    """Indices of the chunks whose completion record is written."""
    return {record.index for record in read_records(path)}


# --- chunk files against their recorded checksums ----------------------------------------------
def recorded_checksums(path: PathLike | Location) -> tuple[list[str], np.ndarray] | None:
    """The variables and the (chunk, variable) crc32c table of ``_xpbatch/chunk_checksums``;
    None for a catalogue written before xpbatch recorded them."""
    node = zarr_arrays.open_group(zarr_arrays.where(path), CATALOG).get(schema.CHECKSUMS_ARRAY)
    if not isinstance(node, zarr.Array):
        return None
    attrs: dict[str, Any] = node.attrs.asdict()
    names = [str(name) for name in attrs.get(schema.ATTR_CHUNK_FILE_VARIABLES, [])]
    return names, np.asarray(node[:])


def chunk_file_problems(
    path: PathLike | Location, chunks: Iterable[int] | None = None
) -> dict[int, list[str]]:
    """Chunk -> each of its files that is missing or not the file its writer recorded, for the
    chunks with recorded checksums (all, or those of ``chunks``); one small read per file.

    A chunk file copied over another chunk's is a valid file with a valid crc32c: only its
    record tells that it does not belong there.
    """
    path = zarr_arrays.where(path)
    found = recorded_checksums(path)
    if found is None:
        return {}
    names, table = found
    arrays = open_arrays(path, names)
    problems: dict[int, list[str]] = {}
    for index in range(len(table)) if chunks is None else chunks:
        row = table[index]
        if np.any(row == CHECKSUM_MISSING):
            continue  # not written, or by an xpbatch that took no checksums
        for name, recorded in zip(names, map(int, row), strict=True):
            array = arrays[name]
            file = zarr_arrays.chunk_file(path, array, index)
            why = zarr_arrays.record_mismatch(file, array, recorded)
            if why:
                where = f"{name} chunk {index}: file {zarr_arrays.relative(file, path)}"
                problems.setdefault(index, []).append(f"{where} {why}")
    return problems


def catalog_nbytes(path: PathLike | Location) -> int:
    """Bytes on disk (or in objects) under ``path``."""
    return zarr_arrays.nbytes(zarr_arrays.where(path))


# --- opening ------------------------------------------------------------------------------------
def open_catalog(path: PathLike | Location, *, allow_incomplete: bool = False) -> xr.Dataset:
    """Open a catalogue lazily (Dask-backed) after checking that its run completed.

    Parameters
    ----------
    path
        A catalogue written by ``xpbatch encode-catalog``: a local path or an ``s3://`` URL
        (settings from the AWS environment, or a Location carrying its options).
    allow_incomplete
        Open a catalogue whose run did not finish (with a warning): rows of unfinished
        chunks read as NaN with flags 0.

    Raises
    ------
    CatalogError
        Not a catalogue, incomplete without ``allow_incomplete``, or complete but missing a
        chunk file (deleted since; it would read as fill values).

    Examples
    --------
    >>> ds = open_catalog("dr3_catalog.zarr")  # doctest: +SKIP
    >>> ds.latent_mean.sel(latent=0)  # doctest: +SKIP
    """
    import xarray as xr

    path = zarr_arrays.where(path)
    attrs = read_attrs(path)
    if attrs.get(schema.CATALOG_ATTR_COMPLETE) is not True:
        layout = CatalogLayout.from_attrs(attrs[schema.CATALOG_ATTR_LAYOUT])
        message = (
            f"catalogue {path} is incomplete: {len(completed_chunks(path))} of "
            f"{layout.n_chunks} chunks were recorded and it was not verified. Finish it with "
            "`xpbatch encode-catalog ... --resume` (same store, model and options)"
        )
        if not allow_incomplete:
            raise CatalogError(message + ", or pass allow_incomplete=True to read what is there.")
        warnings.warn(
            message + "; rows of unfinished chunks read as NaN. (Silence this warning by "
            "finishing the run.)",
            UserWarning,
            stacklevel=2,
        )
    else:
        _refuse_missing_chunk_files(
            path, CatalogLayout.from_attrs(attrs[schema.CATALOG_ATTR_LAYOUT])
        )
    consolidated = zarr_arrays.open_group(path, CATALOG).metadata.consolidated_metadata is not None
    target = path.zarr_store(read_only=True) if isinstance(path, Location) else path
    return xr.open_zarr(target, consolidated=consolidated)


def _refuse_missing_chunk_files(path: Path | Location, layout: CatalogLayout) -> None:
    """A complete catalogue with a chunk file deleted since would read fill values: refuse it."""
    group = zarr_arrays.open_group(path, CATALOG)
    missing = [
        f"{where} is missing"
        for spec in layout.variables()
        for _, where, size in zarr_arrays.chunk_file_sizes(
            path, zarr_arrays.get_array(group, spec.name, CATALOG)
        )
        if size < 0
    ]
    if missing:
        raise CatalogError(
            f"catalogue {path} is damaged: {zarr_arrays.describe_chunk_problems(missing)}. Zarr "
            "would read fill values in their place. Encode it again with --overwrite, or restore "
            "the files."
        )
