"""The async face, on anyio (asyncio and trio): ``q.async_q``, ``ch.aio``, ``aselect``.

Every async operation is the sync core's non-blocking attempt, run in the event
loop's thread, plus a way to wait between attempts:

* **Fast path, no thread hop.** When there is data (or room), the attempt succeeds at
  once and the coroutine returns without awaiting anything after it. So a
  cancellation can only land *between* attempts, when nothing has been taken: a
  message is never lost or duplicated by cancelling a receive (or a send).
* **Waiting without a thread per task.** The tasks of one event loop that wait on the
  same side of the same channel share a :class:`_Gate`: one registration in the
  channel's waiter counter, and one *leader* task whose helper thread sleeps on the
  channel's semaphore for at most one wait slice; every other task waits on an
  anyio Event that the leader sets when its thread returns. A thousand waiting tasks
  cost one thread, and the thread ends within :data:`~shmchan._core.WAIT_SLICE` of
  its last use (after cancellation or loop shutdown too).
* **Timeouts are cancel scopes** (``anyio.fail_after``, ``trio.move_on_after``,
  ``asyncio.wait_for``): the operations take no timeout argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from . import _objects
from . import _redis as _remote
from ._backends._base import Wakeup
from ._core import WAIT_SLICE, ChannelCore, Waiter
from ._errors import BrokenChannel, ClosedChannel, Empty, EndOfChannel, Full, WrongMode
from ._fence import deadline_after

T = TypeVar("T")


class AsyncQueueEmpty(Empty, asyncio.QueueEmpty):
    """Raised by ``async_q.get_nowait()`` on an empty queue: an ``asyncio.QueueEmpty``
    (and a ``queue.Empty``)."""


class AsyncQueueFull(Full, asyncio.QueueFull):
    """Raised by ``async_q.put_nowait()`` on a full queue: an ``asyncio.QueueFull``
    (and a ``queue.Full``)."""


# -- waiting -------------------------------------------------------------------------------


async def _sleep_in_thread(wakeup: Wakeup) -> None:
    """Sleep on ``wakeup`` for at most one wait slice, in a short-lived thread."""
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    abandoned = False

    def run() -> None:
        try:
            got = wakeup.wait(WAIT_SLICE)
        except Exception:  # noqa: BLE001 - removed or closed: the task's retry will say so
            got = False
        if not abandoned:
            with contextlib.suppress(Exception):  # the event loop may have gone away
                anyio.from_thread.run_sync(done.set, token=token)
                return
        if got:
            wakeup.post()  # a token nobody here will act on: give it back

    threading.Thread(target=run, name="shmchan-async-wait", daemon=True).start()
    try:
        await done.wait()
    except BaseException:
        abandoned = True
        raise


class _Gate:
    """The tasks of one event loop waiting on one side of one channel."""

    def __init__(self, core: ChannelCore, waiter: Waiter) -> None:
        self.core = core
        self.waiter = waiter
        self.wakeup = core.wakeup_for(waiter)
        self.refs = 0
        self.leader = False
        self.round = anyio.Event()

    def enter(self) -> None:
        self.refs += 1
        if self.refs == 1:
            self.core.register(self.waiter)

    def exit(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.core.unregister(self.waiter)

    async def wait(self) -> None:
        """Return after a wakeup, or after at most one wait slice."""
        if self.leader:
            await self.round.wait()
            return
        self.leader = True
        try:
            await _sleep_in_thread(self.wakeup)
        finally:
            self.leader = False
            finished, self.round = self.round, anyio.Event()
            finished.set()  # every follower tries again


def _gate(core: ChannelCore, waiter: Waiter) -> _Gate:
    loop = anyio.lowlevel.current_token().native_token
    key = (waiter, id(loop))
    gate = core.async_gates.get(key)
    if gate is None or gate[0] is not loop:
        for old in [k for k, (_, g) in core.async_gates.items() if g.refs == 0]:
            del core.async_gates[old]  # gates of event loops that are gone
        gate = core.async_gates[key] = (loop, _Gate(core, waiter))
    result: _Gate = gate[1]
    return result


async def _until(core: ChannelCore, waiter: Waiter, attempt: Callable[[], Any]) -> Any:
    """Run ``attempt`` (which returns NOTHING when it must wait) until it succeeds."""
    await anyio.lowlevel.checkpoint_if_cancelled()
    value = attempt()
    if value is not _objects.NOTHING:
        return value
    if waiter is Waiter.CONSUMER and core.spin_budget_recv:
        # The sync face's adaptive spin (at most 100 µs, usually far less, and it
        # shrinks when it does not pay): a thread wakeup costs much more than that.
        core.spin_recv()
        value = attempt()
        if value is not _objects.NOTHING:
            return value
    gate = _gate(core, waiter)
    gate.enter()
    try:
        while True:
            value = attempt()  # again after registering: no wakeup can be missed
            if value is not _objects.NOTHING:
                return value
            await gate.wait()
    finally:
        gate.exit()


async def _send(
    core: ChannelCore,
    out: _objects.Outgoing,
    discard: Callable[[], None],
    broken: Callable[[], bool] | None = None,
) -> None:
    def attempt() -> Any:
        return True if _objects.attempt(core, out, deadline_after(0.0), broken) else _objects.NOTHING

    try:
        await _until(core, Waiter.PRODUCER, attempt)
    except BaseException:
        discard()  # cancelled, or failed: the message was not sent
        raise


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

    async def put(self, item: T) -> None:
        """Put ``item``, waiting (without blocking the event loop) while it is full."""
        q = self._q
        if q._closed:
            raise q._closed_error()
        if q._backend == _remote.BACKEND:  # redis dispatch: await core.put_async(obj)
            await q._rc.put_async(item)
            return
        out = _objects.prepare(q._core, q._impl, q._name, item)
        await _send(q._core, out, lambda: _objects.discard(q._impl, q._name, out))

    async def get(self) -> T:
        """Remove and return an item, waiting (without blocking the loop) while empty."""
        q = self._q
        if q._closed:
            raise q._closed_error()
        if q._backend == _remote.BACKEND:  # redis dispatch: await core.get_async()
            got: T = await q._rc.get_async()
            return got
        item: T = await _until(
            q._core,
            Waiter.CONSUMER,
            lambda: _objects.receive(q._core, q._impl, q._name, deadline_after(0.0)),
        )
        return item

    async def put_many(self, items: Iterable[T]) -> None:
        """Put every item of ``items`` in order, many per lock (see
        :meth:`shmchan.Queue.put_many`), waiting (without blocking the loop) while
        there is no room. If it is cancelled while it waits, the items already put
        stay in the queue and the others are not sent."""
        q = self._q
        if q._closed:
            raise q._closed_error()
        if q._backend == _remote.BACKEND:  # redis dispatch: await core.put_many_async(objs)
            await q._rc.put_many_async(items)
            return
        core: ChannelCore = q._core
        batch = _objects.prepare_many(core, q._impl, q._name, items)

        def attempt() -> Any:
            return _objects.attempt_many(core, batch, deadline_after(0.0)) or _objects.NOTHING

        try:
            while batch.done < len(batch):
                await _until(core, Waiter.PRODUCER, attempt)
        finally:
            _objects.discard_rest(q._impl, q._name, batch)

    async def get_many(self, max_items: int) -> list[T]:
        """Remove and return between 1 and ``max_items`` of the oldest items under one
        lock (see :meth:`shmchan.Queue.get_many`), waiting (without blocking the loop)
        while the queue is empty. Cancelling it consumes nothing."""
        q = self._q
        if q._closed:
            raise q._closed_error()
        if q._backend == _remote.BACKEND:  # redis dispatch: await core.get_many_async(max_items)
            got: list[T] = await q._rc.get_many_async(max_items)
            return got
        items: list[T] = await _until(
            q._core,
            Waiter.CONSUMER,
            lambda: (
                _objects.receive_many(q._core, q._impl, q._name, max_items, deadline_after(0.0))
                or _objects.NOTHING
            ),
        )
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
        if q._closed:
            raise q._closed_error()
        if q._backend == _remote.BACKEND:  # redis dispatch: await core.join_async()
            await q._rc.join_async()
            return
        core: ChannelCore = q._core
        await _until(
            core, Waiter.JOINER, lambda: True if core.join(deadline_after(0.0)) else _objects.NOTHING
        )


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
            ch._writable()
            if ch._backend == _remote.BACKEND:  # redis dispatch: await core.send_async(obj) (BrokenChannel)
                await ch._rc.send_async(item)
                return
            if ch._broken():
                raise BrokenChannel(f"channel {ch.name!r}: every reader is gone")
            out = _objects.prepare(ch._core, ch._impl, ch._name, item)
            await _send(ch._core, out, lambda: _objects.discard(ch._impl, ch._name, out), ch._broken_waiting)
        except (ClosedChannel, WrongMode) as exc:
            raise anyio.ClosedResourceError from exc
        except BrokenChannel as exc:
            raise anyio.BrokenResourceError from exc

    async def receive(self) -> Any:
        ch = self._ch
        try:
            eof = ch._readable()
            if ch._backend == _remote.BACKEND:  # redis dispatch: await core.recv_async() (EndOfChannel)
                return await ch._rc.recv_async()
            return await _until(
                ch._core,
                Waiter.CONSUMER,
                lambda: _objects.receive(ch._core, ch._impl, ch._name, deadline_after(0.0), eof),
            )
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
    from ._select import check_sources, next_start, try_each

    check_sources(sources)
    if any(s.backend == _remote.BACKEND for s in sources):  # redis dispatch: select over redis sources
        from ._redis._select import aselect as remote_aselect

        return await remote_aselect(sources)
    await anyio.lowlevel.checkpoint_if_cancelled()
    while True:
        found = try_each(sources, next_start())
        if found is not None:
            return found
        await _wait_any([s._core for s in sources])


async def _wait_any(cores: Sequence[ChannelCore]) -> None:
    """Return once any of ``cores`` was posted, or within one wait slice."""
    gates = [_gate(core, Waiter.CONSUMER) for core in cores]
    for gate in gates:
        gate.enter()
    try:
        from ._select import try_each_ready

        if try_each_ready(cores):  # re-check after registering
            return
        async with anyio.create_task_group() as tg:

            async def one(gate: _Gate) -> None:
                await gate.wait()
                tg.cancel_scope.cancel()

            for gate in gates:
                tg.start_soon(one, gate)
    finally:
        for gate in gates:
            gate.exit()
