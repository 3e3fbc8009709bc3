"""Run a function over many items on a Dask cluster: bounded, retried, failures named.

Every stage that fans out (``ingest``'s files and store chunks, ``encode-catalog``'s chunks and
verification, ``export-parquet``'s plans and partitions, ``export-hats``' index files) maps a
plain, idempotent function of one item through here, so they share one behaviour:

- at most ``tasks_per_thread`` × (worker threads) tasks are in flight, and each future is
  released as soon as its result is taken, so neither the client nor the scheduler accumulates
  results (memory flat in the number of items);
- a task that fails (it raised, or its worker died too often) is submitted again, up to
  ``max_attempts`` runs; after that a :class:`~xpbatch.errors.ChunkError` names the task and its
  item and carries the last error; an error listed as ``fatal`` (bad input that no rerun
  mends, e.g. a malformed file) is raised at once as it is;
- a cluster left without workers for ``no_workers_timeout`` seconds ends in a
  :class:`~xpbatch.errors.ClusterError` that says how to resume.

Without a client, :func:`map_ordered` runs the same function in a local thread pool (the
rechunker habit: the same tasks, another executor). :func:`progress_bar` is every stage's
progress bar.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from xpbatch.errors import ChunkError, ClusterError

if TYPE_CHECKING:
    from distributed import Client, Future

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def map_bounded(
    client: Client,
    func: Callable[[T], R],
    items: Iterable[T],
    *,
    name: str,
    tasks_per_thread: int = 2,
    max_attempts: int = 3,
    no_workers_timeout: float = 600.0,
    poll_s: float = 2.0,
    fatal: tuple[type[BaseException], ...] = (),
) -> Iterator[R]:
    """Run ``func`` on every item on ``client``'s workers; yield results as they complete.

    At most ``tasks_per_thread`` × (worker threads) tasks are in flight; each future is
    released once its result is taken. A task that fails (its worker died too often or it
    raised) is submitted again, up to ``max_attempts`` runs, so ``func`` must be idempotent.
    When the cluster has had no worker for ``no_workers_timeout`` seconds, raise ClusterError.
    A task error that is an instance of one of ``fatal`` is re-raised at once, unchanged.

    Examples
    --------
    >>> sorted(map_bounded(client, abs, [-1, -2], name="abs"))  # doctest: +SKIP
    [1, 2]
    """
    from distributed import wait

    queue = collections.deque(enumerate(items))
    pending: dict[Future, tuple[int, T]] = {}
    attempts: collections.Counter[int] = collections.Counter()
    token = uuid.uuid4().hex[:8]
    idle_since: float | None = None
    try:
        while queue or pending:
            window = tasks_per_thread * max(1, sum(client.nthreads().values()))
            while queue and len(pending) < window:
                number, item = queue.popleft()
                key = f"{name}-{token}-{number}-{attempts[number]}"
                pending[client.submit(func, item, key=key, pure=False)] = (number, item)
            try:
                done = wait(list(pending), timeout=poll_s, return_when="FIRST_COMPLETED").done
            except TimeoutError:
                idle_since = _check_workers(client, idle_since, no_workers_timeout)
                continue
            idle_since = None
            for future in done:
                number, item = pending.pop(future)
                if future.status == "finished":
                    result = future.result()
                    future.release()
                    yield result
                    continue
                error = _failure(future)
                future.release()
                if isinstance(error, fatal):
                    raise error
                attempts[number] += 1
                if attempts[number] >= max_attempts:
                    raise ChunkError(
                        f"{name} task {number} ({_describe(item)}) failed {attempts[number]} "
                        f"times; last error: {type(error).__name__}: {error}"
                    ) from error
                logger.warning("%s task %d failed (%s); submitting it again", name, number, error)
                queue.appendleft((number, item))
    finally:
        for future in pending:
            future.cancel()


def map_ordered(
    client: Client | None,
    func: Callable[[T], R],
    items: Iterable[T],
    *,
    name: str,
    n_threads: int | None = None,
    on_result: Callable[[R], object] | None = None,
    fatal: tuple[type[BaseException], ...] = (),
) -> list[R]:
    """``list(map(func, items))`` on ``client`` (as :func:`map_bounded`) or a local thread pool.

    ``n_threads`` sizes the local pool (default: one per core); ``on_result`` is called with
    each result as it arrives (e.g. to advance a progress bar); ``fatal`` is :func:`map_bounded`'s
    (without a client every error is raised as it is); the bounds are map_bounded's defaults.
    """
    if client is None:
        with concurrent.futures.ThreadPoolExecutor(n_threads, thread_name_prefix=name) as pool:
            indexed: Iterable[tuple[int, R]] = enumerate(pool.map(func, items))
            results = _collect(indexed, on_result)
    else:
        numbered = map_bounded(client, _Numbered(func), enumerate(items), name=name, fatal=fatal)
        results = _collect(numbered, on_result)
    return [results[i] for i in range(len(results))]


def map_with_progress(
    client: Client | None,
    func: Callable[[T], R],
    todo: Sequence[T],
    *,
    name: str,
    desc: str,
    unit: str,
    total: int,
    enabled: bool = True,
    n_threads: int | None = None,
    fatal: tuple[type[BaseException], ...] = (),
) -> list[R]:
    """:func:`map_ordered` over the items left to do, with a progress bar of ``total`` items
    (those an earlier run did count as done from the start)."""
    initial = total - len(todo)
    with progress_bar(total, initial=initial, desc=desc, unit=unit, enabled=enabled) as bar:
        return map_ordered(
            client,
            func,
            todo,
            name=name,
            n_threads=n_threads,
            on_result=lambda _: bar.update(1),
            fatal=fatal,
        )


@dataclasses.dataclass(frozen=True)
class _Numbered(Generic[T, R]):
    """``func`` on ``(number, item)`` pairs, returning ``(number, result)`` (for map_ordered)."""

    func: Callable[[T], R]

    def __call__(self, numbered: tuple[int, T]) -> tuple[int, R]:
        number, item = numbered
        return number, self.func(item)


def _collect(
    indexed: Iterable[tuple[int, R]], on_result: Callable[[R], object] | None
) -> dict[int, R]:
    results: dict[int, R] = {}
    for number, result in indexed:
        results[number] = result
        if on_result is not None:
            on_result(result)
    return results


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
