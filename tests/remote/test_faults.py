"""Bad input and faults on the redis backend: every one is a clear error from
shmchan's tree that is also the stdlib type callers catch, and no call outlives its
timeout (plus a short grace) while the server is unreachable."""

from __future__ import annotations

import contextlib
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from helpers.procs import child_env

import shmchan
from shmchan import Channel, JoinableQueue, Queue
from shmchan._redis._client import REPLY_GRACE

from .conftest import RedisServer, free_port, need_binary, unique, wait_blocked_client

SLACK = 1.0  # scheduling noise on a loaded 2-core machine


@pytest.mark.parametrize(
    "bad",
    [
        "http://127.0.0.1:6379/0",
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:70000/0",
        "redis:///0",
        "unix://",
    ],
)
def test_unusable_urls(bad: str) -> None:
    with pytest.raises(shmchan.BadURL) as err:
        Queue(backend="redis", url=bad)
    assert isinstance(err.value, ValueError)


def test_url_of_the_wrong_type() -> None:
    with pytest.raises(TypeError):
        Queue(backend="redis", url=b"redis://127.0.0.1:6379/0")  # type: ignore[arg-type]


def test_refused_connection() -> None:
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(shmchan.RemoteUnavailable) as err:
        Queue(backend="redis", url=f"redis://127.0.0.1:{port}/0")
    assert isinstance(err.value, ConnectionError)
    assert time.monotonic() - start < SLACK
    with pytest.raises(ConnectionError):
        Channel.open("x", backend="redis", url=f"redis://127.0.0.1:{port}/0")


def test_wrong_credentials(tmp_path: Path) -> None:
    need_binary()
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        plain = f"redis://127.0.0.1:{server.port}/0"
        wrong = f"redis://:nope@127.0.0.1:{server.port}/0"
        for url in (plain, wrong):
            with pytest.raises(shmchan.RemoteAuthFailed) as err:
                Queue(backend="redis", url=url)
            assert isinstance(err.value, ConnectionError) and isinstance(err.value, PermissionError)
            assert "nope" not in str(err.value)  # the password is not repeated
        q: Queue[int] = Queue(backend="redis", url=server.url)
        q.put(1)
        assert q.get() == 1
        q.close()
    finally:
        server.stop()


def test_wrong_credentials_async(tmp_path: Path) -> None:
    need_binary()
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        q: Queue[int] = Queue(backend="redis", url=server.url)
        q._core.url = f"redis://:nope@127.0.0.1:{server.port}/0"  # as if the password changed

        async def main() -> None:
            with pytest.raises(shmchan.RemoteAuthFailed):
                await q.async_q.get()

        for lib in ("asyncio", "trio"):
            anyio.run(main, backend=lib)
        q._core.url = server.url
        q.close()
    finally:
        server.stop()


def test_ctrl_c_interrupts_a_blocked_get_and_takes_nothing(redis_server: RedisServer) -> None:
    from helpers.children import child

    q: Queue[str] = Queue(backend="redis", url=redis_server.url)
    code = """
        import pickle, sys
        q = pickle.loads(bytes.fromhex(blob))
        print("waiting", flush=True)
        try:
            q.get()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        sys.stdin.readline()
        print("got", q.get(timeout=10), flush=True)
        q.close()
    """
    with child(code, blob=pickle.dumps(q).hex()) as c:
        c.expect("waiting")
        wait_blocked_client(redis_server)  # its BLPOP
        c.signal(signal.SIGINT)
        c.expect("interrupted")
        q.put("after")
        c.tell("go")
        assert c.expect("got") == "got after"
        assert c.finish(10) == 0
    q.close()


def test_server_dies_during_a_blocking_get(own_server: RedisServer) -> None:
    q: Queue[int] = Queue(backend="redis", url=own_server.url)
    errors: list[BaseException] = []
    waiting = threading.Event()

    def consume() -> None:
        waiting.set()
        try:
            q.get()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    assert waiting.wait(5)
    wait_blocked_client(own_server)  # its BLPOP
    own_server.kill()
    t.join(5)
    assert not t.is_alive()
    assert errors and isinstance(errors[0], shmchan.RemoteUnavailable), errors
    with pytest.raises(ConnectionError):
        q.put(1)
    q.close()  # best effort: the server is gone, the handle closes anyway
    assert q.closed


