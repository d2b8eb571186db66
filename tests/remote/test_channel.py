"""Named channels on the redis backend: modes, end of stream (also with a SIGKILLed
writer), BrokenChannel, fencing of a writer whose lease ran out, capacity."""

from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import signal
import threading
import time

import pytest
from helpers.children import child

import shmchan
from shmchan import Channel

from . import children
from .conftest import unique

SPAWN = mp.get_context("spawn")


@pytest.fixture
def name(url: str):  # type: ignore[no-untyped-def]
    chan = unique("ch")
    yield chan
    try:
        Channel.remove(chan, backend="redis", url=url)
    except shmchan.ChannelNotFound:
        pass


def test_send_and_receive(url: str, name: str) -> None:
    w = Channel.create(name, backend="redis", url=url, mode="w")
    r = Channel.open(name, backend="redis", url=url, mode="r")
    assert (w.mode, r.mode, w.capacity) == ("w", "r", 1 << 20)
    w.send({"job": 1})
    w.send_bytes(bytearray(b"raw"))
    w.send_many([1, 2, 3])
    assert r.recv() == {"job": 1}
    assert r.recv_bytes() == b"raw"
    assert r.recv_many(10) == [1, 2, 3]
    w.send("not bytes")
    with pytest.raises(shmchan.UndecodableMessage):
        r.recv_bytes()  # consumed all the same
    with pytest.raises(shmchan.Empty):
        r.recv(timeout=0.05)
    with pytest.raises(shmchan.WrongMode):
        r.send(1)
    with pytest.raises(shmchan.WrongMode):
        w.recv_nowait()
    with pytest.raises(shmchan.MessageTooLarge):
        w.send_bytes(b"x" * (w.max_message + 1))
    w.close()
    r.close()
    with pytest.raises(shmchan.ClosedChannel):
        r.recv()


def test_names(url: str, name: str) -> None:
    with pytest.raises(shmchan.ChannelNotFound):
        Channel.open(name, backend="redis", url=url)
    Channel.create(name, backend="redis", url=url).close()
    with pytest.raises(shmchan.ChannelExists):
        Channel.create(name, backend="redis", url=url)
    Channel.remove(name, backend="redis", url=url)
    with pytest.raises(shmchan.ChannelNotFound):
        Channel.remove(name, backend="redis", url=url)
    with pytest.raises(ValueError):
        Channel.create("bad{name}", backend="redis", url=url)
    with pytest.raises(ValueError, match="only for backend='redis'"):
        Channel.create(name, url=url)


def test_end_of_stream_once_every_writer_closed(url: str, name: str) -> None:
    r = Channel.create(name, backend="redis", url=url, mode="r")
    w1 = Channel.open(name, backend="redis", url=url, mode="w")
    w2 = Channel.open(name, backend="redis", url=url, mode="rw")
    w1.send(1)
    w1.close()
    w2.send(2)
    w2.send_eof()
    assert w2.mode == "r"
    got: list[int] = []
    ended = threading.Event()

    def read() -> None:
        got.extend(r)  # stops at the end of the stream
        ended.set()

    t = threading.Thread(target=read)
    t.start()
    assert ended.wait(5)
    t.join(5)
    assert got == [1, 2]
    with pytest.raises(shmchan.EndOfChannel):
        r.recv(timeout=0)
    r.close()
    w2.close()


def test_reader_blocked_wakes_at_the_last_close(url: str, name: str) -> None:
    r = Channel.create(name, backend="redis", url=url, mode="r")
    w = Channel.open(name, backend="redis", url=url, mode="w")
    result: list[object] = []
    waiting = threading.Event()

    def read() -> None:
        waiting.set()
        try:
            r.recv()
        except shmchan.EndOfChannel as exc:
            result.append(exc)

    t = threading.Thread(target=read)
    t.start()
    assert waiting.wait(5)
    start = time.monotonic()
    w.close()
    t.join(5)
    assert result and time.monotonic() - start < 1.0  # woken by the close, not a lease
    r.close()


