"""Locations: local paths and s3:// URLs (against a real SeaweedFS server), the same operations
on both, Zarr through them, and messages that name the URL but never a secret."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from s3_server import SECRET_KEY

from xpbatch.errors import ConfigError, StorageError, StorageNotFoundError
from xpbatch.storage.clients import object_store
from xpbatch.storage.location import (
    Location,
    StorageOptions,
    as_location,
    is_url,
)

PARSE_CASES = {
    "s3 prefix": ("s3://bucket/a/b.zarr", ("s3", "bucket", "a/b.zarr")),
    "s3 slashes": ("s3://bucket//a/b.zarr/", ("s3", "bucket", "a/b.zarr")),
    "s3a": ("s3a://bucket/a", ("s3", "bucket", "a")),
    "whole bucket": ("s3://bucket", ("s3", "bucket", "")),
}


@pytest.mark.parametrize("case", PARSE_CASES, ids=list(PARSE_CASES))
def test_parse_urls(case: str) -> None:
    text, (scheme, bucket, key) = PARSE_CASES[case]
    loc = as_location(text)
    assert (loc.scheme, loc.bucket, loc.key) == (scheme, bucket, key)
    assert not loc.is_local and is_url(text)


def test_local_paths_and_file_urls(tmp_path: Path) -> None:
    for target in (
        tmp_path / "out.zarr",
        str(tmp_path / "out.zarr"),
        f"file://{tmp_path}/out.zarr",
    ):
        loc = as_location(target)
        assert loc.is_local and loc.path == tmp_path / "out.zarr" and not is_url(target)
        assert str(loc) == str(tmp_path / "out.zarr")


BAD_URLS = {
    "no bucket": ("s3:///a", "names no bucket"),
    "credentials in url": (f"s3://key:{SECRET_KEY}@bucket/a", "must not hold credentials"),
    "other scheme": ("gs://bucket/a", "unsupported storage URL scheme gs://"),
    "dot dot": ("s3://bucket/a/../b", "'..' is not allowed"),
}


@pytest.mark.parametrize("case", BAD_URLS, ids=list(BAD_URLS))
def test_bad_urls_are_refused_in_one_line(case: str) -> None:
    text, expected = BAD_URLS[case]
    with pytest.raises(ConfigError, match=expected) as info:
        as_location(text)
    assert SECRET_KEY not in str(info.value) and "\n" not in str(info.value)


def test_joins_stay_below() -> None:
    loc = as_location("s3://bucket/run")
    assert str(loc / "catalog.zarr" / "x/zarr.json") == "s3://bucket/run/catalog.zarr/x/zarr.json"
    assert (
        str((loc / "catalog.zarr").sibling("catalog.zarr.lock"))
        == "s3://bucket/run/catalog.zarr.lock"
    )
    assert (loc / "catalog.zarr").name == "catalog.zarr"
    with pytest.raises(ConfigError, match="relative name"):
        loc.child("../escape")
    with pytest.raises(ConfigError, match="whole bucket"):
        as_location("s3://bucket").sibling("x")


def test_storage_options_parse_json_aliases_and_typos() -> None:
    text = json.dumps(
        {"key": "AKIA", "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": "http://h:1"}}
    )
    options = StorageOptions.parse(text)
    assert options.access_key_id == "AKIA" and options.secret_access_key == SECRET_KEY
    assert options.endpoint_url == "http://h:1"
    with pytest.raises(ConfigError, match="Did you mean 'endpoint_url'"):
        StorageOptions.parse({"endpont_url": "http://h:1"})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        StorageOptions.parse("{not json")
    with pytest.raises(ConfigError, match="must be a str, got a secret") as info:
        StorageOptions.parse({"secret_access_key": 12345678})
    assert "12345678" not in str(info.value)


def test_secrets_stay_out_of_repr_and_str() -> None:
    options = {"key": "AKIAEXAMPLEKEY", "secret": SECRET_KEY, "token": "SESSIONTOKEN123"}
    loc = as_location("s3://bucket/run", storage_options=options)
    shown = " ".join([repr(loc), str(loc), repr(loc.options), str(loc.options), loc.url])
    for secret in options.values():
        assert secret not in shown
    # ... but readers get them
    assert loc.storage_options()["secret"] == SECRET_KEY


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """The same tests on a local directory and on an s3:// prefix of the test server."""
    if request.param == "local":
        return as_location(tmp_path / "root")
    return as_location(request.getfixturevalue("s3_url"))


