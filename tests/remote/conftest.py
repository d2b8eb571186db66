"""A real redis-server for the redis backend's tests: nothing is mocked.

The session's server (``$SHMCHAN_REDIS_SERVER``, else redis-server or valkey-server
from PATH) runs on a free port of 127.0.0.1, in a temporary directory, with
persistence off, and is shut down at the end. Without ``redis-server`` on PATH these
tests are skipped with the reason, unless ``SHMCHAN_REQUIRE_REDIS=1`` (which CI sets)
turns that into a failure. The autouse ``no_keys_left`` fixture fails any test that
leaves a key on the server. Tests that kill, stop or restart a server use a private
one (``own_server``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REQUIRE = os.environ.get("SHMCHAN_REQUIRE_REDIS") == "1"
BINARY = (
    os.environ.get("SHMCHAN_REDIS_SERVER") or shutil.which("redis-server") or shutil.which("valkey-server")
)
"""The server the tests start: $SHMCHAN_REDIS_SERVER (say, a valkey-server), else the
first of redis-server and valkey-server on PATH."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process owned by the tests."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> None:
        """Start (on ``port``, or a free one) and wait until it answers PING."""
        assert BINARY is not None
        for _ in range(5):
            self.port = port or free_port()
            args = [
                BINARY,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            args += ["--dir", str(self.directory), "--maxmemory-policy", "noeviction"]
            args += ["--logfile", str(self.directory / "server.log")]
            if self.password:
                args += ["--requirepass", self.password]
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
            if self._ready(5.0):
                return
            self.kill()
            if port:
                break
        raise RuntimeError(f"redis-server did not start; log:\n{self.log()}")

    def _ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return True
            except OSError:
                pass
            time.sleep(0.01)
        return False

    def log(self) -> str:
        try:
            return (self.directory / "server.log").read_text()[-3000:]
        except OSError:
            return ""

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=10)

    def kill(self) -> None:
        """SIGKILL the server and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()  # redis-server exits at once on SIGTERM (nothing to save)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


def wait_blocked_client(server: RedisServer, timeout: float = 10.0) -> None:
    """Wait (polling the server's CLIENT LIST, bounded) until some client is blocked in
    a command such as BLPOP: a consumer has reached its wait."""
    deadline = time.monotonic() + timeout
    with server.client() as c:
        while not any("b" in client.get("flags", "") for client in c.client_list()):
            if time.monotonic() > deadline:
                pytest.fail("no client blocked on the server")
            time.sleep(0.01)


def keys_on(server: RedisServer) -> list[bytes]:
    with server.client() as c:
        return sorted(c.scan_iter(count=1000))


def wait_no_keys(server: RedisServer, timeout: float) -> list[bytes]:
    """Wait (polling the server, bounded) until it holds no key; what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = keys_on(server)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def need_binary() -> None:
    """Skip without redis-server, or fail if SHMCHAN_REQUIRE_REDIS=1 (as in CI)."""
    if BINARY is None:
        why = "redis-server is not on PATH (Debian: apt-get install redis-server)"
        if REQUIRE:
            pytest.fail(f"{why}, and SHMCHAN_REQUIRE_REDIS=1 requires the redis tests to run")
        pytest.skip(f"{why}; set SHMCHAN_REQUIRE_REDIS=1 to make this a failure")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    need_binary()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(autouse=True)
def no_keys_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves any key on the session's server (and clean up after it)."""
    if "redis_server" not in request.fixturenames and "url" not in request.fixturenames:
        yield
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    yield
    left = keys_on(server)
    if left:
        with server.client() as c:
            c.flushall()
        pytest.fail(f"the test left keys on the redis server: {left[:20]}")


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private server this test may kill, stop, pause or restart."""
    need_binary()
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    lib: str = request.param
    return lib


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{os.getpid()}-{os.urandom(5).hex()}"
