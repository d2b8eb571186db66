"""One set of behavioural tests for multiprocessing's queues and shmchan's twins.

Every test takes ``impl``: ``multiprocessing`` itself (the oracle, id ``mp``) or
shmchan on one backend. Tests that hand queues to child processes also run under
each start method (fork, spawn, forkserver). Where shmchan deliberately differs from
multiprocessing (see the module docstring of ``shmchan._queue``), the test spells out
both behaviours with ``impl.is_mp``; nothing is skipped for either side.

Two multiprocessing traits shape how these tests are written, so that they assert
behaviour, not timing:

* ``mp.Queue.put`` hands the object to a feeder thread, so ``empty()`` and
  ``get_nowait()`` can miss an item that was just put. Tests that need the items to
  be readable at once have them put by a child process that has exited
  (:func:`put_from_child`): a multiprocessing process flushes its queues at exit.
* ``mp.Queue.put`` pickles in that feeder thread too, so an unpicklable object does
  not raise in ``put``; shmchan raises there and leaves the queue unchanged.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import pickle
import queue
import sys
import threading
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import shmchan
from shmchan._backends import BACKENDS, available_backends

# Python 3.12+ warns when a process with threads forks (pytest-timeout runs one);
# the fork start method is exercised here on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")

AVAILABLE = available_backends()
IMPLS = [pytest.param("mp", id="mp")] + [
    pytest.param(b, id=b, marks=pytest.mark.skipif(b not in AVAILABLE, reason=f"backend {b} unavailable"))
    for b in BACKENDS
]
METHODS = ["fork", "spawn", "forkserver"]
T = 30.0  # bound of every blocking call that should succeed
STOP = "<stop>"  # the echo children's sentinel (None is one of the items)
BIG = 1 << 20  # int64 items: an 8 MiB array, above the 4 MiB ring's largest message


# -- the implementations under test -------------------------------------------------------


class Impl:
    """Makes queues of one implementation and cleans up everything it made."""

    def __init__(self, kind: str, method: str) -> None:
        self.kind = kind
        self.is_mp = kind == "mp"
        self.ctx = mp.get_context(method)
        if method == "forkserver":
            # Children forked by the server find this module already imported
            # (only if the server is not running yet; harmless otherwise).
            self.ctx.set_forkserver_preload([__name__])
        self._queues: list[Any] = []
        self._procs: list[Any] = []

    def __repr__(self) -> str:
        return f"<Impl {self.kind} {self.ctx.get_start_method()}>"

    def _made(self, q: Any) -> Any:
        self._queues.append(q)
        return q

    def Queue(self, maxsize: int = 0) -> Any:
        if self.is_mp:
            return self._made(self.ctx.Queue(maxsize))
        return self._made(shmchan.Queue(maxsize, backend=self.kind))

    def JoinableQueue(self, maxsize: int = 0) -> Any:
        if self.is_mp:
            return self._made(self.ctx.JoinableQueue(maxsize))
        return self._made(shmchan.JoinableQueue(maxsize, backend=self.kind))

    def SimpleQueue(self) -> Any:
        if self.is_mp:
            return self._made(self.ctx.SimpleQueue())
        return self._made(shmchan.SimpleQueue(backend=self.kind))

    def process(self, target: Callable[..., None], *args: Any, ctx: Any = None) -> Any:
        """A daemon process (not started), joined or killed at teardown."""
        proc = (ctx or self.ctx).Process(target=target, args=args, daemon=True)
        self._procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self._procs:
            if proc.pid is None:
                continue
            proc.join(10)
            if proc.is_alive():  # the test failed and left it waiting
                proc.kill()
                proc.join(10)
        try:
            with contextlib.ExitStack() as stack:  # closes them all, even if one fails
                for q in self._queues:
                    stack.callback(close_all, q)
        finally:
            self._procs.clear()
            self._queues.clear()
            # multiprocessing unlinks the semaphores of spawn/forkserver contexts when
            # their objects are collected; make that happen before the leak check.
            gc.collect()


@pytest.fixture
def method() -> str:
    """The start method; tests that hand queues to children parametrize it."""
    return "fork"


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest, method: str) -> Iterator[Impl]:
    made = Impl(request.param, method)
    try:
        yield made
    finally:
        made.cleanup()


# -- helpers --------------------------------------------------------------------------------


def assert_same(got: Any, want: Any) -> None:
    """Deep equality that also checks types, and compares arrays with NumPy."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, np.ndarray):
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        if want.flags.f_contiguous and not want.flags.c_contiguous:
            assert got.flags.f_contiguous, "a Fortran-ordered array came back in C order"
        assert_array_equal(got, want)
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    else:
        assert got == want


