"""Channel modes, pipe-like end of stream, BrokenChannel, and select (issue 4).

Writers and readers run in child interpreters driven by the lines they print; the
parent synchronises on those lines and on shared counters, never on guessed sleeps
(producers pace themselves with sleeps only to shape the load).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import anyio
import pytest
from conftest import HELPER_THREADS, unique_name
from helpers.children import Child, child, consumers_waiting, fill, producers_waiting, wait_until

import shmchan
from shmchan import Channel
from shmchan._core import WAIT_SLICE

LATENCY = WAIT_SLICE / 2  # a wakeup that was missed would come at the end of a slice


pytestmark = pytest.mark.usefixtures("helper_threads_end")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    lib: str = request.param
    return lib


@contextmanager
def channels(backend: str, count: int, **kwargs: Any) -> Iterator[list[Channel]]:
    """``count`` fresh channels created with ``kwargs``; closed and removed afterwards."""
    names = [unique_name(backend) for _ in range(count)]
    with ExitStack() as stack:
        for n in names:
            stack.callback(_remove_quietly, n, backend)
        yield [stack.enter_context(Channel.create(n, backend=backend, **kwargs)) for n in names]


def _remove_quietly(name: str, backend: str) -> None:
    try:
        Channel.remove(name, backend=backend)
    except shmchan.ChannelNotFound:
        pass


# -- modes ------------------------------------------------------------------------------------


def test_read_only_handle_cannot_send(backend: str, name: str) -> None:
    with Channel.create(name, backend=backend, mode="r") as rx:
        assert rx.mode == "r"
        for call in (
            lambda: rx.send(1),
            lambda: rx.send_nowait(1),
            lambda: rx.send_bytes(b"x"),
            lambda: rx.send_bytes_nowait(b"x"),
        ):
            with pytest.raises(shmchan.WrongMode) as info:
                call()
            assert isinstance(info.value, io.UnsupportedOperation)


def test_write_only_handle_cannot_receive(backend: str, name: str) -> None:
    with Channel.create(name, backend=backend, mode="w") as tx:
        assert tx.mode == "w"
        tx.send("kept")
        for call in (tx.recv, tx.recv_nowait, tx.recv_bytes, tx.recv_bytes_nowait, lambda: next(iter(tx))):
            with pytest.raises(shmchan.WrongMode) as info:
                call()
            assert isinstance(info.value, io.UnsupportedOperation)
        with Channel.open(name, backend=backend, mode="r") as rx:
            assert rx.recv(timeout=5) == "kept"  # the failed receives consumed nothing


@pytest.mark.parametrize("mode", ["", "a", "wr", "r+", "rb", None])
def test_bad_modes_are_rejected(backend: str, name: str, mode: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        Channel.create(name, backend=backend, mode=mode)


def test_send_eof_on_a_read_write_handle(backend: str, name: str) -> None:
    with (
        Channel.create(name, backend=backend, mode="rw") as ch,
        Channel.open(name, backend=backend, mode="r") as rx,
    ):
        ch.send("a")
        ch.send("b")
        ch.send_eof()
        assert ch.mode == "r" and not ch.closed
        ch.send_eof()  # idempotent
        with pytest.raises(shmchan.WrongMode):
            ch.send("c")
        assert rx.recv(timeout=5) == "a"
        assert ch.recv(timeout=5) == "b"  # the handle still receives
        for handle in (rx, ch):
            start = time.monotonic()
            with pytest.raises(shmchan.EndOfChannel) as info:
                handle.recv()  # no timeout: must not block
            assert time.monotonic() - start < 0.1
            assert isinstance(info.value, EOFError)


def test_iteration_after_end_of_stream(backend: str, name: str) -> None:
    with Channel.create(name, backend=backend, mode="r") as rx:
        with Channel.open(name, backend=backend, mode="w") as tx:
            for i in range(5):
                tx.send(i)
        assert list(rx) == [0, 1, 2, 3, 4]
        assert list(rx) == []  # iterating again ends at once
        for call in (rx.recv, rx.recv_nowait, rx.recv_bytes, lambda: rx.recv(timeout=0)):
            with pytest.raises(shmchan.EndOfChannel):
                call()


def test_end_of_stream_is_not_reported_before_any_writer(backend: str, name: str) -> None:
    with Channel.create(name, backend=backend, mode="r") as rx:
        start = time.monotonic()
        with pytest.raises(shmchan.Empty):
            rx.recv(timeout=0.2)  # waits: no writer has opened it yet
        assert time.monotonic() - start >= 0.19
        with pytest.raises(shmchan.Empty):
            rx.recv_nowait()
        with Channel.open(name, backend=backend, mode="w"):
            pass
        with pytest.raises(shmchan.EndOfChannel):
            rx.recv(timeout=0.2)


def test_waiting_receiver_is_woken_into_end_of_stream(backend: str, name: str) -> None:
    """A receiver blocked without timeout on an empty channel ends when the last
    writer closes (it is woken, not left to time out)."""
    with Channel.create(name, backend=backend, mode="r") as rx:
        tx = Channel.open(name, backend=backend, mode="w")
        outcome: list[Any] = []

        def receive() -> None:
            try:
                rx.recv()
            except shmchan.EndOfChannel as exc:
                outcome.append(exc)

        thread = threading.Thread(target=receive)
        thread.start()
        try:
            wait_until(lambda: consumers_waiting(rx) > 0, 5, "the receiver to wait")
            start = time.monotonic()
            tx.close()
            thread.join(5)
            assert outcome and time.monotonic() - start < 0.2
        finally:
            tx.close()
            thread.join(5)


@pytest.mark.parametrize("side", ["recv", "send"])
def test_close_ends_a_wait_on_the_same_handle(backend: str, name: str, side: str) -> None:
    """A handle is thread-safe: closing it while another thread waits on it ends that
    wait with ClosedChannel (the handle was closed), not an error from its internals."""
    with Channel.create(name, capacity=4096, backend=backend, mode="rw") as ch:
        if side == "send":
            fill(ch)
        outcome: list[BaseException] = []

        def waiting() -> None:
            try:
                if side == "recv":
                    ch.recv(timeout=5)
                else:
                    ch.send_bytes(b"blocked", timeout=5)
            except BaseException as exc:  # noqa: BLE001 - checked below
                outcome.append(exc)

        thread = threading.Thread(target=waiting)
        thread.start()
        try:
            counter = consumers_waiting if side == "recv" else producers_waiting
            wait_until(lambda: counter(ch) > 0, 5, f"the {side} to wait")
            ch.close()
        finally:
            thread.join(10)
        assert len(outcome) == 1
        assert isinstance(outcome[0], shmchan.ClosedChannel), repr(outcome[0])


# -- end of stream across processes: 3 writers, 2 readers --------------------------------------

WRITER = """
    import sys, shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND, mode="w")
    print("open", flush=True)
    sys.stdin.readline()
    for i in range(N):
        ch.send((WID, i))
    print("sent", flush=True)
    if HOLD:
        sys.stdin.readline()  # keep the handle open until killed
    ch.close()
