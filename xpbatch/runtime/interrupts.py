"""Ctrl-C during a run on Dask: after it, the cluster's shutdown logs are not the user's business.

While an interrupted run unwinds, distributed and tornado log tracebacks that say nothing about
the run: a nanny reports killing its busy worker, and ``distributed.utils.sync`` cancels the
call the interrupt arrived in with a callback that itself fails (``NameError``) when the call
had not started yet. The command line ends a Ctrl-C in one line, so these loggers are quieted
before the ``KeyboardInterrupt`` is raised: on the event loop's thread the callback runs at once.
"""

from __future__ import annotations

import logging

CLUSTER_LOGGERS = ("distributed", "asyncio", "tornado")
"""The loggers an abandoned cluster writes its shutdown to."""


def quiet_cluster_logs() -> None:
    """From now on, only critical messages of Dask, asyncio and tornado in this process.

    Their child loggers too: distributed's logging configuration gives some of them a level of
    their own (``tornado.application``), which the parent's level does not override.
    """
    names = [*CLUSTER_LOGGERS, *logging.root.manager.loggerDict]
    for name in names:
        if name.split(".")[0] in CLUSTER_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)


def interrupt_quietly(signum: int, frame: object) -> None:
    """A SIGINT handler: quiet the cluster's logs, then raise ``KeyboardInterrupt`` as Python's
    own handler does (checkpoints, lock releases and the one-line message run as usual)."""
    quiet_cluster_logs()
    raise KeyboardInterrupt