def mixed_items() -> list[Any]:
    grid = np.arange(12, dtype=np.float32).reshape(3, 4)
    return [
        0,
        -7,
        2**70,
        1.5,
        True,
        "text",
        "ünïcødé ✓",
        "x" * 100_000,
        (1, "a", None),
        {"k": [1, 2], "n": None, "nested": {"b": b"in"}},
        None,
        b"raw bytes",
        b"",
        bytearray(b"small"),
        bytearray(range(256)) * 40,  # 10 KiB
        [b"a", bytearray(b"b")],
        {1, 2, 3},
        frozenset({"x"}),
        np.arange(10),
        grid,
        np.asfortranarray(grid),
        np.arange(20)[::3],  # not contiguous
        np.array(3.25),  # 0-d
        np.zeros(0, dtype=np.int8),
        np.array([True, False]),
        {"arrays": [np.ones(5), np.full((2, 2), 7, dtype=np.uint16)]},
    ]


def big_array() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 2**62, size=BIG, dtype=np.int64)


def close_all(*queues: Any) -> None:
    """Close queues the way a multiprocessing program does (flushing its feeder)."""
    for q in queues:
        q.close()
        join_thread = getattr(q, "join_thread", None)
        if join_thread is not None:
            join_thread()


def simple_get(q: Any, timeout: float) -> Any:
    """SimpleQueue.get has no timeout: wait (polling, bounded) until it has an item.
    Only for a single consumer."""
    deadline = time.monotonic() + timeout
    while q.empty():
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing arrived on {q!r} within {timeout} s")
        time.sleep(0.002)
    return q.get()


def collect(q: Any, n: int, procs: list[Any], timeout: float = 60) -> list[Any]:
    """Get ``n`` items, failing early if the children died or exited without them."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        all_exited = all(p.exitcode is not None for p in procs)
        try:
            out.append(q.get(timeout=0.2))
        except queue.Empty:
            codes = [p.exitcode for p in procs]
            if all_exited:  # a multiprocessing child has flushed everything at exit
                pytest.fail(f"children exited ({codes}) after sending {len(out)} of {n} items")
            if any(code not in (None, 0) for code in codes):
                pytest.fail(f"children failed ({codes}) after sending {len(out)} of {n} items")
            if time.monotonic() > deadline:
                pytest.fail(f"got {len(out)} of {n} items within {timeout} s")
    return out


def join_all(procs: list[Any], timeout: float = T) -> list[int | None]:
    for p in procs:
        p.join(timeout)
    return [p.exitcode for p in procs]


# -- children (module level, so that spawn and forkserver can import them) ---------------


def child_put(q: Any, items: list[Any]) -> None:
    for item in items:
        q.put_nowait(item)
    close_all(q)


def child_echo(inq: Any, outq: Any) -> None:
    """Echo every item back, the sentinel included."""
    while True:
        item = inq.get(timeout=T)
        outq.put(item, timeout=T)
        if isinstance(item, str) and item == STOP:
            break
    close_all(inq, outq)


def child_simple_echo(inq: Any, outq: Any) -> None:
    while True:
        item = simple_get(inq, T)
        outq.put(item)
        if isinstance(item, str) and item == STOP:
            break
    close_all(inq, outq)


def child_task_done(jq: Any, ctl: Any, out: Any, n: int) -> None:
    items = [jq.get(timeout=T) for _ in range(n)]
    for _ in range(n - 1):
        jq.task_done()
    out.put(("almost", items))
    assert ctl.get(timeout=T) == "go"
    jq.task_done()
    out.put("done")
    close_all(jq, ctl, out)


def child_produce(q: Any, producer: int, n: int) -> None:
    for seq in range(n):
        q.put((producer, seq), timeout=T)
    close_all(q)


def child_consume(q: Any, out: Any) -> None:
    got = []
    while True:
        item = q.get(timeout=T)
        if item is None:
            break
        got.append(item)
    out.put(got)
    close_all(q, out)


def child_get_report(q: Any, out: Any, n: int) -> None:
    for _ in range(n):
        try:
            item = q.get(timeout=T)
        except (AttributeError, RuntimeError, pickle.UnpicklingError) as exc:
            out.put(("error", type(exc).__name__))
        else:
            out.put(("ok", item))
    close_all(q, out)


def put_from_child(impl: Impl, q: Any, items: list[Any]) -> None:
    """Put ``items`` (small ones) from a forked child and wait for it to exit, so that
    every item is readable at once on multiprocessing too (it flushes at exit)."""
    proc = impl.process(child_put, q, items, ctx=mp.get_context("fork"))
    proc.start()
    assert join_all([proc]) == [0]


def _explode(message: str) -> None:
    raise RuntimeError(message)


class Bomb:
    """Pickles fine; unpickling it raises RuntimeError in any process."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ("boom",))


