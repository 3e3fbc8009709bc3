"""``xpbatch info PATH``: what is in an XP store, a catalogue or a model file.

The kind is detected from the path (a file is a model; a Zarr group is a store or a catalogue by
its attributes and variables). Works on stores and catalogues that are still being written, to
show how far they got. Flag counts are computed chunk by chunk with Dask, so memory stays flat
however large the store is.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from xpbatch import schema
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.errors import StoreError, StoreNotFoundError
from xpbatch.storage import zarr_arrays
from xpbatch.storage.location import Location
from xpbatch.storage.paths import PathLike
from xpbatch.storage.zarr_arrays import Place

if TYPE_CHECKING:
    import zarr

logger = logging.getLogger(__name__)

Kind = Literal["store", "catalog", "model"]

_MAX_ATTR_CHARS = 120
"""Longer attribute values (lists of input files, per-chunk ranges) are shown summarised."""


def detect_kind(path: PathLike | Location) -> Kind:
    """Whether ``path`` is an XP store, a catalogue or a model file.

    Raises
    ------
    StoreNotFoundError
        Nothing exists at ``path``.
    StoreError
        A directory that is neither an XP store nor a catalogue.
    """
    path = zarr_arrays.where(path)
    if not path.exists():
        raise StoreNotFoundError(f"{path} does not exist")
    if isinstance(path, Path) and path.is_file():
        with path.open("rb") as f:
            head = f.read(9)
        # a safetensors file: an 8-byte header length, then the JSON header; a torch.save zip
        # is a model too, for the model reader to refuse with its conversion hint
        if head[8:9] in (b"{", b"[") or head.startswith(b"PK\x03\x04"):
            return "model"
        raise StoreError(
            f"{path} is a file but not a model file ({_what_file(head)}); info reads XP stores "
            "and catalogues (Zarr directories) and model files (.safetensors)"
        )
    group = _open_group(path)
    if schema.STORE_ATTR_SCHEMA_VERSION in group.attrs or schema.COEFFICIENTS in group:
        return "store"
    if schema.CATALOG_ATTR_SCHEMA_VERSION in group.attrs or schema.LATENT_MEAN in group:
        return "catalog"
    raise StoreError(
        f"{path} is a Zarr group but neither an XP store (no {schema.COEFFICIENTS!r}) nor a "
        f"catalogue (no {schema.LATENT_MEAN!r}); info reads stores, catalogues and model files"
    )


def _what_file(head: bytes) -> str:
    """A few words on what a file's first bytes say it is."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed, e.g. a DR3 .csv.gz: ingest it with `xpbatch ingest`"
    if not head:
        return "empty"
    return "no safetensors header"


def _open_group(path: Place) -> zarr.Group:
    import zarr

    if not (path / "zarr.json").is_file():
        raise StoreError(
            f"{path} is a directory but not a Zarr v3 group (no zarr.json); xpbatch info reads "
            "XP stores, catalogues (Zarr) and model files (.safetensors)"
        )
    return zarr.open_group(zarr_arrays.zarr_target(path, read_only=True), mode="r")


def summarize(path: PathLike | Location) -> dict[str, Any]:
    """A JSON-serialisable summary of a store, a catalogue or a model file.

    Parameters
    ----------
    path
        An XP store or catalogue directory (Zarr), or a model file (.safetensors).

    Returns
    -------
    dict
        Always ``kind`` and ``path``. Stores and catalogues add ``rows``, ``chunk_rows``,
        ``n_chunks``, ``bytes_on_disk``, ``variables`` (per variable: dims, dtype, shape,
        bytes on disk and uncompressed), ``source_id_range``, ``flags`` (rows per flag bit),
        ``complete`` and ``attributes``. Models add ``name``, ``content_sha256``,
        ``architecture``, ``provenance``, ``n_parameters``, ``n_train``/``n_validation``.

    Examples
    --------
    >>> summarize("dr3.zarr")["rows"]  # doctest: +SKIP
    219197643
    """
    path = zarr_arrays.where(path)
    kind = detect_kind(path)
    if kind == "model" and isinstance(path, Path):
        return _model_summary(path)
    return _zarr_summary(path, kind)


