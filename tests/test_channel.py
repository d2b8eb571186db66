"""The Channel API on every backend: naming, sizes, timeouts, errors, pickling, fork."""

from __future__ import annotations

import array
import contextlib
import errno
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time

import pytest
from conftest import unique_name
from helpers.children import (
    child,
    consumers_waiting,
    header,
    holding_lock,
    lock_holder,
    producers_waiting,
    wait_until,
)

import shmchan
from shmchan import Channel
from shmchan import _layout as L


def test_round_trip_between_two_handles(backend: str, name: str) -> None:
    with (
        Channel.create(name, capacity=4096, backend=backend) as tx,
        Channel.open(name, backend=backend) as rx,
    ):
        for msg in (b"", b"a", b"hello world", bytes(range(256)) * 7):
            tx.send_bytes(msg)
            assert rx.recv_bytes(timeout=5) == msg


@pytest.mark.parametrize(
    "data",
    [
        bytearray(b"abc"),
        memoryview(b"xyzw")[1:3],
        array.array("i", [1, 2, 3]),
        memoryview(bytes(range(20))).cast("B", (4, 5)),
        memoryview(bytes(range(20)))[::2],  # not contiguous: copied once
    ],
    ids=["bytearray", "slice", "array", "2d", "strided"],
)
def test_any_bytes_like_is_accepted(channel: Channel, data: object) -> None:
    channel.send_bytes(data)
    assert channel.recv_bytes_nowait() == memoryview(data).tobytes()  # type: ignore[arg-type]


def test_non_buffer_is_a_type_error(channel: Channel) -> None:
    with pytest.raises(TypeError):
        channel.send_bytes("text is not bytes")


def test_message_too_large_raises_at_once_even_blocking(backend: str, name: str) -> None:
    with Channel.create(name, capacity=4096, backend=backend) as ch:
        assert ch.max_message == 2048 - 16
        ch.send_bytes(b"x" * ch.max_message)  # the largest one fits an empty ring
        start = time.monotonic()
        with pytest.raises(shmchan.MessageTooLarge) as info:
            ch.send_bytes(b"x" * (ch.max_message + 1))  # blocking, no timeout
        assert time.monotonic() - start < 0.1
        assert isinstance(info.value, ValueError)
        assert ch.recv_bytes_nowait() == b"x" * ch.max_message
        with pytest.raises(shmchan.Empty):
            ch.recv_bytes_nowait()


def test_max_message_option(backend: str, name: str) -> None:
    with Channel.create(name, capacity=8192, max_message=100, backend=backend) as ch:
        assert ch.max_message == 112  # 16 + 100 rounded up to 16-byte records: 128 - 16
        ch.send_bytes(b"y" * 112)
        with pytest.raises(shmchan.MessageTooLarge):
            ch.send_bytes(b"y" * 113)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"capacity": 1000}, ValueError),
        ({"capacity": 1 << 41}, ValueError),
        ({"capacity": 4096, "max_message": 4096}, ValueError),
        ({"capacity": 4096, "max_message": -1}, ValueError),
        ({"capacity": "big"}, TypeError),
        ({"permissions": 0o1777}, ValueError),
    ],
)
def test_bad_sizes_are_rejected(backend: str, name: str, kwargs: dict[str, object], exc: type) -> None:
    with pytest.raises(exc):
        Channel.create(name, backend=backend, **kwargs)  # type: ignore[arg-type]


def test_capacity_rounds_up_to_a_power_of_two(backend: str, name: str) -> None:
    with Channel.create(name, capacity=5000, backend=backend) as ch:
        assert ch.capacity == 8192


def test_timeout_on_empty_is_honoured(channel: Channel) -> None:
    start = time.monotonic()
    with pytest.raises(shmchan.Empty) as info:
        channel.recv_bytes(timeout=0.2)
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 0.4
    assert isinstance(info.value, queue.Empty)


