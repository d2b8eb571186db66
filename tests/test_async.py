"""The async face (issue 4): ``q.async_q``, ``ch.aio`` and the example, on asyncio and trio.

Every async test runs once per event loop library (the ``anyio_backend`` fixture below)
and, where it takes ``backend``, once per storage backend. Waits are bounded by cancel
scopes; the tests synchronise on shared counters, events and lines printed by child
processes, never on guessed sleeps (a producer's pacing sleeps only shape the load).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import queue
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from conftest import leaks_since, snapshot, unique_name
from helpers.children import (
    child,
    consumers_waiting,
    fill,
    joiners_waiting,
    producers_waiting,
    side_entries,
    side_objects,
)
from helpers.procs import ROOT, child_env

import shmchan
from shmchan import Channel
from shmchan._core import WAIT_SLICE

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("helper_threads_end")]

SPAWN = mp.get_context("spawn")
WAIT_THREAD = "shmchan-async-wait"
DEFAULT = shmchan.DEFAULT_BACKEND
THREADS_GONE_WITHIN = 0.6  # a helper thread sleeps at most one wait slice (0.1 s)
LATENCY = WAIT_SLICE / 2  # a wakeup that was missed would come at the end of a slice


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    lib: str = request.param
    return lib


@pytest.fixture
def default_name() -> Iterator[str]:
    """A unique channel name on the default backend (for tests too heavy for all three)."""
    chan = unique_name(DEFAULT)
    yield chan
    try:
        Channel.remove(chan, backend=DEFAULT)
    except shmchan.ChannelNotFound:
        pass


# -- helpers ---------------------------------------------------------------------------------


def wait_threads() -> int:
    return sum(t.name == WAIT_THREAD for t in threading.enumerate())


def assert_wait_threads_gone(timeout: float = THREADS_GONE_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while wait_threads():
        if time.monotonic() >= deadline:
            names = [t.name for t in threading.enumerate()]
            pytest.fail(f"{wait_threads()} {WAIT_THREAD!r} threads still alive after {timeout} s: {names}")
        time.sleep(0.005)


async def async_wait_threads_gone(timeout: float = THREADS_GONE_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while wait_threads():
        if time.monotonic() >= deadline:
            pytest.fail(f"{wait_threads()} {WAIT_THREAD!r} threads still alive after {timeout} s")
        await anyio.sleep(0.005)


async def async_wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition (a shared counter, a task's progress) with a deadline."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.002)


@contextmanager
def queue_named(backend: str, name: str, cls: Any = shmchan.Queue, **kwargs: Any) -> Iterator[Any]:
    q = cls(name=name, backend=backend, **kwargs)
    try:
        yield q
    finally:
        q.close()


# -- async_q: the asyncio.Queue-shaped view --------------------------------------------------


async def test_async_q_nowait_sizes_and_exceptions(backend: str, name: str) -> None:
    with queue_named(backend, name, maxsize=2) as q:
        aq = q.async_q
        assert q.async_q is aq  # one view per handle
        assert aq.maxsize == 2
        assert aq.empty() and not aq.full() and aq.qsize() == 0
        with pytest.raises(asyncio.QueueEmpty) as empty:
            aq.get_nowait()
        assert isinstance(empty.value, queue.Empty)
        assert isinstance(empty.value, shmchan.Empty)
        aq.put_nowait("a")
        await aq.put({"b": [1, 2]})
        assert aq.qsize() == 2 and aq.full() and not aq.empty()
        with pytest.raises(asyncio.QueueFull) as full:
            aq.put_nowait("c")
        assert isinstance(full.value, queue.Full)
        assert isinstance(full.value, shmchan.Full)
        assert q.qsize() == 2  # the failed put_nowait queued nothing
        assert await aq.get() == "a"
        assert aq.get_nowait() == {"b": [1, 2]}
        assert aq.empty() and aq.qsize() == 0


async def test_async_q_interoperates_with_sync_handles(backend: str, name: str) -> None:
    with queue_named(backend, name) as q, queue_named(backend, name, cls=shmchan.Queue.open) as other:
        big = bytes(range(256)) * 20_000  # 5 MB: larger than the 4 MiB ring (side segment)
        other.put(1)
        other.put(big)
        assert await q.async_q.get() == 1
        assert await q.async_q.get() == big
        await q.async_q.put(("back", big))
        assert other.get(timeout=5) == ("back", big)


async def test_async_q_on_a_simple_queue(backend: str, name: str) -> None:
    with queue_named(backend, name, cls=shmchan.SimpleQueue) as q:
        await q.async_q.put([1, 2, 3])
        assert not q.async_q.empty()
        assert await q.async_q.get() == [1, 2, 3]


async def test_async_q_on_a_closed_queue_raises_value_error(backend: str, name: str) -> None:
    q = shmchan.Queue(name=name, backend=backend)
    aq = q.async_q
    q.close()
    with pytest.raises(ValueError):
        await aq.put(1)
    with pytest.raises(ValueError):
        await aq.get()


async def test_async_batches(backend: str, name: str) -> None:
    """put_many/get_many on the async face: the sync calls' semantics, and a batch
    bigger than the ring waits for room without blocking the loop."""
    with (
        queue_named(backend, name, capacity=4096) as q,
        queue_named(backend, name, cls=shmchan.Queue.open) as other,
    ):
        await q.async_q.put_many([1, ("two", 2.0), b"three"])
        assert other.get_many(10, timeout=5) == [1, ("two", 2.0), b"three"]
        other.put_many(range(5))
        assert await q.async_q.get_many(3) == [0, 1, 2]
        assert await q.async_q.get_many(10) == [3, 4]
        items = [bytes([i]) * 300 for i in range(100)]  # about 8 rings' worth
        got: list[bytes] = []
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(q.async_q.put_many, items)
                while len(got) < len(items):
                    got += await anyio.to_thread.run_sync(other.get_many, 7, True, 10)
        assert got == items
        with pytest.raises(ValueError):
            await q.async_q.get_many(0)


async def test_cancelled_async_batches_lose_nothing(backend: str, name: str) -> None:
    with (
        queue_named(backend, name, capacity=4096) as q,
        queue_named(backend, name, cls=shmchan.Queue.open) as other,
    ):
        with anyio.move_on_after(0.2) as scope:  # an empty queue: the get_many waits
            await q.async_q.get_many(5)
        assert scope.cancelled_caught
        other.put("kept")
        assert other.get_many(5, timeout=5) == ["kept"]  # the cancelled get took nothing
        items = [bytes([i]) * 1000 for i in range(10)]  # more than the ring holds
        with anyio.move_on_after(0.2) as scope:
            await q.async_q.put_many(items)
        assert scope.cancelled_caught
        sent = other.get_many(100, timeout=5)
        assert 0 < len(sent) < len(items) and sent == items[: len(sent)]  # a prefix, in order
        with pytest.raises(shmchan.Empty):
            other.get_many(100, timeout=0.1)  # and nothing more arrives later


async def test_task_done_and_join(backend: str, name: str) -> None:
    with queue_named(backend, name, cls=shmchan.JoinableQueue) as q:
        aq = q.async_q
        with anyio.fail_after(10):
            await aq.join()  # nothing unfinished: returns at once
            for i in range(3):
                await aq.put(i)
            joined = anyio.Event()

            async def joiner() -> None:
                await aq.join()
                joined.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(joiner)
                await async_wait_until(lambda: joiners_waiting(q) > 0, 5, "join() to wait")
                for i in range(3):
                    assert not joined.is_set()
                    assert await aq.get() == i
                    aq.task_done()
                    await anyio.lowlevel.checkpoint()
                await joined.wait()
            with pytest.raises(ValueError):
                aq.task_done()  # more task_done() than items


async def test_join_waits_for_another_process(backend: str, name: str) -> None:
    with queue_named(backend, name, cls=shmchan.JoinableQueue) as q:
        for i in range(50):
            q.async_q.put_nowait(i)
        code = """
            import shmchan
            q = shmchan.JoinableQueue.open(NAME, backend=BACKEND)
            print("open", flush=True)
            input()
            for _ in range(50):
                q.get(timeout=10)
                q.task_done()
            q.close()
            print("done", flush=True)
        """
        with child(code, NAME=name, BACKEND=backend) as c:
            await anyio.to_thread.run_sync(c.expect, "open")
            done = False

            async def joiner() -> None:
                nonlocal done
                await q.async_q.join()
                done = True

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(joiner)
                    await async_wait_until(lambda: joiners_waiting(q) > 0, 5, "join() to wait")
                    assert not done
                    c.tell("go")
            assert done
            await anyio.to_thread.run_sync(c.expect, "done")
            assert q.async_q.empty()


async def test_join_needs_a_joinable_queue(name: str, backend: str) -> None:
    with queue_named(backend, name) as q, pytest.raises(AttributeError):
        await q.async_q.join()


async def test_fast_path_costs_no_thread(
    backend: str, name: str, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    from shmchan import _async

    hops: list[int] = []
    original = _async._sleep_request

    def counting(*args: Any) -> None:
        hops.append(1)
        original(*args)

    monkeypatch.setattr(_async, "_sleep_request", counting)
    with queue_named(backend, name) as q:
        for i in range(200):
            await q.async_q.put(i)
        for i in range(200):
            assert await q.async_q.get() == i
        assert hops == []
        with anyio.move_on_after(0.05):  # the queue is empty: now it must wait
            await q.async_q.get()
        assert hops


async def test_a_waiting_get_does_not_block_the_loop(backend: str, name: str) -> None:
    with queue_named(backend, name) as q, queue_named(backend, name, cls=shmchan.Queue.open) as other:
        ticks = 0
        got: list[Any] = []

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.lowlevel.checkpoint()

        async def getter() -> None:
            got.append(await q.async_q.get())

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                tg.start_soon(getter)
                await async_wait_until(lambda: consumers_waiting(q) > 0, 5, "the get to wait")
                start = ticks
                await async_wait_until(lambda: ticks > start + 1000, 5, "the other task to run")
                assert got == []  # the get is still waiting, and the loop kept running
                await anyio.to_thread.run_sync(other.put, "from a thread")
                await async_wait_until(lambda: bool(got), 5, "the get to return")
                tg.cancel_scope.cancel()
        assert got == ["from a thread"]


@pytest.mark.parametrize("face", ["get", "put", "receive", "send"])
async def test_a_waiting_task_is_woken_promptly(backend: str, name: str, face: str) -> None:
    """A wait ends within milliseconds of the data (or room) arriving from another
    thread, not at the end of a wait slice."""
    with contextlib.ExitStack() as stack:
        if face in ("get", "put"):
            mine = stack.enter_context(queue_named(backend, name, maxsize=1))
            other = stack.enter_context(queue_named(backend, name, cls=shmchan.Queue.open))
        else:
            mine = stack.enter_context(Channel.create(name, capacity=4096, backend=backend))
            other = stack.enter_context(Channel.open(name, backend=backend))
        for trial in range(5):
            done: list[float] = []
            if face == "get":
                wait, counter, unblock = mine.async_q.get, consumers_waiting, partial(other.put, trial)
            elif face == "put":
                other.put(("full", trial))
                wait, counter, unblock = partial(mine.async_q.put, trial), producers_waiting, other.get
            elif face == "receive":
                wait, counter, unblock = mine.aio.receive, consumers_waiting, partial(other.send, trial)
            else:
                fill(other)
                wait, counter, unblock = partial(mine.aio.send, trial), producers_waiting, other.recv_nowait

            async def waiter(wait: Callable[[], Any] = wait, done: list[float] = done) -> None:
                await wait()
                done.append(time.monotonic())

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiter)
                    await async_wait_until(lambda c=counter: c(mine) > 0, 5, f"the {face} to wait")
                    start = time.monotonic()
                    await anyio.to_thread.run_sync(unblock)
            assert done[0] - start < LATENCY, f"{face} returned {done[0] - start:.3f} s after it could"
            if face == "get":
                assert other.empty()
            elif face == "put":
                assert other.get_nowait() == trial
            elif face == "send":
                assert drain(other)[-1] == trial  # after the rest of the filling


def drain(ch: Channel) -> list[Any]:
    """Receive everything the channel holds now."""
    out = []
    while True:
        try:
            out.append(ch.recv_nowait())
        except shmchan.Empty:
            return out


async def test_a_waiting_get_is_woken_by_another_process(backend: str, name: str) -> None:
    code = """
        import shmchan
        q = shmchan.Queue.open(NAME, backend=BACKEND)
        input()
        q.put("from a process")
        q.close()
        print("put", flush=True)
    """
    with queue_named(backend, name) as q, child(code, NAME=name, BACKEND=backend) as c:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                got: list[str] = []

                async def getter() -> None:
                    got.append(await q.async_q.get())

                tg.start_soon(getter)
                await async_wait_until(lambda: consumers_waiting(q) > 0, 5, "the get to wait")
                c.tell("go")
            assert got == ["from a process"]


async def test_a_thousand_tasks_wait_on_one_queue(backend: str, name: str) -> None:
    n = 1000
    with queue_named(backend, name) as q, queue_named(backend, name, cls=shmchan.Queue.open) as other:
        entered = 0
        got: list[int] = []
        most_threads = 0

        async def getter() -> None:
            nonlocal entered
            entered += 1
            got.append(await q.async_q.get())

        def put_all() -> None:
            for i in range(n):
                other.put(i)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(getter)
                await async_wait_until(lambda: entered == n and consumers_waiting(q) > 0, 10, "every get")
                # Watch the helper threads for more than two wait slices while all wait.
                end = time.monotonic() + 0.6
                while time.monotonic() < end:
                    most_threads = max(most_threads, wait_threads())
                    await anyio.sleep(0.01)
                assert got == []
                await anyio.to_thread.run_sync(put_all)
                while len(got) < n:
                    most_threads = max(most_threads, wait_threads())
                    await anyio.sleep(0.01)
        assert sorted(got) == list(range(n))
        assert 1 <= most_threads <= 4, f"{most_threads} helper threads for {n} waiting tasks"
    await async_wait_threads_gone()


async def test_a_thousand_tasks_wait_on_one_channel(default_name: str) -> None:
    backend, name = DEFAULT, default_name
    n = 1000
    with (
        Channel.create(name, backend=backend, mode="r") as rx,
        Channel.open(name, backend=backend, mode="w") as tx,
    ):
        got: list[int] = []
        entered = 0

        async def receiver() -> None:
            nonlocal entered
            entered += 1
            got.extend([item async for item in rx.aio])  # ends at end of stream

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(receiver)
                await async_wait_until(lambda: entered == n and consumers_waiting(rx) > 0, 10, "receivers")
                assert wait_threads() <= 4

                def send_all() -> None:
                    for i in range(n):
                        tx.send(i)
                    tx.close()  # end of stream: every waiting receiver's loop ends

                await anyio.to_thread.run_sync(send_all)
        assert sorted(got) == list(range(n))


# -- timeouts and cancellation ---------------------------------------------------------------


async def test_fail_after_and_move_on_after(backend: str, name: str) -> None:
    with queue_named(backend, name, maxsize=1) as q:
        aq = q.async_q
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.2):
                await aq.get()
        assert 0.19 <= time.monotonic() - start < 0.6
        with anyio.move_on_after(0.1) as scope:
            await aq.get()
        assert scope.cancelled_caught
        await aq.put("only")
        start = time.monotonic()
        with anyio.move_on_after(0.2) as scope:
            await aq.put("no room")
        assert scope.cancelled_caught
        assert 0.19 <= time.monotonic() - start < 0.6
        assert aq.qsize() == 1  # nothing consumed, nothing added
        assert aq.get_nowait() == "only"
        with pytest.raises(asyncio.QueueEmpty):
            aq.get_nowait()
    await async_wait_threads_gone()


async def test_native_timeouts(anyio_backend: str, backend: str, name: str) -> None:
    """``asyncio.wait_for`` on asyncio, ``trio.move_on_after`` / ``trio.fail_after`` on trio."""
    with queue_named(backend, name, maxsize=1) as q:
        aq = q.async_q
        start = time.monotonic()
        if anyio_backend == "asyncio":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(aq.get(), 0.2)
            await aq.put("x")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(aq.put("y"), 0.2)
            assert await asyncio.wait_for(aq.get(), 5) == "x"
        else:
            import trio

            with trio.move_on_after(0.2) as scope:
                await aq.get()
            assert scope.cancelled_caught
            await aq.put("x")
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(0.2):
                    await aq.put("y")
            with trio.fail_after(5):
                assert await aq.get() == "x"
        assert 0.39 <= time.monotonic() - start < 2
        assert aq.empty()
    await async_wait_threads_gone()


async def test_cancelled_large_sends_leave_no_side_entry_in_use(backend: str, name: str) -> None:
    """A message larger than the ring is written to an entry of the channel's side pool
    before it is queued; cancelling its send gives the entry back and the message never
    arrives. The pool's objects (at most ``side_slots``) stay until the channel is
    removed, and are then gone (the autouse leak check)."""
    big = b"x" * 100_000
    with (
        queue_named(backend, name, maxsize=1, capacity=4096) as q,
        Channel.create(unique_name(backend), capacity=4096, backend=backend) as ch,
    ):
        try:
            q.put_nowait("full")
            fill(ch)
            for send, handle in ((q.async_q.put, q), (ch.aio.send, ch)):
                before = snapshot()
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(send, big)
                        await async_wait_until(
                            lambda h=handle: producers_waiting(h) > 0, 5, "the send to wait"
                        )
                        assert leaks_since(before)  # the side object exists while it waits
                        assert side_objects(handle)
                        during = snapshot()
                        tg.cancel_scope.cancel()
                assert [e["state"] for e in side_entries(handle)] == ["free"] * handle._core.side_slots
                assert not leaks_since(during)  # nothing new, and the pool object is kept for reuse
                assert len(side_objects(handle)) <= handle._core.side_slots
            assert q.get_nowait() == "full"
            with pytest.raises(queue.Empty):
                q.get_nowait()
            # The pool is reused: the same big message goes through now there is room.
            await q.async_q.put(big)
            assert q.get_nowait() == big
            rest = drain(ch)
            assert rest and all(item != big for item in rest)  # only the filling arrived
            await ch.aio.send(big)
            assert ch.recv_nowait() == big
            assert [e["state"] for e in side_entries(ch)] == ["free"] * ch._core.side_slots
        finally:
            ch.unlink()


async def test_no_helper_threads_after_cancellation(backend: str, name: str) -> None:
    with queue_named(backend, name, maxsize=1) as q:
        await async_wait_threads_gone(2)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(q.async_q.get)
                await async_wait_until(lambda: wait_threads() > 0, 5, "a helper thread to start")
                tg.cancel_scope.cancel()
            await async_wait_threads_gone()
            q.put_nowait(1)
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(q.async_q.put, i)
                await async_wait_until(lambda: wait_threads() > 0, 5, "a helper thread to start")
                tg.cancel_scope.cancel()
        await async_wait_threads_gone()
        assert q.get_nowait() == 1
        with pytest.raises(queue.Empty):
            q.get_nowait()


def _loop_ends_with_waiters(lib: str, name: str, backend: str) -> None:
    """Run an event loop that ends while tasks wait on the queue and the channel."""
    q = shmchan.Queue.open(name, backend=backend)
    ch = Channel.create(unique_name(backend), backend=backend, mode="r")
    try:
        if lib == "asyncio":

            async def amain() -> None:
                leftover = [asyncio.create_task(q.async_q.get()) for _ in range(5)]
                leftover.append(asyncio.create_task(ch.aio.receive()))
                while wait_threads() == 0:
                    await asyncio.sleep(0.002)
                # return with the tasks still waiting: asyncio.run() cancels them

            asyncio.run(amain())
        else:
            import trio

            async def tmain() -> None:
                for _ in range(5):
                    trio.lowlevel.spawn_system_task(q.async_q.get)
                trio.lowlevel.spawn_system_task(ch.aio.receive)
                while wait_threads() == 0:
                    await trio.sleep(0.002)
                # return: trio.run() cancels the system tasks

            trio.run(tmain)
    finally:
        q.close()
        ch.close()
        Channel.remove(ch.name, backend=backend)


@pytest.mark.parametrize("lib", ["asyncio", "trio"])
def test_no_helper_threads_after_the_loop_ends(lib: str, backend: str, name: str) -> None:
    with queue_named(backend, name):
        assert_wait_threads_gone(2)
        _loop_ends_with_waiters(lib, name, backend)
        assert_wait_threads_gone()


# -- cancellation stress: never lose or duplicate a message ------------------------------------

STRESS_SEED = 20240604
BIG = 40_000  # larger than the stress queues' ring can hold: travels in a side segment


def stress_count(backend: str) -> int:
    return 10_000 if backend == DEFAULT else 2_000


def item_number(item: Any) -> int:
    return item if isinstance(item, int) else int(item[0])


def random_scope(rng: random.Random) -> anyio.CancelScope:
    """A cancel scope that is already cancelled, expires soon, or has no deadline."""
    roll = rng.random()
    if roll < 0.1:
        scope = anyio.CancelScope()
        scope.cancel()  # cancelled before the operation starts
        return scope
    if roll < 0.85:
        return anyio.move_on_after(rng.choice([0, 0.00005, 0.0002, 0.0005, 0.001, 0.002, 0.005]))
    return anyio.CancelScope()  # no deadline: only the final cancellation ends it


PACED_PRODUCER = """
    import random, time, shmchan
    q = shmchan.Queue.open(NAME, backend=BACKEND)
    rng = random.Random(SEED)
    print("open", flush=True)
    input()
    i = 0
    while i < N:
        for _ in range(rng.randint(1, 40)):
            if i == N:
                break
            q.put(i if i % 997 else (i, b"x" * BIG))  # now and then a side segment
            i += 1
        time.sleep(rng.choice([0, 0, 0.0002, 0.001, 0.002]))  # load shape, not synchronization
    q.close()
    print("done", flush=True)
