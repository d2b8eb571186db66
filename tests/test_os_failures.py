"""What the OS can do to a channel: corrupt memory, full tmpfs, SysV limits, idle
sleeping, signal storms, Ctrl-C, umask, squatted names and symlinks.

Anything that might crash an interpreter (a corrupt header could mean SIGBUS/SIGSEGV
for a careless reader) runs in a child, which must exit normally. Children announce
each step on stdout and the parent acts on those lines or on shared counters polled
against a deadline, never on a sleep.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
import sysv_ipc
from conftest import unique_name
from helpers import procs
from helpers.children import Child, child, drain, run_child, wait_until

import shmchan
from shmchan import Channel
from shmchan import _layout as L
from shmchan._backends.sysv import sysv_key

# -- harness ---------------------------------------------------------------------------------


# -- 1. corrupt headers and records ------------------------------------------------------------


def segment_path(backend: str, name: str) -> str:
    return name if backend == "mmap" else "/dev/shm/" + name.lstrip("/")


@contextmanager
def raw_segment(backend: str, name: str) -> Iterator[memoryview]:
    """The channel's memory through a mapping of our own (not shmchan's)."""
    if backend == "sysv":
        shm = sysv_ipc.SharedMemory(sysv_key("/" + name.lstrip("/"), "shm"))
        buf = memoryview(shm)
        try:
            yield buf
        finally:
            buf.release()
            shm.detach()
        return
    fd = os.open(segment_path(backend, name), os.O_RDWR | os.O_CLOEXEC)
    try:
        mm = mmap.mmap(fd, 0)
        buf = memoryview(mm)
        try:
            yield buf
        finally:
            buf.release()
            mm.close()
    finally:
        os.close(fd)


def _put(buf: memoryview, field: str, value: int) -> None:
    fmt = {f.name: f for f in L.FIELDS}[field]
    code = {"u64": "<Q", "u32": "<I", "u16": "<H", "i32": "<i"}[fmt.type]
    struct.pack_into(code, buf, fmt.offset, value)


def _get(buf: memoryview, field: str) -> int:
    fmt = {f.name: f for f in L.FIELDS}[field]
    code = {"u64": "<Q", "u32": "<I", "u16": "<H", "i32": "<i"}[fmt.type]
    value: int = struct.unpack_from(code, buf, fmt.offset)[0]
    return value


def _fields(**values: int) -> Callable[[memoryview], None]:
    """Set header fields, then recompute header_crc so that the intended check fires."""

    def patch(buf: memoryview) -> None:
        for field, value in values.items():
            _put(buf, field, value)
        struct.pack_into("<I", buf, L.CRC_END, L.header_crc(buf))

    return patch


def _bad_crc(buf: memoryview) -> None:
    _put(buf, "header_crc", _get(buf, "header_crc") ^ 0x00010000)


def _reserved_byte(buf: memoryview) -> None:
    buf[100] ^= 0xFF  # a reserved byte that header_crc covers; crc left stale


CAP = 4096
HEADER_CASES: dict[str, tuple[Callable[[memoryview], None], str]] = {
    "bad_magic": (lambda b: _put(b, "magic", 0x0102030405060708), "NotAShmchanSegment"),
    "magic_zero": (lambda b: _put(b, "magic", 0), "InitializationTimeout"),
    "layout_major_2": (_fields(layout_major=2), "IncompatibleLayout"),
    "unknown_incompat_feature": (_fields(features_incompat=1 << 7), "IncompatibleLayout"),
    "lock_kind_other": (_fields(lock_kind=9), "IncompatibleLayout"),
    "header_crc_mismatch": (_bad_crc, "CorruptChannel"),
    "reserved_byte_flipped": (_reserved_byte, "CorruptChannel"),
    "header_size": (_fields(header_size=8192), "CorruptChannel"),
    "capacity_not_power_of_two": (_fields(capacity=CAP + 16), "CorruptChannel"),
    "capacity_doubled": (_fields(capacity=2 * CAP), "CorruptChannel"),  # larger than the mapping
    "max_record_over_half": (_fields(max_record=CAP // 2 + 16), "CorruptChannel"),
    "max_record_unaligned": (_fields(max_record=1000), "CorruptChannel"),
    "tail_before_head": (_fields(head=64, tail=32), "CorruptChannel"),
    "tail_past_capacity": (_fields(head=0, tail=CAP + 16), "CorruptChannel"),
    "unaligned_head": (_fields(head=8, tail=16), "CorruptChannel"),
    "unaligned_tail": (_fields(head=16, tail=40), "CorruptChannel"),
}

OPEN_AND_REPORT = """
    import time
    import shmchan
    t0 = time.monotonic()
    try:
        ch = shmchan.Channel.open(NAME, backend=BACKEND, timeout=0.3)
    except Exception as exc:
        print(type(exc).__name__, round(time.monotonic() - t0, 3))
    else:
        ch.close()
        print("opened")