"""

SYNC_READER = """
    import json, time, shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND, mode="r")
    print("open", flush=True)
    got = [list(item) for item in ch]
    print("got", time.monotonic(), json.dumps(got), flush=True)
    ch.close()
"""

ASYNC_READER = """
    import json, time, anyio, shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND, mode="r")
    print("open", flush=True)

    async def main():
        async with ch.aio as stream:
            return [list(item) async for item in stream]

    got = anyio.run(main, backend=LIB)
    print("got", time.monotonic(), json.dumps(got), flush=True)
"""


def _reader_result(reader: Child, timeout: float) -> tuple[float, list[tuple[int, int]]]:
    line = reader.expect("got", timeout=timeout)
    _, stamp, data = line.split(" ", 2)
    return float(stamp), [tuple(item) for item in json.loads(data)]


@pytest.mark.parametrize("lib", ["asyncio", "trio"])
@pytest.mark.parametrize("ending", ["close", "sigkill"])
def test_readers_loops_end_after_everything_was_drained(
    backend: str, name: str, lib: str, ending: str
) -> None:
    n = 2000
    with Channel.create(name, capacity=1 << 14, backend=backend, mode="r"), ExitStack() as stack:
        readers = [
            stack.enter_context(child(SYNC_READER, NAME=name, BACKEND=backend)),
            stack.enter_context(child(ASYNC_READER, NAME=name, BACKEND=backend, LIB=lib)),
        ]
        writers = [
            stack.enter_context(
                child(WRITER, NAME=name, BACKEND=backend, N=n, WID=w, HOLD=ending == "sigkill" and w == 2)
            )
            for w in range(3)
        ]
        for c in readers + writers:
            c.expect("open", timeout=30)
        for w in writers:  # every writer has opened before any closes
            w.tell("go")
        for w in writers:
            w.expect("sent", timeout=30)
        if ending == "sigkill":
            killed = time.monotonic()
            writers[2].kill()  # it reported its sends, and never closes
        results = [_reader_result(r, timeout=15) for r in readers]
        for w in writers[:2] if ending == "sigkill" else writers:
            assert w.finish(timeout=10) == 0, w.stderr
        for r in readers:
            assert r.finish(timeout=10) == 0, r.stderr
    if ending == "sigkill":
        latest = max(stamp for stamp, _ in results)
        assert latest - killed < 3, f"the readers ended {latest - killed:.2f} s after the kill"
    got = [item for _, items in results for item in items]
    assert len(got) == len(set(got)), "an item was received twice"
    assert set(got) == {(w, i) for w in range(3) for i in range(n)}
    for _, items in results:  # each reader sees each writer's items in order
        for w in range(3):
            seq = [i for ww, i in items if ww == w]
            assert seq == sorted(seq)


# -- BrokenChannel ---------------------------------------------------------------------------


def test_broken_channel_at_once_when_readers_closed(backend: str, name: str) -> None:
    with Channel.create(name, capacity=1 << 14, backend=backend, mode="w") as tx:
        tx.send("before any reader")  # no reader yet: not broken (like a FIFO being opened)
        readers = [Channel.open(name, backend=backend, mode="r") for _ in range(2)]
        assert readers[0].recv(timeout=5) == "before any reader"
        readers[0].close()
        tx.send("one reader left")
        readers[1].close()
        for call in (
            lambda: tx.send("x"),
            lambda: tx.send_nowait("x"),
            lambda: tx.send_bytes(b"x"),
            lambda: tx.send("x", timeout=5),
        ):
            start = time.monotonic()
            with pytest.raises(shmchan.BrokenChannel) as info:
                call()
            assert time.monotonic() - start < 0.05
            assert isinstance(info.value, BrokenPipeError)


READER_TO_KILL = """
    import sys, shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND, mode="r")
    print("open", flush=True)
    if sys.stdin.readline().strip() == "close":
        ch.close()
        print("closed", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("how", ["close", "sigkill"])
def test_broken_channel_while_the_ring_has_room(backend: str, name: str, how: str) -> None:
    with (
        Channel.create(name, backend=backend, mode="w") as tx,
        child(READER_TO_KILL, NAME=name, BACKEND=backend) as reader,
    ):
        reader.expect("open")
        tx.send("first")
        if how == "close":
            reader.tell("close")
            reader.expect("closed")
        else:
            reader.kill()
        start = time.monotonic()
        sent = 0
        with pytest.raises(shmchan.BrokenChannel):
            while time.monotonic() - start < 5:
                tx.send(sent, timeout=5)
                sent += 1
                time.sleep(0.001)  # a paced writer: the 1 MiB ring never fills
        elapsed = time.monotonic() - start
        assert elapsed < (0.05 if how == "close" else 1.0), f"BrokenChannel after {elapsed:.2f} s"


@pytest.mark.parametrize("how", ["close", "sigkill"])
def test_broken_channel_while_blocked_on_a_full_ring(backend: str, name: str, how: str) -> None:
    with (
        Channel.create(name, capacity=4096, backend=backend, mode="w") as tx,
        child(READER_TO_KILL, NAME=name, BACKEND=backend) as reader,
    ):
        reader.expect("open")
        fill(tx)
        outcome: list[BaseException] = []
        ended = threading.Event()

        def blocked_send() -> None:
            try:
                tx.send_bytes(b"blocked", timeout=10)
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome.append(exc)
            ended.set()

        thread = threading.Thread(target=blocked_send)
        thread.start()
        try:
            wait_until(lambda: producers_waiting(tx) > 0, 5, "the send to block")
            start = time.monotonic()
            if how == "close":
                reader.tell("close")
                reader.expect("closed")
            else:
                reader.kill()
            assert ended.wait(5), "the blocked send did not end"
            elapsed = time.monotonic() - start
        finally:
            thread.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], shmchan.BrokenChannel), outcome
        assert elapsed < (0.3 if how == "close" else 1.0), f"BrokenChannel after {elapsed:.2f} s"


