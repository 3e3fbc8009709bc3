"""One writer per output: the lock beside every output. (Whether a stage starts, continues or
replaces what is there is the run manifest's rule, :mod:`xpbatch.storage.manifest`.)

Every stage function that writes holds :func:`output_lock` on its output while it writes (the
stage, not the CLI: one owner). The lock is the file ``OUTPUT.lock`` (a sibling of the output, e.g.
``catalog.zarr.lock`` or ``model.safetensors.lock``), created atomically with
``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFSv3+, Lustre and GPFS), holding JSON
that names its holder: run id, host, pid, command and start time.

Why a sibling and not a file inside the output: ``--overwrite`` removes the whole output
directory, and a resumed run may rebuild it; a lock inside would be removed with it (letting a
second writer in mid-run) and would have to exist before the output does. Beside it, the lock is
taken before the output is looked at and outlives every removal.

The lock is named after the output's real path (symlinks resolved), so two writers that name
one output through different links still meet at one lock.

A lock whose holder is gone is stale and is taken over: on the same host when its pid no longer
runs (a SIGKILLed or crashed run); across hosts nobody here can tell, so the message says how to
check and ``--break-lock`` (:func:`output_lock` with ``break_lock=True``) takes it over.

Standard library only, so that the CLI can take the lock before it starts a cluster.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from xpbatch.errors import OutputLockedError
from xpbatch.storage.paths import LOCK_SUFFIX, PathLike

logger = logging.getLogger(__name__)


P = ParamSpec("P")
R = TypeVar("R")


def lock_path(output: PathLike) -> Path:
    """The lock file of ``output``: ``OUTPUT.lock`` beside its real path (symlinks resolved)."""
    output = Path(os.path.realpath(output))
    return output.with_name(output.name + LOCK_SUFFIX)


def _holder_text(holder: dict[str, Any]) -> str:
    return (
        f"run {holder.get('run_id', '?')} ({holder.get('command', '?')}) on host "
        f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
        f"{holder.get('started', '?')}"
    )


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The lock file's content, or None when it vanished; {} when unreadable (being written)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid_is_running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def _is_stale(holder: dict[str, Any]) -> bool:
    """A holder on this host whose process is gone. Other hosts' holders are never judged."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    return pid != os.getpid() and not _pid_is_running(pid)


