"""Interoperability with the C peer in examples/c (docs/layout.md, posix backend).

The C programs are compiled with -Werror, then exchange many random messages with
Python in both directions. Both sides fold every message into the checksum that
examples/c/README.md defines and compare the results.
"""

from __future__ import annotations

import contextlib
import os
import random
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
    """The messages `writer NAME COUNT SEED` sends (README.md), in order."""
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


@pytest.fixture(scope="module")
def c_peer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Compile writer and reader; any warning fails the test (-Werror)."""
    assert CC is not None  # the module is skipped otherwise
    out = tmp_path_factory.mktemp("c_peer")
    exes = {}
    for prog in ("writer", "reader"):
        cmd = [CC, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror",
               "-o", str(out / prog), str(C_DIR / f"{prog}.c")]  # fmt: skip
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            pytest.fail(f"compiling {prog} failed:\n$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
        exes[prog] = out / prog
    return exes


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
            try:
                for i in range(count):
                    data = ch.recv_bytes(timeout=RECV_TIMEOUT)
                    if i < 200:  # the README's PRNG definition, checked message by message
                        assert data == next(expected), f"message #{i} differs"
                    h = fold(h, data)
                    total += len(data)
            except shmchan.Empty as exc:
                peer_failed(proc, "the C writer", exc)
            line = finish(proc, "the C writer")
            elapsed = time.perf_counter() - start
        assert line == f"count={count} checksum={h:016x}"
        with pytest.raises(shmchan.Empty):  # nothing more than COUNT messages
            ch.recv_bytes(timeout=0)
    print(f"C->python: {count} messages, {total / 1e6:.1f} MB in {elapsed:.2f} s")