def test_unresponsive_server_honours_every_timeout(own_server: RedisServer) -> None:
    # A long lease: the server's clock runs on while it is stopped, and a default 5 s
    # lease would expire the (unnamed) queue before it answers again.
    q: Queue[int] = Queue(1, backend="redis", url=own_server.url, lease=60)
    q.put(0)
    ch = Channel.create(unique("ch"), backend="redis", url=own_server.url, lease=60)
    ch.send(0)
    own_server.pause()  # accepts connections, answers nothing
    try:
        for call, timeout in (
            (lambda: q.get(timeout=0.3), 0.3),
            (lambda: q.put(1, timeout=0.3), 0.3),
            (q.get_nowait, 0.0),
            (lambda: q.get_many(10, timeout=0.3), 0.3),
            (lambda: q.put_many([1, 2], timeout=0.3), 0.3),
            (lambda: ch.send(1, timeout=0.3), 0.3),
            (lambda: ch.recv(timeout=0.3), 0.3),
            (lambda: shmchan.select(q, ch, timeout=0.3), 0.3),
            (lambda: Queue.open(q.name, backend="redis", url=own_server.url), 5.0),
        ):
            start = time.monotonic()
            with pytest.raises(shmchan.RemoteTimeout) as err:
                call()
            assert isinstance(err.value, TimeoutError) and isinstance(err.value, ConnectionError)
            assert time.monotonic() - start < timeout + REPLY_GRACE + SLACK

        async def main() -> None:
            # The cancel scope fires at its deadline, or the call gives up on the
            # server (ConnectionError) within the grace: either way nothing hangs.
            start = anyio.current_time()
            with contextlib.suppress(ConnectionError), anyio.move_on_after(0.3):
                await q.async_q.get()
                pytest.fail("got an item from a stopped server")
            assert anyio.current_time() - start < 0.3 + REPLY_GRACE + SLACK

        for lib in ("asyncio", "trio"):
            anyio.run(main, backend=lib)
    finally:
        own_server.resume()
    assert q.get(timeout=5) == 0  # usable again once the server answers
    assert ch.recv(timeout=5) == 0
    q.close()
    ch.unlink()
    ch.close()


def test_server_restarted_without_its_data(own_server: RedisServer) -> None:
    name = unique()
    named: Queue[int] = Queue(name=name, backend="redis", url=own_server.url)
    unnamed: Queue[int] = Queue(backend="redis", url=own_server.url)
    ch = Channel.create(unique("ch"), backend="redis", url=own_server.url)
    named.put(1)
    port = own_server.port
    own_server.stop()
    own_server.start(port)  # same address, empty
    for call in (lambda: named.put(2), unnamed.get_nowait, lambda: ch.send(1), ch.recv_nowait):
        with pytest.raises(shmchan.ChannelNotFound) as err:
            call()
        assert isinstance(err.value, FileNotFoundError)
        assert "restarted without its data" in str(err.value)
    with pytest.raises(FileNotFoundError):
        Queue.open(name, backend="redis", url=own_server.url)
    for handle in (named, unnamed, ch):
        handle.close()


def test_out_of_memory_is_no_space_and_consumers_still_drain(own_server: RedisServer) -> None:
    q: JoinableQueue[bytes] = JoinableQueue(1000, backend="redis", url=own_server.url)
    with own_server.client() as c:
        c.config_set("maxmemory", str(c.info("memory")["used_memory"] + (2 << 20)))
    put = 0
    with pytest.raises(shmchan.NoSpace) as err:
        for _ in range(200):
            q.put(b"x" * (64 << 10))
            put += 1
    assert isinstance(err.value, OSError)
    assert put > 0
    got = [q.get(timeout=5) for _ in range(put)]  # blocking gets, with their wake lists
    for _ in got:
        q.task_done()
    q.join()
    assert q.empty()
    with own_server.client() as c:
        c.config_set("maxmemory", "0")
    q.close()


def test_without_the_extra_the_error_names_it(url: str) -> None:
    code = f"""
import sys
sys.modules["redis"] = None  # as if the extra were not installed
import shmchan
try:
    shmchan.Queue(backend="redis", url={url!r})
except shmchan.BackendUnavailable as exc:
    assert isinstance(exc, ImportError)
    print("unavailable:", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60, check=False
    )
    assert "unavailable:" in out.stdout and "shmchan[redis]" in out.stdout, out.stderr


def test_connection_to_a_port_that_never_answers() -> None:
    # A listening socket that never accepts: the connection completes (the kernel's
    # backlog) but no reply ever comes, as with a hung server.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
        start = time.monotonic()
        with pytest.raises(shmchan.RemoteTimeout):
            Queue(backend="redis", url=url)
        assert time.monotonic() - start < 5.0 + 5.0 + SLACK  # connect, then the handshake's read
