"""The ``xpbatch`` command: parse, build a config, call one stage function, print its summary.

- :mod:`~xpbatch.cli.main`: the commands.
- :mod:`~xpbatch.cli.options`: click options generated from the config fields.
- :mod:`~xpbatch.cli.bench`: ``xpbatch bench ...``.
- :mod:`~xpbatch.cli.info`: ``xpbatch info``, what a store, catalogue or model file holds.
- :mod:`~xpbatch.cli.failures`: every failure of a command as one line and an exit code.

Only this layer imports click; heavy imports are deferred so ``xpbatch --help`` is instant.
"""

import os as _os
import signal as _signal
import sys as _sys
import threading as _threading


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C while the ``xpbatch`` command is still importing: one line, exit 130."""
    _sys.stderr.write("error: interrupted (Ctrl-C); nothing was written\n")
    _sys.stderr.flush()
    _os._exit(130)


if (
    _os.path.basename(_sys.argv[0] if _sys.argv else "") == "xpbatch"
    and _threading.current_thread() is _threading.main_thread()
    and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
):
    # The console script imports the commands first (a second or more on a loaded machine);
    # :class:`xpbatch.cli.failures.FailuresInOneLine` restores the usual KeyboardInterrupt
    # when a command runs.
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)
