"""The compiled core's behaviour at its edges: idle cost, odd records, waiter cleanup."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.children import child, run_child

import shmchan
from shmchan import _layout as L

IDLE = """
    import resource, time
    import shmchan
    q = shmchan.Queue.open(NAME, backend=BACKEND)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    try:
        q.get(timeout=SECONDS)
    except shmchan.Empty:
        pass
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print("idle", time.monotonic() - t0, cpu, flush=True)
"""


@pytest.mark.slow
def test_a_consumer_blocked_for_10_s_uses_under_1_percent_of_a_core(backend: str, name: str) -> None:
    """It spins briefly, then sleeps on the futex in slices: its CPU time over 10 s of
    waiting stays under 0.1 s, also while two busy processes load both cores."""
    q: shmchan.Queue[int] = shmchan.Queue(name=name, backend=backend)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        res = run_child(IDLE, timeout=60, NAME=name, BACKEND=backend, SECONDS=10.0)
        assert res.returncode == 0, res.stderr
        _, waited, cpu = res.stdout.split()
        assert 10.0 <= float(waited) < 11.0
        assert float(cpu) < 0.1, f"{float(cpu):.3f} s of CPU in 10 s of waiting"
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        q.close()
        q.unlink()


def test_records_of_unknown_types_are_consumed_and_reported(channel: shmchan.Channel) -> None:
    """docs/layout.md 2.2: a reader consumes a record it cannot decode, counts it, and
    reports it (UndecodableMessage with the payload); the next record is fine."""
    core = channel._core
    assert core.put_record(77, b"mystery", None)
    channel.send_bytes(b"after")
    with pytest.raises(shmchan.UndecodableMessage) as info:
        channel.recv()
    assert (info.value.record_type, info.value.payload) == (77, b"mystery")
    assert channel.recv_bytes() == b"after"
    assert core.got_total() == 2


def test_a_short_side_record_is_corruption_not_a_struct_error(channel: shmchan.Channel) -> None:
    """A SIDE record whose payload is not 24 bytes (layout 1's LARGE raised a bare
    struct.error from recv_bytes): a clean CorruptChannel, and the channel is marked."""
    assert channel._core.put_record(L.RT_SIDE, b"short", None)
    with pytest.raises(shmchan.CorruptChannel):
        channel.recv_bytes()
    with pytest.raises(shmchan.CorruptChannel):
        channel.send_bytes(b"x")


def test_raw_receive_refuses_objects_and_consumes_them(channel: shmchan.Channel) -> None:
    channel.send({"a": 1})
    channel.send(b"x" * (channel.max_message + 1))  # raw bytes, in a side segment
    with pytest.raises(shmchan.UndecodableMessage) as info:
        channel.recv_bytes()
    assert info.value.record_type == L.RT_PICKLE
    assert channel.recv_bytes() == b"x" * (channel.max_message + 1)


BLOCKED = """
    import shmchan
    q = shmchan.Queue.open(NAME, backend=BACKEND)
    print("waiting", flush=True)
    q.get(timeout=30)
"""


def test_a_closed_handle_and_a_dead_waiter_leave_no_registration(backend: str, name: str) -> None:
    """Waiter bits follow their sleepers: a timed-out wait clears its own, and a killed
    one's is cleared when its slot is re-claimed or swept."""
    q: shmchan.Queue[int] = shmchan.Queue(name=name, backend=backend)
    try:
        with pytest.raises(shmchan.Empty):
            q.get(timeout=0.05)
        header = L.decode_header(q._core.raw(0, L.HEADER_BASE))
        assert header["waiting_consumers"] == header["waiting_producers"] == []
        with child(BLOCKED, NAME=name, BACKEND=backend) as c:
            c.expect("waiting")
            for _ in range(1000):
                if L.decode_header(q._core.raw(0, L.HEADER_BASE))["waiting_consumers"]:
                    break
                os.sched_yield()
        # Killed while registered: the next wakes find nobody, and sweep it.
        for i in range(40):
            q.put(i)
            assert q.get(timeout=1) == i
        assert L.decode_header(q._core.raw(0, L.HEADER_BASE))["waiting_consumers"] == []
    finally:
        q.close()
        q.unlink()