# -- select ------------------------------------------------------------------------------------


def test_select_returns_the_source_and_consumes_only_one(backend: str) -> None:
    with channels(backend, 3, capacity=4096) as (a, b, c):
        b.send("from b")
        c.send("from c")
        source, item = shmchan.select(a, b, c, timeout=5)
        # Either ready source may win (select rotates where it starts), never a.
        assert (source, item) in [(b, "from b"), (c, "from c")]
        other, left = (c, "from c") if source is b else (b, "from b")
        assert other.recv_nowait() == left  # untouched
        with pytest.raises(shmchan.Empty):
            source.recv_nowait()
        a.send_bytes(b"raw")
        assert shmchan.select(a, b, c, timeout=5) == (a, b"raw")


def _fill_both(a: Channel, b: Channel, n: int) -> None:
    for i in range(n):
        a.send(("a", i))
        b.send(("b", i))


def test_select_does_not_starve_a_ready_source(backend: str) -> None:
    """Like Go's select, a source that is always ready does not starve the others:
    with both sources holding items, repeated selects serve both."""
    with channels(backend, 2, capacity=1 << 16) as (a, b):
        _fill_both(a, b, 200)
        picks = [shmchan.select(a, b, timeout=5)[0] for _ in range(200)]
        served_b = sum(source is b for source in picks)
        assert 40 <= served_b <= 160, f"the second source was served {served_b} times out of 200"