# -- put and get ------------------------------------------------------------------------


def test_fifo_order_of_mixed_objects(impl: Impl) -> None:
    q = impl.Queue()
    items = mixed_items()
    for item in items:
        q.put(item)
    got = [q.get(timeout=T) for _ in items]
    for g, want in zip(got, items, strict=True):
        assert_same(g, want)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)


def test_nowait_variants_and_exact_counts_after_a_flush(impl: Impl) -> None:
    q = impl.Queue()
    assert q.empty()
    assert q.qsize() == 0
    put_from_child(impl, q, ["a", 1, (2, 3), None])
    assert not q.empty()
    assert q.qsize() == 4
    assert not q.full()  # maxsize 0: never full
    assert [q.get_nowait() for _ in range(4)] == ["a", 1, (2, 3), None]
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert q.empty()
    assert q.qsize() == 0
    q.put_nowait("again")
    assert q.get(timeout=T) == "again"


def test_get_timeout_on_empty(impl: Impl) -> None:
    q = impl.Queue()
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 0.5


@pytest.mark.parametrize("timeout", [10, 0.5, -1])
def test_get_without_blocking_ignores_the_timeout(impl: Impl, timeout: float) -> None:
    q = impl.Queue()
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(block=False, timeout=timeout)
    with pytest.raises(queue.Empty):
        q.get(False, timeout)
    assert time.monotonic() - start < 0.1


def test_maxsize_blocks_put(impl: Impl) -> None:
    q = impl.Queue(maxsize=3)
    assert not q.full()
    for i in range(3):
        q.put(i, timeout=T)
    assert q.full()
    start = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 0.5
    start = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(3, block=False)
    with pytest.raises(queue.Full):
        q.put(3, False, 10)  # block=False ignores the timeout
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    assert time.monotonic() - start < 0.1
    assert q.get(timeout=T) == 0
    assert not q.full()
    q.put_nowait(3)
    assert q.full()
    assert [q.get(timeout=T) for _ in range(3)] == [1, 2, 3]
    assert not q.full()


def test_maxsize_counts_after_a_flush(impl: Impl) -> None:
    q = impl.Queue(maxsize=2)
    put_from_child(impl, q, ["x", "y"])
    assert q.full()
    assert q.qsize() == 2
    assert not q.empty()
    with pytest.raises(queue.Full):
        q.put_nowait("z")
    assert q.get_nowait() == "x"
    assert q.qsize() == 1
    assert not q.full()


def test_blocked_put_is_released_by_a_get(impl: Impl) -> None:
    q = impl.Queue(maxsize=1)
    q.put("first")
    done = threading.Event()

    def put_second() -> None:
        q.put("second", timeout=T)
        done.set()

    thread = threading.Thread(target=put_second)
    thread.start()
    try:
        assert q.get(timeout=T) == "first"
        assert done.wait(T)
        assert q.get(timeout=T) == "second"
    finally:
        thread.join(T)


