"""How the ``xpbatch`` command ends when something fails: one line and an exit code.

The group class of :mod:`xpbatch.cli.main` turns xpbatch's errors, Ctrl-C, the operating
system's refusals and a lost Dask scheduler into one ``error:`` line (``-v`` adds the
traceback), with a ``--resume`` hint where a rerun continues the work.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import traceback
from typing import Any

import click

from xpbatch.cli import _interrupted_while_starting
from xpbatch.errors import (
    ChunkError,
    ClusterError,
    ClusterUnavailableError,
    StoreError,
    XPBatchError,
)
from xpbatch.runtime.interrupts import interrupt_quietly

_RERUN = {
    "encode-catalog": "rerun with --resume to continue (finished chunks are kept)",
    "train": "rerun with --resume to continue from the last checkpoint (beside the model file)",
    "ingest": "rerun with --resume to continue (files already parsed are reused)",
    "export-parquet": "rerun with --resume to continue (finished files are kept)",
    "export-hats": "rerun with --resume to continue (finished tasks are kept)",
}
"""What to do after a failure that a rerun recovers from, per command."""


_PARAMS = "xpbatch.params"
"""Key of the running subcommand's parameters in the (shared) click context meta."""


class _Command(click.Command):
    """A subcommand that leaves its parameters where the group's error handling finds them."""

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta[_PARAMS] = ctx.params  # meta is shared with the group's context
        return super().invoke(ctx)


class FailuresInOneLine(click.Group):
    """Turns every failure a user can cause into one message and an exit code, not a traceback.

    xpbatch's own errors, Ctrl-C, the operating system's refusals (read-only or full disk,
    permissions) and a lost Dask scheduler each end in one line saying what happened and, where
    a rerun continues the work, how. ``-v`` also prints the traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
            # Cleanup on Ctrl-C from now on, without the cluster's shutdown tracebacks.
            signal.signal(signal.SIGINT, interrupt_quietly)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BaseException as e:
            command = ctx.invoked_subcommand or ""
            written = _wrote_output(command, ctx.meta.get(_PARAMS, {}))
            message, code = _failure_message(e, command, written=written)
            if message is None:
                raise
            if ctx.params.get("verbose"):
                traceback.print_exc()
            click.secho(f"error: {message}", fg="red", err=True)
            if isinstance(e, KeyboardInterrupt) and not _in_process(ctx):
                # Locks are released and the cluster closed or its workers killed (the
                # with-blocks ran): skip the interpreter's teardown of torch and dask and
                # multiprocessing's wait for its children, many seconds on a loaded machine.
                sys.stdout.flush()
                sys.stderr.flush()
                logging.shutdown()
                os._exit(code)
            sys.exit(code)


def _wrote_output(command: str, params: dict[str, Any]) -> bool:
    """Whether the failed command left something a ``--resume`` continues from."""
    from pathlib import Path

    from xpbatch.storage.location import is_url

    output = params.get("output")
    if output is None or is_url(output):
        return True  # not known (e.g. --demo), or not looked up on object storage: keep the hint
    if command == "train":  # the model file appears at the end; the checkpoint as it goes
        return Path(_checkpoint(output)).exists()
    if command == "ingest":  # the store appears at the end; the parsed files' parts as it goes
        return any(Path(f"{output}{end}").exists() for end in ("", ".parts", ".partial"))
    return Path(output).exists()


def _checkpoint(model: str) -> str:
    """Where ``train`` keeps the checkpoint of the model file ``model``."""
    from xpbatch.train.checkpoints import RunPaths

    return str(RunPaths.for_model(model).checkpoint)


def _in_process(ctx: click.Context) -> bool:
    """Whether the command runs inside another program (click's test runner, an API call)."""
    return ctx.find_root().info_name != "xpbatch"  # the console script names itself so


def _failure_message(
    error: BaseException, command: str, *, written: bool = True
) -> tuple[str | None, int]:
    """The one-line message and exit code of ``error``; (None, 0) to let it propagate.

    ``written``: whether the command left an output to resume; without one, no resume hint.
    """
    rerun = _RERUN.get(command) if written else None
    then = f"; {rerun}" if rerun else ""
    if isinstance(error, XPBatchError):
        message = str(error)
        mendable = not isinstance(error.__cause__, StoreError)  # a damaged store stays damaged
        began = not isinstance(error, ClusterUnavailableError)  # else nothing to continue
        resumable = isinstance(error, ChunkError | ClusterError) and mendable and began
        if resumable and "rerun" not in message:
            message += then  # a failed task or a lost cluster: a rerun continues
        return message, 2
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted (Ctrl-C){then or '; nothing was written'}", 130
    if isinstance(error, OSError) and error.errno in _OS_ERRORS:
        where = f" ({error.filename})" if error.filename else ""
        return f"{_OS_ERRORS[error.errno]}{where}: {error.strerror}{then}", 1
    if isinstance(error, UnicodeDecodeError):  # a reader without its own check met binary
        return (
            f"a file read as text is binary ({error.reason} at byte {error.start}); give a text "
            "file where one is expected (-v shows which read failed)",
            2,
        )
    if isinstance(error, ValueError) and "checksum" in str(error):  # zarr's crc32c codec
        return (
            f"a chunk file failed its crc32c checksum ({error}): the data is damaged; for a "
            "catalogue `xpbatch verify` names the file, -v shows where it was read",
            2,
        )
    if _is_lost_cluster(error):
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"lost the Dask scheduler or its workers ({type(error).__name__}: {first}){then}", 1
    return None, 0


_OS_ERRORS = {
    errno.EROFS: "cannot write: the filesystem is read-only",
    errno.EACCES: "cannot write: permission denied",
    errno.EPERM: "cannot write: operation not permitted",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file grew beyond the allowed size",
}
"""OS errors a user causes (and fixes), with what to say."""


def _is_lost_cluster(error: BaseException) -> bool:
    """A Dask communication failure: the scheduler or every worker went away mid-run."""
    module = type(error).__module__ or ""
    return module.startswith(("distributed", "tornado")) or (
        isinstance(error, OSError | TimeoutError) and "scheduler" in str(error).lower()
    )


FailuresInOneLine.command_class = _Command
