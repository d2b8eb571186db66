"""The async faces on the redis backend (coredis), on asyncio and trio: sync producers
with async consumers, random cancellations that must neither lose nor duplicate an
item, channels as anyio streams, aselect, join."""

from __future__ import annotations

import random
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import shmchan
from shmchan import Channel, JoinableQueue, Queue

from .conftest import RedisServer, unique, wait_blocked_client

pytestmark = pytest.mark.anyio


async def test_sync_producer_async_consumer(url: str) -> None:
    q: Queue[int] = Queue(10, backend="redis", url=url)
    n = 500

    def produce() -> None:
        for i in range(n):
            q.put(i)  # blocks on maxsize while the async side catches up

    t = threading.Thread(target=produce)
    t.start()
    got = [await q.async_q.get() for _ in range(n)]
    await anyio.to_thread.run_sync(t.join)
    assert got == list(range(n))
    await q.async_q.put_many(range(5))
    assert await q.async_q.get_many(10) == [0, 1, 2, 3, 4]
    with pytest.raises(shmchan.Empty):
        q.async_q.get_nowait()
    q.close()


async def test_random_cancellations_lose_and_duplicate_nothing(url: str) -> None:
    """10 000 gets cancelled at random points (on each event loop), from 8 tasks at
    once, while a sync producer keeps putting: every item arrives exactly once.

    A cancellation lands before a get starts (it takes nothing), while it waits (it
    takes nothing), or while its take is in flight (the take completes and the get
    returns the item): each get whose cancel scope fired counts, whichever way.
    """
    q: Queue[int] = Queue(32, backend="redis", url=url)
    want = 10_000
    rng = random.Random(1234)
    produced = 0
    stop = threading.Event()

    def produce() -> None:
        nonlocal produced
        while not stop.is_set():
            try:
                q.put_many(range(produced, produced + 4), timeout=0.05)
            except shmchan.Full as exc:
                produced += exc.sent
                continue
            produced += 4

    got: list[int] = []
    requested = delivered = 0

    async def consume() -> None:
        nonlocal requested, delivered
        while requested < want:
            delay = rng.choice((0.0, rng.uniform(0, 0.0003), rng.uniform(0, 0.001), rng.uniform(0, 0.003)))
            with anyio.move_on_after(delay) as scope:
                item = await q.async_q.get()
                got.append(item)
            requested += scope.cancel_called
            delivered += scope.cancelled_caught

    t = threading.Thread(target=produce)
    t.start()
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(consume)
    finally:
        stop.set()
        await anyio.to_thread.run_sync(t.join)
    while len(got) < produced:
        with anyio.fail_after(10):
            got.append(await q.async_q.get())
    assert requested >= want and delivered > want // 10
    assert sorted(got) == list(range(produced)), "an item was lost or duplicated"
    assert q.qsize() == 0
    q.close()


async def test_a_get_that_can_answer_does_not_wait(url: str) -> None:
    """A get finds what is there in one round trip: its pipelined BLPOP must return at
    once (were it to sleep its slice, 100 gets would take 50 s)."""
    q: Queue[int] = Queue(backend="redis", url=url)
    q.put_many(range(100))
    with anyio.fail_after(10):
        assert [await q.async_q.get() for _ in range(100)] == list(range(100))
    q.close()


async def test_cancelled_waits_take_nothing(url: str) -> None:
    q: Queue[str] = Queue(1, backend="redis", url=url)
    for _ in range(20):
        with anyio.move_on_after(0.01):
            await q.async_q.get()  # waits: cancelled within one slice
    q.put("a")
    for _ in range(20):
        with anyio.move_on_after(0.01):
            await q.async_q.put("b")  # full: nothing is put
    assert q.get_nowait() == "a"
    assert q.empty()
    with anyio.fail_after(2):
        with anyio.move_on_after(0.05) as scope:
            await q.async_q.get()
    assert scope.cancelled_caught  # within a slice (0.1 s), not the sync face's 0.5 s
    q.close()


async def test_many_waiting_tasks_share_one_wait(url: str) -> None:
    q: Queue[int] = Queue(backend="redis", url=url)
    got: list[int] = []
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(lambda: _append(q, got))
        await anyio.lowlevel.checkpoint()
        q.put_many(range(50))
    assert sorted(got) == list(range(50))
    q.close()


async def _append(q: Queue[int], got: list[int]) -> None:
    got.append(await q.async_q.get())


async def test_channel_as_an_anyio_stream(url: str) -> None:
    name = unique("ach")
    w = Channel.create(name, backend="redis", url=url, mode="w")
    r = Channel.open(name, backend="redis", url=url, mode="r")
    async with anyio.create_task_group() as tg:

        async def write() -> None:
            for i in range(20):
                await w.aio.send(i)
            await w.aio.send_eof()

        tg.start_soon(write)
        got = [item async for item in r.aio]
    assert got == list(range(20))
    with pytest.raises(anyio.EndOfStream):
        await r.aio.receive()
    await r.aio.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await r.aio.receive()
    w2 = Channel.open(name, backend="redis", url=url, mode="w")
    with pytest.raises(anyio.BrokenResourceError):
        await w2.aio.send(1)  # every reader is gone
    w2.close()
    w.close()
    Channel.remove(name, backend="redis", url=url)


async def test_aselect_takes_exactly_one(redis_server: RedisServer) -> None:
    url = redis_server.url
    qs: list[Queue[Any]] = [Queue(backend="redis", url=url) for _ in range(3)]
    for i, q in enumerate(qs):
        q.put_many([f"{i}a", f"{i}b"])
    seen = []
    for _ in range(6):
        source, item = await shmchan.aselect(*qs)
        assert item.startswith(str(qs.index(source)))
        seen.append(item)
    assert sorted(seen) == ["0a", "0b", "1a", "1b", "2a", "2b"]
    with anyio.move_on_after(0.05):
        await shmchan.aselect(*qs)  # cancelled while waiting: takes nothing
    async with anyio.create_task_group() as tg:
        results: list[Any] = []

        async def pick() -> None:
            results.append(await shmchan.aselect(*qs))

        tg.start_soon(pick)
        await anyio.to_thread.run_sync(wait_blocked_client, redis_server)  # it waits in BLPOP
        qs[1].put("late")
    assert results == [(qs[1], "late")]
    assert all(q.qsize() == 0 for q in qs)
    for q in qs:
        q.close()


async def test_join_async(url: str) -> None:
    q: JoinableQueue[int] = JoinableQueue(backend="redis", url=url)
    q.put(1)
    done = anyio.Event()

    async def joiner() -> None:
        await q.async_q.join()
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(joiner)
        await q.async_q.get()
        await anyio.lowlevel.checkpoint()
        assert not done.is_set()
        q.async_q.task_done()
    assert done.is_set()
    q.close()