"""


async def test_cancelled_receives_never_lose_or_duplicate(
    backend: str, name: str, anyio_backend: str
) -> None:
    n = stress_count(backend)
    tasks = 4
    with (
        queue_named(backend, name, maxsize=32, capacity=1 << 16) as q,
        child(PACED_PRODUCER, NAME=name, BACKEND=backend, SEED=STRESS_SEED, N=n, BIG=BIG) as producer,
    ):
        await anyio.to_thread.run_sync(producer.expect, "open")
        got: list[list[int]] = [[] for _ in range(tasks)]
        attempts = cancelled = 0
        finished = anyio.Event()

        async def receiver(k: int) -> None:
            nonlocal attempts, cancelled
            rng = random.Random(STRESS_SEED + k)
            while True:
                attempts += 1
                with random_scope(rng) as scope:
                    item = await q.async_q.get()
                    got[k].append(item_number(item))
                    if isinstance(item, tuple):
                        assert item[1] == b"x" * BIG
                    if sum(map(len, got)) == n:
                        finished.set()
                if scope.cancelled_caught:
                    cancelled += 1

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for k in range(tasks):
                    tg.start_soon(receiver, k)
                producer.tell("go")
                await finished.wait()
                tg.cancel_scope.cancel()
            await anyio.to_thread.run_sync(producer.expect, "done")
        everything = sorted(x for part in got for x in part)
        assert everything == list(range(n)), "a message was lost or duplicated"
        for part in got:
            assert part == sorted(part)  # each task's gets are FIFO
        assert attempts >= n
        # A receive that finds an item at once may return it even in a scope cancelled
        # beforehand (paced checkpoints, shmchan/_async.py), so most cancellations land
        # in waits; dozens of them are the point of this test.
        assert cancelled >= 40, f"only {cancelled} of {attempts} receives were cancelled"
        assert q.qsize() == 0
        with pytest.raises(queue.Empty):
            q.get_nowait()  # nothing put back late


PACED_CONSUMER = """
    import json, random, time, shmchan
    q = shmchan.Queue.open(NAME, backend=BACKEND)
    rng = random.Random(SEED)
    print("open", flush=True)
    got = []
    while True:
        item = q.get(timeout=60)
        if item is None:
            break
        got.append(item if isinstance(item, int) else item[0])
        if rng.random() < 0.03:
            time.sleep(rng.choice([0.0002, 0.001, 0.002]))  # load shape, not synchronization
    q.close()
    print("got", json.dumps(got), flush=True)
