"""A performance report without distributed's warning about the size of the profiles it sends.

A performance report gathers each worker's profile, a dict nested deeper than ``dask.sizeof``
recurses. distributed's comm measures each message it sends with ``safe_sizeof(msg,
default_size=-1)``, knows that this fails for such messages (-1 then means "serialise it off
the event loop"), and still logs "Sizeof calculation for object of type 'dict' failed.
Defaulting to -1 B" from every process that sends one. -1 is that call's default alone, so the
filter here drops exactly that message; any other sizeof failure still shows.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from distributed import WorkerPlugin

if TYPE_CHECKING:
    from distributed import Worker

SIZEOF_LOGGER = "distributed.sizeof"


class DeliberateSizeofFallback(logging.Filter):
    """Drops distributed's "... failed. Defaulting to -1 B" (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Defaulting to -1 B" not in record.getMessage()


class QuietSizeofFallback(WorkerPlugin):
    """A worker plugin: :class:`DeliberateSizeofFallback` on the worker's sizeof logger from
    setup to teardown."""

    name = "xpbatch-quiet-sizeof-fallback"

    def __init__(self) -> None:
        self.filter = DeliberateSizeofFallback()

    def setup(self, worker: Worker) -> None:
        """Add the filter in the worker's process."""
        logging.getLogger(SIZEOF_LOGGER).addFilter(self.filter)

    def teardown(self, worker: Worker) -> None:
        """Remove it."""
        logging.getLogger(SIZEOF_LOGGER).removeFilter(self.filter)