def test_threads_share_one_handle(impl: Impl) -> None:
    q = impl.Queue(maxsize=16)
    per_producer = 2000
    got: list[list[Any]] = [[], []]

    # An exception in a thread fails the test (pytest reports unhandled thread errors).
    def produce(p: int) -> None:
        for seq in range(per_producer):
            q.put((p, seq), timeout=T)

    def consume(c: int) -> None:
        while (item := q.get(timeout=T)) is not None:
            got[c].append(item)

    producers = [threading.Thread(target=produce, args=(p,)) for p in range(2)]
    consumers = [threading.Thread(target=consume, args=(c,)) for c in range(2)]
    for thread in producers + consumers:
        thread.start()
    for thread in producers:
        thread.join(T)
    for _ in consumers:
        q.put(None, timeout=T)
    for thread in consumers:
        thread.join(T)
    assert not any(thread.is_alive() for thread in producers + consumers)
    assert Counter(got[0] + got[1]) == Counter((p, s) for p in range(2) for s in range(per_producer))
    for items in got:
        for p in range(2):
            seqs = [s for (pp, s) in items if pp == p]
            assert seqs == sorted(seqs)


def test_negative_timeout(impl: Impl) -> None:
    q = impl.Queue()
    if impl.is_mp:
        # multiprocessing treats a negative timeout as 0.
        with pytest.raises(queue.Empty):
            q.get(timeout=-1)
        q.put("x", timeout=-1)
        assert q.get(timeout=T) == "x"
    else:
        # shmchan raises ValueError, like queue.Queue (documented difference).
        with pytest.raises(ValueError, match="non-negative"):
            q.get(timeout=-1)
        with pytest.raises(ValueError, match="non-negative"):
            q.put("x", timeout=-1)
        assert q.empty()  # the refused put queued nothing


def test_big_numpy_array_round_trip(impl: Impl) -> None:
    q = impl.Queue()
    want = big_array()
    assert want.nbytes == 8 << 20
    if not impl.is_mp:
        assert want.nbytes > shmchan.DEFAULT_QUEUE_CAPACITY  # it travels in a side segment
    q.put(want)
    q.put("after")
    got = q.get(timeout=T)
    assert q.get(timeout=T) == "after"
    close_all(q)  # the received array does not depend on the queue
    assert got.dtype == want.dtype
    assert_array_equal(got, want)


# -- pickling failures -------------------------------------------------------------------


def _lambda_in_list() -> Any:
    return [1, lambda: 0]


@pytest.mark.parametrize(
    "make",
    [
        lambda: lambda: 0,
        _lambda_in_list,
        lambda: (np.arange(100), lambda: 0),  # fails after an out-of-band buffer
        lambda: {"big": np.zeros(BIG), "lock": threading.Lock()},  # would be a side segment
    ],
    ids=["lambda", "list-with-lambda", "array-then-lambda", "big-then-lock"],
)
def test_unpicklable_object(impl: Impl, make: Callable[[], Any]) -> None:
    q = impl.Queue()
    q.put("before")
    if impl.is_mp:
        # multiprocessing pickles in its feeder thread: put returns, the feeder prints
        # the error and drops the object.
        q.put(make())
        q.put("after")
        assert q.get(timeout=T) == "before"
        assert q.get(timeout=T) == "after"
    else:
        # shmchan pickles in put: the error raises there, and the queue is unchanged.
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            q.put(make())
        assert q.qsize() == 1
        q.put("after")
        assert q.qsize() == 2
        assert q.get(timeout=T) == "before"
        assert q.get(timeout=T) == "after"
        assert q.empty()


def test_unpickling_error_consumes_the_item(impl: Impl) -> None:
    q = impl.Queue()
    q.put(Bomb())
    q.put("next")
    with pytest.raises(RuntimeError, match="boom"):
        q.get(timeout=T)
    if not impl.is_mp:
        assert q.qsize() == 1  # exact on shmchan
    assert q.get(timeout=T) == "next"