"""


async def test_cancelled_sends_never_lose_or_duplicate(backend: str, name: str, anyio_backend: str) -> None:
    n = stress_count(backend)
    tasks = 4
    with (
        queue_named(backend, name, maxsize=16, capacity=1 << 16) as q,
        child(PACED_CONSUMER, NAME=name, BACKEND=backend, SEED=STRESS_SEED) as consumer,
    ):
        await anyio.to_thread.run_sync(consumer.expect, "open")
        sent: list[list[int]] = [[] for _ in range(tasks)]
        attempts = cancelled = 0
        finished = anyio.Event()

        async def sender(k: int) -> None:
            nonlocal attempts, cancelled
            rng = random.Random(STRESS_SEED + k)
            number = k
            while True:
                attempts += 1
                item: Any = number if number % 997 else (number, b"x" * BIG)
                with random_scope(rng) as scope:
                    await q.async_q.put(item)
                    sent[k].append(number)
                    if sum(map(len, sent)) >= n:
                        finished.set()
                if scope.cancelled_caught:
                    cancelled += 1
                number += tasks  # a cancelled number is never sent again

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for k in range(tasks):
                    tg.start_soon(sender, k)
                await finished.wait()
                tg.cancel_scope.cancel()
            await q.async_q.put(None)
            line = await anyio.to_thread.run_sync(consumer.expect, "got", 60)
        received = json.loads(line[len("got ") :])
        assert len(received) == len(set(received)), "a message was received twice"
        assert sorted(received) == sorted(x for part in sent for x in part), (
            "the received messages are not exactly the successfully sent ones"
        )
        for k in range(tasks):
            assert [x for x in received if x % tasks == k] == sent[k]  # each task's puts in order
        assert cancelled >= 40, f"only {cancelled} of {attempts} sends were cancelled"  # as above


async def test_cancelled_channel_receives_never_lose_or_duplicate(default_name: str) -> None:
    """The same guarantee through ``ch.aio``, ending at end of stream."""
    backend, name = DEFAULT, default_name
    n = 5_000
    code = """
        import random, time, shmchan
        ch = shmchan.Channel.open(NAME, backend=BACKEND, mode="w")
        rng = random.Random(SEED)
        print("open", flush=True)
        input()
        for i in range(N):
            ch.send(i)
            if rng.random() < 0.05:
                time.sleep(rng.choice([0.0002, 0.001]))  # load shape, not synchronization
        ch.close()
        print("done", flush=True)
    """
    with (
        Channel.create(name, capacity=4096, backend=backend, mode="r") as rx,
        child(code, NAME=name, BACKEND=backend, SEED=STRESS_SEED, N=n) as writer,
    ):
        await anyio.to_thread.run_sync(writer.expect, "open")
        got: list[int] = []
        cancelled = 0
        rng = random.Random(STRESS_SEED)
        writer.tell("go")
        with anyio.fail_after(60):
            while True:
                with random_scope(rng) as scope:
                    try:
                        got.append(await rx.aio.receive())
                    except anyio.EndOfStream:
                        break
                if scope.cancelled_caught:
                    cancelled += 1
        assert got == list(range(n))
        assert cancelled >= 50


# -- cross-process faces: sync <-> async through a Queue, 200 000 messages -------------------------


def _sync_producer(name: str, backend: str, n: int) -> None:
    q = shmchan.Queue.open(name, backend=backend)
    for i in range(n):
        q.put(i)
    q.close()


def _async_consumer(name: str, backend: str, n: int, lib: str, report: Connection) -> None:
    q = shmchan.Queue.open(name, backend=backend)

    async def main() -> tuple[str, int, Any]:
        aq = q.async_q
        with anyio.fail_after(90):
            for expected in range(n):
                item = await aq.get()
                if item != expected:
                    return ("out of order", expected, item)
        return ("ok", n, None)

    try:
        report.send(anyio.run(main, backend=lib))
    finally:
        q.close()


def _async_producer(name: str, backend: str, n: int, lib: str) -> None:
    q = shmchan.Queue.open(name, backend=backend)

    async def main() -> None:
        aq = q.async_q
        with anyio.fail_after(90):
            for i in range(n):
                await aq.put(i)

    try:
        anyio.run(main, backend=lib)
    finally:
        q.close()


def _sync_consumer(name: str, backend: str, n: int, report: Connection) -> None:
    q = shmchan.Queue.open(name, backend=backend)
    try:
        for expected in range(n):
            item = q.get(timeout=90)
            if item != expected:
                report.send(("out of order", expected, item))
                return
        report.send(("ok", n, None))
    finally:
        q.close()


def _run_pair(targets: list[tuple[Callable[..., None], tuple[Any, ...]]], report: Connection) -> Any:
    procs = [SPAWN.Process(target=target, args=args) for target, args in targets]
    for p in procs:
        p.start()
    try:
        assert report.poll(90), "the consumer did not report"
        result = report.recv()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        return result
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)


@pytest.mark.parametrize("lib", ["asyncio", "trio"])
@pytest.mark.parametrize("direction", ["sync-to-async", "async-to-sync"])
def test_sync_and_async_processes_share_a_queue(backend: str, name: str, lib: str, direction: str) -> None:
    n = 200_000 if backend == DEFAULT else 20_000
    with queue_named(backend, name, maxsize=1000) as q:
        receive_end, send_end = SPAWN.Pipe(duplex=False)
        with receive_end, send_end:
            if direction == "sync-to-async":
                targets = [
                    (_sync_producer, (name, backend, n)),
                    (_async_consumer, (name, backend, n, lib, send_end)),
                ]
            else:
                targets = [
                    (_async_producer, (name, backend, n, lib)),
                    (_sync_consumer, (name, backend, n, send_end)),
                ]
            assert _run_pair(targets, receive_end) == ("ok", n, None)
        assert q.empty()  # exactly n: nothing extra is left behind


# -- ch.aio: a Channel as an anyio ObjectStream ------------------------------------------------


async def test_channel_stream_round_trip(backend: str, name: str) -> None:
    with (
        Channel.create(name, capacity=1 << 16, backend=backend, mode="w") as tx,
        Channel.open(name, backend=backend, mode="r") as rx,
    ):
        assert isinstance(tx.aio, anyio.abc.ObjectStream)
        assert tx.aio.channel is tx
        big = b"y" * 200_000  # larger than the ring: a side segment
        items: list[Any] = [1, "two", {"three": [3]}, b"four", big, None]
        with anyio.fail_after(10):
            for item in items:
                await tx.aio.send(item)
            tx.send_bytes(b"raw")
            for item in items:
                assert await rx.aio.receive() == item
            assert await rx.aio.receive() == b"raw"


async def test_channel_stream_end_of_stream(backend: str, name: str) -> None:
    with (
        Channel.create(name, capacity=1 << 16, backend=backend, mode="r") as rx,
        Channel.open(name, backend=backend, mode="w") as tx,
    ):
        with anyio.fail_after(10):
            for i in range(100):
                await tx.aio.send(i)
            await tx.aio.send_eof()  # the last writer gives up its rights
            assert tx.mode == "" and not tx.closed
            with pytest.raises(anyio.ClosedResourceError) as info:
                await tx.aio.send(100)
            assert isinstance(info.value.__cause__, shmchan.WrongMode)
            assert [item async for item in rx.aio] == list(range(100))
            for _ in range(2):  # and it stays ended
                with pytest.raises(anyio.EndOfStream):
                    await rx.aio.receive()
            assert [item async for item in rx.aio] == []


async def test_channel_stream_ends_when_a_waiting_receiver_sees_the_writer_close(
    backend: str, name: str
) -> None:
    with Channel.create(name, backend=backend, mode="r") as rx:
        code = """
            import shmchan
            ch = shmchan.Channel.open(NAME, backend=BACKEND, mode="w")
            print("open", flush=True)
            input()
            for i in range(10):
                ch.send(i)
            ch.close()
            print("closed", flush=True)
        """
        with child(code, NAME=name, BACKEND=backend) as writer:
            await anyio.to_thread.run_sync(writer.expect, "open")
            got: list[int] = []
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:

                    async def consume() -> None:
                        got.extend([item async for item in rx.aio])

                    tg.start_soon(consume)
                    await async_wait_until(lambda: consumers_waiting(rx) > 0, 5, "the receiver to wait")
                    writer.tell("go")
            assert got == list(range(10))


async def test_channel_stream_aclose(backend: str, name: str) -> None:
    with Channel.create(name, backend=backend) as ch:
        other = Channel.open(name, backend=backend)
        async with other.aio as stream:
            await stream.send("x")
        assert other.closed
        await other.aio.aclose()  # idempotent
        with pytest.raises(anyio.ClosedResourceError) as info:
            await other.aio.send("y")
        assert isinstance(info.value.__cause__, shmchan.ClosedChannel)
        with pytest.raises(anyio.ClosedResourceError):
            await other.aio.receive()
        assert await ch.aio.receive() == "x"


async def test_channel_stream_wrong_mode(backend: str, name: str) -> None:
    with (
        Channel.create(name, backend=backend, mode="r") as rx,
        Channel.open(name, backend=backend, mode="w") as tx,
    ):
        with pytest.raises(anyio.ClosedResourceError) as info:
            await rx.aio.send(1)
        assert isinstance(info.value.__cause__, shmchan.WrongMode)
        with pytest.raises(anyio.ClosedResourceError) as info:
            await tx.aio.receive()
        assert isinstance(info.value.__cause__, shmchan.WrongMode)


async def test_channel_stream_broken_resource(backend: str, name: str) -> None:
    with Channel.create(name, capacity=4096, backend=backend, mode="w") as tx:
        rx = Channel.open(name, backend=backend, mode="r")
        await tx.aio.send("seen")
        rx.close()
        with pytest.raises(anyio.BrokenResourceError) as info:
            await tx.aio.send("nobody")
        assert isinstance(info.value.__cause__, shmchan.BrokenChannel)


READER_TO_CLOSE_OR_KILL = """
    import shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND, mode="r")
    print("open", flush=True)
    input()
    ch.close()
    print("closed", flush=True)
    input()
