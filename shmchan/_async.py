"""The async face, on anyio (asyncio and trio): ``q.async_q``, ``ch.aio``, ``aselect``.

Every async operation is the compiled core's non-blocking attempt, one call made in the
event loop's thread, plus a way to wait between attempts:

* **Fast path, no thread hop.** When there is data (or room), the attempt succeeds at
  once and the coroutine returns without awaiting anything after it. So a
  cancellation can only land *between* attempts, when nothing has been taken: a
  message is never lost or duplicated by cancelling a receive (or a send).
* **Never blocking the loop.** An attempt never waits for a lock (F_NOGRACE): if
  another process holds it (even one that is stopped), the task sleeps asynchronously
  and tries again.
* **Waiting without a thread per task.** The tasks of one event loop that wait on the
  same side of the same channel share a :class:`_Gate`: one registration in the
  channel's waiter bitmap, and one *leader* task whose helper thread sleeps on the
  channel's event counter for at most one wait slice; every other task waits on an
  anyio Event that the leader sets when its thread returns. A thousand waiting tasks
  cost one thread; the thread is kept between waits (starting one costs more than a
  round trip) and ends within two :data:`~shmchan._core.WAIT_SLICE` of its last use
  (after cancellation or loop shutdown too). An event counter holds no token,
  so an abandoned helper thread never takes a wakeup away from anyone.
* **Timeouts are cancel scopes** (``anyio.fail_after``, ``trio.move_on_after``,
  ``asyncio.wait_for``): the operations take no timeout argument.
* **Paced checkpoints.** An operation that must wait is always a checkpoint (it
  suspends, and a cancellation is delivered there). One that completes at once is one
  at least every :data:`CHECKPOINT_EVERY` seconds of such operations in a thread (a
  schedule point and a cancellation point), like ``asyncio.Queue.get``, which does not
  suspend when an item is there: anyio's checkpoint costs more than the whole
  operation. So a task that only ever finds data is still cancellable, within a
  millisecond, and lets other tasks run as often.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Generic, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from . import _redis as _remote
from ._core import BUSY, EV_JOINED, EV_NOT_EMPTY, EV_NOT_FULL, F_NOGRACE, NOTHING, WAIT_SLICE
from ._errors import BrokenChannel, ClosedChannel, Empty, EndOfChannel, Full, WrongMode

T = TypeVar("T")

CHECKPOINT_EVERY: Final = 0.001
"""Seconds of operations that complete at once between two checkpoints (per thread)."""


class _Pace(threading.local):
    last = 0.0


_pace = _Pace()


async def _paced_checkpoint() -> None:
    """A checkpoint if the last one in this thread was more than CHECKPOINT_EVERY ago."""
    now = time.monotonic()
    if now - _pace.last >= CHECKPOINT_EVERY:
        _pace.last = now
        await anyio.lowlevel.checkpoint()


class AsyncQueueEmpty(Empty, asyncio.QueueEmpty):
    """Raised by ``async_q.get_nowait()`` on an empty queue: an ``asyncio.QueueEmpty``
    (and a ``queue.Empty``)."""


class AsyncQueueFull(Full, asyncio.QueueFull):
    """Raised by ``async_q.put_nowait()`` on a full queue: an ``asyncio.QueueFull``
    (and a ``queue.Full``)."""


# -- waiting -------------------------------------------------------------------------------


class _Sleeper:
    """The helper thread that sleeps on one event counter of one handle for the tasks
    of one event loop. It is kept between waits (starting a thread costs more than a
    whole ping-pong round trip) and ends after a wait slice without requests, so it
    keeps neither the handle nor the loop for longer. Requests are served in order:
    each sleeps until the counter moves from its ``seen`` or for one slice at most,
    then has its ``wake`` called in the loop's thread, without waiting for the loop."""

    def __init__(self, key: tuple[int, int, int], core: Any, event: int, native: Any) -> None:
        self.key = key
        self.core = core
        self.event = event
        self.native = native
        self.call_soon: Callable[[Callable[[], object]], object] = (
            native.call_soon_threadsafe
            if isinstance(native, asyncio.AbstractEventLoop)
            else native.run_sync_soon  # trio's TrioToken
        )
        self.requests: queue.SimpleQueue[tuple[int, Callable[[], object]]] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            try:
                seen, wake = self.requests.get(timeout=WAIT_SLICE)
            except queue.Empty:
                with _sleepers_lock:
                    if self.requests.empty():  # idle: requests from now on start a new one
                        if _sleepers.get(self.key) is self:
                            del _sleepers[self.key]
                        return
                continue
            with contextlib.suppress(Exception):  # closed meanwhile: the task's retry says so
                self.core.wait(self.event, seen, WAIT_SLICE)
            with contextlib.suppress(Exception):  # the event loop may have gone away
                self.call_soon(wake)


