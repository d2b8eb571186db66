"""Crash safety (docs/layout.md, section 10): what a peer's death or stop can cost.

Every peer here is a separate interpreter (tests/helpers/procs.py). Children announce
each step on stdout ("locked", "ready", ...) and the parent acts only on those lines
or on shared counters polled against a deadline; nothing is synchronised by sleeping.
Every child is killed and reaped in a ``finally``.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time
import zlib

import pytest
from helpers.children import Child, child, drain, proc_state, wait_until

import shmchan
from shmchan import Channel
from shmchan import _layout as L

OPEN = """
    import sys
    import shmchan
    from shmchan import _layout as L
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    core = ch._core
    ring = core.ring
"""

# -- 1. a lock holder killed at each commit boundary ---------------------------------------

PRODUCER_DIES = (
    OPEN
    + """
    assert core.seg.wlock.acquire(None)
    idx = ring.tail & ring.mask
    if POINT == "before_commit":
        # A half-written record: a header promising 200 bytes, then 64 bytes of junk.
        junk = (200 | (L.RT_BYTES << 32)).to_bytes(8, "little") + bytes(8) + b"GARBAGE!" * 8
        core.seg.buf[L.HEADER_SIZE + idx : L.HEADER_SIZE + idx + len(junk)] = junk
    else:
        # Committed (tail stored) but neither unlocked nor posted.
        assert ring.try_write(memoryview(b"committed-by-the-dead"))
    print("locked", flush=True)
    sys.stdin.readline()
"""
)


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_producer_killed_holding_write_lock(backend: str, name: str, point: str) -> None:
    with Channel.create(name, capacity=1 << 16, backend=backend) as ch:
        before = [b"before-%d" % i for i in range(3)]
        for msg in before:
            ch.send_bytes(msg)
        with child(PRODUCER_DIES, NAME=name, BACKEND=backend, POINT=point) as c:
            c.expect("locked")
            with pytest.raises(shmchan.Full):  # the child really holds the write lock
                ch.send_bytes(b"blocked", timeout=0.05)
            if point == "before_commit":
                assert b"GARBAGE!" in bytes(ch._core.seg.buf[L.HEADER_SIZE :])
            c.kill()
            assert c.proc.returncode == -signal.SIGKILL
        t0 = time.monotonic()
        ch.send_bytes(b"after-0", timeout=2)
        assert time.monotonic() - t0 < 1.0, "the dead producer's lock was not freed promptly"
        ch.send_bytes(b"after-1", timeout=2)
        got = drain(ch)
        dead = [b"committed-by-the-dead"] if point == "after_commit" else []
        assert got == [*before, *dead, b"after-0", b"after-1"]
        assert ch._core.ring.state() == L.STATE_NORMAL
        assert ch._core.ring.head == ch._core.ring.tail


CONSUMER_DIES = (
    OPEN
    + """
    assert core.seg.rlock.acquire(None)
    if POINT == "before_head":
        # Read the record (but do not store head): what a get does before its commit.
        idx = ring.head & ring.mask
        n = ring._q[ring._hdr + (idx >> 3)] & 0xFFFFFFFF
        seen = bytes(core.seg.buf[L.HEADER_SIZE + idx + 16 : L.HEADER_SIZE + idx + 16 + n])
    else:
        seen = ring.try_read()[1]  # head stored: the get is committed
    assert seen == b"msg-0", seen
    print("locked", flush=True)
    sys.stdin.readline()
"""
)


@pytest.mark.parametrize("point", ["before_head", "after_head"])
def test_consumer_killed_holding_read_lock(backend: str, name: str, point: str) -> None:
    with Channel.create(name, capacity=1 << 16, backend=backend) as ch:
        for i in range(3):
            ch.send_bytes(b"msg-%d" % i)
        with child(CONSUMER_DIES, NAME=name, BACKEND=backend, POINT=point) as c:
            c.expect("locked")
            with pytest.raises(shmchan.Empty):  # the child really holds the read lock
                ch.recv_bytes(timeout=0.05)
            c.kill()
        t0 = time.monotonic()
        first = ch.recv_bytes(timeout=2)
        assert time.monotonic() - t0 < 1.0, "the dead consumer's lock was not freed promptly"
        rest = drain(ch)
        if point == "before_head":
            assert [first, *rest] == [b"msg-0", b"msg-1", b"msg-2"]  # redelivered
        else:
            assert [first, *rest] == [b"msg-1", b"msg-2"]  # taken by the dead consumer
        ch.send_bytes(b"still works", timeout=1)
        assert ch.recv_bytes(timeout=1) == b"still works"


CONSUMER = (
    OPEN
    + """
    print("ready", flush=True)
    msg = ch.recv_bytes(timeout=TIMEOUT)
    print("got", msg.decode(), flush=True)
