"""Interoperability with C programs (examples/c) built on the shmchan C library.

The example programs link the library the Python extension is built from
(shmchan/_native/shmchan.c, and shmchan_posix.c for opening posix channels by name).
They are compiled with -Werror, once plainly and once with AddressSanitizer and
UndefinedBehaviorSanitizer, then exchange many random messages with Python in both
directions, over a Channel and over a named drop-in Queue (whose maxsize the C writer
must honour), including messages larger than the ring (the side-segment pool). Both
sides fold every message into the checksum that examples/c/README.md defines and
compare the results. The C programs hold presence, so Python sees a C writer's end of
stream and a C reader's departure.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmchan
from shmchan import _layout as L

C_DIR = Path(__file__).resolve().parent.parent / "examples" / "c"
CC = shutil.which("cc")

pytestmark = [
    pytest.mark.skipif(CC is None, reason="no C compiler: `cc` is not on PATH"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C peer needs Linux"),
]

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
M64 = (1 << 64) - 1
RECV_TIMEOUT = 30.0
"""Per-message timeout on both sides: a stuck peer fails the test instead of hanging."""

# (capacity, messages): the default-size ring, and a small one that wraps constantly.
CASES = [
    pytest.param(16384, 100_000, id="16k-100000"),
    pytest.param(4096, 20_000, id="4k-wrap-20000"),
]


def fold(h: int, data: bytes) -> int:
    """One message into the checksum: CRC-32 of le32(len) + bytes, FNV-style fold."""
    crc = zlib.crc32(data, zlib.crc32(len(data).to_bytes(4, "little")))
    return ((h ^ crc) * FNV_PRIME) & M64


def writer_messages(seed: int, max_payload: int) -> Iterator[bytes]:
    """The messages `writer NAME COUNT SEED [MAXLEN]` sends (README.md), in order;
    ``max_payload`` is the length limit: the channel's, or MAXLEN if smaller."""
    state = seed & M64

    def splitmix64() -> int:
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    while True:
        n = splitmix64() % (max_payload + 1)
        words = b"".join(splitmix64().to_bytes(8, "little") for _ in range((n + 7) // 8))
        yield words[:n]


NATIVE = Path(__file__).resolve().parent.parent / "shmchan" / "_native"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def compile_peer(out: Path, extra: list[str]) -> dict[str, Path]:
    """Compile writer and reader against the library; any warning fails (-Werror)."""
    assert CC is not None  # the module is skipped otherwise
    exes = {}
    for prog in ("writer", "reader"):
        cmd = [CC, "-std=c11", "-O2", "-Wall", "-Wextra", "-Wconversion", "-Werror", *extra,
               f"-I{NATIVE}", "-o", str(out / prog), str(C_DIR / f"{prog}.c"),
               str(NATIVE / "shmchan.c"), str(NATIVE / "shmchan_posix.c")]  # fmt: skip
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
        if res.returncode != 0:
            pytest.fail(f"compiling {prog} failed:\n$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
        exes[prog] = out / prog
    return exes


@pytest.fixture(scope="module", params=["plain", "sanitized"])
def c_peer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example programs, plain and under ASan + UBSan (any report aborts them)."""
    out = tmp_path_factory.mktemp(f"c_peer_{request.param}")
    return compile_peer(out, SANITIZE if request.param == "sanitized" else [])


@contextlib.contextmanager
def posix_channel(capacity: int) -> Iterator[shmchan.Channel]:
    name = f"shmchan-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ch = shmchan.Channel.create(name, capacity=capacity, backend="posix")
    try:
        yield ch
    finally:
        try:
            ch.close()
        finally:
            shmchan.Channel.remove(ch.name, backend="posix")
    assert not os.path.exists("/dev/shm" + ch.name)


@contextlib.contextmanager
def named_queue(maxsize: int, capacity: int = 16384) -> Iterator[shmchan.Queue[object]]:
    """A named posix drop-in Queue (no lifetime service), removed afterwards."""
    name = f"shmchan-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    q: shmchan.Queue[object] = shmchan.Queue(maxsize=maxsize, name=name, backend="posix", capacity=capacity)
    try:
        yield q
    finally:
        try:
            q.unlink()
        finally:
            q.close()
    assert not os.path.exists("/dev/shm" + q.name)


def side_states(q: shmchan.Queue[object]) -> list[str]:
    """The states of the queue's side-pool entries (layout.md 2.5)."""
    raw = q._core.raw(0, 4096)
    return [str(L.decode_side_entry(raw, i)["state"]) for i in range(q._core.side_slots)]


@contextlib.contextmanager
def spawn(args: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.returncode is None:  # the test failed while it ran: never leave it behind
            proc.kill()
            proc.communicate(timeout=10)


def finish(proc: subprocess.Popen[str], what: str) -> str:
    """Wait for the C program (killing it on timeout); return its one output line."""
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what} did not exit within 60 s; stderr: {err}")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}; stderr: {err}"
    return out.strip()


def peer_failed(proc: subprocess.Popen[str], what: str, exc: Exception) -> None:
    proc.kill()
    _, err = proc.communicate(timeout=10)
    pytest.fail(f"{exc!r} while talking to {what} (exit {proc.returncode}); its stderr: {err}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("capacity", "count"), CASES)
def test_python_to_c(c_peer: dict[str, Path], capacity: int, count: int) -> None:
    rng = random.Random(20240611 + capacity)
    with posix_channel(capacity) as ch, spawn([str(c_peer["reader"]), ch.name, str(count)]) as proc:
        max_message = ch.max_message
        assert max_message == capacity // 2 - 16
        h = FNV_OFFSET
        total = 0
        start = time.perf_counter()
        try:
            for _ in range(count):
                data = rng.randbytes(rng.randint(0, max_message))
                ch.send_bytes(data, timeout=RECV_TIMEOUT)
                h = fold(h, data)
                total += len(data)
        except shmchan.Full as exc:
            peer_failed(proc, "the C reader", exc)
        line = finish(proc, "the C reader")
        elapsed = time.perf_counter() - start
        assert line == f"count={count} checksum={h:016x}"
    print(f"python->C: {count} messages, {total / 1e6:.1f} MB in {elapsed:.2f} s")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("capacity", "count"), CASES)
def test_c_to_python(c_peer: dict[str, Path], capacity: int, count: int) -> None:
    seed = 0x5EED0000 + capacity
    with posix_channel(capacity) as ch:
        args = [str(c_peer["writer"]), ch.name, str(count), str(seed)]
        with spawn(args) as proc:
            expected = writer_messages(seed, ch.max_message)
            h = FNV_OFFSET
            total = 0
            start = time.perf_counter()
            received = 0
            try:
                while True:  # to the end of the stream: the C writer's exit ends it
                    data = ch.recv_bytes(timeout=RECV_TIMEOUT)
                    if received == 0:
                        ch.send_eof()  # the C writer holds write presence: only it now
                    if received < 200:  # the README's PRNG definition, message by message
                        assert data == next(expected), f"message #{received} differs"
                    h = fold(h, data)
                    total += len(data)
                    received += 1
            except shmchan.EndOfChannel:
                pass
            except shmchan.Empty as exc:
                peer_failed(proc, "the C writer", exc)
            line = finish(proc, "the C writer")
            elapsed = time.perf_counter() - start
        assert received == count
        assert line == f"count={count} checksum={h:016x}"
    print(f"C->python: {count} messages, {total / 1e6:.1f} MB in {elapsed:.2f} s")


# -- the drop-in Queue: max_items, the record counters, Python object records ---------------

QUEUE_COUNT = 20_000
SHORT = 64
"""MAXLEN for the writer feeding a maxsize-5 queue: ~200 such records fit the 16 KiB
ring, so only max_items (not bytes) can stop the writer."""


@pytest.mark.timeout(120)
def test_c_writer_to_queue_honours_maxsize(c_peer: dict[str, Path]) -> None:
    maxsize = 5
    seed = 0xC0FFEE
    with named_queue(maxsize) as q:
        args = [str(c_peer["writer"]), q.name, str(QUEUE_COUNT), str(seed), str(SHORT)]
        with spawn(args) as proc:
            # Nobody reads yet: the writer must stop at exactly maxsize records
            # (msgs_put - msgs_got >= max_items), with plenty of ring bytes left.
            deadline = time.monotonic() + 10
            while q.qsize() < maxsize and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(0.2)
            assert q.qsize() == maxsize, f"the C writer put {q.qsize()} records, maxsize is {maxsize}"
            assert proc.poll() is None, "the C writer should be waiting for a free item slot"
            expected = writer_messages(seed, SHORT)
            h = FNV_OFFSET
            most = 0
            start = time.perf_counter()
            try:
                for i in range(QUEUE_COUNT):
                    size = q.qsize()  # sampled between gets, while the writer runs
                    assert 0 <= size <= maxsize, f"qsize {size} > maxsize {maxsize} before get #{i}"
                    most = max(most, size)
                    data = q.get(timeout=RECV_TIMEOUT)
                    assert type(data) is bytes, f"message #{i} is {type(data).__name__}, not bytes"
                    if i < 200:
                        assert data == next(expected), f"message #{i} differs"
                    h = fold(h, data)
            except shmchan.Empty as exc:
                peer_failed(proc, "the C writer", exc)
            line = finish(proc, "the C writer")
            elapsed = time.perf_counter() - start
        assert line == f"count={QUEUE_COUNT} checksum={h:016x}"
        assert q.qsize() == 0 and q.empty()  # msgs_put (C) == msgs_got (Python)
        with pytest.raises(shmchan.Empty):
            q.get(timeout=0)
    print(f"C->Queue(maxsize={maxsize}): {QUEUE_COUNT} messages in {elapsed:.2f} s, qsize peak {most}")


@pytest.mark.timeout(120)
def test_queue_to_c_reader(c_peer: dict[str, Path]) -> None:
    maxsize = 3
    rng = random.Random(20250101)
    with named_queue(maxsize) as q, spawn([str(c_peer["reader"]), q.name, str(QUEUE_COUNT)]) as proc:
        max_message = 16384 // 2 - 32  # the ring's max payload: no side segments
        h = FNV_OFFSET
        start = time.perf_counter()
        try:
            for i in range(QUEUE_COUNT):
                data = rng.randbytes(rng.randint(0, max_message))
                q.put(data, timeout=RECV_TIMEOUT)  # blocks until the C get counts (msgs_got)
                h = fold(h, data)
                size = q.qsize()
                assert 0 <= size <= maxsize, f"qsize {size} > maxsize {maxsize} after put #{i}"
        except shmchan.Full as exc:
            peer_failed(proc, "the C reader", exc)
        line = finish(proc, "the C reader")
        elapsed = time.perf_counter() - start
        assert line == f"count={QUEUE_COUNT} checksum={h:016x}"
        assert q.qsize() == 0 and q.empty()  # the C reader counted every get
    print(f"Queue(maxsize={maxsize})->C: {QUEUE_COUNT} messages in {elapsed:.2f} s")


@pytest.mark.timeout(60)
def test_c_reader_consumes_python_objects(c_peer: dict[str, Path]) -> None:
    with named_queue(0) as q:
        big_pickle = list(range(5000))
        assert len(pickle.dumps(big_pickle, protocol=5)) > 16384 // 2  # a side segment too
        q.put(b"first")
        q.put({"a": 1})  # PICKLE
        q.put(bytearray(5000))  # PICKLE_OOB (a top-level bytearray goes out of band)
        q.put(b"x" * 20000)  # raw bytes larger than the 16 KiB ring's largest record
        q.put(big_pickle)  # a PICKLE in a side segment
        q.put(b"end")
        assert q.qsize() == 6
        with spawn([str(c_peer["reader"]), "-o", q.name, "3"]) as proc:
            lines = finish(proc, "the C reader -o").splitlines()
        assert lines[:3] == [
            f"other type=2 len={len(pickle.dumps({'a': 1}, protocol=5))}",
            lines[1],
            f"other type=2 len={len(pickle.dumps(big_pickle, protocol=5))}",
        ], lines
        assert re.fullmatch(r"other type=3 len=\d+", lines[1])
        checksum = fold(fold(fold(FNV_OFFSET, b"first"), b"x" * 20000), b"end")
        assert lines[3:] == [f"count=3 checksum={checksum:016x}"]
        assert q.qsize() == 0
        assert side_states(q) == ["free"] * q._core.side_slots  # the C reader freed its entries


@pytest.mark.timeout(120)
def test_large_messages_both_ways(c_peer: dict[str, Path]) -> None:
    """Messages up to 200 KB through a 16 KiB ring: most travel in the side-segment
    pool, written by Python and read by C, and written by C and read by Python."""
    count, seed = 300, 0xB16
    writer = [str(c_peer["writer"]), "", str(count), str(seed), "200000"]
    with posix_channel(16384) as ch, spawn([*writer[:1], ch.name, *writer[2:]]) as proc:
        expected = writer_messages(seed, 200000)
        h = FNV_OFFSET
        for i in range(count):
            data = ch.recv_bytes(timeout=RECV_TIMEOUT)
            if i == 0:
                ch.send_eof()  # the C writer holds write presence by now
            assert data == next(expected), f"message #{i} differs"
            h = fold(h, data)
        with pytest.raises(shmchan.EndOfChannel):
            ch.recv_bytes(timeout=RECV_TIMEOUT)
        assert finish(proc, "the C writer") == f"count={count} checksum={h:016x}"
    rng = random.Random(7)
    with posix_channel(16384) as ch, spawn([str(c_peer["reader"]), ch.name, str(count)]) as proc:
        h = FNV_OFFSET
        for _ in range(count):
            data = rng.randbytes(rng.randint(0, 200000))
            ch.send_bytes(data, timeout=RECV_TIMEOUT) if len(data) <= ch.max_message else ch.send(
                data, timeout=RECV_TIMEOUT
            )
            h = fold(h, data)
        assert finish(proc, "the C reader") == f"count={count} checksum={h:016x}"


@pytest.mark.timeout(60)
def test_python_sees_a_c_readers_departure(c_peer: dict[str, Path]) -> None:
    """The C reader holds read presence: once it has read its messages and exited, a
    Python writer without read rights gets BrokenChannel (docs/layout.md 13)."""
    name = f"shmchan-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with shmchan.Channel.create(name, capacity=16384, backend="posix", mode="w") as tx:
        try:
            with spawn([str(c_peer["reader"]), tx.name, "3"]) as proc:
                for i in range(3):
                    tx.send_bytes(b"m%d" % i, timeout=RECV_TIMEOUT)
                finish(proc, "the C reader")
            deadline = time.monotonic() + 5
            with pytest.raises(shmchan.BrokenChannel):
                while time.monotonic() < deadline:
                    tx.send_bytes(b"after", timeout=RECV_TIMEOUT)
        finally:
            shmchan.Channel.remove(tx.name, backend="posix")


@pytest.mark.timeout(60)
def test_c_reader_rejects_objects_without_flag(c_peer: dict[str, Path]) -> None:
    """Without -o the reader keeps its strict behaviour: exit 3, the record consumed."""
    with named_queue(0) as q:
        q.put({"a": 1})
        q.put(b"after")
        with spawn([str(c_peer["reader"]), q.name, "1"]) as proc:
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 3, err
        assert "record type 2, not BYTES" in err
        assert q.qsize() == 1 and q.get(timeout=0) == b"after"