@pytest.mark.anyio
async def test_aselect_does_not_starve_a_ready_source(backend: str) -> None:
    with channels(backend, 2, capacity=1 << 16) as (a, b):
        _fill_both(a, b, 200)
        picks = [(await shmchan.aselect(a, b))[0] for _ in range(200)]
        served_b = sum(source is b for source in picks)
        assert 40 <= served_b <= 160, f"the second source was served {served_b} times out of 200"


def test_select_timeout_zero_never_blocks(backend: str) -> None:
    with channels(backend, 3, capacity=4096) as chans:
        for _ in range(5):
            start = time.monotonic()
            with pytest.raises(shmchan.Empty):
                shmchan.select(*chans, timeout=0)
            assert time.monotonic() - start < 0.05
        start = time.monotonic()
        with pytest.raises(shmchan.Empty):
            shmchan.select(*chans, timeout=0.2)
        assert 0.19 <= time.monotonic() - start < 0.5


def test_select_bad_arguments(backend: str) -> None:
    with channels(backend, 1, capacity=4096) as (a,):
        with pytest.raises(ValueError):
            shmchan.select()
        with pytest.raises(TypeError):
            shmchan.select(a, "not a channel")
        with pytest.raises(ValueError):
            shmchan.select(a, timeout=-1)