"""
)


def test_committed_but_never_posted_reaches_a_waiter(backend: str, name: str) -> None:
    """A producer that dies between its commit and its post: the waiter still gets the
    message within about one wait slice (it re-checks at least once per slice)."""
    with Channel.create(name, capacity=1 << 16, backend=backend) as ch:
        ring = ch._core.ring
        with child(CONSUMER, NAME=name, BACKEND=backend, TIMEOUT=10.0) as cons:
            cons.expect("ready")
            wait_until(lambda: ring.consumers_waiting() == 1, 10, "the consumer to wait")
            with child(PRODUCER_DIES, NAME=name, BACKEND=backend, POINT="after_commit") as prod:
                t0 = time.monotonic()
                prod.expect("locked")
                line = cons.expect("got", timeout=5)
                assert line == "got committed-by-the-dead"
                assert time.monotonic() - t0 < 1.5
                prod.kill()
            assert cons.finish(timeout=10) == 0, cons.stderr
        wait_until(lambda: ring.consumers_waiting() == 0, 5, "the waiter to deregister")


# -- 2. a waiter killed while registered ---------------------------------------------------


def test_waiter_killed_while_registered(backend: str, name: str) -> None:
    with Channel.create(name, capacity=1 << 16, backend=backend) as ch:
        ring = ch._core.ring
        with child(CONSUMER, NAME=name, BACKEND=backend, TIMEOUT=None) as dead:
            dead.expect("ready")
            wait_until(lambda: ring.consumers_waiting() == 1, 10, "the first consumer to wait")
            dead.kill()
        # Its registration outlives it (section 10): the counter is one too high.
        assert ring.consumers_waiting() == 1
        # Another consumer still gets a message promptly.
        with child(CONSUMER, NAME=name, BACKEND=backend, TIMEOUT=10.0) as live:
            live.expect("ready")
            wait_until(lambda: ring.consumers_waiting() == 2, 10, "the second consumer to wait")
            t0 = time.monotonic()
            ch.send_bytes(b"hello", timeout=1)
            assert live.expect("got", timeout=5) == "got hello"
            assert time.monotonic() - t0 < 1.0
            assert live.finish(timeout=10) == 0, live.stderr
        assert ring.consumers_waiting() == 1  # only the dead one's stale registration
        # With nobody waiting but a stale count, producers post only while the
        # semaphore is 0: its value stays bounded instead of growing per send.
        for i in range(1000):
            ch.send_bytes_nowait(b"%d" % i)
        assert ch._core.seg.not_empty.value() <= 2
        assert drain(ch) == [b"%d" % i for i in range(1000)]
        assert ch._core.seg.not_empty.value() <= 2
        # A spurious token costs a wakeup, not a wrong result.
        with pytest.raises(shmchan.Empty):
            ch.recv_bytes(timeout=0.3)


# -- 3. a lock holder that is stopped, not dead --------------------------------------------

HOLDER = (
    OPEN
    + """
    lock = core.seg.wlock if SIDE == "write" else core.seg.rlock
    assert lock.acquire(None)
    print("locked", flush=True)
    sys.stdin.readline()
    lock.release()
    print("released", flush=True)
    sys.stdin.readline()
"""
)


@pytest.mark.parametrize("side", ["write", "read"])
def test_stopped_lock_holder_delays_but_timeouts_hold(backend: str, name: str, side: str) -> None:
    with Channel.create(name, capacity=1 << 16, backend=backend) as ch:
        ch.send_bytes(b"queued")
        with child(HOLDER, NAME=name, BACKEND=backend, SIDE=side) as c:
            try:
                c.expect("locked")
                c.signal(signal.SIGSTOP)
                wait_until(lambda: proc_state(c.pid) in "Tt", 5, "the child to stop")
                t0 = time.monotonic()
                if side == "write":
                    with pytest.raises(shmchan.Full):
                        ch.send_bytes(b"x", timeout=0.2)
                else:
                    with pytest.raises(shmchan.Empty):
                        ch.recv_bytes(timeout=0.2)
                elapsed = time.monotonic() - t0
                assert 0.2 <= elapsed <= 0.6, elapsed
                # The other side's lock is separate: it is not held up by this one.
                if side == "write":
                    assert ch.recv_bytes(timeout=1) == b"queued"
                else:
                    ch.send_bytes(b"more", timeout=1)
            finally:
                c.signal(signal.SIGCONT)
            c.tell("release")
            c.expect("released")
            t0 = time.monotonic()
            ch.send_bytes(b"after", timeout=2)
            got = drain(ch)
            assert time.monotonic() - t0 < 1.0
            assert got == ([b"after"] if side == "write" else [b"queued", b"more", b"after"])
            c.close_stdin()
            assert c.finish(timeout=10) == 0, c.stderr


# -- 4. random SIGKILL stress --------------------------------------------------------------

STRESS_HEADER = struct.Struct("<IIII")  # producer id, seq, body length, crc32(body)
CHAOS_SECONDS = 6.0
FINAL_BATCH = 50

STRESS_PRODUCER = """
    import random, struct, sys, threading, zlib
    import shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    stop = threading.Event()
    def watch():
        sys.stdin.read()  # EOF: the parent asks for a final batch
        stop.set()
    threading.Thread(target=watch, daemon=True).start()
    hdr = struct.Struct("<IIII")
    rng = random.Random(PID)
    seq, last = 0, None
    while last is None or seq < last:
        if last is None and stop.is_set():
            last = seq + FINAL
        body = rng.randbytes(rng.randrange(0, 600))
        msg = hdr.pack(PID, seq, len(body), zlib.crc32(body)) + body
        while True:
            try:
                ch.send_bytes(msg, timeout=0.5)
                break
            except shmchan.Full:
                pass
        print("A", seq, flush=True)  # acknowledged: send_bytes returned
        seq += 1
    ch.close()
    print("done", flush=True)