"""


def _open_in_child(backend: str, name: str) -> tuple[str, float]:
    res = run_child(OPEN_AND_REPORT, NAME=name, BACKEND=backend)
    assert res.returncode == 0, f"the opener died ({res.returncode}):\n{res.stderr}"
    words = res.stdout.split()
    assert words, res.stderr
    return words[0], float(words[1]) if len(words) > 1 else 0.0


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_corrupt_header_is_refused(backend: str, name: str, case: str) -> None:
    patch, expected = HEADER_CASES[case]
    Channel.create(name, capacity=CAP, backend=backend).close()
    with raw_segment(backend, name) as buf:
        original = bytes(buf[: L.HEADER_SIZE])
        patch(buf)
    try:
        got, elapsed = _open_in_child(backend, name)
        assert got == expected
        if expected == "InitializationTimeout":
            assert 0.3 <= elapsed < 1.5
    finally:
        with raw_segment(backend, name) as buf:  # so that remove() finds the semaphores
            buf[: L.HEADER_SIZE] = original


@pytest.mark.parametrize("change", ["shorter", "longer", "below_header"])
def test_segment_size_mismatch_is_refused(backend: str, name: str, change: str) -> None:
    """The mapping must be exactly header + capacity: a shorter one would SIGBUS."""
    total = L.HEADER_SIZE + CAP
    new_size = {"shorter": total - 4096, "longer": total + 4096, "below_header": 100}[change]
    expected = "InitializationTimeout" if change == "below_header" else "CorruptChannel"
    if backend == "sysv" and change == "below_header":
        pytest.skip("a SysV segment is rebuilt, not truncated: it always holds the header")
    ch = Channel.create(name, capacity=CAP, backend=backend)
    ch.send_bytes(b"in the ring")
    ch.close()  # nothing in this process maps the segment while it changes size
    if backend == "sysv":
        # SysV segments cannot be resized: replace the segment under the same key.
        key = sysv_key("/" + name, "shm")
        with raw_segment(backend, name) as buf:
            content = bytes(buf)
        old = sysv_ipc.SharedMemory(key)
        old.remove()
        old.detach()
        shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode=0o600, size=new_size)
        try:
            shm.write(content[:new_size])
        finally:
            shm.detach()
    else:
        os.truncate(segment_path(backend, name), new_size)
    try:
        assert _open_in_child(backend, name)[0] == expected
    finally:
        if backend != "sysv":
            os.truncate(segment_path(backend, name), total)


def _advance(ch: Channel, to: int) -> None:
    """Move head and tail (equal) to ``to`` with 1 KiB records."""
    while ch._core.ring.tail < to:
        ch.send_bytes(b"s" * 1008)
        ch.recv_bytes_nowait()
    assert ch._core.ring.tail == ch._core.ring.head == to


BLOCKED = """
    import shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    print("ready", flush=True)
    try:
        if SIDE == "consumer":
            ch.recv_bytes(timeout=10)
        else:
            ch.send_bytes(b"p" * 1008, timeout=10)
        print("returned")
    except Exception as exc:
        print("raised", type(exc).__name__, flush=True)