def test_select_over_queues_and_channels_mixed(backend: str) -> None:
    names = [unique_name(backend) for _ in range(2)]
    queues = [shmchan.Queue(name=n, backend=backend) for n in names]
    try:
        with channels(backend, 2, capacity=4096) as (c1, c2):
            q1, q2 = queues
            sources = (q1, c1, q2, c2)
            q2.put({"q": 2})
            assert shmchan.select(*sources, timeout=5) == (q2, {"q": 2})
            c2.send("c2")
            q1.put("q1")
            got = [shmchan.select(*sources, timeout=5) for _ in range(2)]
            assert sorted(got, key=repr) == sorted([(c2, "c2"), (q1, "q1")], key=repr)
            with pytest.raises(shmchan.Empty):
                shmchan.select(*sources, timeout=0)
            assert all(q.empty() for q in queues)
    finally:
        for q in queues:
            q.close()
        for n in names:
            _remove_quietly(n, backend)


def test_select_at_end_of_stream(backend: str) -> None:
    with channels(backend, 3, capacity=4096, mode="r") as (a, b, c):
        for ch in (a, b):
            with Channel.open(ch.name, backend=backend, mode="w") as tx:
                tx.send(f"last of {ch.name}")
        assert {shmchan.select(a, b, timeout=5)[1] for _ in range(2)} == {
            f"last of {a.name}",
            f"last of {b.name}",
        }
        start = time.monotonic()
        with pytest.raises(shmchan.EndOfChannel):
            shmchan.select(a, b)  # no timeout: every source is at end of stream, so it must not wait
        assert time.monotonic() - start < 0.1
        with pytest.raises(shmchan.Empty):
            shmchan.select(a, b, c, timeout=0.1)  # c never had a writer: it may still get one
        with Channel.open(c.name, backend=backend, mode="w") as tx:
            tx.send("c")
        assert shmchan.select(a, b, c, timeout=5) == (c, "c")
        with pytest.raises(shmchan.EndOfChannel):
            shmchan.select(a, b, c, timeout=5)


def test_select_is_woken_promptly_by_any_source(backend: str) -> None:
    """A select woken by the second or third source returns within milliseconds, not at
    the end of a wait slice."""
    with channels(backend, 3, capacity=4096) as chans:
        for trial in range(6):
            target = chans[1 + trial % 2]
            result: list[tuple[float, Any]] = []

            def selecting(result: list[tuple[float, Any]] = result) -> None:
                found = shmchan.select(*chans, timeout=10)
                result.append((time.monotonic(), found))

            thread = threading.Thread(target=selecting)
            thread.start()
            try:
                wait_until(lambda t=target: consumers_waiting(t) > 0, 5, "select to wait")
                sent = time.monotonic()
                target.send(trial)
                thread.join(5)
            finally:
                thread.join(5)
            assert result, "select did not return"
            returned, found = result[0]
            assert found == (target, trial)
            assert returned - sent < LATENCY, f"select returned {returned - sent:.3f} s after the send"


PRODUCER = """
    import time, shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND, mode="w")
    for i in range(N):
        ch.send((SRC, i))
        if PAUSE:
            time.sleep(PAUSE)  # this producer's rate: load shape, not synchronization
    ch.close()
    print("done", flush=True)
"""

RATES = [(0, 3000), (0.001, 300), (0.005, 60)]  # (pause between sends, items)


@contextmanager
def paced_producers(backend: str, chans: list[Channel]) -> Iterator[list[Child]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(child(PRODUCER, NAME=ch.name, BACKEND=backend, SRC=src, N=n, PAUSE=pause))
            for src, (ch, (pause, n)) in enumerate(zip(chans, RATES, strict=True))
        ]


