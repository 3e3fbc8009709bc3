"""The one executor every stage maps its tasks with: serial, a thread pool, or a real Dask cluster
(worker processes, so every task is pickled). Each behaviour is checked on all three."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xpbatch.errors import ChunkError, ConfigError, ParseError
from xpbatch.runtime.executor import SERIAL, Executor, LazyClient, Progress

KINDS = ["serial", "threads", "dask"]
THREADS = 3
TASKS_PER_THREAD = 2


@pytest.fixture(params=KINDS)
def executor(request: pytest.FixtureRequest) -> Executor:
    """Each kind of executor, with the same bounds (the Dask one on the shared LocalCluster)."""
    options: dict[str, Any] = {"tasks_per_thread": TASKS_PER_THREAD, "max_attempts": 2}
    if request.param == "dask":
        return Executor(request.getfixturevalue("dask_client"), **options)
    return Executor(threads=1 if request.param == "serial" else THREADS, **options)


def _window(executor: Executor) -> int:
    """Tasks the executor may have in flight at once (serially: the one running)."""
    if executor.client:
        return TASKS_PER_THREAD * sum(executor.client.nthreads().values())
    return 1 if executor.kind == "serial" else TASKS_PER_THREAD * THREADS


def _sleepy() -> Callable[[int], int]:
    """A task that takes longer for smaller items, so results complete out of order.

    A closure, so it is pickled by value (workers need not import the tests)."""

    def task(i: int) -> int:
        time.sleep(0.01 * (8 - i % 8))
        return i * i

    return task


def _failing(error: type[Exception]) -> Callable[[int], int]:
    def task(i: int) -> int:
        if i == 5:
            raise error(f"item {i} is bad")
        return i

    return task


def test_the_executor_is_chosen_by_its_constructor(dask_client: Any) -> None:
    cases = [
        (Executor(), "serial"),
        (Executor.of(None), "serial"),
        (Executor.of(None, threads=4), "threads"),
        (Executor.of(None, threads=None), "threads"),
        (Executor.of(dask_client), "dask"),
        (Executor.of(dask_client, threads=4), "dask"),
    ]
    for made, kind in cases:
        assert made.kind == kind
    assert Executor.of(SERIAL) is SERIAL  # an executor is taken as it is


@pytest.mark.parametrize(
    "options", [{"threads": 0}, {"tasks_per_thread": 0}, {"max_attempts": 0}], ids=str
)
def test_bad_bounds_are_refused(options: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        Executor(**options)


def test_every_result_comes_once(executor: Executor) -> None:
    assert sorted(executor.map(_sleepy(), range(20), name="t")) == [i * i for i in range(20)]
    assert list(executor.map(abs, [], name="t")) == []


def test_ordered_results_come_in_the_items_order(executor: Executor) -> None:
    results = list(executor.map(_sleepy(), range(20), name="t", ordered=True))
    assert results == [i * i for i in range(20)]


def test_a_failing_item_is_named(executor: Executor) -> None:
    items = range(10)
    if executor.kind == "dask":  # retried max_attempts times, then a ChunkError names it
        with pytest.raises(ChunkError, match=r"t task 5 \(5\) failed 2 times; last error: .*bad"):
            list(executor.map(_failing(ValueError), items, name="t"))
    else:  # locally raised at once, as it is, with a note naming the task and its item
        with pytest.raises(ValueError, match="item 5 is bad") as raised:
            list(executor.map(_failing(ValueError), items, name="t"))
        assert "(in t task 5: 5)" in raised.value.__notes__
    # a fatal error (bad input no rerun mends) is raised at once as it is, on every executor
    with pytest.raises(ParseError, match="item 5 is bad") as raised:
        list(executor.map(_failing(ParseError), items, name="t", fatal=(ParseError,)))
    assert "(in t task 5: 5)" in raised.value.__notes__


def test_tasks_in_flight_are_bounded(executor: Executor) -> None:
    """Items are drawn (locally) or futures held (on Dask) at most a window ahead of results,
    and nothing is held once the map is done (each result released as it is taken)."""
    drawn = 0

    def items() -> Iterator[int]:
        nonlocal drawn
        for i in range(30):
            drawn += 1
            yield i

    held_before = len(executor.client.futures) if executor.client else 0
    in_flight = []
    for taken, _ in enumerate(executor.map(_sleepy(), items(), name="t"), start=1):
        if executor.client:
            in_flight.append(len(executor.client.futures) - held_before)
        else:
            in_flight.append(drawn - taken)
    assert drawn == 30 and len(in_flight) == 30
    # At each result the others of its window are still in flight, never more (on Dask the
    # client drops a released future a moment later, in its event loop: one more may show).
    slack = 1 if executor.client else 0
    assert max(in_flight) <= _window(executor) - 1 + slack
    if executor.kind != "serial":
        assert max(in_flight) >= 1  # really side by side
    if executor.client:
        deadline = time.monotonic() + 5
        while len(executor.client.futures) > held_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(executor.client.futures) == held_before


def test_threads_run_side_by_side_but_no_more_than_asked() -> None:
    running, most = 0, 0
    lock = threading.Lock()

    def task(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return i

    assert sorted(Executor(threads=THREADS).map(task, range(30), name="t")) == list(range(30))
    assert most == THREADS


def test_closing_the_map_early_stops_the_tasks(executor: Executor) -> None:
    ran: list[int] = []

    def task(i: int) -> int:
        ran.append(i)  # on Dask a worker's copy: only the local kinds can be counted
        time.sleep(0.01)
        return i

    results = executor.map(task, range(1000), name="t")
    assert next(results) in range(1000)
    results.close()
    if executor.client is None:
        assert len(ran) <= _window(executor) + 1


def test_progress_counts_each_result(executor: Executor) -> None:
    progress = Progress(100, desc="t", unit="rows", initial=40, enabled=False, count=len)
    chunks = [list(range(n)) for n in (10, 20, 30)]
    results = executor.map(list, chunks, name="t", ordered=True, progress=progress)
    assert list(results) == chunks


def test_a_performance_report_needs_a_cluster() -> None:
    with pytest.raises(ConfigError, match="needs a Dask cluster"):
        Executor(threads=2).performance_report("report.html")


def test_per_process_setup_runs_here_without_a_cluster() -> None:
    calls: list[str] = []
    with Executor().per_process(None, name="p", here=lambda: calls.append("here")):  # type: ignore[arg-type]
        calls.append("body")
    assert calls == ["here", "body"]


def test_a_lazy_client_hands_a_ctrl_c_to_the_cluster_it_started() -> None:
    """The cluster's exit must see the Ctrl-C (it then closes quickly and silently), not a
    normal end: a normal close waits on busy workers and prints the nannies' warnings."""
    seen: list[type[BaseException] | None] = []

    @contextlib.contextmanager
    def start() -> Iterator[Any]:
        try:
            yield "a client"
        except BaseException as error:
            seen.append(type(error))
            raise
        seen.append(None)

    with pytest.raises(KeyboardInterrupt), LazyClient(start) as lazy:
        lazy()
        raise KeyboardInterrupt
    with LazyClient(start) as lazy:
        lazy()
    assert seen == [KeyboardInterrupt, None]
