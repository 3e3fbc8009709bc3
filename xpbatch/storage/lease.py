"""One writer per output on object storage: a lease object beside the output.

Object storage has no ``O_EXCL`` and no pid to look at, so the lock is a *lease*: the object
``OUTPUT.lock`` beside the output (``s3://b/run/catalog.zarr.lock``, the same name as on disk)
holds JSON naming its holder and when it last renewed. It is

- created with a conditional create (``If-None-Match: *``): of two writers exactly one wins;
- renewed by its holder every third of its time to live, with ``If-Match`` on the version it
  wrote, in a background thread; a failed condition means someone took it over, and the holder
  learns so (:meth:`Lease.check` raises);
- taken over only when it has expired (its holder stopped renewing: killed, or cut off) or with
  ``break_lock``, again with ``If-Match`` so that of two takers one wins;
- released at exit (marked released with ``If-Match``, then deleted).

Expiry compares the holder's last renewal with the reader's clock, so the machines' clocks must
agree to well within the time to live (NTP does). All of this rests on the server honouring
conditional writes; :func:`check_conditional_writes` proves it once per bucket and refuses a
server that ignores them, unless ``unsafe_no_conditional_writes`` is set.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from types import TracebackType
from typing import Any

from xpbatch.errors import ConditionalWriteError, ConfigError, OutputLockedError, StorageError
from xpbatch.storage.clients import endpoint_of, object_store, storage_errors
from xpbatch.storage.location import Location
from xpbatch.storage.paths import LOCK_SUFFIX

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0
"""How long a lease lives without renewal before another writer may take it over."""

_PROBED: set[tuple[str, str, str]] = set()
"""(scheme, endpoint, bucket) whose conditional writes were proven in this process."""
_PROBED_GUARD = threading.Lock()


def _obstore() -> Any:
    import obstore

    return obstore


def _conditional_errors() -> tuple[type[BaseException], type[BaseException]]:
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    return AlreadyExistsError, PreconditionError


def check_conditional_writes(location: Location) -> None:
    """Prove once per bucket that the server honours ``If-None-Match`` and ``If-Match``.

    A probe object beside ``location`` is created twice (the second must be refused) and
    replaced with a wrong version (must be refused), then removed. A server that accepts either
    would silently let two writers into one output: :class:`ConditionalWriteError`, unless the
    location's storage options set ``unsafe_no_conditional_writes``.
    """
    if location.is_local:
        return
    key = (location.scheme, endpoint_of(location), location.bucket)
    with _PROBED_GUARD:
        if key in _PROBED:
            return
    if location.options.unsafe_no_conditional_writes:
        logger.warning(
            "not checking conditional writes on %s (unsafe_no_conditional_writes): two writers "
            "of one output would not be stopped",
            location.url,
        )
        return
    obstore = _obstore()
    already_exists, precondition = _conditional_errors()
    probe = location.sibling(f".xpbatch-probe-{uuid.uuid4().hex}")
    store = object_store(probe)
    failures = []
    with storage_errors(probe, "probe conditional writes at"):
        try:
            result = obstore.put(store, probe.key, b"1", mode="create")
            try:
                obstore.put(store, probe.key, b"2", mode="create")
                failures.append("a second create-if-absent (If-None-Match: *) was accepted")
            except already_exists:
                pass
            wrong = {"e_tag": '"xpbatch-not-the-etag"'}
            try:
                obstore.put(store, probe.key, b"3", mode=wrong)
                failures.append("a replace with a wrong If-Match was accepted")
            except precondition:
                pass
            if not failures and result.get("e_tag") is None:
                failures.append("the server returned no ETag")
        finally:
            obstore.delete(store, probe.key)
    if failures:
        raise ConditionalWriteError(
            f"{endpoint_of(location)} ignores conditional writes ({'; '.join(failures)}), so "
            f"one writer per output cannot be guaranteed for {location.url}. Use a server that "
            "supports them (AWS S3, SeaweedFS, MinIO, Ceph), or, only if you are sure no two "
            "runs write the same output, set the storage option "
            "unsafe_no_conditional_writes=true"
        )
    with _PROBED_GUARD:
        _PROBED.add(key)


@dataclasses.dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease, as written in the lease object."""

    run_id: str
    host: str
    pid: int
    command: str
    started: str
    renewed: float
    """Unix time of the last renewal (the holder's clock)."""
    ttl_s: float
    released: bool = False

    def expired(self, now: float | None = None) -> bool:
        """True once the holder has not renewed for its time to live (or has released it)."""
        now = time.time() if now is None else now
        return self.released or now > self.renewed + self.ttl_s

    def describe(self) -> str:
        """One line naming the holder (no secret: run id, host, pid, command, times)."""
        renewed = datetime.datetime.fromtimestamp(self.renewed, datetime.UTC).isoformat(
            timespec="seconds"
        )
        return (
            f"run {self.run_id} ({self.command}) on host {self.host}, pid {self.pid}, started "
            f"{self.started}, last renewed {renewed} (lease {self.ttl_s:g} s)"
        )

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseHolder | None:
        """The holder in a lease object, or None when it is not one (then treated as expired)."""
        try:
            values = json.loads(data)
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in values.items() if k in names})
        except (ValueError, TypeError):
            return None