def check_selected(chans: list[Channel], got: list[tuple[Channel, Any]]) -> None:
    for src, (ch, (_, n)) in enumerate(zip(chans, RATES, strict=True)):
        items = [item for source, item in got if source is ch]
        assert [tuple(x) for x in items] == [(src, i) for i in range(n)], f"source {src}"
    assert len(got) == sum(n for _, n in RATES)


def test_select_three_channels_at_different_rates(backend: str) -> None:
    with (
        channels(backend, 3, capacity=1 << 14, mode="r") as chans,
        paced_producers(backend, chans) as producers,
    ):
        got: list[tuple[Channel, Any]] = []
        deadline = time.monotonic() + 60
        while True:
            try:
                got.append(shmchan.select(*chans, timeout=max(0, deadline - time.monotonic())))
            except shmchan.EndOfChannel:
                break
        for p in producers:
            p.expect("done")
            assert p.finish(timeout=10) == 0, p.stderr
        check_selected(chans, got)


@pytest.mark.anyio
async def test_aselect_three_channels_at_different_rates(backend: str) -> None:
    with (
        channels(backend, 3, capacity=1 << 14, mode="r") as chans,
        paced_producers(backend, chans) as producers,
    ):
        got: list[tuple[Channel, Any]] = []
        with anyio.fail_after(60):
            while True:
                try:
                    got.append(await shmchan.aselect(*chans))
                except shmchan.EndOfChannel:
                    break
        for p in producers:
            p.expect("done")
            assert p.finish(timeout=10) == 0, p.stderr
        check_selected(chans, got)


@pytest.mark.anyio
async def test_aselect_basics(backend: str) -> None:
    names = [unique_name(backend)]
    q = shmchan.Queue(name=names[0], backend=backend)
    try:
        with channels(backend, 2, capacity=4096) as (a, b):
            q.put("q")
            b.send("b")
            got = [await shmchan.aselect(a, q, b) for _ in range(2)]
            assert sorted(got, key=repr) == sorted([(q, "q"), (b, "b")], key=repr)
            with anyio.move_on_after(0.2) as scope:
                await shmchan.aselect(a, q, b)
            assert scope.cancelled_caught
            a.send("a")  # the cancelled aselect consumed nothing
            assert await shmchan.aselect(a, q, b) == (a, "a")
            assert q.empty()
            deadline = time.monotonic() + 0.6  # its helper threads end within a wait slice
            while any(t.name in HELPER_THREADS for t in threading.enumerate()):
                assert time.monotonic() < deadline, "aselect left helper threads running"
                await anyio.sleep(0.005)
            with pytest.raises(ValueError):
                await shmchan.aselect()
    finally:
        q.close()
        _remove_quietly(names[0], backend)


@pytest.mark.anyio
async def test_aselect_at_end_of_stream(backend: str) -> None:
    with channels(backend, 2, capacity=4096, mode="r") as (a, b):
        for ch in (a, b):
            Channel.open(ch.name, backend=backend, mode="w").close()
        with anyio.fail_after(1):
            with pytest.raises(shmchan.EndOfChannel):
                await shmchan.aselect(a, b)


@pytest.mark.anyio
async def test_aselect_is_woken_promptly_by_any_source(backend: str) -> None:
    with channels(backend, 3, capacity=4096) as chans:
        for trial in range(6):
            target = chans[1 + trial % 2]
            result: list[tuple[float, Any]] = []

            async def selecting(result: list[tuple[float, Any]] = result) -> None:
                found = await shmchan.aselect(*chans)
                result.append((time.monotonic(), found))

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(selecting)
                    deadline = time.monotonic() + 5
                    while consumers_waiting(target) == 0:
                        assert time.monotonic() < deadline, "aselect did not wait"
                        await anyio.sleep(0.002)
                    sent = time.monotonic()
                    await anyio.to_thread.run_sync(target.send, trial)
            returned, found = result[0]
            assert found == (target, trial)
            assert returned - sent < LATENCY, f"aselect returned {returned - sent:.3f} s after the send"
