"""Run a function over many items: serially, in a local thread pool, or on a Dask cluster.

Every stage that fans out (``ingest``'s files and store chunks, ``encode-catalog``'s chunks and
its verification, ``export-parquet``'s plans and partitions, ``export-hats``' index files, the
sky maps, the neighbour search) maps a plain, idempotent function of one item with
:meth:`Executor.map`, so they share one behaviour whichever executor runs it (the rechunker
habit: the same tasks, another executor):

- a bounded number of tasks is in flight (``tasks_per_thread`` × threads, the cluster's or the
  local pool's) and each result is released as soon as it is taken, so neither this process nor
  the scheduler accumulates results (memory flat in the number of items);
- results come as they complete, or in the items' order (``ordered=True``);
- on a cluster, a task that fails (it raised, or its worker died too often) is submitted again,
  up to ``max_attempts`` runs; after that a :class:`~xpbatch.errors.ChunkError` names the task and
  its item and carries the last error. Locally a failure is raised at once, as it is, with a note
  naming its task and item. An error listed as ``fatal`` (bad input that no rerun mends, e.g. a
  malformed file) is raised at once as it is everywhere;
- a cluster left without workers for ``no_workers_timeout`` seconds ends in a
  :class:`~xpbatch.errors.ClusterError` that says how to resume;
- an optional :class:`Progress` bar advances with every result.

A stage builds its executor from the ``client`` it was given (:meth:`Executor.of`): which one
runs is decided there, never by a branch in the stage. The client may be a :class:`LazyClient`
(what the CLI passes, :func:`xpbatch.runtime.cluster.lazy_connect`): its cluster starts at the
first task a map submits, so a stage checks its inputs and claims its output before any cluster
starts, and a refused input costs no cluster start.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from xpbatch.errors import ChunkError, ClusterError, ConfigError

if TYPE_CHECKING:
    from distributed import Client, Future, WorkerPlugin

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

Numbered = Iterator[tuple[int, R]]
"""(item number, result) pairs, as tasks complete."""


class LazyClient:
    """A ``distributed.Client`` started on first use, and closed (with what it started) on exit.

    hats-import's ``pipeline(args)`` builds its client, ``pipeline_with_client(args, client)``
    takes one; this is the third way: the caller decides the cluster, the stage decides when it
    is needed (after its inputs are checked and its output claimed).

    Examples
    --------
    >>> with LazyClient(lambda: contextlib.nullcontext("a client")) as lazy:
    ...     lazy.started, lazy(), lazy.started
    (False, 'a client', True)
    """

    def __init__(
        self,
        start: Callable[[], contextlib.AbstractContextManager[Client]],
        *,
        on_start: Callable[[Client], object] | None = None,
    ) -> None:
        self._start, self._on_start = start, on_start
        self._stack = contextlib.ExitStack()
        self._client: Client | None = None

    @property
    def started(self) -> bool:
        """Whether the client was asked for (and so its cluster started)."""
        return self._client is not None

    def __call__(self) -> Client:
        """The client, started now if it is not yet."""
        if self._client is None:
            client = self._stack.enter_context(self._start())
            self._client = client
            if self._on_start is not None:
                self._on_start(client)
        return self._client

    def close(self) -> None:
        """Close the client and the cluster it started (nothing when it never started)."""
        self._client = None
        self._stack.close()

    def __enter__(self) -> LazyClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        """Close as :meth:`close`, with the exception that ended the block handed on, so that
        the cluster's own exit sees it (after a Ctrl-C it closes quickly and silently)."""
        self._client = None
        self._stack.__exit__(*exc)


def dask_client(client: Client | LazyClient | None) -> Client | None:
    """``client`` itself, a lazy one started now, or None."""
    return client() if isinstance(client, LazyClient) else client


def started_client(client: Client | LazyClient) -> Client:
    """``client`` itself, or a lazy one started now (for a library that takes a client)."""
    return client() if isinstance(client, LazyClient) else client


