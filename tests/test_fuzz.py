"""Corrupt rings and headers never crash, hang or read out of bounds (docs/layout.md 3).

A child process (so that a crash fails the test instead of killing it) creates a channel,
fills it with records that wrap, then many times over flips random bytes of the commit
words, the record headers and the ring, or writes random values into header fields,
and runs every read and write path on it: each call must return normally or raise a
shmchan error, within its timeout. Then the header is re-validated from scratch by the
C library (as an opener would) with random corruptions of the identity block. CI runs
this file again with the extension built with AddressSanitizer and
UndefinedBehaviorSanitizer, so an out-of-bounds read is a failure even when it does not
crash.
"""

from __future__ import annotations

import contextlib
import os

import pytest
from helpers.children import run_child

import shmchan

FUZZ = """
    import mmap, os, random, struct, sys, time
    import shmchan
    from shmchan import _cext
    from shmchan import _layout as L

    rng = random.Random(SEED)
    path = "/dev/shm/" + NAME
    ch = shmchan.Channel.create(NAME, capacity=4096, backend="posix")
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size)
    os.close(fd)
    base = ch._core.header_size
    pristine = bytes(mm)
    errors = {}
    hot = ["tail", "head", "msgs_put", "msgs_got", "state", "wlock", "rlock", "side_journal",
           "side_journal_tail", "tasks_done", "writers_seen", "readers_seen"]

    def fill():
        mm[:] = pristine
        for i in range(rng.randrange(0, 40)):
            try:
                ch.send_bytes_nowait(bytes([i]) * rng.randrange(0, 900))
            except shmchan.Full:
                break
            if rng.random() < 0.4:
                try:
                    ch.recv_bytes_nowait()
                except shmchan.Empty:
                    pass

    for it in range(ITERATIONS):
        fill()
        kind = rng.randrange(4)
        if kind == 0:  # a hot header word
            wanted = rng.choice(hot)
            f = next(f for f in L.FIELDS if f.name == wanted)
            mm[f.offset : f.offset + f.size] = rng.randbytes(f.size)
        elif kind == 1:  # record headers: lengths and types
            for _ in range(rng.randrange(1, 6)):
                at = base + 16 * rng.randrange(4096 // 16)
                mm[at : at + 8] = rng.randbytes(8)
        elif kind == 2:  # anything in the ring
            for _ in range(rng.randrange(1, 30)):
                at = base + rng.randrange(4096)
                mm[at] = rng.randrange(256)
        else:  # the side table
            at = L.SIDE_TABLE_OFFSET + rng.randrange(64 * 32)
            mm[at : at + 8] = rng.randbytes(8)
        for op in ("recv", "recv_many", "send", "send_big", "qsize"):
            t0 = time.monotonic()
            try:
                if op == "recv":
                    ch.recv(timeout=0)
                elif op == "recv_many":
                    ch.recv_many(50, timeout=0)
                elif op == "send":
                    ch.send_bytes(b"z" * rng.randrange(0, 1500), timeout=0)
                elif op == "send_big":
                    ch.send(b"big" * 1000, timeout=0)
                else:
                    ch._core.qsize(); ch._core.put_total(); ch._core.unfinished()
            except shmchan.ShmchanError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            except Exception as exc:
                # A record whose type was flipped to PICKLE: whatever pickle.loads raises
                # for garbage (consumed and reported). Anything else is a bug.
                if not op.startswith("recv"):
                    raise
                errors["unpickling"] = errors.get("unpickling", 0) + 1
            took = time.monotonic() - t0
            if took > 1.0:
                print("SLOW", op, took, flush=True)
                sys.exit(3)

    # The header as an opener validates it (all of block A), from random corruptions.
    for it in range(ITERATIONS * 4):
        buf = bytearray(pristine)
        for _ in range(rng.randrange(1, 8)):
            at = rng.randrange(128) if rng.random() < 0.7 else rng.randrange(4096)
            buf[at] = rng.randrange(256)
        code, why = _cext.check_header(bytes(buf), 1)
        assert code in (0, _cext.E_CORRUPT, _cext.E_NOTSHM, _cext.E_INCOMPAT), code
    mm[:] = pristine
    mm.close()
    ch.close()
    shmchan.Channel.remove(NAME)
    print("ok", repr(errors), flush=True)
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_corrupt_rings_and_headers_fail_cleanly(seed: int) -> None:
    name = f"shmchan-test-fuzz-{seed}-{os.getpid()}"
    try:
        res = run_child(FUZZ, timeout=240, NAME=name, SEED=seed, ITERATIONS=700)
    finally:
        with contextlib.suppress(shmchan.ChannelNotFound):
            shmchan.Channel.remove(name, force=True)
    assert res.returncode == 0, f"the fuzzing child died ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    assert res.stdout.startswith("ok"), res.stdout
    assert "CorruptChannel" in res.stdout, "no corruption was ever detected: the fuzzing did not bite"