def test_end_of_stream_with_a_sigkilled_writer(url: str, name: str) -> None:
    r = Channel.create(name, backend="redis", url=url, mode="r")
    code = """
        import sys, shmchan
        w = shmchan.Channel.open(name, backend="redis", url=url, mode="w", lease=0.5)
        for i in range(100):
            w.send(i)
        print("sent", flush=True)
        sys.stdin.readline()
    """
    with child(code, name=name, url=url) as c:
        c.expect("sent")
        assert [r.recv(timeout=5) for _ in range(100)] == list(range(100))
        with pytest.raises(shmchan.Empty):
            r.recv(timeout=0.05)  # the writer is alive: no end yet
        c.kill()
    start = time.monotonic()
    with pytest.raises(shmchan.EndOfChannel):
        r.recv(timeout=10)
    assert time.monotonic() - start < 0.5 + 1.5  # the lease, then at most a slice or so
    r.close()


def test_broken_channel(url: str, name: str) -> None:
    w = Channel.create(name, backend="redis", url=url, mode="w")
    w.send(1)  # no reader yet: not broken (as locally)
    r = Channel.open(name, backend="redis", url=url, mode="r")
    assert r.recv() == 1
    r.close()
    with pytest.raises(shmchan.BrokenChannel):
        w.send(2)
    with pytest.raises(shmchan.BrokenChannel):
        w.send_many([3, 4])
    w.close()


def test_broken_channel_with_a_sigkilled_reader(url: str, name: str) -> None:
    w = Channel.create(name, backend="redis", url=url, mode="w")
    code = """
        import sys, shmchan
        r = shmchan.Channel.open(name, backend="redis", url=url, mode="r", lease=0.5)
        print("open", flush=True)
        sys.stdin.readline()
    """
    with child(code, name=name, url=url) as c:
        c.expect("open")
        w.send(1)
        c.kill()
    deadline = time.monotonic() + 5
    with pytest.raises(shmchan.BrokenChannel):
        while time.monotonic() < deadline:
            w.send(2)
    w.close()


def test_a_writer_paused_past_its_lease_is_fenced(url: str, name: str) -> None:
    r = Channel.create(name, backend="redis", url=url, mode="r")
    code = """
        import sys, shmchan
        w = shmchan.Channel.open(name, backend="redis", url=url, mode="w", lease=0.3)
        w.send("before")
        print("sent", flush=True)
        sys.stdin.readline()
        try:
            w.send("after")
            print("sent again", flush=True)
        except shmchan.BrokenChannel as exc:
            print("fenced", exc, flush=True)
    """
    with child(code, name=name, url=url) as c:
        c.expect("sent")
        c.signal(signal.SIGSTOP)  # the writer stops renewing its lease
        assert r.recv(timeout=5) == "before"
        with pytest.raises(shmchan.EndOfChannel):
            r.recv(timeout=10)  # the lease ran out: the readers see the end
        c.signal(signal.SIGCONT)
        c.tell("go")
        assert "lease ran out" in c.expect("fenced")
    with pytest.raises(shmchan.EndOfChannel):
        r.recv(timeout=0)  # nothing came after the end
    r.close()


def test_capacity_bounds_queued_bytes(url: str, name: str) -> None:
    ch = Channel.create(name, backend="redis", url=url, capacity=4096)
    ch.send_bytes(b"a" * 1500)
    ch.send_bytes(b"b" * 1500)
    with pytest.raises(shmchan.Full):
        ch.send_bytes(b"c" * 1500, timeout=0.1)
    with pytest.raises(shmchan.Full) as err:
        ch.send_many([b"d" * 500, b"e" * 1500], timeout=0.1)
    assert err.value.sent == 1
    assert ch.recv_bytes() == b"a" * 1500
    ch.send_bytes(b"c" * 1500)
    assert [len(ch.recv_bytes()) for _ in range(3)] == [1500, 500, 1500]
    big = b"z" * 100_000  # larger than the capacity: it fits an empty channel
    ch.send(big)
    assert ch.recv() == big
    ch.close()


def test_handles_pickle_to_other_processes(url: str, name: str) -> None:
    w = Channel.create(name, backend="redis", url=url, mode="w")
    r = Channel.open(name, backend="redis", url=url, mode="r")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        future = pool.submit(children.read_channel, r)
        w.send_many(range(50))
        w.close()
        assert future.result(timeout=60) == list(range(50))
    r.close()
