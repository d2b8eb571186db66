"""What the OS can do to a channel: corrupt memory, full tmpfs, SysV limits, idle
sleeping, signal storms, Ctrl-C, umask, squatted names and symlinks.

Anything that might crash an interpreter (a corrupt header could mean SIGBUS/SIGSEGV
for a careless reader) runs in a child, which must exit normally. Children announce
each step on stdout and the parent acts on those lines or on shared counters polled
against a deadline, never on a sleep.
"""

from __future__ import annotations

import contextlib
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
from conftest import leaks_since, snapshot, unique_name
from helpers import procs
from helpers.children import (
    Child,
    child,
    consumers_waiting,
    drain,
    header,
    holding_lock,
    lock_holder,
    producers_waiting,
    ring_positions,
    run_child,
    side_entries,
    side_objects,
    wait_until,
)

import shmchan
from shmchan import Channel, _cext
from shmchan import _layout as L
from shmchan._backends.sysv import sysv_key
from shmchan._core import WAIT_SLICE

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
HEADER = L.header_size(L.DEFAULT_MAX_PEERS)  # what Channel.create makes: 1024 peer slots
W = L.make_word
HEADER_CASES: dict[str, tuple[Callable[[memoryview], None], str]] = {
    "bad_magic": (lambda b: _put(b, "magic", 0x0102030405060708), "NotAShmchanSegment"),
    "layout_1": (_fields(layout_major=1), "IncompatibleLayout"),  # shmchan 0.1's layout
    "layout_3": (_fields(layout_major=3), "IncompatibleLayout"),
    "unknown_incompat_feature": (_fields(features_incompat=1 << 7), "IncompatibleLayout"),
    "liveness_kind_unknown": (_fields(liveness_kind=9), "CorruptChannel"),
    "wakeup_kind_unknown": (_fields(wakeup_kind=2), "CorruptChannel"),
    "header_crc_mismatch": (_bad_crc, "CorruptChannel"),
    "reserved_byte_flipped": (_reserved_byte, "CorruptChannel"),
    "header_size": (_fields(header_size=HEADER + 4096), "CorruptChannel"),
    "max_peers_zero": (_fields(max_peers=0), "CorruptChannel"),
    "max_peers_over_limit": (
        _fields(max_peers=L.MAX_PEERS_LIMIT + 1, header_size=L.header_size(L.MAX_PEERS_LIMIT + 1)),
        "CorruptChannel",
    ),
    "max_peers_not_matching_header_size": (_fields(max_peers=8), "CorruptChannel"),
    "peer_table_offset": (_fields(peer_table_offset=L.PEER_TABLE_OFFSET + 32), "CorruptChannel"),
    "side_table_offset": (_fields(side_table_offset=L.SIDE_TABLE_OFFSET + 32), "CorruptChannel"),
    "side_slots_over_max": (_fields(side_slots=L.SIDE_SLOTS_MAX + 1), "CorruptChannel"),
    "record_header_size": (_fields(record_header_size=32), "CorruptChannel"),
    "record_align": (_fields(record_align=8), "CorruptChannel"),
    "capacity_not_power_of_two": (_fields(capacity=CAP + 16), "CorruptChannel"),
    "capacity_doubled": (_fields(capacity=2 * CAP), "CorruptChannel"),  # larger than the mapping
    "max_record_over_half": (_fields(max_record=CAP // 2 + 16), "CorruptChannel"),
    "max_record_unaligned": (_fields(max_record=1000), "CorruptChannel"),
    # Commit words: positions in 16-byte units (they cannot be unaligned any more) and
    # record counts, which must agree with the bytes between head and tail.
    "tail_before_head": (_fields(head=W(0, 64), tail=W(0, 32)), "CorruptChannel"),
    "tail_past_capacity": (_fields(head=W(0, 0), tail=W(1, CAP + 16)), "CorruptChannel"),
    "more_records_than_bytes": (_fields(head=W(0, 0), tail=W(3, 32)), "CorruptChannel"),
    "records_without_bytes": (_fields(head=W(0, 64), tail=W(1, 64)), "CorruptChannel"),
    "head_count_past_tail": (_fields(head=W(2, 64), tail=W(1, 128)), "CorruptChannel"),
}

OPEN_AND_REPORT = """
    import time
    import shmchan
    t0 = time.monotonic()
    try:
        ch = shmchan.Channel.open(NAME, backend=BACKEND, timeout=0.3)
    except Exception as exc:
        print(type(exc).__name__, round(time.monotonic() - t0, 3), str(exc).replace("\\n", " "))
    else:
        ch.close()
        print("opened")
"""


def _open_in_child(backend: str, name: str) -> tuple[str, float, str]:
    res = run_child(OPEN_AND_REPORT, NAME=name, BACKEND=backend)
    assert res.returncode == 0, f"the opener died ({res.returncode}):\n{res.stderr}"
    words = res.stdout.split(maxsplit=2)
    assert words, res.stderr
    return words[0], float(words[1]) if len(words) > 1 else 0.0, words[2] if len(words) > 2 else ""


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_corrupt_header_is_refused(backend: str, name: str, case: str) -> None:
    patch, expected = HEADER_CASES[case]
    Channel.create(name, capacity=CAP, backend=backend).close()
    with raw_segment(backend, name) as buf:
        assert buf.nbytes == HEADER + CAP
        original = bytes(buf[:HEADER])
        patch(buf)
    try:
        got, _, why = _open_in_child(backend, name)
        assert got == expected, why
        if case == "layout_1":  # the message names both versions
            assert "layout 1.0" in why and "layout 2" in why, why
        if case == "bad_magic" and backend != "sysv":
            # Not shmchan's: remove() refuses it (it is somebody else's file).
            with pytest.raises(shmchan.NotAShmchanSegment):
                Channel.remove(name, backend=backend)
    finally:
        with raw_segment(backend, name) as buf:  # so that remove() recognises it
            buf[:HEADER] = original


@pytest.mark.parametrize("how", ["remove", "unlink"])
@pytest.mark.parametrize("case", ["header_crc_mismatch", "capacity_doubled", "truncated"])
def test_a_corrupt_channel_is_removed_whole(backend: str, name: str, case: str, how: str) -> None:
    """``Channel.remove(name)``, and ``unlink()`` on a handle that was open before the
    header went bad, remove everything the channel uses (segment, semaphores, side
    objects) while the header stays corrupt or truncated."""
    if case == "truncated" and (backend == "sysv" or how == "unlink"):
        pytest.skip("a SysV segment cannot be truncated; truncating a mapped segment is SIGBUS")
    before = snapshot()
    ch = Channel.create(name, capacity=CAP, backend=backend)
    ch.send(b"L" * 3 * CAP)  # one side object
    assert leaks_since(before)  # the channel's objects exist
    if case == "truncated":
        ch.close()  # its processes are gone (docs/security.md: never truncate a live one)
        os.truncate(name if backend == "mmap" else "/dev/shm/" + name, 100)
    else:
        with raw_segment(backend, name) as buf:
            HEADER_CASES[case][0](buf)
    if how == "remove":
        Channel.remove(name, backend=backend)
        ch.close()
    else:
        ch.unlink()
        ch.close()
    assert not leaks_since(before), leaks_since(before)


@pytest.mark.parametrize("busy", [False, True], ids=["creator_gone", "creator_busy"])
def test_unpublished_segment(backend: str, name: str, busy: bool) -> None:
    """magic 0: a segment never published. While its creator is still at work (it holds
    the creation lock: an OFD lock on bytes [0, 8), or semaphore 0 of the sysv peers
    set), an opener waits out its timeout; once the creator is gone, it is told at once."""
    Channel.create(name, capacity=CAP, backend=backend).close()
    with raw_segment(backend, name) as buf:
        original = bytes(buf[:8])
        _put(buf, "magic", 0)
    try:
        with contextlib.ExitStack() as stack:
            if busy:
                stack.enter_context(_creation_lock_held(backend, name))
            got, elapsed, why = _open_in_child(backend, name)
        assert got == "InitializationTimeout", why
        if busy:
            assert 0.3 <= elapsed < 1.5, elapsed
        else:
            assert elapsed < 0.25, elapsed
            assert "died" in why, why
    finally:
        with raw_segment(backend, name) as buf:
            buf[:8] = original


@contextmanager
def _creation_lock_held(backend: str, name: str) -> Iterator[None]:
    """Hold what a creator holds until it publishes its segment."""
    if backend == "sysv":
        semid = _cext.sem_lookup(sysv_key("/" + name.lstrip("/"), "peers"))
        assert semid is not None
        assert _cext.sem_op(semid, 0, 1, True, True)
        try:
            yield
        finally:
            _cext.sem_op(semid, 0, -1, True, True)
        return
    fd = os.open(segment_path(backend, name), os.O_RDWR | os.O_CLOEXEC)
    try:
        assert _cext.ofd_lock(fd, 0, 8, True)
        yield
    finally:
        os.close(fd)  # releases the OFD lock


@pytest.mark.parametrize("change", ["shorter", "longer", "below_header"])
def test_segment_size_mismatch_is_refused(backend: str, name: str, change: str) -> None:
    """The mapping must be exactly header + capacity: a shorter one would SIGBUS. Each is
    refused as corrupt (a published segment is never resized), not waited for."""
    total = HEADER + CAP
    new_size = {"shorter": total - 4096, "longer": total + 4096, "below_header": 100}[change]
    expected = "CorruptChannel"
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
        got, _, why = _open_in_child(backend, name)
        assert got == expected, why  # CorruptChannel, not InitializationTimeout: at once
    finally:
        if backend != "sysv":
            os.truncate(segment_path(backend, name), total)


def _advance(ch: Channel, to: int) -> None:
    """Move head and tail (equal) to byte ``to`` with 1 KiB records."""
    while header(ch)["tail_position"] < to:
        ch.send_bytes(b"s" * 1008)
        ch.recv_bytes_nowait()
    h = header(ch)
    assert h["tail_position"] == h["head_position"] == to


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
        _advance(ch, 3072)
        if waiter == "producer":
            for _ in range(4):  # fill the ring: records at 3072 (to the end), 0, 1024, 2048
                ch.send_bytes_nowait(b"f" * 1008)
            with pytest.raises(shmchan.Full):
                ch.send_bytes_nowait(b"")
        with child(BLOCKED, NAME=name, BACKEND=backend, SIDE=waiter) as c:
            c.expect("ready")
            counter = consumers_waiting if waiter == "consumer" else producers_waiting
            wait_until(lambda: counter(ch) == 1, 10, f"the {waiter} to wait")
            bad = struct.pack("<IH", 1500, L.RT_BYTES)  # 3072 + 16 + 1500 > 4096
            before = header(ch)
            at = HEADER + before["head_position"] % CAP
            with raw_segment(backend, name) as buf:
                buf[at : at + 6] = bad
                if waiter == "consumer":
                    # A "producer" commits a record with an impossible length (no wakeup:
                    # the only writer is this test, nobody else touches the tail).
                    assert before["records"] == 0
                    _put(buf, "tail", W(before["tail_count"] + 1, before["tail_position"] + 32))
            with pytest.raises(shmchan.CorruptChannel):
                ch.recv_bytes(timeout=1)
            t0 = time.monotonic()
            assert c.expect("raised", timeout=5) == "raised CorruptChannel"
            assert time.monotonic() - t0 < 1.0
            assert c.finish(timeout=10) == 0, c.stderr
        assert header(ch)["state"] == L.STATE_CORRUPT
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
    from shmchan import _layout as L

    HEADER = L.header_size(L.DEFAULT_MAX_PEERS)

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
        # A channel needs its header (HEADER bytes) and ring: leave room for one but not two.
        fill(leave=HEADER + 4096 + 8192)
        attempt(backend + " header room only", backend, name, 16384)
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
        "posix header room only NoSpace ['filler']",
        "mmap 4MiB in 1MiB NoSpace []",
        "mmap 256KiB in 100KiB NoSpace ['filler']",
        "mmap header room only NoSpace ['filler']",
        "used a full tmpfs without SIGBUS []",
    ], res.stderr


TMPFS_SIDE_NOSPACE = """
    import errno, os
    import shmchan
    from shmchan import Channel

    for backend, name in (("posix", "x"), ("mmap", "/dev/shm/x-file")):
        # Room for the channel but not for a side object (they are made in whole MiB): a
        # large send fails with NoSpace, leaves no side object behind, and the channel
        # goes on working.
        ch = Channel.create(name, capacity=4096, backend=backend)
        try:
            try:
                ch.send(b"L" * 100_000, timeout=1)
            except shmchan.NoSpace as exc:
                assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC, exc
                outcome = "NoSpace"
            except BaseException as exc:
                outcome = "unexpected " + type(exc).__name__
            else:
                outcome = "sent"
            ch.send_bytes(b"small", timeout=1)
            assert ch.recv_bytes(timeout=1) == b"small"
            print(backend, outcome, sorted(os.listdir("/dev/shm")), flush=True)
        finally:
            ch.close()
            ch.unlink()
    print("left", sorted(os.listdir("/dev/shm")), flush=True)
"""


@pytest.mark.root
@pytest.mark.skipif(not _can_unshare("-m"), reason="needs root and unshare -m (private tmpfs on /dev/shm)")
def test_full_tmpfs_fails_a_large_send_with_nospace() -> None:
    res = _in_namespace(
        ["-m", "--propagation", "private"], "mount -t tmpfs -o size=512k tmpfs /dev/shm", TMPFS_SIDE_NOSPACE
    )
    assert res.returncode == 0, f"child died ({res.returncode}, never SIGBUS):\n{res.stderr}"
    assert res.stdout.splitlines() == [
        "posix NoSpace ['x']",
        "mmap NoSpace ['x-file']",
        "left []",
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

    def limit(label, sysctl, value, capacity):
        path = "/proc/sys/kernel/" + sysctl
        with open(path) as f:
            saved = f.read()
        with open(path, "w") as f:
            f.write(value)
        try:
            Channel.create("x", capacity=capacity, backend="sysv")
        except shmchan.NoSpace as exc:
            assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC, exc
            print(label, "NoSpace", objects(), flush=True)
        except ValueError as exc:
            print(label, "ValueError", objects(), flush=True)
        except BaseException as exc:
            print(label, "unexpected", type(exc).__name__, exc, flush=True)
        else:
            Channel.remove("x", backend="sysv")
            print(label, "created", flush=True)
        finally:
            with open(path, "w") as f:
                f.write(saved)

    print("start", objects(), flush=True)
    limit("shmmni", "shmmni", "0", 4096)                      # no segment ids at all
    sem = open("/proc/sys/kernel/sem").read().split()
    # A channel has two semaphore sets: peers (one per peer slot) and presence (2).
    limit("semmni", "sem", " ".join(sem[:3] + ["1"]), 4096)   # SEMMNI 1: the second set fails
    limit("semmsl", "sem", " ".join(["1000"] + sem[1:]), 4096)  # 1024 peer semaphores > SEMMSL
    limit("semmns", "sem", " ".join(sem[:1] + ["1025"] + sem[2:]), 4096)  # 1024 + 2 > SEMMNS
    limit("shmall", "shmall", "100", 4 << 20)                 # 100 pages in all
    limit("shmmax", "shmmax", str(1 << 20), 4 << 20)          # segment larger than shmmax
    Channel.create("x", capacity=4096, backend="sysv").close()  # the limits are back
    Channel.remove("x", backend="sysv")
    print("restored created", objects(), flush=True)
"""


@pytest.mark.root
@pytest.mark.skipif(not _can_unshare("-i"), reason="needs root and unshare -i (private SysV IPC namespace)")
def test_sysv_limits_raise_nospace_and_leave_nothing() -> None:
    res = _in_namespace(["-i"], "true", SYSV_LIMITS)
    assert res.returncode == 0, f"child died ({res.returncode}):\n{res.stderr}"
    lines = res.stdout.splitlines()
    assert lines[:6] == [
        "start [0, 0]",
        "shmmni NoSpace [0, 0]",
        "semmni NoSpace [0, 0]",  # the segment and the peers set were rolled back
        "semmsl NoSpace [0, 0]",  # the segment was rolled back
        "semmns NoSpace [0, 0]",  # the segment and the peers set were rolled back
        "shmall NoSpace [0, 0]",
    ], res.stderr
    assert lines[6] in ("shmmax NoSpace [0, 0]", "shmmax ValueError [0, 0]"), res.stderr
    assert lines[7:] == ["restored created [0, 0]"], res.stderr


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
            wait_until(lambda b=b: consumers_waiting(chans[b]) == 1, 10, f"{b} consumer")
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
        wait_until(lambda: consumers_waiting(ch) == 1, 10, "the consumer to wait")
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
    worst = ("FromHandler", 0.0)
    for _ in range(ATTEMPTS):
        signal.setitimer(signal.ITIMER_REAL, ALARM)
        t0 = time.monotonic()
        try:
            if MODE == "recv":
                ch.recv_bytes(timeout=1.0)
            else:
                ch.send_bytes(b"x" * 100, timeout=1.0)
            result = "returned"
        except BaseException as exc:
            result = type(exc).__name__
        elapsed = round(time.monotonic() - t0, 3)
        if result != "FromHandler" or elapsed > worst[1]:
            worst = (result, elapsed)
        if result != "FromHandler" or elapsed >= 0.6:
            break
    print(*worst, flush=True)
"""


@pytest.mark.parametrize("mode", ["recv", "send"])
def test_exception_from_signal_handler_propagates(backend: str, name: str, mode: str) -> None:
    """An exception raised by a Python signal handler while a call is blocked comes out
    of that call (PEP 475), as KeyboardInterrupt does; it is not swallowed until the
    timeout expires. Repeated with the alarm at one wait slice, where it often lands
    between two sleeps of the wait: it must not be lost there either."""
    with Channel.create(name, capacity=CAP, backend=backend) as ch:
        res = run_child(HANDLER_RAISES, NAME=name, BACKEND=backend, MODE=mode, ATTEMPTS=40, ALARM=WAIT_SLICE)
        assert res.returncode == 0, res.stderr
        result, elapsed = res.stdout.split()
        assert result == "FromHandler", f"{res.stdout.strip()} (expected FromHandler after ~0.1 s)"
        assert float(elapsed) < 0.6, f"FromHandler came out after {elapsed} s, not ~{WAIT_SLICE} s"
        assert consumers_waiting(ch) == producers_waiting(ch) == 0


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
        counter = consumers_waiting if side == "recv" else producers_waiting
        c.expect("ready")
        wait_until(lambda: counter(ch) == 1, 10, "the child to block")
        positions = ring_positions(ch)
        os.kill(c.pid, signal.SIGINT)
        t0 = time.monotonic()
        c.expect("interrupted", timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert counter(ch) == 0, "the interrupted waiter is still registered"
        assert ring_positions(ch) == positions, "the interrupted call changed the ring"
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
        assert consumers_waiting(ch) == producers_waiting(ch) == 0


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
        holding_lock(ch, "w", payload=b"held") as holder,
    ):
        # Started only now, so its send cannot slip in before the holder locked.
        with child(BLOCKED_ON_LOCK, NAME=name, BACKEND=backend) as sender:
            sender.expect("ready")
            wait_until(lambda: _proc_state(sender.pid) == "S", 5, "the sender to block")
            os.kill(sender.pid, signal.SIGINT)
            t0 = time.monotonic()
            sender.expect("interrupted", timeout=5)
            assert time.monotonic() - t0 < 1.0
            assert _proc_state(holder.pid) in "Tt"  # the stopped holder still holds the lock
            assert lock_holder(ch, "w") is not None
            os.kill(holder.pid, signal.SIGCONT)
            holder.expect("sent")
            sender.tell("go")
            sender.expect("done")
            assert sender.finish(timeout=10) == 0, sender.stderr
        assert drain(ch) == [b"held", b"after"]
        assert producers_waiting(ch) == 0
        assert lock_holder(ch, "w") is None


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
        ch.send(b"L" * 3 * CAP)  # larger than the ring: creates a side object
    finally:
        os.umask(old)
    with ch:
        if backend == "sysv":
            full = "/" + name
            shm = sysv_ipc.SharedMemory(sysv_key(full, "shm"))
            shm.detach()
            modes = {"shm": shm.mode & 0o777}
            for role in ("peers", "presence"):
                semid = _cext.sem_lookup(sysv_key(full, role))
                assert semid is not None, role
                modes[role] = _cext.sem_info(semid)[1] & 0o777
            [index] = side_objects(ch)
            shmid = _cext.shm_lookup(sysv_key(full, L.side_suffix(index)[1:]))
            assert shmid is not None
            modes["side"] = _cext.shm_info(shmid)[1] & 0o777
        else:
            [index] = side_objects(ch)
            paths = {
                "segment": segment_path(backend, name),
                "side": segment_path(backend, name) + L.side_suffix(index),
            }
            modes = {what: os.stat(p).st_mode & 0o777 for what, p in paths.items()}
    assert modes == dict.fromkeys(modes, want), {k: oct(v) for k, v in modes.items()}


def _set_owner(
    backend: str, name: str, suffix: str = "", mode: int | None = None, uid: int | None = None
) -> None:
    """Change the mode or owner of a channel's memory (``suffix`` "": the segment; ".Sxx":
    a side object), as another user (or a careless chmod) could."""
    if backend == "sysv":
        role = suffix[1:] if suffix else "shm"
        shm = sysv_ipc.SharedMemory(sysv_key("/" + name.lstrip("/"), role))
        try:
            if mode is not None:
                shm.mode = mode
            if uid is not None:
                shm.uid = uid
        finally:
            shm.detach()
        return
    path = segment_path(backend, name) + suffix
    if mode is not None:
        os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, -1)


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602, 0o640, 0o644])
def test_open_refuses_a_channel_others_may_write(backend: str, name: str, mode: int) -> None:
    """Whoever can write a channel can make its readers unpickle anything: a channel that
    group or others may write is refused (UntrustedChannel) unless allow_foreign=True."""
    with Channel.create(name, capacity=CAP, backend=backend) as ch:
        _set_owner(backend, name, mode=mode)
        if mode & 0o022:
            with pytest.raises(shmchan.UntrustedChannel) as info:
                Channel.open(name, backend=backend)
            assert isinstance(info.value, shmchan.AccessDenied) and isinstance(info.value, PermissionError)
            assert "allow_foreign" in str(info.value) and oct(mode) in str(info.value)
            with pytest.raises(shmchan.UntrustedChannel):
                shmchan.Queue.open(name, backend=backend)
        else:
            Channel.open(name, backend=backend).close()  # readable by others is fine
        with Channel.open(name, backend=backend, allow_foreign=True) as other:
            ch.send_bytes(b"shared on purpose")
            assert other.recv_bytes_nowait() == b"shared on purpose"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the segment to another user")
