"""The lease lock on object storage, against a real SeaweedFS server: one writer per output, an
expired or broken lease taken over (and its old holder told), renewal, release, a killed holder;
and a server that ignores conditional writes (moto behind a header-dropping middleware) refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import NO_INSTANCE_METADATA as NO_METADATA
from s3_server import SECRET_KEY, S3Server, moto_ignoring_conditions

from xpbatch.errors import ConditionalWriteError, ConfigError, OutputLockedError
from xpbatch.storage.lease import Lease, check_conditional_writes, read_lease
from xpbatch.storage.location import Location, as_location


@pytest.fixture
def output(s3_url: str) -> Location:
    return as_location(s3_url) / "catalog.zarr"


def test_second_writer_is_refused_until_release(output: Location) -> None:
    with Lease(output, run_id="first") as first:
        assert first.held and read_lease(output).run_id == "first"  # type: ignore[union-attr]
        with pytest.raises(OutputLockedError, match="run first") as info:
            Lease(output, run_id="second").acquire()
        text = str(info.value)
        assert output.url in text and "--break-lock" in text and SECRET_KEY not in text
    assert read_lease(output) is None  # released and removed
    with Lease(output, run_id="second") as second:
        assert second.held


def test_exactly_one_of_many_racing_writers_wins(output: Location) -> None:
    leases = [Lease(output, run_id=f"w{i}") for i in range(8)]
    outcomes: list[str] = []
    start = threading.Barrier(len(leases))

    def take(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            outcomes.append("won")
        except OutputLockedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
    winner = next(lease for lease in leases if lease.held)
    assert read_lease(output).run_id == winner.run_id  # type: ignore[union-attr]
    winner.release()


def _stop_renewing(lease: Lease) -> None:
    """What a killed holder does: nothing (no renewal, no release)."""
    lease._stop.set()
    assert lease._thread is not None
    lease._thread.join(timeout=30)


def test_expired_lease_is_taken_over_and_the_old_holder_learns_it(output: Location) -> None:
    old = Lease(output, ttl_s=1.0, run_id="old").acquire()
    _stop_renewing(old)
    with pytest.raises(OutputLockedError, match="run old"):
        Lease(output, run_id="new").acquire()  # not expired yet
    time.sleep(1.3)
    with Lease(output, run_id="new") as new:
        assert new.held and read_lease(output).run_id == "new"  # type: ignore[union-attr]
        assert old.renew() is False
        with pytest.raises(OutputLockedError, match="lost the lock"):
            old.check()
        old.release()  # must not remove the new holder's lease
        assert read_lease(output).run_id == "new"  # type: ignore[union-attr]


def test_break_lock_takes_a_live_lease(output: Location) -> None:
    with Lease(output, run_id="old") as old:
        with Lease(output, run_id="breaker", break_lock=True) as breaker:
            assert breaker.held
            assert old.renew() is False and not old.held
            with pytest.raises(OutputLockedError):
                old.check()
        assert read_lease(output) is None


def test_renewal_keeps_a_short_lease_alive(output: Location) -> None:
    with Lease(output, ttl_s=1.0, run_id="holder") as holder:
        first = read_lease(output)
        time.sleep(2.5)  # more than twice its life: only the background renewal keeps it
        later = read_lease(output)
        assert first is not None and later is not None and later.renewed > first.renewed
        with pytest.raises(OutputLockedError, match="run holder"):
            Lease(output, run_id="other").acquire()
        holder.check()
        assert holder.renew() is True


HOLD = """
import sys, time
from xpbatch.storage.lease import Lease
from xpbatch.storage.location import as_location
Lease(as_location(sys.argv[1]), ttl_s=1.5, run_id="killed").acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_killed_holder_is_taken_over_after_its_lease_expires(output: Location) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, output.url], stdout=subprocess.PIPE, env=os.environ.copy()
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == b"held"
        time.sleep(1.0)  # renewed at least once by its thread
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        with pytest.raises(OutputLockedError, match="run killed"):
            Lease(output).acquire()
        time.sleep(1.8)
        with Lease(output, run_id="resumer") as lease:
            assert lease.held
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_local_paths_are_not_leased(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(ConfigError, match="local path"):
        Lease(as_location(tmp_path))


@pytest.fixture
def ignoring_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    pytest.importorskip("moto", reason="moto[server] is in the test extra")
    with moto_ignoring_conditions() as server:
        for name in [n for n in os.environ if n.startswith("AWS_") and n not in NO_METADATA]:
            monkeypatch.delenv(name)
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        yield server


def test_a_server_ignoring_conditional_writes_is_refused(ignoring_server: S3Server) -> None:
    output = as_location(f"s3://{ignoring_server.bucket}/run/catalog.zarr")
    with pytest.raises(ConditionalWriteError, match="ignores conditional writes") as info:
        Lease(output).acquire()
    text = str(info.value)
    assert output.url in text and "unsafe_no_conditional_writes" in text and "\n" not in text
    assert SECRET_KEY not in text
    assert as_location(f"s3://{ignoring_server.bucket}/run").list() == []  # probe removed
    unsafe = as_location(output, storage_options={"unsafe_no_conditional_writes": True})
    check_conditional_writes(unsafe)  # the documented opt-out: warns, does not refuse
    with Lease(unsafe) as lease:
        assert lease.held