"""

STRESS_CONSUMER = """
    import struct, sys, threading, zlib
    import shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    stop = threading.Event()
    def watch():
        sys.stdin.read()
        stop.set()
    threading.Thread(target=watch, daemon=True).start()
    hdr = struct.Struct("<IIII")
    while not stop.is_set():
        try:
            msg = ch.recv_bytes(timeout=0.2)
        except shmchan.Empty:
            continue
        if len(msg) < 16:
            print("R -1 -1 0", flush=True)
            continue
        pid, seq, n, crc = hdr.unpack_from(msg)
        ok = len(msg) == 16 + n and zlib.crc32(msg[16:]) == crc
        print("R", pid, seq, int(ok), flush=True)
    ch.close()
    print("done", flush=True)
"""


def _received(lines: list[str]) -> list[tuple[int, int, bool]]:
    out = []
    for line in lines:
        if line.startswith("R "):
            _, pid, seq, ok = line.split()
            out.append((int(pid), int(seq), ok == "1"))
    return out


@pytest.mark.slow
def test_random_sigkill_stress(backend: str, name: str) -> None:
    rng = random.Random(20240601 + ["posix", "sysv", "mmap"].index(backend))
    ch = Channel.create(name, capacity=4096, backend=backend)
    next_pid = 0
    slots: list[tuple[str, Child, int]] = []  # (kind, child, producer id or -1)
    finished: list[tuple[str, Child, int]] = []
    producer_kills = consumer_kills = 0

    def start(kind: str) -> tuple[str, Child, int]:
        nonlocal next_pid
        if kind == "P":
            next_pid += 1
            code, pid = STRESS_PRODUCER, next_pid
            return kind, Child(code, NAME=name, BACKEND=backend, PID=pid, FINAL=FINAL_BATCH), pid
        return kind, Child(STRESS_CONSUMER, NAME=name, BACKEND=backend), -1

    try:
        slots = [start("P"), start("P"), start("C"), start("C")]
        deadline = time.monotonic() + CHAOS_SECONDS
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.05, 0.3))  # load pattern, not synchronisation
            i = rng.randrange(len(slots))
            kind, victim, pid = slots[i]
            victim.kill()
            finished.append(slots[i])
            if kind == "P":
                producer_kills += 1
            else:
                consumer_kills += 1
            slots[i] = start(kind)
        # Stop killing. The consumers leave first; then the producers send a final
        # batch and leave while the parent drains everything as the only consumer.
        for kind, c, _ in slots:
            if kind == "C":
                c.close_stdin()
                assert c.finish(timeout=30) == 0, c.stderr
        producers = [c for kind, c, _ in slots if kind == "P"]
        for c in producers:
            c.close_stdin()
        drained = []
        deadline = time.monotonic() + 30
        while True:
            try:
                drained.append(_parse_drained(ch.recv_bytes(timeout=0.2)))
            except shmchan.Empty:
                if all(c.proc.poll() is not None for c in producers):
                    break
            assert time.monotonic() < deadline, "the producers' final batches never arrived"
        drained += [_parse_drained(m) for m in drain(ch)]
        for c in producers:
            assert c.finish(timeout=10) == 0, c.stderr
            assert c.complete[-1] == "done"
        finished += slots
        slots = []
        assert ch._core.ring.state() == L.STATE_NORMAL
        assert ch._core.ring.head == ch._core.ring.tail
    finally:
        for _, c, _ in slots:
            c.kill()
        ch.close()

    acked: dict[int, set[int]] = {}
    clean_exit: set[int] = set()
    per_consumer: list[list[tuple[int, int, bool]]] = [drained]
    for kind, c, pid in finished:
        if kind == "P":
            acked[pid] = {int(line.split()[1]) for line in c.complete if line.startswith("A ")}
            if c.proc.returncode == 0:
                clean_exit.add(pid)
        else:
            per_consumer.append(_received(c.complete))
    everything = [r for rs in per_consumer for r in rs]

    assert producer_kills >= 3 and consumer_kills >= 3, (producer_kills, consumer_kills)
    assert sum(len(s) for s in acked.values()) > 500, "too little traffic to mean anything"
    # Nothing torn.
    assert all(ok for _, _, ok in everything), [r for r in everything if not r[2]][:10]
    # Nothing delivered twice.
    keys = [(pid, seq) for pid, seq, _ in everything]
    assert len(keys) == len(set(keys)), "a message was delivered twice"
    # Nothing that was never sent: at most the one in-flight message of a killed producer
    # may arrive without having been acknowledged.
    for pid, seq in keys:
        assert pid in acked, f"message from unknown producer {pid}"
        limit = len(acked[pid]) if pid in clean_exit else len(acked[pid]) + 1
        assert seq < limit, f"message ({pid}, {seq}) was never sent"
    for pid, seqs in acked.items():
        assert seqs == set(range(len(seqs))), f"producer {pid} acknowledged a gapped sequence"
    # FIFO per producer, as seen by each consumer.
    for rs in per_consumer:
        last: dict[int, int] = {}
        for pid, seq, _ in rs:
            assert seq > last.get(pid, -1), f"producer {pid}'s messages out of order"
            last[pid] = seq
    # Acknowledged messages are all received, except at most one per consumer kill
    # (taken by a consumer killed after its head store).
    got = set(keys)
    lost = [(pid, seq) for pid, seqs in acked.items() for seq in seqs if (pid, seq) not in got]
    assert len(lost) <= consumer_kills, (lost[:20], consumer_kills)


def _parse_drained(msg: bytes) -> tuple[int, int, bool]:
    pid, seq, n, crc = STRESS_HEADER.unpack_from(msg)
    return pid, seq, len(msg) == 16 + n and zlib.crc32(msg[16:]) == crc


# -- 5. the creator dies before publishing ---------------------------------------------------

CREATOR_DIES = """
    import sys
    import shmchan
    from shmchan import _layout as L
    from shmchan._backends import _base, _filebacked

    def stop_here(nonce):
        print("dying", f"{nonce:016x}", flush=True)
        sys.stdin.readline()  # killed here

    if POINT == "before_magic":
        def publish(buf, info, owner=b""):
            L.write_identity(buf, info)  # the whole header but the magic
            stop_here(info.nonce)
        _base.publish = publish
    else:
        make = _filebacked.create_wakeups
        def create_wakeups(*args, **kwargs):
            made = make(*args, **kwargs)  # the semaphores exist, the header is still zero
            stop_here(made[0])
            return made
        _filebacked.create_wakeups = create_wakeups
    shmchan.Channel.create(NAME, capacity=4096, backend=BACKEND)
