"""Queue lifetime, pickling anywhere, messages bigger than the ring, and copies.

Unnamed queues must leave nothing in /dev/shm or SysV IPC once every process that
used them is gone, however they went (normal exit, exception, SIGKILL of the whole
tree), and a process that merely attached must never destroy a queue for the others.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import os
import pickle
import signal
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Snapshot, leaks_since, snapshot
from helpers.children import Child, descendants, header, records, side_entries, side_objects, wait_until
from helpers.procs import child_env

import shmchan
from shmchan import _layout as L

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")


def wait_clean(baseline: Snapshot, timeout: float = 15.0) -> None:
    """Wait (bounded) until nothing shmchan made since ``baseline`` is left: the lifetime
    service removes queues asynchronously once their last holder is gone."""
    wait_until(lambda: not leaks_since(baseline), timeout, "the lifetime service to remove the queue")


# -- lifetime of unnamed queues -----------------------------------------------------------

TREE = """
import os, sys, multiprocessing as mp
import shmchan

def worker(q, r):
    r.put(("up", os.getpid()))  # every worker holds both queues before the tree ends
    while True:
        r.put(q.get())

if __name__ == "__main__":
    backend, mode = sys.argv[1], sys.argv[2]
    ctx = mp.get_context("spawn")
    q = shmchan.Queue(backend=backend)
    r = shmchan.Queue(backend=backend)
    big = shmchan.Queue(backend=backend, capacity=4096)
    big.put(b"x" * 10000)  # a side segment still in flight when everything dies
    procs = [ctx.Process(target=worker, args=(q, r), daemon=(mode != "kill")) for _ in range(2)]
    for p in procs:
        p.start()
    assert sorted(r.get(timeout=60)[1] for _ in procs) == sorted(p.pid for p in procs)
    for i in range(200):
        q.put(i)
    assert sorted(r.get(timeout=30) for _ in range(200)) == list(range(200))
    print("ready", os.getpid(), *[p.pid for p in procs], flush=True)
    sys.stdin.readline()  # the test has seen the queues (in mode "kill": wait to be killed)
    if mode == "raise":
        raise RuntimeError("the workload failed")
    # mode "exit": return normally; daemonic workers are terminated at exit
