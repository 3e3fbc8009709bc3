"""The outputs written to object storage (mock, ingest, sky maps, neighbours, Parquet and HATS
exports) on a real S3 server (SeaweedFS) equal the same runs on local paths, value for value,
under the same rules: the lease, the one output rule, completion records last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from xpbatch.config import EncodeConfig, MockConfig, NeighboursConfig, SkyMapConfig
from xpbatch.storage.location import Location, as_location

CONFIG = EncodeConfig(progress_bar=False, check_fit=False)


def same_objects(local: Path, remote: Location, *, skip: tuple[str, ...] = ()) -> None:
    """Every file below ``local`` has an object of the same name below ``remote``, and the
    chunk files (not the metadata, which records times and ids) hold the same bytes."""
    a, b = as_location(local), remote
    names = [n for n in a.list() if not n.startswith(skip)]
    assert names == [n for n in b.list() if not n.startswith(skip)]
    chunks = [n for n in names if "/c/" in n]
    assert chunks and [n for n in chunks if (a / n).read_bytes() != (b / n).read_bytes()] == []


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small encoded mock catalogue (with positions), local: the input of the products."""
    from xpbatch.encode.stage import encode_catalog
    from xpbatch.mock import write_mock_store
    from xpbatch.model.trained import TrainedModel

    root = tmp_path_factory.mktemp("s3out")
    store = write_mock_store(root / "mock.zarr", 900, seed=3, chunk_rows=300)
    out = root / "catalog.zarr"
    encode_catalog(store, TrainedModel.untrained(), out, config=CONFIG)
    return out


def test_mock_store_on_s3_equals_local(s3_url: str, tmp_path: Path) -> None:
    from xpbatch.errors import ConfigError, OutputExistsError
    from xpbatch.mock import make_mock, read_mock_labels
    from xpbatch.storage.lease import read_lease
    from xpbatch.store.reader import open_xp_store

    config = MockConfig(n=700, seed=5, chunk_rows=200, binary_fraction=0.05)
    local = make_mock(tmp_path / "mock.zarr", config=config)
    out = as_location(s3_url) / "mock.zarr"
    remote = make_mock(out.url, config=config)
    assert str(remote.path) == out.url and remote.rare_counts == local.rare_counts
    assert read_lease(out) is None
    same_objects(tmp_path / "mock.zarr", out)
    a, b = open_xp_store(tmp_path / "mock.zarr"), open_xp_store(out.url)
    xr.testing.assert_identical(a.drop_attrs().load(), b.drop_attrs().load())
    assert b.attrs["complete"] is True
    assert read_mock_labels(out.url).equals(read_mock_labels(tmp_path / "mock.zarr"))

    with pytest.raises(OutputExistsError, match="--overwrite"):
        make_mock(out.url, config=config)
    again = make_mock(out.url, config=MockConfig(n=300, seed=6, chunk_rows=200, overwrite=True))
    assert again.rows == 300 and open_xp_store(out.url).sizes["source"] == 300
    assert not [n for n in out.list() if n.endswith(("/2", "/2/0"))]  # nothing left of the old
    foreign = as_location(s3_url) / "foreign"
    (foreign / "data.txt").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="not an xpbatch"):
        make_mock(foreign.url, config=MockConfig(n=100, overwrite=True))
    assert (foreign / "data.txt").read_bytes() == b"mine"
    with pytest.raises(ConfigError, match="local directory"):
        make_mock((as_location(s3_url) / "bulk").url, config=MockConfig(n=100, format="dr3-bulk"))


def test_skymap_and_neighbours_outputs_on_s3_equal_local(
    s3_url: str, tmp_path: Path, catalogue: Path
) -> None:
    from xpbatch.catalog.zarr_catalog import open_arrays
    from xpbatch.errors import OutputExistsError
    from xpbatch.products.neighbours import write_neighbours
    from xpbatch.products.sky_maps import write_sky_maps
    from xpbatch.storage.lease import read_lease

    root = as_location(s3_url)
    config = SkyMapConfig(order=1)
    a = write_sky_maps(catalogue, tmp_path / "sky.png", config=config)
    b = write_sky_maps(catalogue, (root / "sky.png").url, config=config)
    assert np.array_equal(a.count, b.count)
    assert (root / "sky.png").read_bytes() == (tmp_path / "sky.png").read_bytes()
    assert (root / "sky.png.xpbatch.json").is_file() and read_lease(root / "sky.png") is None
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_sky_maps(catalogue, (root / "sky.png").url, config=config)
    write_sky_maps(catalogue, (root / "sky.png").url, config=SkyMapConfig(order=1, overwrite=True))
    (root / "mine.png").write_bytes(b"not ours")
    with pytest.raises(OutputExistsError, match="not an xpbatch"):
        write_sky_maps(catalogue, (root / "mine.png").url, config=SkyMapConfig(overwrite=True))
    assert (root / "mine.png").read_bytes() == b"not ours"

    ids = np.asarray(open_arrays(catalogue, ["source_id"])["source_id"][[0, 450, 899]])
    for name in ("n.parquet", "n.csv"):
        local = write_neighbours(catalogue, ids, tmp_path / name, config=NeighboursConfig(k=4))
        remote = write_neighbours(catalogue, ids, (root / name).url, config=NeighboursConfig(k=4))
        assert local.equals(remote)
        assert (root / name).read_bytes() == (tmp_path / name).read_bytes()