"""


@pytest.mark.parametrize("waiter", ["consumer", "producer"])
def test_corrupt_record_is_refused_everywhere(backend: str, name: str, waiter: str) -> None:
    """A record whose length runs past the ring end: the reader that finds it raises
    CorruptChannel and marks the channel, so a peer blocked in another process and any
    other handle raise it too, instead of reading garbage or sleeping forever."""
    with Channel.create(name, capacity=CAP, backend=backend) as ch:
        ring = ch._core.ring
        _advance(ch, 3072)
        if waiter == "producer":
            for _ in range(4):  # fill the ring: records at 3072 (to the end), 0, 1024, 2048
                ch.send_bytes_nowait(b"f" * 1008)
            with pytest.raises(shmchan.Full):
                ch.send_bytes_nowait(b"")
        with child(BLOCKED, NAME=name, BACKEND=backend, SIDE=waiter) as c:
            c.expect("ready")
            counter = ring.consumers_waiting if waiter == "consumer" else ring.producers_waiting
            wait_until(lambda: counter() == 1, 10, f"the {waiter} to wait")
            bad = (1500 | (L.RT_BYTES << 32)).to_bytes(8, "little")  # 3072 + 1520 > 4096
            at = L.HEADER_SIZE + (ring.head & ring.mask)
            if waiter == "consumer":
                # A "producer" that commits a record with an impossible length (no post).
                assert ch._core.seg.wlock.acquire(None)
                try:
                    ch._core.seg.buf[at : at + 8] = bad
                    ring._q[L.Q_TAIL] = ring.tail + 32
                finally:
                    ch._core.seg.wlock.release()
            else:
                ch._core.seg.buf[at : at + 8] = bad  # the record at head goes bad
            with pytest.raises(shmchan.CorruptChannel):
                ch.recv_bytes(timeout=1)
            t0 = time.monotonic()
            assert c.expect("raised", timeout=5) == "raised CorruptChannel"
            assert time.monotonic() - t0 < 1.0
            assert c.finish(timeout=10) == 0, c.stderr
        assert ring.state() == L.STATE_CORRUPT
        with Channel.open(name, backend=backend) as other:
            with pytest.raises(shmchan.CorruptChannel):
                other.recv_bytes_nowait()
            with pytest.raises(shmchan.CorruptChannel):
                other.send_bytes_nowait(b"x")
        with pytest.raises(shmchan.CorruptChannel):
            ch.recv_bytes(timeout=0.1)


# -- 2. out of space (private tmpfs and IPC namespaces) -----------------------------------------


@cache
def _can_unshare(*flags: str) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        res = subprocess.run(["unshare", *flags, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def _in_namespace(flags: list[str], setup: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``setup`` (sh) then ``python -c code`` inside ``unshare flags``."""
    script = f'{setup} && exec "$0" -c "$1"'
    return subprocess.run(
        ["unshare", *flags, "sh", "-c", script, sys.executable, textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=procs.child_env(),
        timeout=60,
        check=False,
    )


TMPFS_NOSPACE = """
    import errno, os
    import shmchan
    from shmchan import Channel

    def listing():
        return sorted(os.listdir("/dev/shm"))

    def fill(leave):
        if os.path.exists("/dev/shm/filler"):
            os.unlink("/dev/shm/filler")
        st = os.statvfs("/dev/shm")
        fd = os.open("/dev/shm/filler", os.O_WRONLY | os.O_CREAT)
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - leave)
        os.close(fd)

    def attempt(label, backend, name, capacity):
        try:
            ch = Channel.create(name, capacity=capacity, backend=backend)
        except shmchan.NoSpace as exc:
            assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC, exc
            print(label, "NoSpace", listing(), flush=True)
        except BaseException as exc:
            print(label, "unexpected", type(exc).__name__, exc, flush=True)
        else:
            ch.close()
            ch.unlink()
            print(label, "created", flush=True)

    for backend, name in (("posix", "x"), ("mmap", "/dev/shm/x-file")):
        attempt(backend + " 4MiB in 1MiB", backend, name, 4 << 20)
        fill(leave=100 << 10)
        attempt(backend + " 256KiB in 100KiB", backend, name, 256 << 10)
        # Room for the 8 KiB segment but not for both of its semaphores.
        fill(leave=8192 + 4096)
        attempt(backend + " no room for semaphores", backend, name, 4096)
        os.unlink("/dev/shm/filler")

    # Created means backed: filling the tmpfs afterwards cannot SIGBUS the channel.
    ch = Channel.create("y", capacity=256 << 10, backend="posix")
    fill(leave=0)
    chunk = b"z" * (ch.max_message // 2)
    for _ in range(2 * ch.capacity // len(chunk)):
        ch.send_bytes(chunk, timeout=1)
        assert ch.recv_bytes(timeout=1) == chunk
    ch.close()
    ch.unlink()
    os.unlink("/dev/shm/filler")
    print("used a full tmpfs without SIGBUS", listing(), flush=True)
"""


@pytest.mark.root
@pytest.mark.skipif(not _can_unshare("-m"), reason="needs root and unshare -m (private tmpfs on /dev/shm)")
def test_full_tmpfs_raises_nospace_and_leaves_nothing() -> None:
    res = _in_namespace(
        ["-m", "--propagation", "private"], "mount -t tmpfs -o size=1m tmpfs /dev/shm", TMPFS_NOSPACE
    )
    assert res.returncode == 0, f"child died ({res.returncode}, never SIGBUS):\n{res.stderr}"
    assert res.stdout.splitlines() == [
        "posix 4MiB in 1MiB NoSpace []",
        "posix 256KiB in 100KiB NoSpace ['filler']",
        "posix no room for semaphores NoSpace ['filler']",
        "mmap 4MiB in 1MiB NoSpace []",
        "mmap 256KiB in 100KiB NoSpace ['filler']",
        "mmap no room for semaphores NoSpace ['filler']",
        "used a full tmpfs without SIGBUS []",
    ], res.stderr


SYSV_LIMITS = """
    import errno
    import shmchan
    from shmchan import Channel

    def objects():
        counts = []
        for kind in ("shm", "sem"):
            with open("/proc/sysvipc/" + kind) as f:
                counts.append(len(f.read().splitlines()) - 1)
        return counts

    def limit(sysctl, value, capacity):
        path = "/proc/sys/kernel/" + sysctl
        with open(path) as f:
            saved = f.read()
        with open(path, "w") as f:
            f.write(value)
        try:
            Channel.create("x", capacity=capacity, backend="sysv")
        except shmchan.NoSpace as exc:
            assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC, exc
            print(sysctl, "NoSpace", objects(), flush=True)
        except ValueError as exc:
            print(sysctl, "ValueError", objects(), flush=True)
        except BaseException as exc:
            print(sysctl, "unexpected", type(exc).__name__, exc, flush=True)
        else:
            Channel.remove("x", backend="sysv")
            print(sysctl, "created", flush=True)
        finally:
            with open(path, "w") as f:
                f.write(saved)

    print("start", objects(), flush=True)
    limit("shmmni", "0", 4096)                        # no segment ids at all
    sem = open("/proc/sys/kernel/sem").read().split()
    limit("sem", " ".join(sem[:3] + ["2"]), 4096)     # SEMMNI 2: the third set fails
    limit("shmall", "100", 4 << 20)                   # 100 pages in all
    limit("shmmax", str(1 << 20), 4 << 20)            # segment larger than shmmax
"""


@pytest.mark.root
@pytest.mark.skipif(not _can_unshare("-i"), reason="needs root and unshare -i (private SysV IPC namespace)")
def test_sysv_limits_raise_nospace_and_leave_nothing() -> None:
    res = _in_namespace(["-i"], "true", SYSV_LIMITS)
    assert res.returncode == 0, f"child died ({res.returncode}):\n{res.stderr}"
    lines = res.stdout.splitlines()
    assert lines[:4] == [
        "start [0, 0]",
        "shmmni NoSpace [0, 0]",
        "sem NoSpace [0, 0]",  # the segment and two semaphore sets were rolled back
        "shmall NoSpace [0, 0]",
    ], res.stderr
    assert lines[4] in ("shmmax NoSpace [0, 0]", "shmmax ValueError [0, 0]"), res.stderr
    assert len(lines) == 5


# -- 3. an idle waiter sleeps ------------------------------------------------------------------

IDLE_CONSUMER = """
    import shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    print("ready", flush=True)
    print("got", ch.recv_bytes().decode(), flush=True)
"""


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


@pytest.mark.slow
def test_blocked_consumer_uses_no_cpu() -> None:
    """One consumer per backend blocked 10 s on an empty channel (all at once)."""
    window = 10.0
    backends = shmchan.available_backends()
    names = {b: unique_name(b) for b in backends}
    chans: dict[str, Channel] = {}
    kids: dict[str, Child] = {}
    try:
        for b in backends:
            chans[b] = Channel.create(names[b], capacity=4096, backend=b)
        for b in backends:
            kids[b] = Child(IDLE_CONSUMER, NAME=names[b], BACKEND=b)
        for b in backends:
            kids[b].expect("ready")
            wait_until(lambda b=b: chans[b]._core.ring.consumers_waiting() == 1, 10, f"{b} consumer")
        t0 = time.monotonic()
        before = {b: _cpu_ticks(kids[b].pid) for b in backends}
        time.sleep(window)  # the measurement window, not synchronisation
        after = {b: _cpu_ticks(kids[b].pid) for b in backends}
        elapsed = time.monotonic() - t0
        used = {b: (after[b] - before[b]) / os.sysconf("SC_CLK_TCK") for b in backends}
        for b in backends:
            chans[b].send_bytes(b"wake up " + b.encode(), timeout=1)
        for b in backends:
            assert kids[b].expect("got", timeout=5) == f"got wake up {b}"
            assert kids[b].finish(timeout=10) == 0, kids[b].stderr
        hungry = {b: u for b, u in used.items() if u >= 0.01 * elapsed}
        assert not hungry, f"CPU seconds used in {elapsed:.1f} s of waiting: {used}"
    finally:
        for c in kids.values():
            if c.proc.poll() is None:
                c.proc.kill()
            c.finish(timeout=10)
        for b, ch in chans.items():
            ch.close()
            Channel.remove(names[b], backend=b)


# -- 4. EINTR storm -------------------------------------------------------------------------------

STORM = """
    import os, signal, sys, time
    import shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    alarms = 0

    def on_alarm(signum, frame):
        global alarms
        alarms += 1
        if alarms == 200:
            os.write(1, b"storming\\n")  # 200 signals have hit the waiting call

    signal.signal(signal.SIGALRM, on_alarm)
    if MODE == "send":
        while True:
            try:
                ch.send_bytes_nowait(b"f" * 100)
            except shmchan.Full:
                break
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    t0 = time.monotonic()
    try:
        if MODE == "recv":
            ch.recv_bytes(timeout=1.0)
            result = "returned"
        elif MODE == "send":
            ch.send_bytes(b"x" * 100, timeout=1.0)
            result = "returned"
        else:
            sys.stdout.flush()
            result = "got " + ch.recv_bytes(timeout=10.0).decode()
    except shmchan.Empty:
        result = "Empty"
    except shmchan.Full:
        result = "Full"
    except BaseException as exc:
        result = "error " + repr(exc)
    elapsed = time.monotonic() - t0
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    print(result, round(elapsed, 3), alarms, flush=True)
"""


@pytest.mark.parametrize("mode", ["recv", "send"])
def test_signal_storm_keeps_the_deadline(backend: str, name: str, mode: str) -> None:
    """1 kHz SIGALRM with a Python handler: the timeout is not restarted per signal and
    no InterruptedError (or anything else) escapes."""
    with Channel.create(name, capacity=CAP, backend=backend):
        res = run_child(STORM, NAME=name, BACKEND=backend, MODE=mode)
    assert res.returncode == 0, res.stderr
    result, elapsed, alarms = res.stdout.splitlines()[-1].split()
    assert result == ("Empty" if mode == "recv" else "Full"), res.stdout
    assert 1.0 <= float(elapsed) <= 1.5, elapsed
    assert int(alarms) > 100


def test_message_arrives_during_signal_storm(backend: str, name: str) -> None:
    with (
        Channel.create(name, capacity=CAP, backend=backend) as ch,
        child(STORM, NAME=name, BACKEND=backend, MODE="wait") as c,
    ):
        c.expect("storming")
        wait_until(lambda: ch._core.ring.consumers_waiting() == 1, 10, "the consumer to wait")
        t0 = time.monotonic()
        ch.send_bytes(b"through the storm", timeout=1)
        line = c.expect("got", timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert line.startswith("got through the storm "), line
        assert int(line.split()[-1]) >= 200
        assert c.finish(timeout=10) == 0, c.stderr


HANDLER_RAISES = """
    import signal, time
    import shmchan

    class FromHandler(Exception):
        pass

    def on_alarm(signum, frame):
        raise FromHandler

    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    if MODE == "send":
        while True:
            try:
                ch.send_bytes_nowait(b"f" * 100)
            except shmchan.Full:
                break
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    t0 = time.monotonic()
    try:
        if MODE == "recv":
            ch.recv_bytes(timeout=2.0)
        else:
            ch.send_bytes(b"x" * 100, timeout=2.0)
        result = "returned"
    except BaseException as exc:
        result = type(exc).__name__
    print(result, round(time.monotonic() - t0, 3), flush=True)
"""


@pytest.mark.parametrize("mode", ["recv", "send"])
def test_exception_from_signal_handler_propagates(backend: str, name: str, mode: str) -> None:
    """An exception raised by a Python signal handler while a call is blocked comes out
    of that call (PEP 475), as KeyboardInterrupt does; it is not swallowed until the
    timeout expires."""
    with Channel.create(name, capacity=CAP, backend=backend) as ch:
        res = run_child(HANDLER_RAISES, NAME=name, BACKEND=backend, MODE=mode)
        assert res.returncode == 0, res.stderr
        result, elapsed = res.stdout.split()
        assert result == "FromHandler", f"{res.stdout.strip()} (expected FromHandler after ~0.1 s)"
        assert float(elapsed) < 0.6
        assert ch._core.ring.consumers_waiting() == ch._core.ring.producers_waiting() == 0


# -- 5. Ctrl-C ------------------------------------------------------------------------------------

CTRL_C = """
    import signal, sys
    import shmchan
    # A shell that starts us in the background may have ignored SIGINT: undo that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    if SIDE == "send":
        n = 0
        while True:
            try:
                ch.send_bytes_nowait(b"fill-%d" % n)
            except shmchan.Full:
                break
            n += 1
    print("ready", flush=True)
    try:
        if SIDE == "recv":
            ch.recv_bytes()
        else:
            ch.send_bytes(b"never-sent")
        print("returned?!", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    sys.stdin.readline()  # the parent has checked the shared counters
    if SIDE == "recv":
        print("got", ch.recv_bytes(timeout=2).decode(), flush=True)
        ch.send_bytes(b"from-child", timeout=2)
    else:
        print("got", ch.recv_bytes_nowait().decode(), flush=True)
        ch.send_bytes(b"after", timeout=2)
    print("done", flush=True)
"""


@pytest.mark.parametrize("side", ["recv", "send"])
def test_ctrl_c_while_blocked(backend: str, name: str, side: str) -> None:
    with (
        Channel.create(name, capacity=CAP, backend=backend) as ch,
        child(CTRL_C, NAME=name, BACKEND=backend, SIDE=side) as c,
    ):
        ring = ch._core.ring
        counter = ring.consumers_waiting if side == "recv" else ring.producers_waiting
        c.expect("ready")
        wait_until(lambda: counter() == 1, 10, "the child to block")
        positions = (ring.head, ring.tail)
        os.kill(c.pid, signal.SIGINT)
        t0 = time.monotonic()
        c.expect("interrupted", timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert counter() == 0, "the interrupted waiter is still registered"
        assert (ring.head, ring.tail) == positions, "the interrupted call changed the ring"
        if side == "recv":
            ch.send_bytes(b"from-parent", timeout=1)
            c.tell("go")
            assert c.expect("got") == "got from-parent"
            c.expect("done")
            assert ch.recv_bytes(timeout=2) == b"from-child"
        else:
            c.tell("go")
            assert c.expect("got") == "got fill-0"
            c.expect("done")
            rest = drain(ch)
            assert rest[-1] == b"after" and b"never-sent" not in rest
            assert rest[:-1] == [b"fill-%d" % i for i in range(1, len(rest))]
        assert c.finish(timeout=10) == 0, c.stderr
        assert ring.consumers_waiting() == ring.producers_waiting() == 0


LOCK_HOLDER = """
    import sys
    import shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    assert ch._core.seg.wlock.acquire(None)
    print("locked", flush=True)
    sys.stdin.readline()
    ch._core.seg.wlock.release()
    print("released", flush=True)
    sys.stdin.readline()
"""

BLOCKED_ON_LOCK = """
    import signal, sys
    import shmchan
    # A shell that starts us in the background may have ignored SIGINT: undo that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    try:
        print("ready", flush=True)
        ch.send_bytes(b"never-sent")  # no timeout: waits for the stopped holder
        print("returned?!", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    sys.stdin.readline()
    ch.send_bytes(b"after", timeout=2)
    print("done", flush=True)
"""


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_ctrl_c_while_waiting_for_a_stopped_lock_holder(backend: str, name: str) -> None:
    """A call with no timeout waits for a stopped (not dead) holder, but Ctrl-C still
    gets it out, holding nothing; once the holder continues, the interrupted process
    sends normally."""
    with (
        Channel.create(name, capacity=CAP, backend=backend) as ch,
        child(LOCK_HOLDER, NAME=name, BACKEND=backend) as holder,
    ):
        holder.expect("locked")
        os.kill(holder.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: _proc_state(holder.pid) in "Tt", 5, "the holder to stop")
            # Started only now, so its send cannot slip in before the holder locked.
            with child(BLOCKED_ON_LOCK, NAME=name, BACKEND=backend) as sender:
                sender.expect("ready")
                wait_until(lambda: _proc_state(sender.pid) == "S", 5, "the sender to block")
                os.kill(sender.pid, signal.SIGINT)
                t0 = time.monotonic()
                sender.expect("interrupted", timeout=5)
                assert time.monotonic() - t0 < 1.0
                os.kill(holder.pid, signal.SIGCONT)
                holder.tell("release")
                holder.expect("released")
                sender.tell("go")
                sender.expect("done")
                assert sender.finish(timeout=10) == 0, sender.stderr
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        assert drain(ch) == [b"after"]
        assert ch._core.ring.producers_waiting() == 0


# -- 6. permissions, existing and missing names, symlinks -------------------------------------


@pytest.mark.parametrize("umask", [0o077, 0o000], ids=["umask077", "umask000"])
@pytest.mark.parametrize("permissions", [0o640, None], ids=["perm640", "default"])
def test_permissions_are_exact_whatever_the_umask(
    backend: str, name: str, umask: int, permissions: int | None
) -> None:
    want = 0o600 if permissions is None else permissions
    kwargs = {} if permissions is None else {"permissions": permissions}
    old = os.umask(umask)
    try:
        ch = Channel.create(name, capacity=CAP, backend=backend, **kwargs)
    finally:
        os.umask(old)
    with ch:
        if backend == "sysv":
            full = "/" + name
            shm = sysv_ipc.SharedMemory(sysv_key(full, "shm"))
            shm.detach()
            modes = {"shm": shm.mode & 0o777}
            for role in ("wlock", "rlock", "ne", "nf"):
                modes[role] = sysv_ipc.Semaphore(sysv_key(full, role)).mode & 0o777
        else:
            nonce = _get(ch._core.seg.buf, "nonce")
            paths = {
                "segment": segment_path(backend, name),
                "ne": f"/dev/shm/sem.shmchan.{nonce:016x}.ne",
                "nf": f"/dev/shm/sem.shmchan.{nonce:016x}.nf",
            }
            modes = {what: os.stat(p).st_mode & 0o777 for what, p in paths.items()}
    assert modes == dict.fromkeys(modes, want), {k: oct(v) for k, v in modes.items()}


def test_create_existing_and_open_missing(backend: str, name: str) -> None:
    with pytest.raises(shmchan.ChannelNotFound):
        Channel.open(name, backend=backend)
    with pytest.raises(FileNotFoundError):
        Channel.remove(name, backend=backend)
    with Channel.create(name, capacity=CAP, backend=backend) as ch:
        ch.send_bytes(b"kept")
        with pytest.raises(shmchan.ChannelExists):
            Channel.create(name, capacity=CAP, backend=backend)
        with pytest.raises(FileExistsError):
            Channel.create(name, capacity=2 * CAP, backend=backend)
        assert ch.recv_bytes_nowait() == b"kept"  # the failed creates touched nothing


def test_mmap_refuses_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"do not touch")
    target.chmod(0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")

    with pytest.raises(OSError) as info:
        Channel.open(str(link), backend="mmap")
    assert info.value.errno == errno.ELOOP
    with pytest.raises(shmchan.ChannelExists):
        Channel.create(str(link), capacity=CAP, backend="mmap")
    with pytest.raises(FileExistsError):
        Channel.create(str(dangling), capacity=CAP, backend="mmap")
    with pytest.raises(OSError) as info:
        Channel.remove(str(link), backend="mmap")
    assert info.value.errno == errno.ELOOP

    assert target.read_bytes() == b"do not touch"
    assert target.stat().st_mode & 0o777 == 0o644
    assert not (tmp_path / "nowhere").exists()
    assert link.is_symlink() and dangling.is_symlink()


def test_posix_refuses_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"do not touch")
    name = unique_name("posix")
    link = Path("/dev/shm") / name
    link.symlink_to(target)
    try:
        with pytest.raises(OSError) as info:
            Channel.open(name, backend="posix")
        assert info.value.errno == errno.ELOOP
        with pytest.raises(shmchan.ChannelExists):
            Channel.create(name, capacity=CAP, backend="posix")
        with pytest.raises(OSError) as info:
            Channel.remove(name, backend="posix")
        assert info.value.errno == errno.ELOOP
        assert link.is_symlink()
    finally:
        link.unlink()
    assert target.read_bytes() == b"do not touch"