"""


@pytest.mark.parametrize("mode", ["exit", "raise", "kill"])
def test_unnamed_queues_leave_nothing_behind(backend: str, mode: str, tmp_path: Path) -> None:
    baseline = snapshot()
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    child = Child(
        f"import runpy, sys; sys.argv = ['tree.py', {backend!r}, {mode!r}]; runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    try:
        line = child.expect("ready", timeout=60)
        pids = [int(p) for p in line.split()[1:]]
        assert leaks_since(baseline)  # the queues exist while the tree lives
        if mode == "kill":
            tree = descendants(pids[0])
            assert set(pids[1:]) <= set(tree)
            for pid in [*tree, pids[0]]:  # SIGKILL every process of the tree
                os.kill(pid, signal.SIGKILL)
            child.finish(timeout=30)
            assert child.proc.returncode == -signal.SIGKILL
        else:
            child.tell("go")  # only now may the tree end (and its queues go)
            code = child.finish(timeout=60)
            assert code == (1 if mode == "raise" else 0), child.stderr
    finally:
        child.kill()
    wait_clean(baseline)


def test_a_child_killed_right_after_fork_holds_nothing(backend: str) -> None:
    """A forked child that dies at once, before any Python code of it runs (here: a
    fork handler that kills it runs before shmchan's own), must not keep the queue
    alive while its parent lives on: the holds taken for it die with it. (Before
    this was fixed, the parent kept one extra hold for each such child until it
    exited itself.)"""
    baseline = snapshot()
    code = f"""
        import os, signal, sys
        kill_child = False
        os.register_at_fork(  # registered before shmchan's handlers, so it runs first
            after_in_child=lambda: kill_child and os.kill(os.getpid(), signal.SIGKILL)
        )
        import shmchan
        q = shmchan.Queue(backend={backend!r})
        q.put("kept")
        kill_child = True
        pid = os.fork()
        if pid == 0:
            os._exit(3)  # never reached: the handler above kills the child
        kill_child = False
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        assert q.get(timeout=5) == "kept"
        q.close()  # the last hold: the queue must go now, while this process lives
        print("closed", flush=True)
        sys.stdin.readline()
    """
    child = Child(code)
    try:
        child.expect("closed", timeout=60)
        wait_clean(baseline, timeout=10)
    finally:
        child.kill()


def test_attaching_process_never_destroys_the_queue(backend: str) -> None:
    """Regression guard for CPython gh-82300: a process that only attached, used the
    queue and exited must leave it intact for the others."""
    q: shmchan.Queue[str] = shmchan.Queue(backend=backend)
    try:
        code = f"""
            import shmchan
            q = shmchan.Queue.open({q.name!r}, backend={backend!r})
            q.put("from a stranger")
            print(q.qsize(), flush=True)
        """
        child = Child(code)
        assert child.expect("1") == "1"
        assert child.finish(timeout=30) == 0, child.stderr
        assert child.stderr == ""  # no resource-tracker warnings either
        assert q.get(timeout=5) == "from a stranger"
        q.put("still here")
        assert q.get(timeout=5) == "still here"
    finally:
        q.close()


def test_named_queue_lives_until_unlinked(backend: str, name: str) -> None:
    q: shmchan.Queue[int] = shmchan.Queue(name=name, backend=backend)
    q.put(7)
    q.close()
    other: shmchan.Queue[int] = shmchan.Queue.open(name, backend=backend)
    try:
        assert other.get(timeout=5) == 7
    finally:
        other.close()
    # the `name` fixture removes it; a second create with the same name must fail
    with pytest.raises(shmchan.ChannelExists):
        shmchan.Queue(name=name, backend=backend)


def test_open_of_a_released_queue_fails_cleanly(backend: str) -> None:
    q: shmchan.Queue[int] = shmchan.Queue(backend=backend)
    name = q.name
    q.close()
    with pytest.raises(shmchan.ChannelNotFound):
        shmchan.Queue.open(name, backend=backend)


def test_pickled_copy_in_flight_keeps_the_queue(backend: str) -> None:
    """A pickled queue holds the queue until it is unpickled, even if every handle
    closed meanwhile (as when a parent drops a queue right after Process.start())."""
    q: shmchan.Queue[int] = shmchan.Queue(backend=backend)
    q.put(42)
    blob = pickle.dumps(q)
    q.close()
    revived = pickle.loads(blob)
    try:
        assert revived.get(timeout=5) == 42
    finally:
        revived.close()


# -- pickling anywhere ---------------------------------------------------------------------


def _forward(inbox: shmchan.Queue[Any], outbox: shmchan.Queue[Any]) -> None:
    """A running worker that receives a queue through another queue and uses it."""
    reply_q = inbox.get(timeout=30)
    reply_q.put(("hello from", os.getpid()))
    outbox.put("done")
    reply_q.close()


def test_queue_through_another_queue_to_a_running_worker(backend: str) -> None:
    inbox: shmchan.Queue[Any] = shmchan.Queue(backend=backend)
    outbox: shmchan.Queue[Any] = shmchan.Queue(backend=backend)
    reply: shmchan.Queue[Any] = shmchan.Queue(backend=backend)
    worker = SPAWN.Process(target=_forward, args=(inbox, outbox))
    worker.start()
    try:
        inbox.put(reply)  # multiprocessing raises RuntimeError here
        assert outbox.get(timeout=60) == "done"
        msg, pid = reply.get(timeout=10)
        assert (msg, pid) == ("hello from", worker.pid)
    finally:
        worker.join(30)
        for q in (inbox, outbox, reply):
            q.close()
    assert worker.exitcode == 0


def _pool_task(q: shmchan.Queue[int], x: int) -> int:
    q.put(x * x)
    return x


def test_queue_as_pool_and_executor_argument(backend: str) -> None:
    q: shmchan.Queue[int] = shmchan.Queue(backend=backend)
    try:
        with FORK.Pool(2) as pool:
            assert sorted(pool.apply_async(_pool_task, (q, i)).get(30) for i in range(5)) == list(range(5))
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=SPAWN) as ex:
            assert sorted(f.result(60) for f in [ex.submit(_pool_task, q, i) for i in range(5, 8)]) == [
                5,
                6,
                7,
            ]
        assert sorted(q.get(timeout=10) for _ in range(8)) == sorted(i * i for i in range(8))
    finally:
        q.close()


# -- messages bigger than the ring ---------------------------------------------------------


def test_messages_bigger_than_the_ring(backend: str) -> None:
    q: shmchan.Queue[Any] = shmchan.Queue(3, backend=backend, capacity=4096)
    try:
        items = [b"a" * 10_000, "small", bytearray(b"b" * 50_000), np.arange(5000), {"k": b"c" * 3000}]
        for item in items[:3]:
            q.put(item)
        with pytest.raises(shmchan.Full):  # maxsize counts large messages like any other
            q.put(items[3], timeout=0.1)
        got = [q.get(timeout=5) for _ in range(3)]
        for item in items[3:]:
            q.put(item)
        got += [q.get(timeout=5) for _ in range(2)]
        assert got[:3] == items[:3] and type(got[2]) is bytearray
        np.testing.assert_array_equal(got[3], items[3])
        assert got[4] == items[4]
    finally:
        q.close()


def test_side_segments_go_away_with_the_queue(backend: str) -> None:
    baseline = snapshot()
    q: shmchan.Queue[bytes] = shmchan.Queue(backend=backend, capacity=4096)
    try:
        for i in range(3):
            q.put(bytes([i]) * 20_000)  # never received
        assert header(q)["records"] == 3
        assert [t for _, t, _ in records(q)] == [L.RT_SIDE] * 3
        states = [e["state"] for e in side_entries(q)]
        assert states.count("queued") == 3 and states.count("free") == len(states) - 3
        assert len(side_objects(q)) == 3
    finally:
        q.close()  # the last holder: the queue and its three side objects go
    wait_clean(baseline)


def test_big_puts_with_no_reader_at_work_go_on_with_transient_entries(backend: str) -> None:
    """Once every retained side entry holds an unread message, a big put waits for one
    only while readers are at work: with none, it soon makes a transient entry (no
    hang, and put_nowait does not wait at all); everything arrives, and the transient
    objects go as they are read."""
    baseline = snapshot()
    q: shmchan.Queue[bytes] = shmchan.Queue(backend=backend, capacity=4096)
    try:
        retained = q._core.side_retained
        items = [bytes([i]) * 20_000 for i in range(retained + 4)]
        start = time.monotonic()
        for item in items[:-1]:
            q.put(item, timeout=30)
        q.put_nowait(items[-1])
        assert time.monotonic() - start < 10  # a few ms of grace per put, never a hang
        states = [e["state"] for e in side_entries(q)]
        assert states.count("queued") == len(items)
        assert all(states[i] == "queued" for i in range(retained))
        assert len(side_objects(q)) == len(items)
        assert [q.get(timeout=5) for _ in items] == items
        assert side_objects(q) == set(range(retained))  # transient objects are read once
    finally:
        q.close()
    wait_clean(baseline)


def test_a_stream_of_big_messages_through_a_busy_pool(backend: str) -> None:
    """A writer that is ahead of its reader (the pool's retained entries all in use, a
    reader copying out) waits for entries or makes transient ones; either way every
    message arrives whole and in order, and only the retained objects stay."""
    baseline = snapshot()
    q: shmchan.Queue[bytes] = shmchan.Queue(backend=backend, capacity=4096)
    n = 60
    got: list[bytes] = []

    def read() -> None:
        for _ in range(n):
            got.append(q.get(timeout=30))

    try:
        reader = threading.Thread(target=read)
        reader.start()
        items = [bytes([i % 251]) * (20_000 + i) for i in range(n)]
        for item in items:
            q.put(item, timeout=30)
        reader.join(60)
        assert not reader.is_alive()
        assert got == items
        assert side_objects(q) <= set(range(q._core.side_retained))
    finally:
        q.close()
    wait_clean(baseline)


def test_unpicklable_put_leaves_the_queue_unchanged(backend: str) -> None:
    q: shmchan.Queue[Any] = shmchan.Queue(backend=backend)
    try:
        q.put(1)
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            q.put(lambda: 0)
        assert q.qsize() == 1
        assert q.get(timeout=1) == 1
    finally:
        q.close()


class _Explodes:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def _explode() -> None:
    raise RuntimeError("cannot be rebuilt here")


def test_undecodable_item_is_consumed(backend: str) -> None:
    q: shmchan.Queue[Any] = shmchan.Queue(backend=backend)
    try:
        q.put(_Explodes())
        q.put("next")
        with pytest.raises(RuntimeError, match="cannot be rebuilt"):
            q.get(timeout=1)
        assert q.get(timeout=1) == "next"  # no poison-pill loop
    finally:
        q.close()


def test_get_after_every_producer_is_gone(backend: str) -> None:
    """Like multiprocessing: nothing special happens, get waits, Empty on timeout."""
    q: shmchan.Queue[int] = shmchan.Queue(backend=backend)
    try:
        producer = SPAWN.Process(target=_pool_task, args=(q, 3))
        producer.start()
        producer.join(60)
        assert q.get(timeout=10) == 9
        start = time.monotonic()
        with pytest.raises(shmchan.Empty):
            q.get(timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 0.5
    finally:
        q.close()


# -- copies ----------------------------------------------------------------------------------


def test_numpy_8mib_is_copied_once_on_the_way_in(backend: str) -> None:
    """An 8 MiB array is written straight into shared memory (one copy, no pickled copy
    on the Python heap) and arrives equal, as a private writable copy made in one copy
    (the side entry it came through is reused by the next large message). tracemalloc
    sees every Python allocation, so a second copy (a pickle of the data, an
    intermediate bytes) would show as ~8 MiB of extra peak."""
    array = np.random.default_rng(1).random(2 << 20, dtype=np.float32)  # 8 MiB
    assert array.nbytes == 8 << 20
    q: shmchan.Queue[Any] = shmchan.Queue(backend=backend)
    try:
        assert array.nbytes > q._core.max_payload  # it travels through the side pool
        tracemalloc.start()
        try:
            q.put(array)
            _, put_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            back = q.get(timeout=10)
            _, get_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert put_peak < 256 << 10, f"put allocated {put_peak} bytes on the Python heap"
        assert get_peak < array.nbytes + (256 << 10), f"get allocated {get_peak} bytes (more than one copy)"
        np.testing.assert_array_equal(back, array)
        assert back.flags.writeable
        # Private: the next large message reuses the same side entry and object, and
        # neither it nor writing to the copy shows through the other.
        assert [e["state"] for e in side_entries(q)] == ["free"] * q._core.side_slots
        q.put(np.zeros_like(array))
        back[:3] = (1.5, 2.5, 3.5)
        assert not q.get(timeout=10).any()
        np.testing.assert_array_equal(back[3:], array[3:])
        assert tuple(back[:3]) == (1.5, 2.5, 3.5)
        assert len(side_objects(q)) == 1
    finally:
        q.close()


def test_record_types_on_the_wire(backend: str) -> None:
    """bytes skip pickling; NumPy goes out of band; other objects are pickled; a message
    larger than the ring is a reference to a side-pool entry."""
    q: shmchan.Queue[Any] = shmchan.Queue(backend=backend, capacity=4096)
    try:
        for obj, rtype in [
            (b"raw", L.RT_BYTES),
            ((1, 2.0, "x"), L.RT_PICKLE),
            (np.zeros(4), L.RT_PICKLE_OOB),
            (b"big" * 4096, L.RT_SIDE),
        ]:
            q.put(obj)
            [(_, seen, _)] = records(q)
            assert seen == rtype
            back = q.get(timeout=1)
            assert back == obj if rtype != L.RT_PICKLE_OOB else (back == obj).all()
    finally:
        q.close()


def test_generic_alias_at_runtime() -> None:
    assert shmchan.Queue[int].__origin__ is shmchan.Queue  # type: ignore[attr-defined]
    assert shmchan.SimpleQueue[str] is not None and shmchan.JoinableQueue[bytes] is not None


def test_no_resource_tracker_warnings(tmp_path: Path) -> None:
    """A spawn child that attaches and exits prints nothing on stderr (no 'leaked
    shared_memory' warnings: shmchan never registers with multiprocessing's tracker)."""
    code = textwrap.dedent(
        """
        import multiprocessing as mp, shmchan
        def use(q):
            q.put(1)
        if __name__ == "__main__":
            q = shmchan.Queue()
            p = mp.get_context("spawn").Process(target=use, args=(q,))
            p.start(); p.join()
            assert q.get(timeout=10) == 1
            q.close()
        """
    )
    script = tmp_path / "tracker.py"
    script.write_text(code)
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