class Lease:
    """The lease on one output on object storage (a context manager).

    Examples
    --------
    >>> with Lease(as_location("s3://bucket/run/catalog.zarr")) as lease:  # doctest: +SKIP
    ...     write_some_chunks()
    ...     lease.check()  # raises OutputLockedError if another writer took it over
    """

    def __init__(
        self,
        output: Location,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        break_lock: bool = False,
        run_id: str | None = None,
        command: str | None = None,
    ) -> None:
        if output.is_local:
            raise ConfigError(
                f"{output.url} is a local path; local outputs use the lock file of "
                "xpbatch.storage.outputs"
            )
        if not ttl_s > 0:
            raise ConfigError(f"a lease's time to live must be positive, got {ttl_s}")
        self.output = output
        self.lock = output.sibling(output.name + LOCK_SUFFIX)
        self.ttl_s = float(ttl_s)
        self.break_lock = break_lock
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.command = command or os.path.basename(sys.argv[0] or "python")
        self._started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self._e_tag: str | None = None
        self._renewed_at = 0.0
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._lost_to = ""
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def __repr__(self) -> str:
        return f"Lease({self.lock.url!r}, run_id={self.run_id!r}, held={self.held})"

    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`, unless lost."""
        return self._e_tag is not None and not self._lost.is_set()

    def _record(self, *, released: bool = False) -> LeaseHolder:
        return LeaseHolder(
            run_id=self.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            command=self.command,
            started=self._started,
            renewed=time.time(),
            ttl_s=self.ttl_s,
            released=released,
        )

    def acquire(self) -> Lease:
        """Take the lease (create it, or take over an expired one) and start renewing it.

        Raises :class:`OutputLockedError` naming the holder when a live lease is held by
        another run (and ``break_lock`` is not set).
        """
        check_conditional_writes(self.output)
        obstore = _obstore()
        already_exists, precondition = _conditional_errors()
        store = object_store(self.lock)
        for _attempt in range(5):  # bounded: each round loses only to a writer that won
            with storage_errors(self.lock, "take the lock"):
                try:
                    result = obstore.put(
                        store, self.lock.key, self._record().to_bytes(), mode="create"
                    )
                    self._took(result["e_tag"])
                    return self
                except already_exists:
                    pass
                try:
                    current = obstore.get(store, self.lock.key)
                except FileNotFoundError:
                    continue  # released between our create and our read: create again
                data = bytes(current.bytes())
                e_tag = current.meta["e_tag"]
            holder = LeaseHolder.from_bytes(data)
            if holder is not None and not holder.expired() and not self.break_lock:
                raise OutputLockedError(
                    f"{self.output.url} is being written by {holder.describe()}. Wait for it "
                    f"to finish; if that run is gone, its lease expires {holder.ttl_s:g} s after "
                    "its last renewal, or pass --break-lock to take it over now"
                )
            what = "broken" if holder is not None and not holder.expired() else "expired"
            with storage_errors(self.lock, "take over the lock"):
                try:
                    mode = {"e_tag": e_tag}
                    result = obstore.put(store, self.lock.key, self._record().to_bytes(), mode=mode)
                except (precondition, FileNotFoundError):
                    continue  # another writer renewed, took or released it first: look again
            logger.warning(
                "took over the %s lease on %s from %s",
                what,
                self.output.url,
                holder.describe() if holder else "an unreadable lease object",
            )
            self._took(result["e_tag"])
            return self
        raise OutputLockedError(
            f"could not take the lock of {self.output.url}: other writers kept changing it"
        )

    def _took(self, e_tag: str) -> None:
        self._e_tag = e_tag
        self._renewed_at = time.monotonic()
        self._stop.clear()
        self._lost.clear()
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease {self.lock.url}", daemon=True
        )
        self._thread.start()

    def renew(self) -> bool:
        """Renew the lease now (the background thread does this every third of its life).

        Returns False, and marks the lease lost, when another writer has taken it over.
        """
        obstore = _obstore()
        _, precondition = _conditional_errors()
        with self._guard:
            if not self.held:
                return False
            try:
                with storage_errors(self.lock, "renew the lock"):
                    result = obstore.put(
                        object_store(self.lock),
                        self.lock.key,
                        self._record().to_bytes(),
                        mode={"e_tag": self._e_tag},
                    )
            except (precondition, FileNotFoundError):
                self._mark_lost("another run took it over (or it was removed)")
                return False
            self._e_tag = result["e_tag"]
            self._renewed_at = time.monotonic()
            return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
            except StorageError as e:  # a passing outage: try again until the lease runs out
                if time.monotonic() - self._renewed_at > self.ttl_s:
                    self._mark_lost(f"it could not be renewed for its whole life ({e})")
                    return
                logger.warning("could not renew the lease on %s (will retry): %s", self.output, e)

    def _mark_lost(self, why: str) -> None:
        self._lost_to = why
        self._lost.set()
        logger.error("lost the lease on %s: %s; stop writing", self.output.url, why)

    def check(self) -> None:
        """Raise :class:`OutputLockedError` if the lease was lost (writers call this often)."""
        if self._lost.is_set():
            raise OutputLockedError(
                f"lost the lock of {self.output.url}: {self._lost_to}; this run must stop "
                "writing (rerun with --resume once the other run has finished)"
            )

    def release(self) -> None:
        """Stop renewing, mark the lease released and remove it (if it is still ours)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._guard:
            e_tag, self._e_tag = self._e_tag, None
        if e_tag is None or self._lost.is_set():
            return
        obstore = _obstore()
        _, precondition = _conditional_errors()
        store = object_store(self.lock)
        try:
            with storage_errors(self.lock, "release the lock"):
                released = self._record(released=True).to_bytes()
                result = obstore.put(store, self.lock.key, released, mode={"e_tag": e_tag})
                # A released lease may be taken at once; delete only while it is still ours.
                if obstore.head(store, self.lock.key)["e_tag"] == result["e_tag"]:
                    obstore.delete(store, self.lock.key)
        except (precondition, FileNotFoundError):
            logger.warning("the lease on %s was taken over before release", self.output.url)
        except StorageError as e:
            logger.warning("could not release the lease on %s: %s", self.output.url, e)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def read_lease(output: Location) -> LeaseHolder | None:
    """The holder of ``output``'s lease, or None when there is none (for ``info`` and tests)."""
    lock = output.sibling(output.name + LOCK_SUFFIX)
    try:
        return LeaseHolder.from_bytes(lock.read_bytes())
    except FileNotFoundError:
        return None
