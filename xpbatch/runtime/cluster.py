"""Connect to the Dask cluster a stage runs on: a LocalCluster, dask-cuda, or an existing one.

The only place that creates Dask clusters. dask-cuda is imported only when asked for, because it
needs CUDA libraries at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from distributed import WorkerPlugin

from xpbatch.config import CLUSTER_LOCAL_CUDA, GPU_THREADS_PER_WORKER, ClusterConfig
from xpbatch.errors import ClusterUnavailableError
from xpbatch.runtime.executor import LazyClient
from xpbatch.runtime.interrupts import quiet_cluster_logs

if TYPE_CHECKING:
    from distributed import Client, LocalCluster, Worker

logger = logging.getLogger(__name__)

T = TypeVar("T")


def check_local_cuda() -> None:
    """ClusterUnavailableError unless dask-cuda imports and torch sees a CUDA GPU: checked before
    a stage starts, so a machine without a GPU is told so before anything is written."""
    try:
        import dask_cuda  # noqa: F401
    except ImportError as e:  # also covers missing CUDA libraries at import
        raise ClusterUnavailableError(
            f"--cluster local-cuda needs dask-cuda, but importing dask_cuda failed ({e}). Install "
            "`pip install 'xpbatch[cuda13]'` (or [cuda12], matching torch's CUDA build) on a GPU "
            "machine, or omit --cluster to run on CPU workers."
        ) from e
    import torch

    if not torch.cuda.is_available():
        why = (
            "this torch is a CPU-only build"
            if torch.version.cuda is None
            else f"torch (built for CUDA {torch.version.cuda}) finds no GPU or no usable driver"
        )
        raise ClusterUnavailableError(
            f"--cluster local-cuda needs a CUDA GPU, but {why}. Check `nvidia-smi` and "
            "CUDA_VISIBLE_DEVICES, or omit --cluster to run on CPU workers."
        )


def _local_cuda_cluster(config: ClusterConfig):  # type: ignore[no-untyped-def]
    check_local_cuda()
    from dask_cuda import LocalCUDACluster

    try:
        return LocalCUDACluster(
            dashboard_address=free_dashboard_address(config.dashboard_address),
            threads_per_worker=config.threads_per_worker or GPU_THREADS_PER_WORKER,
            memory_limit=config.memory_limit,
        )
    except Exception as e:  # e.g. NVMLError_LibraryNotFound: no driver on this machine
        raise ClusterUnavailableError(
            f"--cluster local-cuda could not start dask-cuda's LocalCUDACluster "
            f"({type(e).__name__}: {e}); check `nvidia-smi`, or omit --cluster to run on CPU "
            "workers."
        ) from e


class WorkerLogLevel(WorkerPlugin):
    """A worker plugin: the workers' ``distributed.worker`` logger at the application's level.

    Without it each failed task prints a "Compute Failed" block with its traceback from the
    worker process, even though the run retries it and reports the final error once (``-v``
    shows them).
    """

    name = "xpbatch-worker-log-level"

    def __init__(self, level: int) -> None:
        self.level = level

    def setup(self, worker: Worker) -> None:
        """Set the level in the worker's process."""
        logging.getLogger("distributed.worker").setLevel(self.level)


def quiet_workers(client: Client) -> None:
    """Silence per-task failure logs on ``client``'s workers unless the application logs INFO."""
    level = logging.getLogger().getEffectiveLevel()
    plugin = WorkerLogLevel(logging.CRITICAL if level > logging.INFO else level)
    client.register_plugin(plugin, name=WorkerLogLevel.name)


def _quiet_distributed() -> None:
    """Let distributed's loggers follow the application's level (its own default is INFO).

    The scheduler of a LocalCluster runs in this process, so without this every worker start
    and stop would be printed by a command run without ``-v``.
    """
    level = max(logging.getLogger().getEffectiveLevel(), logging.INFO)
    logging.getLogger("distributed").setLevel(level)
    if level > logging.INFO:  # without -v: distributed's own messages keep one line each
        for name in _TRACEBACK_LOGGERS:
            logger_ = logging.getLogger(name)
            if not any(isinstance(f, _NoTraceback) for f in logger_.filters):
                logger_.addFilter(_NoTraceback())


_TRACEBACK_LOGGERS = (
    "distributed.client",
    "distributed.core",
    "distributed.utils",
    "distributed.nanny",
    "distributed.scheduler",
    "distributed.deploy.spec",
)
"""Loggers of the driver process that attach tracebacks to messages about a lost connection."""