"""


@pytest.mark.parametrize("how", ["close", "sigkill"])
async def test_channel_stream_blocked_send_gets_broken_resource(backend: str, name: str, how: str) -> None:
    """A send waiting on a full ring ends with BrokenResourceError when the last reader
    closes (at once) or is SIGKILLed (within about a second)."""
    with (
        Channel.create(name, capacity=4096, backend=backend, mode="w") as tx,
        child(READER_TO_CLOSE_OR_KILL, NAME=name, BACKEND=backend) as reader,
    ):
        await anyio.to_thread.run_sync(reader.expect, "open")
        fill(tx)
        outcome: list[BaseException] = []

        async def blocked_send() -> None:
            try:
                await tx.aio.send(b"blocked")
            except anyio.BrokenResourceError as exc:
                outcome.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(blocked_send)
                await async_wait_until(lambda: producers_waiting(tx) > 0, 5, "the send to wait")
                start = time.monotonic()
                if how == "close":
                    reader.tell("close")
                    await anyio.to_thread.run_sync(reader.expect, "closed")
                else:
                    reader.kill()
                await async_wait_until(lambda: bool(outcome), 5, "BrokenResourceError")
        elapsed = time.monotonic() - start
        assert elapsed < (0.5 if how == "close" else 1.5), f"{how}: {elapsed:.2f} s"


@pytest.mark.parametrize("side", ["receive", "send"])
async def test_aclose_wakes_a_task_waiting_on_the_same_stream(backend: str, name: str, side: str) -> None:
    """Closing a stream while another task waits on it (the usual way to stop a
    consumer) ends that wait with anyio.ClosedResourceError, as for anyio's sockets."""
    with (
        Channel.create(name, capacity=4096, backend=backend, mode="r") as rx,
        Channel.open(name, backend=backend, mode="w") as tx,
    ):
        handle = rx if side == "receive" else tx
        if side == "send":
            fill(tx)
        outcome: list[BaseException] = []

        async def waiting() -> None:
            try:
                if side == "receive":
                    await handle.aio.receive()
                else:
                    await handle.aio.send(b"blocked")
            except Exception as exc:  # noqa: BLE001 - checked below
                outcome.append(exc)

        counter = consumers_waiting if side == "receive" else producers_waiting
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiting)
                await async_wait_until(lambda: counter(handle) > 0, 5, f"the {side} to wait")
                await handle.aio.aclose()
                await async_wait_until(lambda: bool(outcome), 2, f"the waiting {side} to end")
        assert len(outcome) == 1
        assert isinstance(outcome[0], anyio.ClosedResourceError), repr(outcome[0])


async def test_end_of_stream_is_not_reported_before_any_writer(backend: str, name: str) -> None:
    with Channel.create(name, backend=backend, mode="r") as rx:
        with anyio.move_on_after(0.2) as scope:
            await rx.aio.receive()
        assert scope.cancelled_caught  # it waited: no EndOfStream
        with Channel.open(name, backend=backend, mode="w") as tx:
            await tx.aio.send(1)
        assert await rx.aio.receive() == 1
        with pytest.raises(anyio.EndOfStream):
            await rx.aio.receive()


# -- the example --------------------------------------------------------------------------------

EXAMPLE = ROOT / "examples" / "async_pipeline.py"
SUMMARY = re.compile(
    r"^async_pipeline: OK: (\d+) records through (\d+) worker processes \((asyncio|trio)\), "
    r"digest [0-9a-f]{16} in [0-9.]+ s$"
)


@pytest.mark.parametrize("lib", ["asyncio", "trio"])
def test_async_pipeline_example(lib: str) -> None:
    args = [] if lib == "asyncio" else ["--backend", lib]  # asyncio is the default
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    match = SUMMARY.match(lines[0])
    assert match, f"unexpected summary: {lines[0]!r}"
    assert match.group(3) == lib
    assert proc.stderr == ""
