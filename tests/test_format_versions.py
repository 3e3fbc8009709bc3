"""Every kind of file xpbatch writes records its format version; any other version is refused.

A store, catalogue or model file of an older format (or with no version at all) is refused on
open with one line saying to rebuild it, and a newer one with one line saying to upgrade; the
CLI ends either with exit code 2 and no traceback.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from xpbatch import schema
from xpbatch.benchmarks.neighbours import synthetic_catalog
from xpbatch.catalog import zarr_catalog as catalog
from xpbatch.catalog.output import prepare_output
from xpbatch.cli.main import main
from xpbatch.errors import CatalogError, ModelFileError, StoreError
from xpbatch.model.files import load_model, save_model
from xpbatch.model.trained import TrainedModel
from xpbatch.storage import zarr_arrays
from xpbatch.store.reader import open_xp_store
from xpbatch.store.xp_store import write_xp_store


def _store(root: Path) -> Path:
    rng = np.random.default_rng(0)
    coefficients = rng.normal(size=(10, schema.N_COEFF))
    return write_xp_store(
        root / "s.zarr",
        source_id=np.arange(10, dtype=np.int64) + 1,
        coefficients=coefficients,
        coefficient_errors=np.abs(coefficients) + 0.5,
        phot_g_mean_flux=np.full(10, 1e4),
        chunk_rows=4,
    )


def _catalogue(root: Path) -> Path:
    return synthetic_catalog(root / "c.zarr", 40, chunk_rows=16)


def _model(root: Path) -> Path:
    path = root / "m.safetensors"
    save_model(TrainedModel.untrained(), path)
    return path


def _set_group_attr(name: str) -> Callable[[Path, int | None], None]:
    def set_version(path: Path, version: int | None) -> None:
        group = zarr.open_group(path, mode="r+", use_consolidated=False)
        attrs = group.attrs.asdict()
        attrs.pop(name)
        if version is not None:
            attrs[name] = version
        group.attrs.clear()
        group.attrs.update(attrs)
        zarr_arrays.consolidate(path)

    return set_version


def _set_model_version(path: Path, version: int | None) -> None:
    """Rewrite the safetensors header's metadata in place (the tensors are untouched)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header["__metadata__"]
    meta.pop(schema.MODEL_ATTR_FORMAT_VERSION)
    if version is not None:
        meta[schema.MODEL_ATTR_FORMAT_VERSION] = str(version)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


KINDS = {
    "store": (
        _store,
        _set_group_attr(schema.STORE_ATTR_SCHEMA_VERSION),
        schema.STORE_SCHEMA_VERSION,
        open_xp_store,
        StoreError,
        "re-ingest",
    ),
    "catalogue": (
        _catalogue,
        _set_group_attr(schema.CATALOG_ATTR_SCHEMA_VERSION),
        schema.CATALOG_SCHEMA_VERSION,
        catalog.open_catalog,
        CatalogError,
        "re-encode",
    ),
    "model": (
        _model,
        _set_model_version,
        schema.MODEL_FORMAT_VERSION,
        load_model,
        ModelFileError,
        "re-export",
    ),
}
VERSIONS = {
    "older": (lambda current: current - 1, r"written by an older xpbatch \(format {found}, "),
    "missing": (
        lambda current: None,
        r"written by an older xpbatch or not by xpbatch \(no format version recorded, ",
    ),
    "newer": (lambda current: current + 1, r"written by a newer xpbatch \(format {found}, "),
}


@pytest.mark.parametrize("version", VERSIONS.values(), ids=VERSIONS.keys())
@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_a_file_of_another_format_version_is_refused_with_one_line(
    tmp_path: Path, kind: tuple, version: tuple
) -> None:
    make, set_version, current, open_it, error, redo = kind
    choose, pattern = version
    path = make(tmp_path)
    open_it(path)  # as written: readable
    found = choose(current)
    set_version(path, found)
    remedy = "upgrade xpbatch" if found is not None and found > current else redo
    expected = pattern.format(found=found) + rf"this xpbatch reads {current}\): {remedy}"
    with pytest.raises(error, match=expected):
        open_it(path)
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert str(path) in lines[0] and remedy in lines[0]


def test_versions_are_written_as_this_xpbatch_reads_them(tmp_path: Path) -> None:
    store, cat, model = _store(tmp_path), _catalogue(tmp_path), _model(tmp_path)
    attrs = zarr.open_group(store, mode="r").attrs
    assert attrs[schema.STORE_ATTR_SCHEMA_VERSION] == schema.STORE_SCHEMA_VERSION
    attrs = zarr.open_group(cat, mode="r").attrs
    assert attrs[schema.CATALOG_ATTR_SCHEMA_VERSION] == schema.CATALOG_SCHEMA_VERSION
    from safetensors import safe_open

    with safe_open(str(model), framework="numpy") as f:
        meta = f.metadata()
    assert meta[schema.MODEL_ATTR_FORMAT_VERSION] == str(schema.MODEL_FORMAT_VERSION)


def test_resuming_an_older_catalogue_is_refused(tmp_path: Path) -> None:
    path = _catalogue(tmp_path)
    attrs = catalog.read_attrs(path)
    layout = catalog.read_layout(path)
    _set_group_attr(schema.CATALOG_ATTR_SCHEMA_VERSION)(path, 1)
    with pytest.raises(CatalogError, match=r"older xpbatch .* re-encode it"):
        prepare_output(path, layout, attrs=attrs, resume=True, overwrite=False)