class _NoTraceback(logging.Filter):
    """Keep a record's message, drop its traceback (the run reports the failure itself once)
    and the records with no message at all (an exception without text: only its traceback
    said anything)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return bool(record.getMessage().strip())
        except (TypeError, ValueError):  # a message with arguments that do not fit: keep it
            return True


JUPYTERHUB_DASHBOARD_LINK = "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status"
"""Dask's ``distributed.dashboard.link`` under JupyterHub: the dashboard through the user
server's jupyter-server-proxy (the browser cannot reach the server's 127.0.0.1)."""


def use_jupyterhub_dashboard_link() -> bool:
    """Under JupyterHub, make every dashboard link go through jupyter-server-proxy.

    Sets Dask's ``distributed.dashboard.link`` to :data:`JUPYTERHUB_DASHBOARD_LINK` when
    ``JUPYTERHUB_SERVICE_PREFIX`` is set and the link was not configured otherwise, so that
    ``client.dashboard_link`` (printed by the CLI and the notebooks) and dask-labextension's
    panes open in the browser. Returns whether the proxied link is in use.

    Examples
    --------
    >>> use_jupyterhub_dashboard_link()  # doctest: +SKIP
    True
    """
    import dask.config

    link = dask.config.get("distributed.dashboard.link")
    if "JUPYTERHUB_SERVICE_PREFIX" in os.environ and link == _DASK_DEFAULT_LINK:
        dask.config.set({"distributed.dashboard.link": JUPYTERHUB_DASHBOARD_LINK})
        return True
    return bool(link == JUPYTERHUB_DASHBOARD_LINK)


_DASK_DEFAULT_LINK = "{scheme}://{host}:{port}/status"
"""distributed's own default dashboard link."""


@contextlib.contextmanager
def connect(config: ClusterConfig) -> Iterator[Client]:
    """Yield a ``distributed.Client`` for ``config``; close what we started on exit.

    Examples
    --------
    >>> from xpbatch.config import ClusterConfig
    >>> with connect(ClusterConfig(n_workers=2)) as client:  # doctest: +SKIP
    ...     print(client.dashboard_link)
    """
    from distributed import Client

    _quiet_distributed()
    use_jupyterhub_dashboard_link()
    if config.scheduler_file is not None:
        if not os.path.exists(config.scheduler_file):
            raise ClusterUnavailableError(
                f"scheduler file {config.scheduler_file} does not exist; start the scheduler "
                "with `dask scheduler --scheduler-file FILE` first (see deploy/slurm/README.md)"
            )
        with Client(scheduler_file=config.scheduler_file) as client:
            quiet_workers(client)
            yield client
        return
    if config.cluster is not None and config.cluster != CLUSTER_LOCAL_CUDA:
        try:
            client = Client(config.cluster)  # Dask's connect timeout (30 s unless configured)
        except OSError as e:
            raise ClusterUnavailableError(
                f"could not reach the Dask scheduler at {config.cluster}: {e}. "
                "Is it running, and is the address/port right?"
            ) from e
        with client:
            quiet_workers(client)
            yield client
        return
    make = _local_cuda_cluster if config.cluster == CLUSTER_LOCAL_CUDA else _local_cluster
    with _workers_in_own_process_group():
        yield from _local(lambda: make(config))


def _local(make: Callable[[], Any]) -> Iterator[Client]:
    """Start a local cluster, yield its client, close both (quickly after a Ctrl-C)."""
    from distributed import Client

    cluster = _start_interruptibly(make)
    client = None
    try:
        client = Client(cluster)
        logger.info("Dask dashboard: %s", client.dashboard_link)
        quiet_workers(client)
        yield client
    except KeyboardInterrupt:
        _close_quickly(client, cluster)  # not the full close: it can wait on busy workers
        raise
    except BaseException:
        _close(client, cluster)
        raise
    _close(client, cluster)


def _close(client: Client | None, cluster: Any) -> None:
    """Close the client, then the cluster, however the first goes."""
    try:
        if client is not None:
            client.close()
    finally:
        cluster.close()


INTERRUPT_CLOSE_S = 3.0
"""After Ctrl-C, the seconds the client and the cluster each get to close; the workers' tasks
are abandoned (finished chunks are recorded, a rerun with --resume redoes the rest)."""


def _close_quickly(client: Client | None, cluster: Any) -> None:
    """Close ``client`` and ``cluster`` within :data:`INTERRUPT_CLOSE_S` each, silently.

    A worker busy with a task does not stop at once, and its nanny would report killing it;
    after a Ctrl-C the user wants the prompt back and one line, not the shutdown's log.
    """
    quiet_cluster_logs()
    if client is not None:
        with contextlib.suppress(Exception):
            client.close(timeout=INTERRUPT_CLOSE_S)
    with contextlib.suppress(Exception):
        cluster.close(timeout=INTERRUPT_CLOSE_S)
    for process in _SPAWNED:  # workers still busy after that: they redo the chunk on resume
        if process.poll() is None and "resource_tracker" not in str(process.args):
            process.kill()