_sleepers: dict[tuple[int, int, int], _Sleeper] = {}
_sleepers_lock = threading.Lock()


def _sleep_request(core: Any, event: int, native: Any, seen: int, wake: Callable[[], object]) -> None:
    """Have ``wake`` called in the loop once ``event``'s counter moved from ``seen``, or
    after at most one wait slice."""
    key = (id(core), event, id(native))
    with _sleepers_lock:
        sleeper = _sleepers.get(key)
        start = sleeper is None or sleeper.core is not core or sleeper.native is not native
        if start:
            sleeper = _sleepers[key] = _Sleeper(key, core, event, native)
        assert sleeper is not None
        sleeper.requests.put((seen, wake))
    if start:
        threading.Thread(target=sleeper.run, name="shmchan-async-wait", daemon=True).start()


def _forget_after_fork() -> None:
    """A forked child has none of the parent's threads (nor its event loops)."""
    global _sleepers_lock
    _sleepers_lock = threading.Lock()
    _sleepers.clear()
    _gates.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


class _Gate:
    """The tasks of one event loop waiting on one event of one channel handle."""

    def __init__(self, core: Any, event: int, key: tuple[int, int, int], native: Any) -> None:
        self.core = core
        self.event = event
        self.key = key
        self.native = native
        self.refs = 0
        self.leader = False
        self.round = anyio.Event()

    def enter(self) -> None:
        self.refs += 1
        if self.refs == 1:
            self.core.register(self.event, 1)

    def exit(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.core.register(self.event, -1)
            # Nobody waits here any more: forget the gate, so that it keeps neither the
            # handle nor the event loop alive.
            entry = _gates.get(self.key)
            if entry is not None and entry[2] is self:
                del _gates[self.key]

    async def wait(self, seen: int) -> None:
        """Return after the counter moved from ``seen``, or after at most one slice."""
        if self.leader:
            await self.round.wait()
            return
        self.leader = True
        try:
            done = anyio.Event()
            _sleep_request(self.core, self.event, self.native, seen, done.set)
            await done.wait()
        finally:
            self.leader = False
            finished, self.round = self.round, anyio.Event()
            finished.set()  # every follower tries again


_gates: dict[tuple[int, int, int], tuple[Any, Any, _Gate]] = {}


def _gate(core: Any, event: int) -> _Gate:
    loop = anyio.lowlevel.current_token().native_token
    key = (id(core), event, id(loop))
    entry = _gates.get(key)
    if entry is None or entry[0] is not core or entry[1] is not loop:
        entry = _gates[key] = (core, loop, _Gate(core, event, key, loop))
    return entry[2]


async def _until(core: Any, event: int, attempt: Callable[[], Any], value: Any = None) -> Any:
    """Run ``attempt`` (which returns NOTHING while it must wait for data or room, and
    BUSY while a lock is held elsewhere) until it succeeds. ``value``: the result of a
    first attempt the caller already made (after its paced checkpoint)."""
    if value is None:
        await _paced_checkpoint()
        value = attempt()
        if value is not NOTHING and value is not BUSY:
            return value
    await anyio.lowlevel.checkpoint_if_cancelled()  # about to wait: a cancellation point
    if event == EV_NOT_EMPTY and value is NOTHING and core.spin_readable():
        # The core's adaptive spin (at most 100 µs, usually far less, and it shrinks
        # when it does not pay): a thread wakeup costs much more than that.
        value = attempt()
        if value is not NOTHING and value is not BUSY:
            return value
    gate = _gate(core, event)
    gate.enter()
    delay = 0.0002
    try:
        while True:
            seen = core.seq(event)
            value = attempt()  # again after registering: no wakeup can be missed
            if value is NOTHING:
                await gate.wait(seen)
            elif value is BUSY:
                await anyio.sleep(delay)  # a lock held elsewhere: never block the loop
                delay = min(delay * 2, 0.01)
            else:
                return value
    finally:
        gate.exit()


# -- the asyncio.Queue-shaped view of a Queue ------------------------------------------


class AsyncQueue(Generic[T]):
    """``q.async_q``: the same queue as an ``asyncio.Queue``-shaped object whose
    coroutines run under asyncio or trio (through anyio), usable while other
    processes use the queue synchronously. Cancelling ``put`` or ``get`` never
    loses or duplicates an item."""

    def __init__(self, queue: Any) -> None:
        self._q = queue

    @property
    def maxsize(self) -> int:
        maxsize: int = self._q._maxsize
        return maxsize

    def _core(self) -> Any:
        q = self._q
        if q._closed:
            raise q._closed_error()
        return q._core

    async def put(self, item: T) -> None:
        """Put ``item``, waiting (without blocking the event loop) while it is full."""
        core = self._core()
        if self._q._backend == _remote.BACKEND:  # redis dispatch: await core.put_async(obj)
            await core.put_async(item)
            return
        await _paced_checkpoint()
        done = core.put(item, 0.0, F_NOGRACE)  # the fast path: one call, no waiting
        if done is True:
            return

        def attempt() -> Any:
            done = core.put(item, 0.0, F_NOGRACE)
            return NOTHING if done is False else done

        await _until(core, EV_NOT_FULL, attempt, NOTHING if done is False else done)

    async def get(self) -> T:
        """Remove and return an item, waiting (without blocking the loop) while empty."""
        core = self._core()
        if self._q._backend == _remote.BACKEND:  # redis dispatch: await core.get_async()
            got: T = await core.get_async()
            return got
        await _paced_checkpoint()
        item: Any = core.get(0.0, F_NOGRACE)  # the fast path: one call, no waiting
        if item is NOTHING or item is BUSY:
            item = await _until(core, EV_NOT_EMPTY, lambda: core.get(0.0, F_NOGRACE), item)
        result: T = item
        return result

    async def put_many(self, items: Iterable[T]) -> None:
        """Put every item of ``items`` in order, many per lock (see
        :meth:`shmchan.Queue.put_many`), waiting (without blocking the loop) while
        there is no room. If it is cancelled while it waits, the items already put
        stay in the queue and the others are not sent."""
        core = self._core()
        if self._q._backend == _remote.BACKEND:  # redis dispatch: await core.put_many_async(objs)
            await core.put_many_async(items)
            return
        rest = list(items)

        def attempt() -> Any:
            nonlocal rest
            sent = core.put_many(rest, 0.0, F_NOGRACE)
            if sent is BUSY:
                return BUSY
            rest = rest[sent:]
            return NOTHING if rest else True

        if rest:
            await _until(core, EV_NOT_FULL, attempt)

    async def get_many(self, max_items: int) -> list[T]:
        """Remove and return between 1 and ``max_items`` of the oldest items under one
        lock (see :meth:`shmchan.Queue.get_many`), waiting (without blocking the loop)
        while the queue is empty. Cancelling it consumes nothing."""
        from ._channel import _check_max_items

        _check_max_items(max_items)
        core = self._core()
        if self._q._backend == _remote.BACKEND:  # redis dispatch: await core.get_many_async(max_items)
            got: list[T] = await core.get_many_async(max_items)
            return got

        def attempt() -> Any:
            got = core.get_many(max_items, 0.0, F_NOGRACE)
            return NOTHING if isinstance(got, list) and not got else got

        items: list[T] = await _until(core, EV_NOT_EMPTY, attempt)
        return items

    def put_nowait(self, item: T) -> None:
        try:
            self._q.put_nowait(item)
        except Full:
            raise AsyncQueueFull from None

    def get_nowait(self) -> T:
        try:
            item: T = self._q.get_nowait()
        except Empty:
            raise AsyncQueueEmpty from None
        return item

    def qsize(self) -> int:
        size: int = self._q.qsize()
        return size

    def empty(self) -> bool:
        return bool(self._q.empty())

    def full(self) -> bool:
        return bool(self._q.full())

    def task_done(self) -> None:
        """Mark one item processed (JoinableQueue only)."""
        self._q.task_done()

    async def join(self) -> None:
        """Wait until every item put so far was marked done (JoinableQueue only)."""
        q = self._q
        if not hasattr(q, "task_done"):
            raise AttributeError("join() needs a JoinableQueue")
        core = self._core()
        if q._backend == _remote.BACKEND:  # redis dispatch: await core.join_async()
            await core.join_async()
            return
        await _until(core, EV_JOINED, lambda: True if core.unfinished() == 0 else NOTHING)


# -- a Channel as an anyio object stream ------------------------------------------------------


class ChannelStream(anyio.abc.ObjectStream[Any]):
    """``ch.aio``: a Channel handle as an ``anyio.abc.ObjectStream``, so it drops into
    anyio and trio code where a memory object stream would go.

    ``receive`` raises ``anyio.EndOfStream`` at the end of the stream (``async for``
    just stops), ``send`` raises ``anyio.BrokenResourceError`` once no reader is
    left, and both raise ``anyio.ClosedResourceError`` once this handle is closed.
    ``send_eof`` gives up this handle's write rights; ``aclose`` closes the handle.
    """

    def __init__(self, channel: Any) -> None:
        self._ch = channel

    @property
    def channel(self) -> Any:
        return self._ch

    async def send(self, item: Any) -> None:
        ch = self._ch
        try:
            flags = ch._writable() | F_NOGRACE
            core = ch._core
            if ch._backend == _remote.BACKEND:  # redis dispatch: await core.send_async(obj) (BrokenChannel)
                await core.send_async(item)
                return

            def attempt() -> Any:
                done = core.put(item, 0.0, flags)
                return NOTHING if done is False else done

            await _until(core, EV_NOT_FULL, attempt)
        except (ClosedChannel, WrongMode) as exc:
            raise anyio.ClosedResourceError from exc
        except BrokenChannel as exc:
            raise anyio.BrokenResourceError from exc

    async def receive(self) -> Any:
        ch = self._ch
        try:
            flags = ch._readable() | F_NOGRACE
            core = ch._core
            if ch._backend == _remote.BACKEND:  # redis dispatch: await core.recv_async() (EndOfChannel)
                return await core.recv_async()
            return await _until(core, EV_NOT_EMPTY, lambda: core.get(0.0, flags))
        except EndOfChannel:
            raise anyio.EndOfStream from None
        except (ClosedChannel, WrongMode) as exc:
            raise anyio.ClosedResourceError from exc

    async def send_eof(self) -> None:
        self._ch.send_eof()
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._ch.close()
        await anyio.lowlevel.checkpoint()


# -- select across sources ----------------------------------------------------------------------


async def aselect(*sources: Any) -> tuple[Any, Any]:
    """The async twin of :func:`shmchan.select`: wait (without blocking the event
    loop) until one of ``sources`` has an item, and return ``(source, item)``.
    Exactly one item is consumed; cancelling consumes none. Use a cancel scope for a
    timeout. Raises EndOfChannel once every source is a channel at end of stream.
    """
    from ._select import check_sources, next_start, try_each, try_each_ready

    check_sources(sources)
    if any(s.backend == _remote.BACKEND for s in sources):  # redis dispatch: select over redis sources
        from ._redis._select import aselect as remote_aselect

        return await remote_aselect(sources)
    await anyio.lowlevel.checkpoint_if_cancelled()
    cores = [s._core for s in sources]
    while True:
        found = try_each(sources, next_start())
        if found is not None:
            return found
        gates = [_gate(core, EV_NOT_EMPTY) for core in cores]
        for gate in gates:
            gate.enter()
        try:
            seqs = [core.seq(EV_NOT_EMPTY) for core in cores]
            if try_each_ready(cores):  # re-check after registering
                continue
            await _wait_any(cores, seqs)
        finally:
            for gate in gates:
                gate.exit()


async def _wait_any(cores: Sequence[Any], seqs: list[int]) -> None:
    """Return once any of ``cores`` was posted, or within one wait slice (one helper
    thread, FUTEX_WAITV)."""
    from . import _cext

    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    abandoned = False

    def run() -> None:
        with contextlib.suppress(Exception):
            _cext.wait_any(cores, seqs, WAIT_SLICE)
        if not abandoned:
            with contextlib.suppress(Exception):
                anyio.from_thread.run_sync(done.set, token=token)

    threading.Thread(target=run, name="shmchan-aselect-wait", daemon=True).start()
    try:
        await done.wait()
    except BaseException:
        abandoned = True
        raise
