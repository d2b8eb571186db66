"""Batch calls on every queue: ``put_many`` and ``get_many``.

They must behave exactly like the same sequence of ``put``/``get`` calls (order,
maxsize, side segments, task counting), except that a batch takes the lock once per
run of items, and a batch receive returns what is there without waiting for more.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import zlib
from typing import Any

import numpy as np
import pytest
from helpers.children import side_entries

import shmchan

SPAWN = mp.get_context("spawn")


def _boom() -> None:
    raise ValueError("this object cannot be rebuilt here")


class RaisesOnLoad:
    """Pickles fine; unpickling it raises ValueError (in any process)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_boom, ())


def test_round_trip_of_mixed_items_in_order(backend: str) -> None:
    q: shmchan.Queue[Any] = shmchan.Queue(backend=backend, capacity=1 << 16)
    try:
        items: list[Any] = [b"", b"x" * 64, ("t", 1, 2.5), bytearray(b"b" * 5000)]
        items += [np.arange(1000, dtype=np.float32), b"big" * 20_000, {"k": [1, 2]}, 7]
        q.put_many(items)
        q.put_many([])  # nothing to do
        assert q.qsize() == len(items)
        got: list[Any] = []
        while len(got) < len(items):
            got += q.get_many(3, timeout=5)
        assert q.empty()
        for want, have in zip(items, got, strict=True):
            if isinstance(want, np.ndarray):
                np.testing.assert_array_equal(want, have)
            else:
                assert want == have and type(want) is type(have)
    finally:
        q.close()


def test_get_many_takes_what_is_there_without_waiting_for_more(backend: str) -> None:
    q: shmchan.Queue[int] = shmchan.Queue(backend=backend)
    try:
        q.put_many(range(5))
        assert q.get_many(3) == [0, 1, 2]
        assert q.get_many(100, timeout=0) == [3, 4]  # fewer than asked: no wait
        with pytest.raises(shmchan.Empty):
            q.get_many(10, block=False)
        start = time.monotonic()
        with pytest.raises(shmchan.Empty):
            q.get_many(10, timeout=0.1)
        assert time.monotonic() - start >= 0.1
    finally:
        q.close()


def test_put_many_stops_at_maxsize_and_reports_how_many_went_in(backend: str) -> None:
    q: shmchan.Queue[int] = shmchan.Queue(10, backend=backend)
    try:
        with pytest.raises(shmchan.Full) as info:
            q.put_many(range(25), timeout=0.1)
        assert info.value.sent == 10
        assert q.full() and q.get_many(100) == list(range(10))
        with pytest.raises(shmchan.Full) as info:
            q.put_many(range(100, 125), block=False)  # what fits now, no wait
        assert info.value.sent == 10
        assert q.get_many(100) == list(range(100, 110))
    finally:
        q.close()


def test_put_many_stops_when_the_ring_is_out_of_bytes(backend: str) -> None:
    q: shmchan.Queue[bytes] = shmchan.Queue(backend=backend, capacity=4096)
    try:
        items = [bytes([i]) * 1000 for i in range(10)]
        with pytest.raises(shmchan.Full) as info:
            q.put_many(items, block=False)
        assert 0 < info.value.sent < len(items)  # 4096 bytes hold a few 1000-byte records
        assert q.get_many(100) == items[: info.value.sent]
    finally:
        q.close()


def test_a_blocked_put_many_finishes_as_a_consumer_makes_room(backend: str) -> None:
    """A batch bigger than the ring: put_many publishes what fits, sleeps, goes on."""
    q: shmchan.Queue[bytes] = shmchan.Queue(backend=backend, capacity=4096)
    items = [i.to_bytes(4, "little") * 100 for i in range(300)]  # about 30 rings' worth
    got: list[bytes] = []

    def consume() -> None:
        while len(got) < len(items):
            got.extend(q.get_many(7, timeout=10))

    try:
        reader = threading.Thread(target=consume)
        reader.start()
        q.put_many(items, timeout=30)
        reader.join(30)
        assert not reader.is_alive()
        assert got == items
    finally:
        q.close()


def test_an_unpicklable_item_raises_before_anything_is_sent(backend: str) -> None:
    q: shmchan.Queue[Any] = shmchan.Queue(backend=backend, capacity=4096)
    try:
        with pytest.raises((TypeError, AttributeError)):
            q.put_many([1, b"side" * 10_000, lambda: 0, 2])  # the side entry is given back too
        assert q.empty()
        assert [e["state"] for e in side_entries(q)] == ["free"] * q._core.side_slots
        q.put_many([3])
        assert q.get() == 3
    finally:
        q.close()


def test_get_many_keeps_every_item_that_decodes(backend: str) -> None:
    q: shmchan.Queue[Any] = shmchan.Queue(backend=backend)
    try:
        q.put_many([1, RaisesOnLoad(), 2, RaisesOnLoad(), 3])
        with pytest.raises(shmchan.UndecodableBatch) as info:
            q.get_many(10)
        assert info.value.items == [1, 2, 3]
        assert [i for i, _ in info.value.errors] == [1, 3]
        assert all(isinstance(e, ValueError) for _, e in info.value.errors)
        assert isinstance(info.value, ValueError) and isinstance(info.value.__cause__, ValueError)
        assert q.empty()  # consumed: no poison-pill loop
    finally:
        q.close()


def test_bad_arguments_and_closed_handles(backend: str) -> None:
    q: shmchan.Queue[int] = shmchan.Queue(backend=backend)
    q.put(1)
    with pytest.raises(ValueError):
        q.get_many(0)
    with pytest.raises(TypeError):
        q.get_many("3")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        q.get_many(True)
    with pytest.raises(ValueError):
        q.get_many(3, timeout=-1)
    with pytest.raises(ValueError):
        q.put_many([2], timeout=-1)
    assert q.qsize() == 1  # nothing was put or taken by the refused calls
    q.close()
    with pytest.raises(ValueError):
        q.put_many([1])
    with pytest.raises(ValueError):
        q.get_many(1)


