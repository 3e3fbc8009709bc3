"""The read side on object storage: an XP store uploaded to a real S3 server (SeaweedFS) opens
through its s3:// URL exactly as it does on disk, and a missing chunk object is found."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import xarray as xr

from xpbatch.errors import CatalogError, StoreError
from xpbatch.storage.location import Location, as_location
from xpbatch.store.reader import open_xp_store


def upload(local: Path, target: Location) -> None:
    """Copy every file of a local directory to object storage."""
    for name in as_location(local).list():
        (target / name).write_bytes((local / name).read_bytes())


def test_xp_store_opens_through_s3_as_on_disk(
    s3_url: str, tmp_path: Path, make_xp_store: Callable[..., Path]
) -> None:
    local = make_xp_store(tmp_path / "store.zarr", 1200, chunk_rows=500)
    remote = as_location(s3_url) / "store.zarr"
    upload(local, remote)
    xr.testing.assert_identical(open_xp_store(remote.url).load(), open_xp_store(local).load())

    chunk = next(name for name in remote.list() if name.startswith("coefficients/c/"))
    (remote / chunk).remove_tree()
    with pytest.raises(StoreError, match=r"coefficients chunk \d .* is missing") as info:
        open_xp_store(remote.url)
    assert remote.url in str(info.value)


def test_catalogue_opens_through_s3_as_on_disk(
    s3_url: str,
    tmp_path: Path,
    make_xp_store: Callable[..., Path],
    encode_untrained: Callable[[Path, Path], Path],
) -> None:
    from xpbatch.catalog.zarr_catalog import open_catalog

    store = make_xp_store(tmp_path / "store.zarr", 700, chunk_rows=300)
    local = encode_untrained(store, tmp_path / "catalog.zarr")
    remote = as_location(s3_url) / "catalog.zarr"
    upload(local, remote)
    xr.testing.assert_identical(open_catalog(remote.url).load(), open_catalog(local).load())
    back = xr.open_zarr(remote.url, storage_options=remote.storage_options())
    xr.testing.assert_identical(back.load(), open_catalog(local).load())

    chunk = next(name for name in remote.list() if name.startswith("latent_mean/c/"))
    (remote / chunk).remove_tree()
    with pytest.raises(CatalogError, match=r"latent_mean chunk \d .* is missing"):
        open_catalog(remote.url)
