"""Many messages across processes (spawn): exactly once, in order, checksums equal."""

from __future__ import annotations

import multiprocessing as mp
import random
import struct
import zlib
from array import array
from collections import Counter
from typing import Any

import pytest

import shmchan

SPAWN = mp.get_context("spawn")
POOL_SEED = 1234


def _pool() -> bytes:
    return random.Random(POOL_SEED).randbytes(1 << 16)


def _message(seq: int, n: int, pool: bytes) -> bytes:
    """Message ``seq`` of ``n`` bytes: the sequence number first (when it fits)."""
    off = (seq * 7919) % (len(pool) - n - 8)
    head = seq.to_bytes(8, "little")
    return (head + pool[off : off + n])[:n]


def _chain(crc: int, payload: bytes) -> int:
    """Order-sensitive checksum over (length, bytes) of every message."""
    return zlib.crc32(payload, zlib.crc32(len(payload).to_bytes(4, "little"), crc))


def spsc_producer(name: str, backend: str, count: int, seed: int, out: Any) -> None:
    ch = shmchan.Channel.open(name, backend=backend)
    rng = random.Random(seed)
    pool = _pool()
    crc = 0
    top = ch.max_message
    for seq in range(count):
        msg = _message(seq, rng.randint(0, top), pool)
        ch.send_bytes(msg, timeout=30)
        crc = _chain(crc, msg)
    ch.close()
    out.put(("sent", count, crc))


def spsc_consumer(name: str, backend: str, count: int, out: Any) -> None:
    ch = shmchan.Channel.open(name, backend=backend)
    crc = 0
    out_of_order = 0
    for seq in range(count):
        msg = ch.recv_bytes(timeout=30)
        crc = _chain(crc, msg)
        if len(msg) >= 8 and int.from_bytes(msg[:8], "little") != seq:
            out_of_order += 1
    leftover = 0
    try:
        ch.recv_bytes_nowait()
        leftover = 1
    except shmchan.Empty:
        pass
    ch.close()
    out.put(("received", count, crc, out_of_order, leftover))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_million_messages_spsc(backend: str, name: str) -> None:
    count = 1_000_000
    with shmchan.Channel.create(name, capacity=1 << 14, max_message=1024, backend=backend):
        results = SPAWN.Queue()
        procs = [
            SPAWN.Process(target=spsc_consumer, args=(name, backend, count, results)),
            SPAWN.Process(target=spsc_producer, args=(name, backend, count, 7, results)),
        ]
        for p in procs:
            p.start()
        try:
            got = {r[0]: r[1:] for r in (results.get(timeout=240), results.get(timeout=240))}
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
        assert [p.exitcode for p in procs] == [0, 0]
        sent_count, sent_crc = got["sent"]
        recv_count, recv_crc, out_of_order, leftover = got["received"]
        assert (recv_count, out_of_order, leftover) == (sent_count, 0, 0)
        assert recv_crc == sent_crc


def mpmc_producer(name: str, backend: str, pid: int, count: int) -> None:
    ch = shmchan.Channel.open(name, backend=backend)
    rng = random.Random(pid)
    for seq in range(count):
        body = rng.randbytes(rng.randint(0, 200))
        ch.send_bytes(struct.pack("<III", pid, seq, zlib.crc32(body)) + body, timeout=60)
    ch.close()


def mpmc_consumer(name: str, backend: str, out: Any) -> None:
    ch = shmchan.Channel.open(name, backend=backend)
    seen = array("Q")
    bad = 0
    while True:
        msg = ch.recv_bytes(timeout=60)
        if not msg:  # the sentinel: every data message was committed before it
            break
        pid, seq, crc = struct.unpack_from("<III", msg)
        bad += zlib.crc32(msg[12:]) != crc
        seen.append(pid << 32 | seq)
    ch.close()
    out.put((seen.tobytes(), bad))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mpmc_4x4(backend: str, name: str) -> None:
    producers, consumers, per_producer = 4, 4, 50_000
    with shmchan.Channel.create(name, capacity=1 << 13, backend=backend) as ch:
        results = SPAWN.Queue()
        cons = [SPAWN.Process(target=mpmc_consumer, args=(name, backend, results)) for _ in range(consumers)]
        prods = [
            SPAWN.Process(target=mpmc_producer, args=(name, backend, i, per_producer))
            for i in range(producers)
        ]
        for p in cons + prods:
            p.start()
        try:
            for p in prods:
                p.join(240)
            assert [p.exitcode for p in prods] == [0] * producers
            for _ in cons:
                ch.send_bytes(b"", timeout=30)
            outputs = [results.get(timeout=120) for _ in cons]
        finally:
            for p in cons + prods:
                p.join(30)
                if p.is_alive():
                    p.kill()
        assert [p.exitcode for p in cons] == [0] * consumers
        everything: Counter[int] = Counter()
        for raw, bad in outputs:
            assert bad == 0, "a message arrived with a wrong checksum (torn?)"
            seen = array("Q")
            seen.frombytes(raw)
            last: dict[int, int] = {}
            for key in seen:  # per-producer order holds within each consumer's stream
                pid, seq = key >> 32, key & 0xFFFFFFFF
                assert seq > last.get(pid, -1)
                last[pid] = seq
            everything.update(seen)
        expected = Counter(pid << 32 | seq for pid in range(producers) for seq in range(per_producer))
        assert everything == expected  # each message exactly once, none unknown
