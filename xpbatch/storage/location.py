"""Where an output or an input lives: a local path or an object-storage URL (``s3://b/prefix``).

:class:`Location` is the one type the stages pass around for "where": join a child name, ask
whether something is there, read and write small objects, list and remove what lies under it,
open it as a Zarr store, and hand readers (xarray, fsspec) their ``storage_options``. Local paths
go through the filesystem; ``s3://`` (any S3-compatible server) through obstore, whose
``S3Store`` also backs zarr's :class:`zarr.storage.ObjectStore`. Another scheme (``gs://``,
``az://``) is one more branch in :func:`~xpbatch.storage.clients.object_store` and
:meth:`Location.storage_options`.

Settings come from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``,
``AWS_PROFILE`` and the shared credentials file; ``AWS_ALLOW_HTTP=true`` for an ``http://``
endpoint) plus explicit :class:`~xpbatch.storage.clients.StorageOptions`. Secrets never appear
in a ``repr``, a message or an output; one client per process and settings is built and reused
(:mod:`~xpbatch.storage.clients`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from xpbatch.errors import ConfigError, StorageNotFoundError
from xpbatch.storage.clients import StorageOptions, object_store, storage_errors
from xpbatch.storage.paths import PathLike, atomic_path

if TYPE_CHECKING:
    import zarr.abc.store

__all__ = ["OBJECT_SCHEMES", "Location", "StorageOptions", "as_location", "is_url"]

OBJECT_SCHEMES = ("s3",)
"""URL schemes served by object storage today (``s3a://`` is read as ``s3://``)."""

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


@dataclasses.dataclass(frozen=True)
class Location:
    """A local directory or file, or an object-storage prefix such as ``s3://bucket/a/b.zarr``.

    Build one with :func:`as_location`. ``str(location)`` is its URL (or absolute path): safe
    to print, it never holds a secret.

    Examples
    --------
    >>> loc = as_location("s3://bucket/run1") / "catalog.zarr"
    >>> str(loc), loc.is_local, loc.bucket, loc.key
    ('s3://bucket/run1/catalog.zarr', False, 'bucket', 'run1/catalog.zarr')
    """

    scheme: str
    """``"file"`` for a local path, else the object-storage scheme (``"s3"``)."""
    bucket: str
    """The bucket; ``""`` for a local path."""
    key: str
    """The object key prefix without slashes at either end; the absolute path when local."""
    options: StorageOptions = dataclasses.field(default_factory=StorageOptions, repr=False)
    """Explicit storage settings (object storage only)."""

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    @property
    def is_local(self) -> bool:
        """True for a path on a (possibly shared) filesystem."""
        return self.scheme == "file"

    @property
    def url(self) -> str:
        """The URL (``s3://bucket/key``) or the absolute local path."""
        if self.is_local:
            return self.key
        return f"{self.scheme}://{self.bucket}/{self.key}".rstrip("/")

    @property
    def path(self) -> Path:
        """The local path; a :class:`ConfigError` for object storage."""
        if not self.is_local:
            raise ConfigError(f"{self.url} is on object storage, not a local path")
        return Path(self.key)

    @property
    def name(self) -> str:
        """The last component (``catalog.zarr``)."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def child(self, name: str) -> Location:
        """The location ``name`` below this one (``name`` may hold ``/``, never ``..``)."""
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise ConfigError(f"cannot join {name!r} to {self.url}: expected a relative name")
        if self.is_local:
            return dataclasses.replace(self, key=str(Path(self.key, *parts)))
        key = "/".join([self.key, *parts]) if self.key else "/".join(parts)
        return dataclasses.replace(self, key=key)

    __truediv__ = child

    def sibling(self, name: str) -> Location:
        """The location ``name`` beside this one (e.g. its lock, ``catalog.zarr.lock``)."""
        if self.is_local:
            return dataclasses.replace(self, key=str(Path(self.key).with_name(name)))
        if not self.key:
            raise ConfigError(
                f"{self.url} is a whole bucket; outputs need a prefix (s3://bucket/name)"
            )
        parent = self.key.rpartition("/")[0]
        return dataclasses.replace(self, key=f"{parent}/{name}" if parent else name)

    # Objects ------------------------------------------------------------------------------

    def exists(self) -> bool:
        """True when a file, a directory, an object or any object below this location exists."""
        if self.is_local:
            return self.path.exists()
        import obstore

        with storage_errors(self, "look up"):
            store = object_store(self)
            try:
                obstore.head(store, self.key)
                return True
            except FileNotFoundError:
                pass
            for batch in obstore.list(store, self._dir_prefix(), chunk_size=1):
                if batch:
                    return True
        return False

    def is_file(self) -> bool:
        """True when a file (locally) or an object (one HEAD request) is exactly here."""
        if self.is_local:
            return self.path.is_file()
        import obstore

        with storage_errors(self, "look up"):
            try:
                obstore.head(object_store(self), self.key)
                return True
            except FileNotFoundError:
                return False

    def size(self) -> int:
        """Bytes of the file or object here (one HEAD request on object storage)."""
        if self.is_local:
            with self._local_missing():
                return self.path.stat().st_size
        import obstore

        with storage_errors(self, "look up"):
            return int(obstore.head(object_store(self), self.key)["size"])

    @contextlib.contextmanager
    def _local_missing(self) -> Iterator[None]:
        """A local file that is not there as :class:`StorageNotFoundError` (as on object
        storage, where :func:`storage_errors` says it)."""
        try:
            yield
        except FileNotFoundError:
            raise StorageNotFoundError(f"{self.url} does not exist") from None

    def relative_name(self, root: Location) -> str:
        """This location's name below ``root`` (``latent_mean/c/0/0``), for messages."""
        prefix = root.key.rstrip("/") + "/"
        return self.key[len(prefix) :] if self.key.startswith(prefix) else self.url

    def read_bytes(self) -> bytes:
        """The whole content of the file or object here; :class:`StorageNotFoundError` if none."""
        if self.is_local:
            with self._local_missing():
                return self.path.read_bytes()
        import obstore

        with storage_errors(self, "read"):
            return bytes(obstore.get(object_store(self), self.key).bytes())

    def read_tail(self, n: int) -> bytes:
        """The last ``n`` bytes here (fewer if shorter): one ranged GET on object storage."""
        if self.is_local:
            with self._local_missing(), open(self.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(size - n, 0))
                return f.read()
        import obstore

        with storage_errors(self, "read"):
            found = obstore.get(object_store(self), self.key, options={"range": {"suffix": n}})
            return bytes(found.bytes())

    def write_bytes(self, data: bytes) -> None:
        """Write ``data`` here whole: readers see the old content or the new, never a part."""
        if self.is_local:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(data)
            return
        import obstore

        with storage_errors(self, "write"):
            obstore.put(object_store(self), self.key, data)

    def upload(self, file: Path) -> None:
        """Copy the local ``file`` here whole (a large one in parts, in parallel; readers see
        it only once complete); locally, copied under a temporary name and renamed."""
        if self.is_local:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                shutil.copyfile(file, tmp)
            return
        import obstore

        with storage_errors(self, "write"):
            obstore.put(object_store(self), self.key, Path(file))

    def open_reader(self) -> BinaryIO:
        """The file or object here as a binary file to read and seek (buffered ranged GETs on
        object storage, e.g. for ``pyarrow.parquet.ParquetFile``)."""
        if self.is_local:
            with self._local_missing():
                return open(self.path, "rb")
        import obstore

        with storage_errors(self, "read"):
            return _ObjectReader(obstore.open_reader(object_store(self), self.key))

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes ``start`` to ``stop`` of the file or object here (one ranged GET)."""
        if self.is_local:
            with self._local_missing(), open(self.path, "rb") as f:
                f.seek(start)
                return f.read(max(stop - start, 0))
        if stop <= start:
            return b""
        import obstore

        with storage_errors(self, "read"):
            return bytes(obstore.get_range(object_store(self), self.key, start=start, end=stop))

    def list(self) -> list[str]:
        """The relative names of all files/objects below this location, sorted (recursive)."""
        if self.is_local:
            root = self.path
            if not root.is_dir():
                return []
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        import obstore

        prefix = self._dir_prefix()
        with storage_errors(self, "list"):
            keys = [
                meta["path"] for batch in obstore.list(object_store(self), prefix) for meta in batch
            ]
        return sorted(k[len(prefix) :] for k in keys if k.startswith(prefix))

    def sizes(self) -> dict[str, int]:
        """Relative name -> size in bytes of every file/object below this location (one
        listing on object storage)."""
        if self.is_local:
            return {name: (self.path / name).stat().st_size for name in self.list()}
        import obstore

        prefix = self._dir_prefix()
        with storage_errors(self, "list"):
            return {
                meta["path"][len(prefix) :]: int(meta["size"])
                for batch in obstore.list(object_store(self), prefix)
                for meta in batch
                if meta["path"].startswith(prefix)
            }

    def remove_tree(self) -> None:
        """Remove everything at and below this location (never anything beside it)."""
        if self.is_local:
            if self.path.is_dir() and not self.path.is_symlink():
                shutil.rmtree(self.path)
            else:
                self.path.unlink(missing_ok=True)
            return
        if not self.key:
            raise ConfigError(f"refusing to remove the whole bucket {self.url}")
        import obstore

        keys = [self._dir_prefix() + name for name in self.list()]
        with storage_errors(self, "remove"):
            store = object_store(self)
            for start in range(0, len(keys), 1000):
                obstore.delete(store, keys[start : start + 1000])
            with contextlib.suppress(FileNotFoundError):
                obstore.delete(store, self.key)

    # Readers and writers --------------------------------------------------------------------

    def zarr_store(self, *, read_only: bool = False) -> zarr.abc.store.Store:
        """A Zarr store rooted here: a ``LocalStore`` or an obstore-backed ``ObjectStore``."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path, read_only=read_only)
        return zarr.storage.ObjectStore(object_store(self, prefix=self.key), read_only=read_only)

    def storage_options(self) -> dict[str, Any]:
        """Options for fsspec readers (``xarray.open_zarr(str(loc), storage_options=...)``).

        The environment is read by those readers themselves, so only the explicit settings go
        here; the result may hold secrets: pass it on, never print or store it.
        """
        if self.is_local:
            return {}
        o = self.options
        result: dict[str, Any] = {}
        client: dict[str, Any] = {}
        if o.endpoint_url:
            client["endpoint_url"] = o.endpoint_url
        if o.region:
            client["region_name"] = o.region
        if client:
            result["client_kwargs"] = client
        for ours, theirs in (
            ("access_key_id", "key"),
            ("secret_access_key", "secret"),
            ("session_token", "token"),
            ("profile", "profile"),
        ):
            if getattr(o, ours):
                result[theirs] = getattr(o, ours)
        if o.anonymous:
            result["anon"] = True
        return result

    def _dir_prefix(self) -> str:
        return f"{self.key}/" if self.key else ""


class _ObjectReader(io.RawIOBase, BinaryIO):
    """obstore's buffered object reader as a standard binary file (``closed``, ``readinto``),
    which pyarrow and pandas expect."""

    def __init__(self, reader: Any) -> None:
        super().__init__()
        self._reader = reader

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = memoryview(self._reader.read(len(buffer)))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._reader.seek(offset, whence))

    def tell(self) -> int:
        return int(self._reader.tell())

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()