@pytest.mark.parametrize("method", ["spawn"])
def test_class_only_in_the_parent_fails_in_the_child(impl: Impl) -> None:
    module = sys.modules[__name__]
    only_here = type("OnlyInParent", (), {"__module__": __name__, "__qualname__": "OnlyInParent"})
    module.OnlyInParent = only_here  # type: ignore[attr-defined]
    try:
        q, out = impl.Queue(), impl.Queue()
        q.put(1)
        q.put(only_here())
        q.put(2)
        proc = impl.process(child_get_report, q, out, 3)
        proc.start()
        got = collect(out, 3, [proc])
        assert join_all([proc]) == [0]
    finally:
        del module.OnlyInParent  # type: ignore[attr-defined]
    # The spawned child cannot find the class: get raises, and the item is consumed.
    assert got == [("ok", 1), ("error", "AttributeError"), ("ok", 2)]


# -- close ----------------------------------------------------------------------------------


def test_close_semantics(impl: Impl) -> None:
    q = impl.Queue(maxsize=5)
    q.put(1)
    assert q.get(timeout=T) == 1
    with pytest.raises(AssertionError):
        q.join_thread()  # before close: an error on both
    q.cancel_join_thread()  # harmless
    q.close()
    q.close()  # idempotent
    q.join_thread()  # after close: returns
    q.cancel_join_thread()
    for call in (
        lambda: q.put(2),
        lambda: q.put(2, timeout=1),
        lambda: q.put_nowait(2),
        lambda: q.get(),
        lambda: q.get(timeout=1),
        lambda: q.get_nowait(),
    ):
        with pytest.raises(ValueError):
            call()
    if impl.is_mp:
        # multiprocessing still answers these after close (documented difference).
        assert q.qsize() == 0
        assert q.full() is False
    else:
        # shmchan: every method but close/join_thread/cancel_join_thread raises.
        for call in (q.qsize, q.empty, q.full):
            with pytest.raises(ValueError):
                call()


def test_cancel_join_thread_is_harmless(impl: Impl) -> None:
    q = impl.Queue()
    q.cancel_join_thread()
    q.put("kept")
    assert q.get(timeout=T) == "kept"
    q.close()
    q.join_thread()


def test_joinable_queue_after_close(impl: Impl) -> None:
    jq = impl.JoinableQueue()
    jq.put("a")
    assert jq.get(timeout=T) == "a"
    jq.task_done()
    jq.close()
    with pytest.raises(ValueError):
        jq.put("b")
    with pytest.raises(ValueError):
        jq.get(timeout=1)
    if impl.is_mp:
        # multiprocessing's join does not look at close: nothing is unfinished.
        jq.join()
    else:
        # shmchan: a closed handle raises ValueError (documented difference).
        with pytest.raises(ValueError):
            jq.join()
        with pytest.raises(ValueError):
            jq.task_done()


def test_simple_queue_after_close(impl: Impl) -> None:
    sq = impl.SimpleQueue()
    sq.put("a")
    assert simple_get(sq, T) == "a"
    assert sq.empty()
    sq.close()
    sq.close()  # idempotent
    for call in (lambda: sq.put("b"), sq.get, sq.empty):
        # multiprocessing raises OSError (a closed pipe); shmchan raises an error that
        # is both an OSError and a ValueError (documented).
        with pytest.raises(OSError) as info:
            call()
        if not impl.is_mp:
            assert isinstance(info.value, ValueError)


# -- JoinableQueue --------------------------------------------------------------------------


def test_task_done_and_join_in_one_process(impl: Impl) -> None:
    jq = impl.JoinableQueue()
    with pytest.raises(ValueError):
        jq.task_done()  # nothing was put
    for i in range(3):
        jq.put(i)
    assert [jq.get(timeout=T) for _ in range(3)] == [0, 1, 2]
    for _ in range(3):
        jq.task_done()
    joiner = threading.Thread(target=jq.join, daemon=True)
    joiner.start()
    joiner.join(T)
    assert not joiner.is_alive()
    with pytest.raises(ValueError):
        jq.task_done()