def _start_interruptibly(make: Callable[[], T]) -> T:
    """``make()`` in a helper thread, so that a Ctrl-C during a slow start stops us at once.

    The half-started cluster is closed by the helper once it is up; its workers exit with
    this process in any case (they watch their parent).
    """
    if threading.current_thread() is not threading.main_thread():
        return make()
    started: dict[str, Any] = {}
    done = threading.Event()

    def start() -> None:
        try:
            started["cluster"] = make()
        except BaseException as e:  # handed to the waiting thread
            started["error"] = e
        finally:
            done.set()
            if "abandoned" in started and "cluster" in started:
                with contextlib.suppress(Exception):
                    started["cluster"].close(timeout=INTERRUPT_CLOSE_S)

    threading.Thread(target=start, name="xpbatch-cluster-start", daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except BaseException:
        started["abandoned"] = True
        raise
    if "error" in started:
        raise started["error"]
    return started["cluster"]  # type: ignore[no-any-return]


_SPAWNED: list[subprocess.Popen[bytes]] = []
"""Processes started by :func:`_spawn_in_own_group`, held so that ``subprocess`` never reaps
them: multiprocessing waits for them itself."""


_QUIET_IF_ORPHANED = "import sys\ntry:\n    {code}\nexcept EOFError:\n    sys.exit(0)"
"""A spawned worker whose driver was stopped (Ctrl-C) before handing it its work exits quietly
instead of printing multiprocessing's traceback on the user's terminal."""


def _spawn_in_own_group(path: bytes, args: Sequence[Any], passfds: Sequence[int]) -> int:
    """``multiprocessing.util.spawnv_passfds``, with the child in a process group of its own."""
    tracker = any("resource_tracker" in str(arg) for arg in args)
    args = list(args)
    if "-c" in args and not tracker:
        code = args.index("-c") + 1
        args[code] = _QUIET_IF_ORPHANED.format(code=args[code])
    process = subprocess.Popen(
        args,
        executable=path,
        pass_fds=sorted(map(int, passfds)),
        process_group=0,
        # multiprocessing's resource tracker outlives a driver stopped by Ctrl-C; it still
        # removes what the driver left, without a warning per run on the user's terminal
        stderr=subprocess.DEVNULL if tracker else None,
    )
    _SPAWNED.append(process)
    return process.pid


def lazy_connect(
    config: ClusterConfig, *, on_start: Callable[[Client], object] | None = None
) -> LazyClient:
    """:func:`connect` deferred to the first task a stage submits (``on_start(client)`` then).

    What the CLI passes to a stage: the stage checks its inputs and claims its output first, so
    a missing input or a locked output is refused without starting a cluster.

    Examples
    --------
    >>> from xpbatch.config import ClusterConfig
    >>> with lazy_connect(ClusterConfig(n_workers=2)) as client:  # doctest: +SKIP
    ...     encode_catalog("dr3.zarr", "model.safetensors", "catalog.zarr", client=client)
    """
    if config.cluster == CLUSTER_LOCAL_CUDA:
        check_local_cuda()
    return LazyClient(lambda: connect(config), on_start=on_start)


@contextlib.contextmanager
def _workers_in_own_process_group() -> Iterator[None]:
    """Worker processes spawned meanwhile (at the start or on a restart) get their own group.

    Ctrl-C in a terminal sends SIGINT to the whole foreground process group. Only the driver
    should act on it (cancel, close the cluster quickly, say how to resume); a worker turning
    it into task errors would have them retried and the run would go on. A worker outside the
    group never receives it, from the first instruction of its life (a SIGINT handler set in
    the worker would leave its start-up exposed). Workers still exit with the driver: they
    watch their parent.
    """
    import multiprocessing.util as mp_util

    original = mp_util.spawnv_passfds
    mp_util.spawnv_passfds = _spawn_in_own_group
    try:
        yield
    except KeyboardInterrupt:
        raise  # a cluster still starting in its thread spawns more workers: keep them out too
    except BaseException:
        mp_util.spawnv_passfds = original
        raise
    mp_util.spawnv_passfds = original


def _local_cluster(config: ClusterConfig) -> LocalCluster:
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=config.n_workers or os.cpu_count() or 1,
        threads_per_worker=config.threads_per_worker or 1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=free_dashboard_address(config.dashboard_address),
        memory_limit=config.memory_limit,
    )


def free_dashboard_address(address: str) -> str:
    """``address``, or the same host with any free port (':0') when its port is taken.

    Another cluster (or notebook) on the same machine often holds 8787; distributed would then
    pick another port itself but warn. The link is printed either way.
    """
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return address
    with socket.socket() as probe:
        try:
            probe.bind((host or "0.0.0.0", int(port)))
        except OSError:
            logger.info("dashboard port %s is taken; using a free one", port)
            return f"{host}:0"
    return address