def test_joinable_queue_counts_every_item_of_a_batch(backend: str) -> None:
    q: shmchan.JoinableQueue[int] = shmchan.JoinableQueue(backend=backend)
    joined = threading.Event()

    def join() -> None:
        q.join()
        joined.set()

    try:
        q.put_many(range(5))
        assert q.get_many(10) == list(range(5))
        joiner = threading.Thread(target=join)
        joiner.start()
        for _ in range(4):
            q.task_done()
        assert not joined.wait(0.2)  # one task is still unfinished
        q.task_done()
        joiner.join(10)
        assert joined.is_set()
        with pytest.raises(ValueError):
            q.task_done()
    finally:
        q.close()


def test_simple_queue_batches(backend: str) -> None:
    q: shmchan.SimpleQueue[int] = shmchan.SimpleQueue(backend=backend)
    try:
        q.put_many(range(10))
        assert q.get_many(4) == [0, 1, 2, 3]
        assert q.get_many(100) == list(range(4, 10))
        assert q.empty()
    finally:
        q.close()


# -- across processes ------------------------------------------------------------------

PER_PRODUCER = 40_000
STOP = (-1, -1, 0)


def _produce(q: shmchan.Queue[tuple[int, int, int]], who: int) -> None:
    batch: list[tuple[int, int, int]] = []
    for seq in range(PER_PRODUCER):
        batch.append((who, seq, zlib.crc32(f"{who}:{seq}".encode())))
        if len(batch) == 1 + seq % 97:  # batches of every size from 1 to 97
            q.put_many(batch, timeout=60)
            batch = []
    q.put_many(batch, timeout=60)
    q.close()


def _consume(q: shmchan.Queue[tuple[int, int, int]], results: shmchan.Queue[Any]) -> None:
    seen: list[tuple[int, int]] = []
    bad = 0
    while True:
        stops = 0
        for who, seq, crc in q.get_many(64, timeout=60):
            if (who, seq, crc) == STOP:
                stops += 1
            elif crc != zlib.crc32(f"{who}:{seq}".encode()):
                bad += 1
            else:
                seen.append((who, seq))
        if stops:
            q.put_many([STOP] * (stops - 1))  # markers taken for another consumer go back
            break
    results.put((seen, bad))
    q.close()
    results.close()


def test_batches_across_processes_mpmc(backend: str) -> None:
    """2 producer processes put batches of every size, 2 consumers take batches: every
    item arrives exactly once, intact, and each producer's items in order."""
    q: shmchan.Queue[tuple[int, int, int]] = shmchan.Queue(1000, backend=backend, capacity=1 << 16)
    results: shmchan.Queue[Any] = shmchan.Queue(backend=backend)
    producers = [SPAWN.Process(target=_produce, args=(q, who)) for who in range(2)]
    consumers = [SPAWN.Process(target=_consume, args=(q, results)) for _ in range(2)]
    try:
        for p in producers + consumers:
            p.start()
        for p in producers:
            p.join(90)
            assert p.exitcode == 0
        q.put_many([STOP, STOP])  # after every item: each consumer stops at one
        outs = [results.get(timeout=60) for _ in consumers]
        for p in consumers:
            p.join(30)
            assert p.exitcode == 0
        assert sum(bad for _, bad in outs) == 0
        everything: dict[int, list[int]] = {0: [], 1: []}
        for seen, _ in outs:
            for who in everything:
                mine = [seq for w, seq in seen if w == who]
                assert mine == sorted(mine)  # one consumer sees each producer in order
                everything[who] += mine
        for seqs in everything.values():
            assert sorted(seqs) == list(range(PER_PRODUCER))  # exactly once
        assert q.empty()
    finally:
        for p in producers + consumers:
            if p.is_alive():
                p.kill()
                p.join(10)
        q.close()
        results.close()


# -- channels ----------------------------------------------------------------------------


def test_channel_batches_and_end_of_stream(backend: str, name: str) -> None:
    reader = None
    try:
        with shmchan.Channel.create(name, backend=backend, mode="w") as writer:
            reader = shmchan.Channel.open(name, backend=backend, mode="r")
            writer.send_many([b"raw", ("t", 1), 2])
            assert reader.recv_many(2) == [b"raw", ("t", 1)]
            with pytest.raises(shmchan.WrongMode):
                reader.send_many([1])
            with pytest.raises(shmchan.WrongMode):
                writer.recv_many(1)
        # the last writer is gone: drain, then end of stream
        assert reader.recv_many(10, timeout=5) == [2]
        with pytest.raises(shmchan.EndOfChannel):
            reader.recv_many(10, timeout=5)
    finally:
        if reader is not None:
            reader.close()
    with pytest.raises(shmchan.ClosedChannel):
        reader.recv_many(1)


def test_channel_send_many_when_full_or_broken(backend: str, name: str) -> None:
    with shmchan.Channel.create(name, backend=backend, mode="rw", capacity=4096) as ch:
        with pytest.raises(shmchan.Full) as info:
            ch.send_many([b"z" * 1000] * 10, timeout=0.05)
        assert 0 < info.value.sent < 10
        assert ch.recv_many(20) == [b"z" * 1000] * info.value.sent
    with shmchan.Channel.open(name, backend=backend, mode="w") as writer:
        with shmchan.Channel.open(name, backend=backend, mode="r") as reader:
            writer.send_many([1, 2])
            assert reader.recv_many(5) == [1, 2]
        with pytest.raises(shmchan.BrokenChannel):
            writer.send_many([3])