def test_open_refuses_a_channel_of_another_user(backend: str, name: str) -> None:
    with Channel.create(name, capacity=CAP, backend=backend) as ch:
        _set_owner(backend, name, uid=4242)
        with pytest.raises(shmchan.UntrustedChannel, match="uid 4242"):
            Channel.open(name, backend=backend)
        with pytest.raises(shmchan.UntrustedChannel):
            shmchan.Queue.open(name, backend=backend)
        with Channel.open(name, backend=backend, allow_foreign=True) as other:
            other.send_bytes(b"from a friend")
            assert ch.recv_bytes_nowait() == b"from a friend"


AS_NOBODY = """
    import os
    import shmchan
    # Everything is imported first (root's interpreter is not readable by nobody): a
    # throwaway queue, made and opened by name, loads the modules the script will use.
    warm = shmchan.Queue(name=NAME + "-warm", backend=BACKEND)
    shmchan.Queue.open(NAME + "-warm", backend=BACKEND).close()
    warm.unlink()
    warm.close()
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
"""
"""The prelude of a child script that runs as nobody (uid 65534)."""

SQUATTER = (
    AS_NOBODY
    + """

    class Payload:
        def __reduce__(self):
            return (open, (MARKER, "w"))  # runs in whoever unpickles it

    ch = shmchan.Channel.create(NAME, capacity=4096, backend=BACKEND, permissions=0o666)
    ch.send(Payload())
    ch.close()  # the channel stays, waiting for its victim
    print("squatted", flush=True)
"""
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the squatter runs as nobody (uid 65534)")
def test_a_squatted_name_with_a_crafted_pickle_is_refused(backend: str, name: str, tmp_path: Path) -> None:
    """As issue 9 reproduced it: nobody creates the name first, mode 0666, with a pickle
    that runs code when loaded. Opening it as root is refused (UntrustedChannel: owner
    and mode), as a Channel and as a Queue, and the pickle never runs."""
    marker = tmp_path / "the-pickle-ran"
    res = run_child(SQUATTER, timeout=60, NAME=name, BACKEND=backend, MARKER=str(marker))
    assert res.returncode == 0 and "squatted" in res.stdout, res.stderr
    for opener in (Channel.open, shmchan.Queue.open):
        with pytest.raises(shmchan.UntrustedChannel, match="uid 65534") as err:
            opener(name, backend=backend)
        assert "allow_foreign" in str(err.value)  # says how to allow it deliberately
    assert not marker.exists()


OTHER_UID_OPENS = (
    AS_NOBODY
    + """
    for opener in (shmchan.Channel.open, shmchan.Queue.open):
        try:
            opener(NAME, backend=BACKEND)
        except shmchan.AccessDenied as exc:
            print("denied", type(exc).__name__, isinstance(exc, PermissionError), flush=True)
        else:
            print("opened", flush=True)
"""
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the other user runs as nobody (uid 65534)")
def test_another_user_opening_a_private_channel_gets_access_denied(backend: str, name: str) -> None:
    """A 0600 channel opened by another (non-root) uid: shmchan.AccessDenied, also a
    PermissionError, never a backend library's own exception type."""
    with Channel.create(name, capacity=CAP, backend=backend):
        res = run_child(OTHER_UID_OPENS, timeout=60, NAME=name, BACKEND=backend)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split("\n")[:2] == ["denied AccessDenied True"] * 2, res.stdout + res.stderr


def test_a_side_object_others_may_write_is_not_read(backend: str, name: str) -> None:
    """A side object must belong to the channel's owner with no more permissions: a
    receiver refuses one that others may write (UntrustedChannel); the message is
    consumed, its entry freed, and the channel goes on."""
    big = b"L" * 3 * CAP
    with Channel.create(name, capacity=CAP, backend=backend) as ch:
        ch.send(big)
        [index] = side_objects(ch)
        _set_owner(backend, name, L.side_suffix(index), mode=0o666)
        with pytest.raises(shmchan.UntrustedChannel, match="side segment"):
            ch.recv(timeout=1)
        assert header(ch)["records"] == 0
        assert [e["state"] for e in side_entries(ch)] == ["free"] * ch._core.side_slots
        ch.send_bytes(b"small")
        assert ch.recv_bytes_nowait() == b"small"


def test_a_send_refuses_a_side_object_others_may_write(backend: str, name: str) -> None:
    """A sender reusing a side object checks it too: UntrustedChannel, nothing sent, the
    entry given back."""
    big = b"L" * 3 * CAP
    with Channel.create(name, capacity=CAP, backend=backend) as ch:
        ch.send(big)
        assert ch.recv(timeout=1) == big
        [index] = side_objects(ch)
        _set_owner(backend, name, L.side_suffix(index), mode=0o666)
        with pytest.raises(shmchan.UntrustedChannel, match="side segment"):
            ch.send(big, timeout=1)
        assert header(ch)["records"] == 0
        assert [e["state"] for e in side_entries(ch)] == ["free"] * ch._core.side_slots
        ch.send_bytes(b"small")
        assert ch.recv_bytes_nowait() == b"small"


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


# -- names and descriptors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["a\udc80", "", "two/parts", "x" * 300, "nul\0byte", "jobs.S0a"],
    ids=["surrogate", "empty", "slash", "too-long", "nul", "side-suffix"],
)
def test_bad_names_are_refused_up_front(backend: str, bad: str, tmp_path: Path) -> None:
    """A name that cannot be a channel's is a ValueError before anything is made or
    removed (a lone surrogate used to unlink semaphores, then fail on the segment)."""
    name = str(tmp_path / bad) if backend == "mmap" and bad not in ("", "two/parts") else bad
    if backend == "mmap" and bad == "two/parts":
        pytest.skip("a path with a directory is an mmap channel's normal name")
    for call in (
        lambda: Channel.create(name, backend=backend),
        lambda: Channel.open(name, backend=backend),
        lambda: Channel.remove(name, backend=backend),
        lambda: shmchan.Queue(name=name, backend=backend),
    ):
        with pytest.raises(ValueError):
            call()
    assert not os.listdir(tmp_path)


def test_mmap_paths_that_are_not_files(tmp_path: Path) -> None:
    """A directory, a missing directory and an over-long path are clear errors."""
    with pytest.raises(ValueError, match="directory"):
        Channel.create(f"{tmp_path}/", backend="mmap")
    with pytest.raises(shmchan.ChannelExists):
        Channel.create(str(tmp_path), backend="mmap")
    with pytest.raises(shmchan.NotAShmchanSegment, match="directory"):
        Channel.remove(str(tmp_path), backend="mmap")
    with pytest.raises(shmchan.ChannelNotFound, match="does not exist"):
        Channel.create(str(tmp_path / "missing" / "ch"), backend="mmap")
    with pytest.raises(ValueError, match="too long"):
        Channel.create(str(tmp_path / ("x" * 256)), backend="mmap")
    assert tmp_path.is_dir() and not os.listdir(tmp_path)


OUT_OF_DESCRIPTORS = """
    import errno, os, resource, shmchan
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))
    made = []
    try:
        for i in range(100):
            made.append(shmchan.Channel.create(f"{PREFIX}{i}", backend=BACKEND, capacity=4096))
    except shmchan.NoSpace as exc:
        err = exc
    before = len(os.listdir("/proc/self/fd"))
    for ch in made:
        ch.close()
        ch.unlink()
    print(len(made), err.errno == errno.EMFILE, "ulimit" in str(err), before - len(os.listdir("/proc/self/fd")))
"""


@pytest.mark.parametrize("backend", ["posix", "mmap"])
def test_running_out_of_descriptors_is_a_clear_error_and_leaves_nothing(backend: str, tmp_path: Path) -> None:
    """Each posix or mmap handle holds one descriptor: at the limit, create raises
    NoSpace (errno EMFILE) naming the limit, and the half-made channel is rolled back
    (the no_leaks fixture checks /dev/shm; the mmap directory is checked here)."""
    prefix = str(tmp_path / "ch") if backend == "mmap" else unique_name(backend) + "-"
    res = run_child(OUT_OF_DESCRIPTORS, PREFIX=prefix, BACKEND=backend)
    assert res.returncode == 0, res.stderr
    made, is_emfile, names_limit, freed = res.stdout.split()
    assert int(made) >= 25, f"only {made} channels within 48 descriptors"
    assert (is_emfile, names_limit) == ("True", "True")
    assert int(freed) == int(made), "one descriptor per handle, given back by close()"
    assert not os.listdir(tmp_path)