def test_objects_round_trip(root: Location) -> None:
    out = root / "run.zarr"
    assert not out.exists()
    (out / "a.json").write_bytes(b"{}")
    (out / "sub" / "b.bin").write_bytes(b"\x00\x01")
    (out / "sub" / "b.bin").write_bytes(b"\x02")  # overwrite
    (root / "run.zarr2" / "keep").write_bytes(b"neighbour")  # shares the name's prefix
    assert out.exists() and (out / "a.json").exists()
    assert out.list() == ["a.json", "sub/b.bin"]
    assert (out / "sub" / "b.bin").read_bytes() == b"\x02"
    with pytest.raises(StorageNotFoundError, match=r"run\.zarr/missing"):
        (out / "missing").read_bytes()
    out.remove_tree()
    assert not out.exists() and out.list() == []
    assert (root / "run.zarr2" / "keep").read_bytes() == b"neighbour"


def test_zarr_through_s3_reads_back_with_xarray(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loc = as_location(s3_url) / "cat.zarr"
    ds = xr.Dataset(
        {"z": (("row", "k"), np.arange(40.0, dtype="f4").reshape(10, 4))},
        coords={"row": np.arange(10)},
    )
    ds.to_zarr(loc.zarr_store(), mode="w", consolidated=False, encoding={"z": {"chunks": (4, 4)}})
    # only the standard AWS variables: fsspec (s3fs) reads them itself
    back = xr.open_zarr(str(loc), storage_options=loc.storage_options(), consolidated=False)
    xr.testing.assert_identical(back.load(), ds)
    # explicit options instead of the environment, through obstore and through fsspec
    explicit = {
        "endpoint_url": os.environ.pop("AWS_ENDPOINT_URL"),
        "key": os.environ.pop("AWS_ACCESS_KEY_ID"),
        "secret": os.environ.pop("AWS_SECRET_ACCESS_KEY"),
        "allow_http": True,
    }
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    loc = as_location(str(loc), storage_options=explicit)
    assert xr.open_zarr(loc.zarr_store(read_only=True), consolidated=False).z.values.sum() == 780
    back = xr.open_zarr(str(loc), storage_options=loc.storage_options(), consolidated=False)
    np.testing.assert_array_equal(back.z.values, ds.z.values)


def test_one_client_per_process_and_settings(s3_url: str) -> None:
    loc = as_location(s3_url)
    assert object_store(loc) is object_store(loc / "other" / "place")
    assert object_store(loc) is not object_store(
        as_location(s3_url, storage_options={"region": "eu-west-1"})
    )


def _one_line(error: BaseException, url: str) -> str:
    text = str(error)
    assert "\n" not in text and url in text, text
    assert SECRET_KEY not in text and "wrong-secret-value" not in text
    return text


def test_wrong_credentials_one_clear_line(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    loc = as_location(s3_url) / "x.json"
    for action in (loc.exists, lambda: loc.write_bytes(b"1"), loc.read_bytes):
        with pytest.raises(StorageError) as info:
            action()
        assert "check" in _one_line(info.value, loc.url)


def test_missing_bucket_one_clear_line(s3_url: str) -> None:
    loc = as_location("s3://no-such-bucket-xpbatch/run/x.json")
    for action in (loc.exists, lambda: loc.write_bytes(b"1"), loc.list):
        with pytest.raises(StorageError) as info:
            action()
        assert "NoSuchBucket" in _one_line(info.value, loc.url)


def test_plain_http_needs_allow_http(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    loc = as_location(s3_url)
    with pytest.raises(StorageError, match="AWS_ALLOW_HTTP=true") as info:
        loc.exists()
    _one_line(info.value, loc.url)
