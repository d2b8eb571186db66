"""select over redis sources, and many producers and consumers in separate processes."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import pytest

import shmchan
from shmchan import Channel, Queue

from . import children
from .conftest import unique

SPAWN = mp.get_context("spawn")


def test_select_takes_exactly_one_item(url: str) -> None:
    qs: list[Queue[Any]] = [Queue(backend="redis", url=url) for _ in range(3)]
    name = unique("sel")
    ch = Channel.create(name, backend="redis", url=url)
    qs[0].put_many(["a0", "a1"])
    qs[2].put("c0")
    ch.send("ch0")
    seen = []
    for _ in range(4):
        source, item = shmchan.select(*qs, ch, timeout=1)
        seen.append(item)
        assert (source is ch) == (item == "ch0")
    assert sorted(seen) == ["a0", "a1", "c0", "ch0"]
    assert [q.qsize() for q in qs] == [0, 0, 0]
    with pytest.raises(shmchan.Empty):
        shmchan.select(*qs, ch, timeout=0.2)
    with pytest.raises(shmchan.Empty):
        shmchan.select(*qs, timeout=0)

    got: list[Any] = []
    waiting = threading.Event()

    def pick() -> None:
        waiting.set()
        got.append(shmchan.select(*qs, timeout=10))

    t = threading.Thread(target=pick)
    t.start()
    assert waiting.wait(5)
    start = time.monotonic()
    qs[1].put("late")
    t.join(10)
    assert got == [(qs[1], "late")] and time.monotonic() - start < 1.0  # woken, not polled
    with pytest.raises(ValueError, match="cannot mix"):
        local: Queue[int] = Queue()
        try:
            shmchan.select(qs[0], local, timeout=0)
        finally:
            local.close()
    for q in qs:
        q.close()
    ch.close()
    Channel.remove(name, backend="redis", url=url)


def test_select_ends_when_every_channel_ends(url: str) -> None:
    names = [unique("sel"), unique("sel")]
    readers = [Channel.create(n, backend="redis", url=url, mode="r") for n in names]
    writers = [Channel.open(n, backend="redis", url=url, mode="w") for n in names]
    writers[1].send("last")
    for w in writers:
        w.close()
    assert shmchan.select(*readers, timeout=1) == (readers[1], "last")
    with pytest.raises(shmchan.EndOfChannel):
        shmchan.select(*readers, timeout=1)
    for r, n in zip(readers, names, strict=True):
        r.close()
        Channel.remove(n, backend="redis", url=url)


@pytest.mark.timeout(180)
def test_four_producers_four_consumers_in_processes(url: str) -> None:
    """100 000 items from 4 producer processes to 4 consumer processes (two take
    batches, two take one item per get): each arrives exactly once, and each consumer
    sees every producer's items in the order they were put."""
    q: Queue[Any] = Queue(1000, backend="redis", url=url)
    per_producer = 25_000
    pipes = [SPAWN.Pipe(duplex=False) for _ in range(4)]
    consumers = [
        SPAWN.Process(target=children.consume, args=(q, batch, pipes[i][1]))
        for i, batch in enumerate((64, 64, 0, 0))
    ]
    producers = [SPAWN.Process(target=children.produce, args=(q, p, per_producer, 100)) for p in range(4)]
    procs = consumers + producers
    try:
        for p in procs:
            p.start()
        for _, w in pipes:
            w.close()
        for p in producers:
            p.join(120)
            assert p.exitcode == 0
        q.put_many([None] * 4)  # behind every item: one stop per consumer
        results = [r.recv() if r.poll(120) else pytest.fail("a consumer did not finish") for r, _ in pipes]
        for p in consumers:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    every = [item for got in results for item in got]
    assert len(every) == 4 * per_producer
    assert sorted(every) == [(p, s) for p in range(4) for s in range(per_producer)]
    for got in results:
        for p in range(4):
            seqs = [s for (pp, s) in got if pp == p]
            assert seqs == sorted(seqs), "a consumer saw a producer's items out of order"
    assert all(results), "a consumer got nothing"
    q.close()