@pytest.mark.parametrize("method", METHODS)
def test_task_done_and_join_across_processes(impl: Impl) -> None:
    n = 20
    jq, ctl, out = impl.JoinableQueue(), impl.Queue(), impl.Queue()
    for i in range(n):
        jq.put(i)
    proc = impl.process(child_task_done, jq, ctl, out, n)
    proc.start()
    [(tag, items)] = collect(out, 1, [proc])
    assert (tag, items) == ("almost", list(range(n)))
    joiner = threading.Thread(target=jq.join, daemon=True)
    joiner.start()
    joiner.join(0.2)
    assert joiner.is_alive(), "join() returned with one task unfinished"
    ctl.put("go")
    joiner.join(T)
    assert not joiner.is_alive(), "join() did not return after the last task_done()"
    assert collect(out, 1, [proc]) == ["done"]
    assert join_all([proc]) == [0]
    with pytest.raises(ValueError):
        jq.task_done()  # one more than was put


# -- across processes -------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_queues_as_process_arguments(impl: Impl) -> None:
    inq, outq = impl.Queue(), impl.Queue(maxsize=4)
    proc = impl.process(child_echo, inq, outq)
    proc.start()
    items = [*mixed_items(), big_array(), "last"]
    for item in items:
        inq.put(item, timeout=T)
    inq.put(STOP)
    got = collect(outq, len(items) + 1, [proc])
    assert got[-1] == STOP
    for g, want in zip(got[:-1], items, strict=True):
        assert_same(g, want)
    assert join_all([proc]) == [0]
    with pytest.raises(queue.Empty):
        inq.get(timeout=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_simple_queue_across_processes(impl: Impl) -> None:
    inq, outq = impl.SimpleQueue(), impl.SimpleQueue()
    assert inq.empty()
    proc = impl.process(child_simple_echo, inq, outq)
    proc.start()
    items = ["a", 2, None, (3, "c"), b"bytes", {"k": np.arange(5)}]
    for item in items:
        inq.put(item)
    inq.put(STOP)
    got = [simple_get(outq, T) for _ in range(len(items) + 1)]
    assert got[-1] == STOP
    for g, want in zip(got[:-1], items, strict=True):
        assert_same(g, want)
    assert join_all([proc]) == [0]
    assert inq.empty()
    assert outq.empty()


@pytest.mark.parametrize("method", METHODS)
def test_many_producers_and_consumers(impl: Impl) -> None:
    producers, consumers, per_producer = 3, 3, 3000
    q, out = impl.Queue(maxsize=64), impl.Queue()
    cons = [impl.process(child_consume, q, out) for _ in range(consumers)]
    prods = [impl.process(child_produce, q, p, per_producer) for p in range(producers)]
    for proc in cons + prods:
        proc.start()
    assert join_all(prods, timeout=60) == [0] * producers
    for _ in range(consumers):
        q.put(None, timeout=T)
    results = collect(out, consumers, cons)
    assert join_all(cons) == [0] * consumers
    everything = Counter(item for got in results for item in got)
    assert everything == Counter((p, s) for p in range(producers) for s in range(per_producer))
    for got in results:
        for p in range(producers):
            seqs = [s for (pp, s) in got if pp == p]
            assert seqs == sorted(seqs), f"producer {p}'s items out of order in one consumer"


# -- typing ---------------------------------------------------------------------------------


def test_generic_aliases_work_at_runtime(backend: str) -> None:
    # shmchan only: multiprocessing.queues.Queue is not subscriptable on 3.11.
    assert typing.get_args(shmchan.Queue[int]) == (int,)
    assert typing.get_args(shmchan.JoinableQueue[str]) == (str,)
    assert typing.get_args(shmchan.SimpleQueue[bytes]) == (bytes,)
    q = shmchan.Queue[int](backend=backend)
    jq = shmchan.JoinableQueue[str](backend=backend)
    sq = shmchan.SimpleQueue[bytes](backend=backend)
    try:
        assert type(q) is shmchan.Queue
        q.put(42)
        assert q.get(timeout=T) == 42
        jq.put("s")
        assert jq.get(timeout=T) == "s"
        jq.task_done()
        sq.put(b"b")
        assert sq.get() == b"b"
    finally:
        close_all(q, jq, sq)