def as_location(
    target: Location | PathLike,
    *,
    storage_options: StorageOptions | Mapping[str, Any] | str | None = None,
) -> Location:
    """The :class:`Location` of a local path, a ``file://`` URL or an ``s3://bucket/prefix`` URL.

    ``storage_options`` (see :class:`StorageOptions`; a mapping or JSON text) apply to object
    storage; a location passed in keeps its own unless new ones are given.
    """
    options = StorageOptions.parse(storage_options)
    if isinstance(target, Location):
        return target if storage_options is None else dataclasses.replace(target, options=options)
    text = os.fspath(target)
    match = _SCHEME_RE.match(text)
    if match is None or len(match.group(1)) == 1:  # "C://..." is a Windows drive, not a URL
        return Location("file", "", os.path.abspath(text))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        return Location("file", "", os.path.abspath(rest))
    if scheme == "s3a":
        scheme = "s3"
    if scheme not in OBJECT_SCHEMES:
        raise ConfigError(
            f"unsupported storage URL scheme {scheme}:// (expected a local path or s3://bucket/"
            "prefix)"
        )
    bucket, _, key = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise ConfigError(
            f"a {scheme}:// URL must not hold credentials or a port; give the endpoint and "
            "credentials through the AWS environment variables or storage options"
        )
    if not bucket:
        raise ConfigError(f"{text!r} names no bucket; expected {scheme}://bucket/prefix")
    key = "/".join(p for p in key.split("/") if p)
    if ".." in key.split("/"):
        raise ConfigError(f"{text!r}: '..' is not allowed in an object key")
    return Location(scheme, bucket, key, options)


def is_url(target: object) -> bool:
    """True for an object-storage URL (``s3://...``), False for a local path."""
    if isinstance(target, Location):
        return not target.is_local
    if not isinstance(target, str | os.PathLike):
        return False
    match = _SCHEME_RE.match(os.fspath(target))
    return match is not None and match.group(1).lower() not in ("file",) and len(match.group(1)) > 1