@dataclasses.dataclass(frozen=True)
class Progress:
    """A progress bar over a map: ``total`` units, ``initial`` of them done before this run."""

    total: int
    desc: str
    unit: str
    initial: int = 0
    enabled: bool = True
    count: Callable[[Any], int] | None = None
    """Units a result stands for (e.g. a chunk's rows); by default one per result."""


@dataclasses.dataclass(frozen=True, eq=False)
class Executor:
    """Where a stage's tasks run: in this thread, in a local thread pool, or on a Dask client.

    Examples
    --------
    >>> list(Executor().map(abs, [-1, -2], name="abs"))
    [1, 2]
    >>> sorted(Executor(threads=2).map(abs, [-1, -2], name="abs"))
    [1, 2]
    """

    client: Client | LazyClient | None = None
    """A ``distributed.Client`` whose workers run the tasks (a :class:`LazyClient` is started at
    the first task); None runs them in this process."""
    threads: int | None = 1
    """Without a client: 1 runs the tasks one after another in this thread; more, in a pool of
    that many threads; None, a pool of one thread per core (as :mod:`concurrent.futures`)."""
    tasks_per_thread: int = 2
    """Tasks in flight per thread (the cluster's threads, or the local pool's)."""
    max_attempts: int = 3
    """Runs of a failing task on a cluster before the map fails with a ChunkError."""
    no_workers_timeout: float = 600.0
    """Seconds a cluster may have no worker before the map fails with a ClusterError."""
    poll_s: float = 2.0
    """How often a map on a cluster checks that it still has workers while none finishes."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(
                f"threads must be at least 1 (or None: one per core), got {self.threads}"
            )
        if self.tasks_per_thread < 1 or self.max_attempts < 1:
            raise ConfigError(
                f"tasks_per_thread and max_attempts must be at least 1, got "
                f"{self.tasks_per_thread} and {self.max_attempts}"
            )

    @classmethod
    def of(cls, client: Client | LazyClient | Executor | None, **options: Any) -> Executor:
        """The executor for a stage given ``client`` (an Executor is taken as it is)."""
        if isinstance(client, Executor):
            return client
        return cls(client, **options)

    @property
    def kind(self) -> Literal["serial", "threads", "dask"]:
        """Which of the three runs the tasks."""
        if self.client is not None:
            return "dask"
        return "serial" if self.threads == 1 else "threads"

    def map(
        self,
        func: Callable[[T], R],
        items: Iterable[T],
        *,
        name: str,
        ordered: bool = False,
        fatal: tuple[type[BaseException], ...] = (),
        progress: Progress | None = None,
    ) -> Iterator[R]:
        """Run ``func`` on every item; yield the results as they complete (or in order).

        The tasks start when the first result is asked for; closing the iterator early cancels
        those not yet run. ``name`` names the tasks (Dask keys, thread names, failures).
        """
        runs = {"serial": self._serial, "threads": self._threads, "dask": self._dask}
        numbered = runs[self.kind](func, items, name, fatal)
        results = _in_order(numbered) if ordered else (result for _, result in numbered)
        return results if progress is None else _advancing(results, progress)

    @contextlib.contextmanager
    def per_process(
        self, plugin: WorkerPlugin, *, name: str, here: Callable[[], object]
    ) -> Iterator[None]:
        """Set up every process that runs tasks, for the duration of the block.

        On a cluster ``plugin`` is registered on every worker (also those that join or restart
        later) and removed afterwards; locally ``here()`` runs once in this process.
        """
        client = dask_client(self.client)
        if client is None:
            here()
            yield
            return
        client.register_plugin(plugin, name=name)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # the cluster may be gone; nothing left to free
                client.unregister_worker_plugin(name)

    def performance_report(self, filename: str) -> contextlib.AbstractContextManager[object]:
        """Dask's performance report of the block, written to ``filename`` (HTML).

        Raises ConfigError at once (before any work) without a cluster or without bokeh.
        """
        import importlib.util

        if self.client is None:
            raise ConfigError("--performance-report needs a Dask cluster (it reports on one)")
        if importlib.util.find_spec("bokeh") is None:
            raise ConfigError(
                "--performance-report needs bokeh to draw the report: `pip install 'bokeh>=3.1'`"
            )
        return self._performance_report(filename)

    @contextlib.contextmanager
    def _performance_report(self, filename: str) -> Iterator[None]:
        """The report, without distributed's sizeof warning about the profiles it gathers
        (:mod:`xpbatch.runtime.report_logs`), here (a LocalCluster's scheduler) and on the
        workers."""
        from distributed import performance_report

        from xpbatch.runtime.report_logs import SIZEOF_LOGGER, QuietSizeofFallback

        dask_client(self.client)  # the report needs a running client when it is entered
        plugin = QuietSizeofFallback()
        here = logging.getLogger(SIZEOF_LOGGER)
        here.addFilter(plugin.filter)
        try:
            with (
                self.per_process(plugin, name=plugin.name, here=lambda: None),
                performance_report(filename=filename),
            ):
                yield
        finally:
            here.removeFilter(plugin.filter)

    # --- the three ways to run -------------------------------------------------------------
    def _serial(
        self,
        func: Callable[[T], R],
        items: Iterable[T],
        name: str,
        fatal: tuple[type[BaseException], ...],
    ) -> Numbered[R]:
        for number, item in enumerate(items):
            try:
                result = func(item)
            except Exception as error:
                error.add_note(_where(name, number, item))
                raise
            yield number, result

    def _threads(
        self,
        func: Callable[[T], R],
        items: Iterable[T],
        name: str,
        fatal: tuple[type[BaseException], ...],
    ) -> Numbered[R]:
        n_threads = self.threads or min(32, (os.cpu_count() or 1) + 4)
        window = self.tasks_per_thread * n_threads
        queue = enumerate(items)
        pending: dict[concurrent.futures.Future[R], tuple[int, T]] = {}
        pool = concurrent.futures.ThreadPoolExecutor(n_threads, thread_name_prefix=name)
        try:
            while True:
                for number, item in itertools.islice(queue, window - len(pending)):
                    pending[pool.submit(func, item)] = (number, item)
                if not pending:
                    return
                done, _ = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in sorted(done, key=lambda f: pending[f][0]):
                    number, item = pending.pop(future)
                    error = future.exception()
                    if error is not None:
                        error.add_note(_where(name, number, item))
                        raise error
                    yield number, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _dask(
        self,
        func: Callable[[T], R],
        items: Iterable[T],
        name: str,
        fatal: tuple[type[BaseException], ...],
    ) -> Numbered[R]:
        from distributed import wait

        client = dask_client(self.client)
        assert client is not None
        queue = collections.deque(enumerate(items))
        pending: dict[Future, tuple[int, T]] = {}
        attempts: collections.Counter[int] = collections.Counter()
        token = uuid.uuid4().hex[:8]
        idle_since: float | None = None
        try:
            while queue or pending:
                window = self.tasks_per_thread * max(1, sum(client.nthreads().values()))
                while queue and len(pending) < window:
                    number, item = queue.popleft()
                    key = f"{name}-{token}-{number}-{attempts[number]}"
                    pending[client.submit(func, item, key=key, pure=False)] = (number, item)
                try:
                    done = wait(list(pending), timeout=self.poll_s, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    idle_since = _check_workers(client, idle_since, self.no_workers_timeout)
                    continue
                idle_since = None
                for future in done.done:
                    number, item = pending.pop(future)
                    if future.status == "finished":
                        result = future.result()
                        future.release()
                        yield number, result
                        continue
                    error = _failure(future)
                    future.release()
                    if isinstance(error, fatal):
                        error.add_note(_where(name, number, item))
                        raise error
                    attempts[number] += 1
                    if attempts[number] >= self.max_attempts:
                        raise ChunkError(
                            f"{name} task {number} ({_describe(item)}) failed {attempts[number]} "
                            f"times; last error: {type(error).__name__}: {error}"
                        ) from error
                    logger.warning(
                        "%s task %d failed (%s); submitting it again", name, number, error
                    )
                    queue.appendleft((number, item))
        finally:
            for future in pending:
                future.cancel()


SERIAL = Executor()
"""Every task in this thread, one after another (the reference the tests compare with)."""


@contextlib.contextmanager
def storage_credentials(executor: Executor, *places: object) -> Iterator[None]:
    """For the block, give the executor's workers the secrets of ``places``' explicit storage
    options (if any) through a worker plugin, never through a task
    (:class:`xpbatch.runtime.storage_secrets.StorageSecrets`); nothing to do without a cluster or
    without explicit secrets (workers then use their own AWS environment)."""
    from xpbatch.storage.clients import known_secrets
    from xpbatch.storage.location import Location

    secrets = {}
    for place in places:
        if isinstance(place, Location) and (ref := place.options.secret_ref) is not None:
            values = known_secrets(ref)
            if values is not None:
                secrets[ref] = values
    if executor.client is None or not secrets:
        yield
        return
    from xpbatch.runtime.storage_secrets import StorageSecrets

    with executor.per_process(
        StorageSecrets(secrets), name=f"xpbatch-storage-{uuid.uuid4().hex[:8]}", here=lambda: None
    ):
        yield


def _in_order(numbered: Numbered[R]) -> Iterator[R]:
    """The results in their items' order: each held only until those before it have come."""
    held: dict[int, R] = {}
    following = 0
    for number, result in numbered:
        held[number] = result
        while following in held:
            yield held.pop(following)
            following += 1


def _advancing(results: Iterator[R], progress: Progress) -> Iterator[R]:
    """``results``, advancing a progress bar with each."""
    count = progress.count or (lambda _: 1)
    with progress_bar(
        progress.total,
        initial=progress.initial,
        desc=progress.desc,
        unit=progress.unit,
        enabled=progress.enabled,
    ) as bar:
        for result in results:
            bar.update(count(result))
            yield result


def _where(name: str, number: int, item: object) -> str:
    """The note that names a failed task and its item."""
    return f"(in {name} task {number}: {_describe(item)})"


def _describe(item: object, limit: int = 120) -> str:
    """A short description of a task's item for failure reports."""
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _failure(future: Future) -> BaseException:
    """Why a future did not finish: its exception, or the error of asking (e.g. cancelled)."""
    try:
        return future.exception() or RuntimeError(f"task ended as {future.status!r}")
    except (Exception, asyncio.CancelledError) as e:  # a cancelled future raises instead
        return e


def _check_workers(client: Client, idle_since: float | None, timeout: float) -> float | None:
    """Fail when the cluster has had no worker for ``timeout`` s; return since when it has none."""
    if client.nthreads():
        return None
    now = time.monotonic()
    if idle_since is None:
        logger.warning("the cluster has no workers; waiting up to %.0f s for some", timeout)
        return now
    if now - idle_since > timeout:
        raise ClusterError(
            f"the Dask cluster has had no workers for {timeout:.0f} s; start workers and rerun "
            "with --resume (finished chunks are kept)"
        )
    return idle_since


@contextlib.contextmanager
def progress_bar(
    total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True
) -> Iterator[Any]:
    """A tqdm bar on stderr of ``total`` units (``initial`` done before); ``bar.update(n)``."""
    from tqdm.auto import tqdm

    with tqdm(
        total=total,
        initial=initial,
        unit=unit,
        unit_scale=True,
        desc=desc,
        disable=not enabled,
        smoothing=0.1,
    ) as bar:
        yield bar