def test_timeout_on_full_is_honoured(backend: str, name: str) -> None:
    with Channel.create(name, capacity=4096, backend=backend) as ch:
        while True:
            try:
                ch.send_bytes_nowait(b"z" * 1000)
            except shmchan.Full:
                break
        start = time.monotonic()
        with pytest.raises(shmchan.Full) as info:
            ch.send_bytes(b"z" * 1000, timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 0.4
        assert isinstance(info.value, queue.Full)


def test_zero_timeout_never_blocks(channel: Channel) -> None:
    for call in (channel.recv_bytes_nowait, lambda: channel.recv_bytes(timeout=0)):
        start = time.monotonic()
        with pytest.raises(shmchan.Empty):
            call()
        assert time.monotonic() - start < 0.05


def test_zero_timeout_never_blocks_on_a_held_lock(channel: Channel) -> None:
    # Another process (stopped inside a get) holds the read lock.
    with holding_lock(channel, "r") as holder:
        channel.send_bytes(b"data")
        for call in (channel.recv_bytes_nowait, lambda: channel.recv_bytes(timeout=0)):
            start = time.monotonic()
            with pytest.raises(shmchan.Empty):
                call()
            assert time.monotonic() - start < 0.1
        assert lock_holder(channel, "r") is not None  # a stopped holder is never robbed
        os.kill(holder.pid, signal.SIGCONT)  # its get goes on, and takes the data
        assert holder.expect("got") == "got b'data'"
        assert lock_holder(channel, "r") is None
        channel.send_bytes(b"more")
        assert channel.recv_bytes_nowait() == b"more"


def test_blocked_receiver_is_woken_by_a_send(channel: Channel) -> None:
    rx = Channel.open(channel.name, backend=channel.backend)
    got: list[bytes] = []
    waiting = threading.Event()

    def receive() -> None:
        waiting.set()
        got.append(rx.recv_bytes(timeout=10))

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        assert waiting.wait(5)
        deadline = time.monotonic() + 5
        while consumers_waiting(channel) == 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # poll a shared counter with a deadline (not a sync sleep)
        channel.send_bytes(b"wake up")
        thread.join(5)
        assert got == [b"wake up"]
        assert consumers_waiting(channel) == 0
    finally:
        thread.join(5)
        rx.close()


@pytest.mark.parametrize("bad", [-1, -0.001, float("nan")])
def test_negative_timeout_is_a_value_error(channel: Channel, bad: float) -> None:
    with pytest.raises(ValueError):
        channel.recv_bytes(timeout=bad)
    with pytest.raises(ValueError):
        channel.send_bytes(b"x", timeout=bad)


def test_closed_handle_raises_closed_channel(channel: Channel) -> None:
    other = Channel.open(channel.name, backend=channel.backend)
    other.close()
    other.close()  # idempotent
    assert other.closed
    for call in (lambda: other.send_bytes(b"x"), other.recv_bytes_nowait, lambda: pickle.dumps(other)):
        with pytest.raises(shmchan.ClosedChannel) as info:
            call()
        assert isinstance(info.value, ValueError)
    channel.send_bytes(b"still fine")
    assert channel.recv_bytes_nowait() == b"still fine"


def test_exists_and_not_found(backend: str, name: str) -> None:
    with pytest.raises(shmchan.ChannelNotFound) as missing:
        Channel.open(name, backend=backend)
    assert isinstance(missing.value, FileNotFoundError)
    with pytest.raises(shmchan.ChannelNotFound):
        Channel.remove(name, backend=backend)
    with Channel.create(name, capacity=4096, backend=backend):
        with pytest.raises(shmchan.ChannelExists) as exists:
            Channel.create(name, capacity=4096, backend=backend)
        assert isinstance(exists.value, FileExistsError)


def test_unlink_semantics(backend: str, name: str) -> None:
    """posix/mmap: open handles keep working. sysv: removal ends the channel for all
    handles (SysV objects die at IPC_RMID, so remove() first marks the segment REMOVED),
    which they report as ChannelNotFound."""
    tx = Channel.create(name, capacity=4096, backend=backend)
    rx = Channel.open(name, backend=backend)
    try:
        tx.unlink()
        with pytest.raises(shmchan.ChannelNotFound):
            Channel.open(name, backend=backend)
        if backend == "sysv":
            with pytest.raises(shmchan.ChannelNotFound):
                tx.send_bytes(b"after unlink")
            with pytest.raises(shmchan.ChannelNotFound):
                rx.recv_bytes(timeout=1)
        else:
            tx.send_bytes(b"after unlink")
            assert rx.recv_bytes(timeout=1) == b"after unlink"
    finally:
        tx.close()
        rx.close()


BLOCKED_FOREVER = """
    import time
    import shmchan
    ch = shmchan.Channel.open(NAME, backend="sysv")
    print("ready", flush=True)
    t0 = time.monotonic()
    try:
        if SIDE == "recv":
            ch.recv_bytes()  # no timeout
        else:
            ch.send_bytes(b"x" * 1000)  # no timeout, on a full ring
        print("returned?!", flush=True)
    except Exception as exc:
        print("raised", type(exc).__name__, round(time.monotonic() - t0, 3), flush=True)
"""


@pytest.mark.parametrize("side", ["recv", "send"])
def test_removing_a_sysv_channel_ends_blocked_waiters(side: str) -> None:
    """A sysv channel removed while another process waits on it (with no timeout): the
    waiter raises ChannelNotFound at once instead of sleeping on memory that is gone."""
    if "sysv" not in shmchan.available_backends():
        pytest.skip("backend sysv unavailable")
    name = unique_name("sysv")
    try:
        with Channel.create(name, capacity=4096, backend="sysv") as ch:
            if side == "send":
                while True:
                    try:
                        ch.send_bytes_nowait(b"z" * 1000)
                    except shmchan.Full:
                        break
            with child(BLOCKED_FOREVER, NAME=name, SIDE=side) as c:
                c.expect("ready")
                counter = consumers_waiting if side == "recv" else producers_waiting
                wait_until(lambda: counter(ch) == 1, 10, "the child to wait")
                t0 = time.monotonic()
                Channel.remove(name, backend="sysv")
                assert c.expect("raised", timeout=5).split()[:2] == ["raised", "ChannelNotFound"]
                assert time.monotonic() - t0 < 1.0
                assert c.finish(timeout=10) == 0, c.stderr
            with pytest.raises(shmchan.ChannelNotFound):
                ch.send_bytes_nowait(b"y")
            with pytest.raises(shmchan.ChannelNotFound):
                Channel.open(name, backend="sysv")
    finally:
        with contextlib.suppress(shmchan.ChannelNotFound):
            Channel.remove(name, backend="sysv")


@pytest.mark.parametrize("bad", ["", "/", "a/b", "x" * 201, ".", "..", "nul\0"])
def test_bad_ipc_names(bad: str) -> None:
    for backend in ("posix", "sysv"):
        with pytest.raises(ValueError):
            Channel.create(bad, backend=backend)


def test_unknown_backend() -> None:
    with pytest.raises(shmchan.BackendUnavailable) as info:
        Channel.create("x", backend="carrier-pigeon")
    assert isinstance(info.value, ImportError)


def test_undecodable_record_is_consumed(channel: Channel) -> None:
    assert channel._core.put_record(0x8001, b"future", None)
    channel.send_bytes(b"next")
    with pytest.raises(shmchan.UndecodableMessage) as info:
        channel.recv_bytes_nowait()
    assert (info.value.record_type, info.value.payload) == (0x8001, b"future")
    assert channel.recv_bytes_nowait() == b"next"
    assert header(channel)["state"] == L.STATE_NORMAL


def test_pickle_reopens_by_name(channel: Channel) -> None:
    clone = pickle.loads(pickle.dumps(channel))
    try:
        assert clone is not channel and clone.name == channel.name
        channel.send_bytes(b"via clone")
        assert clone.recv_bytes_nowait() == b"via clone"
    finally:
        clone.close()


def _child_echo(ch: Channel, reply: Channel) -> None:
    reply.send_bytes(ch.recv_bytes(timeout=10) + b"!")
    ch.close()
    reply.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_handles_pass_to_children(backend: str, name: str, method: str) -> None:
    ctx = mp.get_context(method)
    reply_name = name + "-reply"
    with (
        Channel.create(name, capacity=4096, backend=backend) as ch,
        Channel.create(reply_name, capacity=4096, backend=backend) as reply,
    ):
        try:
            proc = ctx.Process(target=_child_echo, args=(ch, reply))
            proc.start()
            ch.send_bytes(b"ping")
            assert reply.recv_bytes(timeout=30) == b"ping!"
            proc.join(30)
            assert proc.exitcode == 0
        finally:
            reply.unlink()


FORKING_HOLDER = """
    import os, sys, time
    import shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    pid = os.fork()
    if pid == 0:
        # The child: its parent stops itself holding the write lock (a test fault point
        # inherited through the fork; this child never takes the lock, or it would stop
        # too, and the test would time out waiting for its line).
        try:
            deadline = time.monotonic() + 10
            while True:
                with open(f"/proc/{os.getppid()}/stat") as f:
                    stat = f.read()
                if stat[stat.rindex(")") + 2] in "Tt":
                    break
                assert time.monotonic() < deadline, "the parent never stopped"
                time.sleep(0.002)
            try:
                ch.send_bytes(b"x", timeout=0.2)
                outcome = "sent"
            except shmchan.Full:
                outcome = "Full"
            print("child", outcome, ch._core.slot, flush=True)
            code = 0
        except BaseException as exc:
            print("child error", repr(exc), flush=True)
            code = 2
        os._exit(code)
    print("parent", ch._core.slot, pid, flush=True)
    ch.send_bytes(b"y")  # stops at w.locked
    _, status = os.waitpid(pid, 0)
    print("sent", os.waitstatus_to_exitcode(status), flush=True)
    ch.close()
"""


def test_forked_child_gets_its_own_locks(backend: str, name: str) -> None:
    """After fork, parent and child must exclude each other: the child has a peer slot
    (and lock token) of its own, so a lock its parent holds is not the child's."""
    with Channel.create(name, capacity=4096, backend=backend) as ch:
        with child(
            FORKING_HOLDER, env={"SHMCHAN_TEST_FAULT": "w.locked:stop"}, NAME=name, BACKEND=backend
        ) as c:
            _, parent_slot, child_pid = c.expect("parent").split()
            # The forked child: the parent holds the write lock, so its send must time out.
            line = c.expect("child", timeout=15).split()
            assert line[:2] == ["child", "Full"], line
            assert int(line[2]) != int(parent_slot)
            assert lock_holder(ch, "w") == int(parent_slot)
            assert header(ch)["put_total"] == 0
            os.kill(c.pid, signal.SIGCONT)
            assert c.expect("sent") == "sent 0"
            assert c.finish(timeout=10) == 0, c.stderr
        assert int(child_pid) > 0
        assert ch.recv_bytes_nowait() == b"y"
        ch.send_bytes(b"z", timeout=1)
        assert ch.recv_bytes_nowait() == b"z"
        with pytest.raises(shmchan.Empty):
            ch.recv_bytes_nowait()


def test_repr(channel: Channel) -> None:
    assert channel.backend in repr(channel)


def test_threads_share_handles(backend: str, name: str) -> None:
    """Threads of one process share a handle: the per-handle thread lock plus the
    process-shared lock keep every message whole and delivered exactly once."""
    per_thread, senders, receivers = 3000, 4, 4
    with (
        Channel.create(name, capacity=4096, backend=backend) as tx,
        Channel.open(name, backend=backend) as rx,
    ):
        got: list[bytes] = []
        lock = threading.Lock()
        errors: list[BaseException] = []

        def send(tid: int) -> None:
            try:
                for i in range(per_thread):
                    tx.send_bytes(f"{tid}:{i}:".encode() * (i % 7 + 1), timeout=30)
            except Exception as exc:  # noqa: BLE001 - handed to the main thread, asserted below
                errors.append(exc)

        def receive() -> None:
            try:
                while True:
                    msg = rx.recv_bytes(timeout=30)
                    if msg == b"stop":
                        return
                    with lock:
                        got.append(msg)
            except Exception as exc:  # noqa: BLE001 - handed to the main thread, asserted below
                errors.append(exc)

        threads = [threading.Thread(target=receive) for _ in range(receivers)]
        threads += [threading.Thread(target=send, args=(t,)) for t in range(senders)]
        for t in threads:
            t.start()
        for t in threads[receivers:]:
            t.join(60)
        for _ in range(receivers):
            tx.send_bytes(b"stop", timeout=30)
        for t in threads[:receivers]:
            t.join(60)
        assert not errors
        expected = sorted(
            f"{t}:{i}:".encode() * (i % 7 + 1) for t in range(senders) for i in range(per_thread)
        )
        assert sorted(got) == expected


def test_removing_a_channel_spares_channels_with_longer_names(backend: str, name: str) -> None:
    """Side segments are matched exactly: removing /X must not touch /X.Log."""
    longer = name + ".Log"
    with (
        Channel.create(name, capacity=4096, backend=backend),
        Channel.create(longer, capacity=4096, backend=backend) as other,
    ):
        try:
            Channel.remove(name, backend=backend)
            other.send_bytes(b"still here")
            assert other.recv_bytes_nowait() == b"still here"
            Channel.open(longer, backend=backend).close()
        finally:
            Channel.remove(longer, backend=backend)


@pytest.mark.parametrize("suffix", [".S00", ".S03", ".S3f", ".Sff"])
def test_names_shaped_like_side_segments_are_refused(backend: str, name: str, suffix: str) -> None:
    with pytest.raises(ValueError, match="side segment"):
        Channel.create(name + suffix, backend=backend)
    with pytest.raises(ValueError, match="side segment"):
        Channel.open(name + suffix, backend=backend)


@pytest.mark.parametrize("suffix", [".S", ".S0", ".S000", ".SG0", ".s00", ".L00000000000000ff"])
def test_names_merely_resembling_side_segments_are_fine(backend: str, name: str, suffix: str) -> None:
    with Channel.create(name + suffix, capacity=4096, backend=backend) as ch:
        try:
            ch.send_bytes(b"ok")
            assert ch.recv_bytes_nowait() == b"ok"
        finally:
            ch.unlink()


PEER = """
    import shmchan
    ch = shmchan.Channel.open(NAME, backend=BACKEND)
    print("open", ch._core.slot, flush=True)
    input()
"""


def test_too_many_peers(backend: str, name: str) -> None:
    """Every peer slot held by a live handle: open() raises TooManyPeers (an OSError with
    EUSERS); a process that dies frees its slot at once, without anyone's help."""
    from shmchan._backends._base import CreateParams
    from shmchan._core import create

    ch = Channel(create(backend, name, CreateParams(4096, 2048, max_peers=2)), backend, "rw")
    with ch, child(PEER, NAME=name, BACKEND=backend) as peer:
        slots = {ch._core.slot, int(peer.expect("open").split()[1])}
        assert slots == {0, 1}
        with pytest.raises(shmchan.TooManyPeers) as info:
            Channel.open(name, backend=backend)
        assert isinstance(info.value, OSError) and info.value.errno == errno.EUSERS
        peer.kill()
        with Channel.open(name, backend=backend) as late:
            late.send_bytes(b"in the dead one's slot")
            assert ch.recv_bytes_nowait() == b"in the dead one's slot"
        with Channel.open(name, backend=backend):  # a closed handle's slot is free too
            pass