"""


@pytest.mark.parametrize("point", ["before_magic", "after_semaphores"])
def test_creator_killed_before_publishing(backend: str, name: str, point: str) -> None:
    """Section 10: "the creator, before magic: the segment is never published; openers
    get 'initialisation timeout'; remove the name". Removing it must take everything
    the dead creator made, its semaphores included (the no_leaks check)."""
    if point == "after_semaphores" and backend == "sysv":
        pytest.skip("the sysv backend names every object by key, before any header exists")
    with child(CREATOR_DIES, NAME=name, BACKEND=backend, POINT=point) as c:
        nonce = c.expect("dying").split()[1]
        c.kill()
    t0 = time.monotonic()
    with pytest.raises(shmchan.InitializationTimeout):
        Channel.open(name, backend=backend, timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(shmchan.ChannelExists):
        Channel.create(name, capacity=4096, backend=backend)
    Channel.remove(name, backend=backend)
    with Channel.create(name, capacity=4096, backend=backend) as ch:  # the name is free again
        ch.send_bytes(b"reborn")
        assert ch.recv_bytes_nowait() == b"reborn"
    if backend != "sysv":
        sems = [f"/dev/shm/sem.shmchan.{nonce}.{role}" for role in ("ne", "nf")]
        left = [p for p in sems if os.path.exists(p)]
        for p in left:  # clean up for the next tests, then fail
            os.unlink(p)
        assert not left, "Channel.remove() left the dead creator's semaphores behind"