# --- stores and catalogues ------------------------------------------------------------------
def _zarr_summary(path: Place, kind: Kind) -> dict[str, Any]:
    group = _open_group(path)
    arrays = dict(group.arrays())
    source_id = arrays.get(schema.SOURCE_ID)
    if source_id is None:
        raise StoreError(f"{path} has no {schema.SOURCE_ID!r} array; is it an xpbatch {kind}?")
    n_rows, chunk_rows = int(source_id.shape[0]), int(source_id.chunks[0])
    flags_name, flag_bits = (
        (schema.INPUT_FLAGS, schema.InputFlag)
        if kind == "store"
        else (schema.FLAGS, schema.CatalogFlag)
    )
    attrs: dict[str, Any] = group.attrs.asdict()
    if kind == "store":
        zarr_arrays.check_format_version(attrs, path, zarr_arrays.STORE)
    else:
        zarr_arrays.check_format_version(attrs, path, zarr_arrays.CATALOG)
    summary: dict[str, Any] = {
        "kind": kind,
        "path": str(path),
        "rows": n_rows,
        "chunk_rows": chunk_rows,
        "n_chunks": -(-n_rows // chunk_rows),
        "bytes_on_disk": _bytes_on_disk(path),
        "variables": [_variable_summary(path, name, a) for name, a in sorted(arrays.items())],
        "source_id_range": _source_id_range(source_id),
        "complete": attrs.get(schema.STORE_ATTR_COMPLETE) is True,
        "attributes": {k: _short(v) for k, v in sorted(attrs.items())},
    }
    if kind == "catalog":
        summary["chunks_recorded"] = _chunks_recorded(path)
        summary["chunk_devices"] = catalog.chunk_devices(path)
        summary["monte_carlo"] = _monte_carlo(attrs)
        if summary["complete"]:
            summary["damaged_chunks"] = _catalog_damage(path, arrays)
            summary["complete"] = not summary["damaged_chunks"]
    elif summary["complete"]:
        from xpbatch.store.checks import chunk_file_problems

        # A deleted chunk file reads as the fill value: a store missing one is not complete.
        summary["damaged_chunks"] = chunk_file_problems(path)
        summary["complete"] = not summary["damaged_chunks"]
    flags = arrays.get(flags_name)
    if flags is not None:
        summary["flags"] = {"variable": flags_name, "rows": _flag_counts(flags, flag_bits)}
    return summary


def _monte_carlo(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The catalogue's Monte-Carlo draws (samples, seed, covariance), None when it has none."""
    options = attrs.get(schema.CATALOG_ATTR_OPTIONS) or {}
    if schema.MC_OPTION_SAMPLES not in options:
        return None
    keys = (schema.MC_OPTION_SAMPLES, schema.MC_OPTION_SEED, schema.MC_OPTION_COVARIANCE)
    return {key.removeprefix("mc_"): options.get(key) for key in keys}


def _catalog_damage(path: Place, arrays: dict[str, zarr.Array]) -> list[str]:
    """Chunk files of a complete catalogue that are missing or not the ones their writer
    recorded (a stat and a 4-byte read each, nothing decoded)."""
    from xpbatch.storage.zarr_arrays import chunk_file_sizes

    layout = catalog.read_layout(path)
    missing = [
        f"{where} is missing"
        for spec in layout.variables()
        if spec.name in arrays
        for _, where, size in chunk_file_sizes(path, arrays[spec.name])
        if size < 0
    ]
    mismatched = [
        problem
        for problems in catalog.chunk_file_problems(path).values()
        for problem in problems
        if not problem.endswith("is missing")
    ]
    return missing + mismatched


def _chunks_recorded(path: Place) -> int | None:
    """How many chunks a catalogue's run has finished (its completion records)."""
    try:
        return len(catalog.completed_chunks(path))
    except (OSError, ValueError):  # template not finished: no records array yet
        return None


def _variable_summary(path: Place, name: str, array: zarr.Array) -> dict[str, Any]:
    return {
        "name": name,
        "dims": list(array.metadata.dimension_names or ()),  # type: ignore[union-attr]
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "chunks": list(array.chunks),
        "bytes_on_disk": _bytes_on_disk(path / name),
        "bytes_uncompressed": int(array.nbytes),
    }


def _bytes_on_disk(path: Place) -> int:
    """Total size of the files under ``path`` (a local directory store, or the objects under
    a prefix)."""
    if isinstance(path, Location):
        return zarr_arrays.nbytes(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _source_id_range(source_id: zarr.Array) -> list[int] | None:
    """First and last source_id (reads two chunks); None for an empty store."""
    if source_id.shape[0] == 0:
        return None
    ends = np.asarray(source_id[[0, -1]])  # type: ignore[index]
    return [int(ends[0]), int(ends[1])]


def _flag_counts(flags: zarr.Array, bits: type[enum.IntFlag]) -> dict[str, int]:
    """Rows with each bit set, and rows with none, reduced chunk by chunk with Dask."""
    import dask
    import dask.array as da

    values = da.from_zarr(flags)
    counts = {bit.name: ((values & int(bit)) != 0).sum() for bit in bits}
    counts["none"] = (values == 0).sum()
    # One graph: every chunk is read once and reduced to a few integers.
    (computed,) = dask.compute(counts, scheduler="threads")
    return {str(name): int(n) for name, n in computed.items()}


def _short(value: Any) -> Any:
    """An attribute value, or a short description of it when it is long."""
    text = json.dumps(value, default=str)
    if len(text) <= _MAX_ATTR_CHARS:
        return value
    if isinstance(value, list):
        return f"[{len(value)} items: {json.dumps(value[:2], default=str)[1:-1]}, ...]"
    return text[: _MAX_ATTR_CHARS - 3] + "..."


# --- model files ----------------------------------------------------------------------------
def _model_summary(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    from xpbatch.model.files import load_model, read_model_metadata

    load_model(path)  # every tensor checked against the architecture: a damaged file says so
    meta = read_model_metadata(path)
    with safe_open(str(path), framework="numpy") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118
        kl = f.get_tensor("latent_density.kl").tolist() if "latent_density.kl" in shapes else None

    def n_values(prefix: str) -> int:
        return sum(math.prod(s) for name, s in shapes.items() if name.startswith(prefix))

    return {
        "kind": "model",
        "path": str(path),
        "bytes_on_disk": path.stat().st_size,
        "name": meta.get("name"),
        "content_sha256": meta.get("content_sha256"),
        "architecture": meta.get("architecture"),
        "n_parameters": n_values("network."),
        "n_train": n_values("split.train_source_id"),
        "n_validation": n_values("split.validation_source_id"),
        "latent_density": {**meta["latent_density"], "kl": kl},
        "provenance": {k: _short(v) for k, v in sorted((meta.get("provenance") or {}).items())},
    }


# --- text -----------------------------------------------------------------------------------
def human_bytes(n: int) -> str:
    """``1234567`` -> ``'1.2 MB'`` (powers of 1000, like ``du --si``)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_summary(summary: dict[str, Any]) -> str:
    """The text ``xpbatch info`` prints for a :func:`summarize` result."""
    if summary["kind"] == "model":
        return _format_model(summary)
    return _format_zarr(summary)


def _rows(pairs: list[tuple[str, Any]], indent: int = 2) -> list[str]:
    return _table([[k, str(v)] for k, v in pairs], indent)


def _table(rows: list[list[str]], indent: int = 4) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return [
        " " * indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _format_zarr(s: dict[str, Any]) -> str:
    uncompressed = sum(v["bytes_uncompressed"] for v in s["variables"])
    sid = s["source_id_range"]
    lines = [f"{'XP store' if s['kind'] == 'store' else 'catalogue'}  {s['path']}"]
    lines += _rows(
        [
            ("rows", f"{s['rows']:,} in {s['n_chunks']:,} chunks of {s['chunk_rows']:,}"),
            ("on disk", f"{human_bytes(s['bytes_on_disk'])} ({human_bytes(uncompressed)} raw)"),
            ("complete", _completeness(s)),
            *_progress_row(s),
            ("source_id", "-" if sid is None else f"{sid[0]} ... {sid[1]}"),
        ]
    )
    lines.append("  variables")
    lines += _table(
        [
            [
                v["name"],
                f"({', '.join(v['dims'])})",
                "str" if "string" in v["dtype"].lower() else v["dtype"],
                " x ".join(f"{n:,}" for n in v["shape"]),
                human_bytes(v["bytes_on_disk"]),
            ]
            for v in s["variables"]
        ]
    )
    if "flags" in s:
        lines.append(f"  rows per flag bit ({s['flags']['variable']})")
        lines += _rows([(k, f"{n:,}") for k, n in s["flags"]["rows"].items()], indent=4)
    lines.append("  attributes")
    lines += _rows([(k, _text(v)) for k, v in s["attributes"].items()], indent=4)
    return "\n".join(lines)


def _completeness(s: dict[str, Any]) -> str:
    damaged = s.get("damaged_chunks")
    if damaged:
        from xpbatch.storage.zarr_arrays import describe_chunk_problems
        from xpbatch.store.checks import DAMAGED_STORE_REMEDY

        remedy = (
            DAMAGED_STORE_REMEDY
            if s["kind"] == "store"
            else "the catalogue is damaged: re-derive those chunks with `xpbatch encode-catalog "
            "... --resume` (same store, model and options), or restore the files"
        )
        return f"NO, {len(damaged)} chunk file(s) damaged: {describe_chunk_problems(damaged)}; " + (
            remedy
        )
    return "yes" if s["complete"] else "NO (still being written, or failed)"


def _progress_row(s: dict[str, Any]) -> list[tuple[str, str]]:
    if s.get("chunks_recorded") is None:
        return []
    rows = [("chunks done", f"{s['chunks_recorded']:,} of {s['n_chunks']:,}")]
    devices = s["chunk_devices"].items()
    rows.append(("encoded on", ", ".join(f"{name} ({n:,} chunks)" for name, n in devices) or "-"))
    mc = s.get("monte_carlo")
    rows.append(
        (
            "monte carlo",
            "off (no latent_mean_mc, latent_std_mc)"
            if mc is None
            else f"{mc['samples']} draws per spectrum, seed {mc['seed']}, "
            f"{mc['covariance']} covariance",
        )
    )
    return rows


def _format_model(s: dict[str, Any]) -> str:
    arch = s["architecture"] or {}
    lines = [f"model  {s['path']}"]
    lines += _rows(
        [
            ("name", s["name"]),
            ("sha256", s["content_sha256"]),
            ("on disk", human_bytes(s["bytes_on_disk"])),
            ("architecture", ", ".join(f"{k}={_text(v)}" for k, v in arch.items())),
            ("parameters", f"{s['n_parameters']:,}"),
            ("training set", f"{s['n_train']:,} sources ({s['n_validation']:,} validation)"),
        ]
    )
    lines.append("  latent space")
    lines += _rows(_latent_rows(s["latent_density"]), indent=4)
    lines.append("  provenance")
    lines += _rows([(k, _text(v)) for k, v in s["provenance"].items()], indent=4)
    return "\n".join(lines)


def _latent_rows(density: dict[str, Any]) -> list[tuple[str, str]]:
    """Per-dimension KL, active dimensions and the density behind anomaly_score."""
    kl = density.get("kl")
    rows = [
        ("KL per dim", "not recorded" if kl is None else ", ".join(f"{v:.3g}" for v in kl)),
        ("active dims", f"{density['active_dims']} (KL >= {density['active_kl_nats']} nats)"),
    ]
    if density["kind"] == "prior":
        rows.append(("density", "prior N(0, I) on the active dims (no training-set density)"))
    else:
        rows.append(("density", f"Gaussian mixture of {density['components']} components"))
    rows.append(
        (
            "latent_outlier",
            f"anomaly_score > {density['threshold']:.4g} nats "
            f"(the {100 * density['outlier_quantile']:g} % quantile)",
        )
    )
    return rows


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)