def _create(path: Path, holder: dict[str, Any]) -> bool:
    """Create the lock file with ``holder`` inside, atomically; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: Path, stale: dict[str, Any]) -> None:
    """Remove the stale lock ``stale``, unless another run replaced it meanwhile.

    Renaming it aside is atomic: of several runs that judged it stale, one moves it. If what was
    moved is not the lock judged stale (a run took it over between our read and our rename),
    it is put back with ``os.link``, which fails rather than replace a newer lock.
    """
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = _read_holder(aside)
    if moved is not None and moved.get("run_id") != stale.get("run_id"):
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def _refusal(output: Path, path: Path, holder: dict[str, Any]) -> OutputLockedError:
    if holder.get("host") == socket.gethostname():
        how = (
            "wait for it to finish or stop it (its process is alive on this host, so the lock "
            "is not stale; only if that pid is not an xpbatch run, rerun with --break-lock)"
        )
    else:
        how = (
            f"if that run is no longer alive (check on host {holder.get('host', '?')}, e.g. "
            f"`ps -p {holder.get('pid', '?')}`), rerun with --break-lock"
        )
    return OutputLockedError(
        f"{output} is being written by {_holder_text(holder)} (lock file {path}); {how}. "
        "Nothing was changed."
    )


_LEASES: dict[str, Any] = {}
"""URL -> the lease this process holds on that output (object storage), for :func:`check_lock`."""


def _is_object_storage(output: object) -> bool:
    if isinstance(output, str | os.PathLike) and "://" not in os.fspath(output):
        return False  # a plain local path: no need to import the storage clients
    from xpbatch.storage.location import is_url

    return is_url(output)


def check_lock(output: object) -> None:
    """Raise :class:`OutputLockedError` if this process held a lease on ``output`` and lost it
    (another run took it over); stages call this before each record and before completing."""
    if not _is_object_storage(output):
        return
    lease = _LEASES.get(str(output))
    if lease is not None:
        lease.check()


@contextlib.contextmanager
def output_lock(
    output: PathLike | Any, *, command: str = "", break_lock: bool = False
) -> Iterator[Any]:
    """Hold the exclusive lock on ``output`` for the duration of the block.

    On object storage (an ``s3://`` URL or a :class:`~xpbatch.storage.location.Location`) the
    lock is the lease of :mod:`xpbatch.storage.lease` (the server's conditional writes proven
    first); elsewhere the lock file described above.

    Parameters
    ----------
    output
        The file or directory about to be written (it need not exist yet).
    command
        What holds it, for the message another run gets (e.g. ``"encode-catalog"``).
    break_lock
        Take the lock over even from a holder that looks alive or is on another host (only
        after checking that run is really gone: two writers corrupt an output).

    Yields
    ------
    pathlib.Path
        The lock file.

    Raises
    ------
    OutputLockedError
        Another live run holds the lock; the message names it and how to proceed.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "catalog.zarr"
    >>> with output_lock(out, command="example") as lock:
    ...     lock.name
    'catalog.zarr.lock'
    """
    if _is_object_storage(output):
        from xpbatch.storage.lease import Lease
        from xpbatch.storage.location import as_location

        location = as_location(output)
        ttl = location.options.lease_ttl_s
        with Lease(location, ttl_s=ttl, command=command or None, break_lock=break_lock) as lease:
            _LEASES[location.url] = lease
            try:
                yield lease.lock
            finally:
                _LEASES.pop(location.url, None)
            lease.check()  # a run that lost its lease mid-write must not report success
        return
    path = lock_path(output)
    holder = _acquire(Path(output), path, command=command, break_lock=break_lock)
    try:
        yield path
    finally:
        if _read_holder(path) == holder:  # never remove a lock someone broke and took over
            path.unlink(missing_ok=True)


def _acquire(output: Path, path: Path, *, command: str, break_lock: bool) -> dict[str, Any]:
    holder = {
        "run_id": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": command or " ".join(sys.argv[:2]),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "output": os.path.realpath(output),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):  # only a run of takeovers and releases in between repeats this
        if _create(path, holder):
            return holder
        found = _read_holder(path)
        if found is None:
            continue  # released in between: try again
        if not found:  # created, not yet filled in (or its holder died in between)
            time.sleep(0.05)
            found = _read_holder(path)
            if found is None:
                continue
            if not found:
                if not break_lock:
                    raise _refusal(output, path, {"run_id": "(unreadable lock file)"})
                found = {"run_id": None}
        if break_lock or _is_stale(found):
            why = "--break-lock" if break_lock else "its process is gone"
            logger.warning(
                "taking over the lock of %s from %s (%s)", output, _holder_text(found), why
            )
            _take_over(path, found)
            continue
        raise _refusal(output, path, found)
    raise OutputLockedError(f"could not take the lock {path}: it keeps changing hands")


def locked_output(parameter: str, command: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a stage function so it holds :func:`output_lock` on its ``parameter`` argument.

    ``break_lock`` comes from the stage's ``config`` argument (its ``break_lock`` field, the
    ``--break-lock`` option). The lock is not re-entrant: a stage that calls another stage
    calls its undecorated body.
    """

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            arguments = signature.bind(*args, **kwargs).arguments
            break_lock = bool(getattr(arguments.get("config"), "break_lock", False))
            with output_lock(arguments[parameter], command=command, break_lock=break_lock):
                return func(*args, **kwargs)

        return wrapper

    return decorate


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree (what ``--overwrite`` does to an earlier output)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
