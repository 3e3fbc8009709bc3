"""Filesystem helpers shared by the stages.

Standard library only, so that any module (the CLI included) can import it for free.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

PathLike = str | os.PathLike[str]
"""A path as callers pass it: a string or any ``os.PathLike`` (``pathlib.Path``)."""

LOCK_SUFFIX = ".lock"
"""Appended to an output's name to make its lock's name (a file, or a lease object)."""

TMP_MARK = ".tmp-"
"""In the name of every temporary file :func:`atomic_path` makes, ``.<name>.tmp-<random>``, so
that code cleaning up after a killed run can recognise them (``.*.tmp-*``)."""


@functools.cache
def new_file_mode() -> int:
    """The permissions a new file gets under this process's umask (0o644 under the usual 022).

    Read from ``/proc/self/status`` where there is one: setting the umask to read it back would
    briefly change it for every thread.
    """
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it onto ``path``.

    A reader never sees a half-written file: ``path`` holds either its old content or the
    whole new one (``os.replace`` is atomic within a directory). If the block raises, the
    temporary file is removed and ``path`` is untouched. The temporary name is hidden (leading
    dot) and random, so concurrent writers of the same ``path`` do not collide.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("whole")
    >>> target.read_text()
    'whole'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex}")
    try:
        yield tmp
        if tmp.is_file() and not tmp.is_symlink():  # e.g. safetensors writes 0600
            os.chmod(tmp, new_file_mode())  # readable by collaborators as the umask allows
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
