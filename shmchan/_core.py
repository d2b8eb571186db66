"""ChannelCore: ring + locks + wakeups, with deadlines. The faces are thin over it.

This is the one place that orders "write, publish, signal" and "register, re-check,
sleep" (docs/layout.md, "Waiting and waking"):

* a put takes the write lock, writes and commits the record (the tail store), drops
  the lock, then fences and posts not-empty if a consumer is registered as waiting;
* a consumer that finds the ring empty registers in ``consumers_waiting`` under the
  read lock, fences, re-checks, and only then sleeps on not-empty; producers mirror it.

Semaphores are hints, never locks: a missing post costs at most one wait slice
(:data:`WAIT_SLICE`), a stray post costs one spurious wakeup, and a post is only made
while the semaphore's value is 0, so values stay bounded by the number of posters.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import time
import weakref
from collections.abc import Callable
from typing import Any, Final, TypeVar

from . import _layout as L
from ._backends._base import READER, WRITER, Mutex, Segment, Wakeup
from ._errors import BrokenChannel, ClosedChannel, CorruptChannel, EndOfChannel, ShmchanError
from ._fence import full_fence
from ._ring import Record, Ring

_Got = TypeVar("_Got")
_Arg = TypeVar("_Arg")

WAIT_SLICE: Final = 0.25
"""Longest single sleep on a semaphore. Bounds how late a waiter notices a post lost
to a peer's death (SIGKILL between commit and post) or a channel marked corrupt."""

LOCK_GRACE: Final = 0.005
"""Even a non-blocking call may wait this long for a lock that another process holds
for its microsecond-long critical section; it never waits for data or space."""

DEREGISTER_PATIENCE: Final = 0.05
"""How long a call that is leaving (timeout, Ctrl-C) waits for its lock to undo its
waiter registration."""

_live: weakref.WeakSet[ChannelCore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for core in list(_live):
        core.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Waiter(enum.IntEnum):
    """Who sleeps on which semaphore."""

    PRODUCER = 0  # not-full, producers_waiting, write lock
    CONSUMER = 1  # not-empty, consumers_waiting, read lock
    JOINER = 2  # joined, joiners_waiting, read lock


def _lock_deadline(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(deadline, time.monotonic() + LOCK_GRACE)


class ChannelCore:
    """Byte-level send/receive with deadlines over one attached segment."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        self.ring = Ring(seg.buf, seg.info.capacity, seg.info.max_record, seg.info.max_items)
        self.max_payload = self.ring.max_payload
        self._spin_recv = self._spin_send = SPIN_START_NS if _CAN_SPIN else 0
        self._roles: set[int] = set()
        self._counted: set[int] = set()
        self.closing = False
        self.async_gates: dict[tuple[Waiter, int], tuple[object, Any]] = {}
        """The async face's per-event-loop gates (see shmchan._async)."""
        _live.add(self)

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Detach. Threads of this process inside an operation on this core finish
        it with ClosedChannel (or its result, if it had already succeeded)."""
        self.closing = True
        _live.discard(self)
        seg = self.seg
        seg.wlock.close()  # waits for in-flight critical sections of our threads
        seg.rlock.close()
        with contextlib.suppress(ValueError, OSError, ShmchanError):
            ring = self.ring  # hurry our own sleepers (a stray post elsewhere is harmless)
            if ring.consumers_waiting():
                seg.not_empty.post()
            if ring.producers_waiting():
                seg.not_full.post()
            if ring.joiners_waiting():
                seg.joined.post()
        self.ring.release()
        seg.close()

    def _closed_error(self, exc: BaseException) -> BaseException:
        """What an operation that raced with close() raises instead of ``exc``."""
        if self.closing and not isinstance(exc, ClosedChannel):
            err = ClosedChannel(f"channel handle {self.seg.name!r} was closed during the call")
            err.__cause__ = exc
            return err
        return exc

    def after_fork_in_child(self) -> None:
        # The segment re-takes the child's presence (a new open file's OFD lock, or a
        # new SEM_UNDO unit): that is what counts. The header counters stay the
        # parent's: taking a lock here could deadlock (the parent may hold it across
        # the fork), and the counters are only hints (see role_gone).
        self.seg.after_fork_in_child()
        self._counted.clear()

    # -- presence: who may still write or read (end of stream) ---------------------------

    def enter_role(self, role: int) -> None:
        """Count this handle as a writer (WRITER) or reader (READER) of the channel."""
        if role in self._roles:
            return
        self.seg.presence.enter(role)
        self._roles.add(role)
        full_fence()
        self.ring.mark_seen(role)
        if self._count_role(role, +1):
            self._counted.add(role)

    def leave_role(self, role: int) -> None:
        """Stop counting this handle in ``role`` and wake the other side, so that it
        re-checks for end of stream (the last writer) or a broken channel (the last
        reader)."""
        if role not in self._roles:
            return
        self._roles.discard(role)
        full_fence()  # everything this handle committed precedes its departure
        if role in self._counted:
            self._counted.discard(role)
            self._count_role(role, -1)
        self.seg.presence.leave(role)
        full_fence()
        if role == WRITER and self.ring.consumers_waiting():
            _post_if_zero(self.seg.not_empty)
        if role == READER and self.ring.producers_waiting():
            _post_if_zero(self.seg.not_full)

    def _count_role(self, role: int, delta: int) -> bool:
        """Adjust the header's hint counter, if the lock can be had at once (a peer
        stopped inside a critical section must not block an open or a close);
        return whether it was adjusted."""
        lock = self.seg.wlock if role == WRITER else self.seg.rlock
        try:
            if not lock.acquire(time.monotonic() + LOCK_GRACE):
                return False
            self.ring.add_role(role, delta)
            return True
        finally:
            lock.release()

    def role_gone(self, role: int) -> bool:
        """Whether ``role`` had holders and none but this handle is left. The kernel's
        presence decides (a holder that died counts as gone, a forked child's
        inherited handle counts as present); this is a system call."""
        if not self.ring.role_seen(role):
            return False
        return not self.seg.presence.others(role)

    def writers_gone(self) -> bool:
        """End of stream, seen from a handle without write rights."""
        if WRITER in self._roles or not self.role_gone(WRITER):
            return False
        full_fence()  # the departures are seen before we look at the ring again
        return True

    def readers_gone(self) -> bool:
        """Broken channel, seen from a handle without read rights."""
        return READER not in self._roles and self.role_gone(READER)

    def _check_state(self) -> None:
        if self.ring.state() != L.STATE_NORMAL:
            raise CorruptChannel(f"channel {self.seg.name!r} was marked corrupt")

    # -- send ---------------------------------------------------------------------

    def send(
        self,
        write: Callable[[_Arg], int],
        arg: _Arg,
        deadline: float | None,
        broken: Callable[[], bool] | None = None,
    ) -> int:
        """Append records with ``write(arg)`` (called under the write lock; it returns
        how many records it appended, 0 if none fits now; see
        :meth:`Ring.try_write_record` and :meth:`Ring.try_write_many`): return that
        count, or 0 if ``deadline`` passed with no room.

        Blocks while the ring is full, or holds ``max_items`` records: after at most
        100 µs of adaptive polling, it sleeps on a semaphore. A KeyboardInterrupt
        leaves the ring unchanged and unlocked. Raises BrokenChannel if ``broken()``
        says so while it waits.
        """
        try:
            return self._send(write, arg, deadline, broken)
        except (ValueError, OSError) as exc:  # released views, closed descriptors
            raise self._closed_error(exc) from None

    def _send(
        self,
        write: Callable[[_Arg], int],
        arg: _Arg,
        deadline: float | None,
        broken: Callable[[], bool] | None = None,
    ) -> int:
        """The body of :meth:`send` (which turns errors of a racing close into ClosedChannel)."""
        ring = self.ring
        seg = self.seg
        lock = seg.wlock
        registered = False
        spin = self._spin_send > 0
        try:
            while True:
                if not lock.acquire(_lock_deadline(deadline)):
                    return 0
                try:
                    if registered:
                        ring.add_producers_waiting(-1)
                        registered = False
                    self._check_state()
                    written = write(arg)
                    if written:
                        break
                    if broken is not None and broken():
                        raise BrokenChannel(f"channel {seg.name!r}: every reader is gone")
                    if deadline is not None and time.monotonic() >= deadline:
                        return 0
                    if spin:  # poll below, without the lock, before registering
                        head = ring.head  # room appears when consumers move the head
                    else:
                        ring.add_producers_waiting(1)
                        registered = True
                        full_fence()  # Dekker: registration visible before the re-check
                        written = write(arg)
                        if written:
                            ring.add_producers_waiting(-1)
                            registered = False
                            break
                finally:
                    lock.release()
                if spin:
                    spin = False
                    self._spin_send = _spin(functools.partial(_unmoved, ring, head), self._spin_send)
                    continue
                _sleep(seg.not_full, deadline)
        finally:
            if registered:  # timed out, or interrupted, while registered as a waiter
                self._deregister(lock, ring.add_producers_waiting)
        # Dekker: the tail store is visible before we read consumers_waiting.
        full_fence()
        if ring.consumers_waiting():
            _post_if_zero(seg.not_empty)
        if ring.producers_waiting():
            _post_if_zero(seg.not_full)  # pass the baton to another waiting producer
        return written

    # -- receive --------------------------------------------------------------------

    def recv(self, deadline: float | None, eof: Callable[[], bool] | None = None) -> Record | None:
        """Remove the oldest record as ``(type, payload)``; None if ``deadline`` passed.

        Blocks while the ring is empty: after at most 100 µs of adaptive polling, it
        sleeps on a semaphore. A KeyboardInterrupt while waiting consumes nothing.
        Raises EndOfChannel when ``eof()`` says every writer is gone and the ring is
        drained.
        """
        try:
            return self._recv(self.ring.try_read, deadline, eof)
        except (ValueError, OSError) as exc:
            raise self._closed_error(exc) from None

    def recv_many(
        self, max_records: int, deadline: float | None, eof: Callable[[], bool] | None = None
    ) -> list[Record] | None:
        """Like :meth:`recv`, but take up to ``max_records`` records at once, under one
        lock and with one commit (waits only while the ring is empty)."""
        try:
            return self._recv(functools.partial(self.ring.try_read_many, max_records), deadline, eof)
        except (ValueError, OSError) as exc:
            raise self._closed_error(exc) from None

    def _recv(
        self, read: Callable[[], _Got | None], deadline: float | None, eof: Callable[[], bool] | None = None
    ) -> _Got | None:
        """The body of :meth:`recv` and :meth:`recv_many` (``read`` runs under the read
        lock and returns None when the ring is empty)."""
        ring = self.ring
        seg = self.seg
        lock = seg.rlock
        registered = False
        spin = self._spin_recv > 0
        try:
            while True:
                if not lock.acquire(_lock_deadline(deadline)):
                    return None
                try:
                    if registered:
                        ring.add_consumers_waiting(-1)
                        registered = False
                    self._check_state()
                    got = read()
                    if got is not None:
                        break
                    if eof is not None and eof():
                        got = read()  # anything committed before the last writer left
                        if got is not None:
                            break
                        raise EndOfChannel(f"channel {seg.name!r}: every writer is gone")
                    if deadline is not None and time.monotonic() >= deadline:
                        return None
                    if not spin:  # (with spin left, poll below without the lock first)
                        ring.add_consumers_waiting(1)
                        registered = True
                        full_fence()  # Dekker: registration visible before the re-check
                        got = read()
                        if got is not None:
                            ring.add_consumers_waiting(-1)
                            registered = False
                            break
                finally:
                    lock.release()
                if spin:
                    spin = False
                    self._spin_recv = _spin(ring.is_empty, self._spin_recv)
                    continue
                _sleep(seg.not_empty, deadline)
        finally:
            if registered:
                self._deregister(lock, ring.add_consumers_waiting)
        # Dekker: the head store is visible before we read producers_waiting.
        full_fence()
        if ring.producers_waiting():
            _post_if_zero(seg.not_full)
        if ring.consumers_waiting() and not ring.is_empty():
            _post_if_zero(seg.not_empty)  # more data: pass the baton to another consumer
        return got

    @staticmethod
    def _deregister(lock: Mutex, adjust: Callable[[int], None]) -> None:
        # Best effort and bounded (a timed-out call must not overrun much): if the lock
        # cannot be had within DEREGISTER_PATIENCE, because its holder is stopped (or
        # the handle was closed meanwhile), the counter stays one too high, which only
        # costs peers an extra post.
        with contextlib.suppress(ClosedChannel, ValueError, OSError):
            if lock.acquire(time.monotonic() + DEREGISTER_PATIENCE):
                try:
                    adjust(-1)
                finally:
                    lock.release()

    # -- waiting from elsewhere (the async face) ---------------------------------------------

    @property
    def spin_budget_recv(self) -> int:
        return self._spin_recv

    def spin_recv(self) -> None:
        """Poll for a record for up to the adaptive spin budget (see :func:`_spin`)."""
        try:
            self._spin_recv = _spin(self.ring.is_empty, self._spin_recv)
        except ValueError as exc:  # the views were released: closed meanwhile
            raise self._closed_error(exc) from None

    def wakeup_for(self, waiter: Waiter) -> Wakeup:
        """The semaphore that wakes ``waiter``s: not-full, not-empty or joined."""
        seg = self.seg
        return (seg.not_full, seg.not_empty, seg.joined)[waiter]

    def register(self, waiter: Waiter) -> None:
        """Count one more sleeper of this kind (a process's async tasks register once,
        together). The caller must try its operation again after this, before
        sleeping on :meth:`wakeup_for` (docs/layout.md 8)."""
        self._adjust_waiting(waiter, +1)
        full_fence()  # Dekker: registration visible before the caller's re-check

    def unregister(self, waiter: Waiter) -> None:
        with contextlib.suppress(ClosedChannel, ValueError, OSError):  # closed meanwhile
            self._adjust_waiting(waiter, -1)

    def _adjust_waiting(self, waiter: Waiter, delta: int) -> None:
        ring = self.ring
        lock = self.seg.wlock if waiter is Waiter.PRODUCER else self.seg.rlock
        adjust = (ring.add_producers_waiting, ring.add_consumers_waiting, ring.add_joiners_waiting)[waiter]
        try:
            lock.acquire(None)
            adjust(delta)
        finally:
            lock.release()

    # -- tasks (JoinableQueue) -------------------------------------------------------------

    def task_done(self) -> None:
        """Mark one record done; wake joiners when none is left unfinished.

        Raises ValueError if called more times than records were put.
        """
        ring = self.ring
        lock = self.seg.rlock
        try:
            lock.acquire(None)
            left = ring.task_done()
        finally:
            lock.release()
        if left == 0:
            full_fence()  # Dekker with join(): tasks_done visible before joiners_waiting
            if ring.joiners_waiting():
                _post_if_zero(self.seg.joined)

    def join(self, deadline: float | None) -> bool:
        """Wait until every record put so far was marked done; False on timeout."""
        try:
            return self._join(deadline)
        except (ValueError, OSError) as exc:
            raise self._closed_error(exc) from None

    def _join(self, deadline: float | None) -> bool:
        ring = self.ring
        seg = self.seg
        lock = seg.rlock
        registered = False
        try:
            while True:
                if not lock.acquire(_lock_deadline(deadline)):
                    return False
                try:
                    if registered:
                        ring.add_joiners_waiting(-1)
                        registered = False
                    self._check_state()
                    if ring.unfinished() == 0:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    ring.add_joiners_waiting(1)
                    registered = True
                    full_fence()  # Dekker: registration visible before the re-check
                    if ring.unfinished() == 0:
                        ring.add_joiners_waiting(-1)
                        registered = False
                        break
                finally:
                    lock.release()
                _sleep(seg.joined, deadline)
        finally:
            if registered:
                self._deregister(lock, ring.add_joiners_waiting)
        full_fence()
        if ring.joiners_waiting():
            _post_if_zero(seg.joined)  # the baton: wake the next joiner too
        return True

    def reserve_large_seq(self) -> int:
        """Take a side-segment sequence number (docs/layout.md 2.5)."""
        lock = self.seg.wlock
        try:
            lock.acquire(None)
            self._check_state()
            return self.ring.reserve_large_seq()
        finally:
            lock.release()


SPIN_MIN_NS: Final = 5_000
SPIN_START_NS: Final = 50_000
SPIN_MAX_NS: Final = 100_000
"""Spin budgets: between 5 and 100 µs of polling before a sleep, adaptive."""
_CAN_SPIN: Final = (os.cpu_count() or 1) > 1  # spinning only helps if the peer runs meanwhile


def _spin(still_waiting: Callable[[], bool], budget_ns: int) -> int:
    """Poll the ring briefly before sleeping: a semaphore wakeup costs tens of µs
    here, and a peer that is busy on another core often delivers sooner. Return the
    next budget: after a success, twice the wait it took (so typical waits stay
    covered); after a miss, half (so an idle or oversubscribed machine quickly stops
    spending CPU on it). A call spins at most once, before its first sleep."""
    now = time.perf_counter_ns
    start = now()
    end = start + budget_ns
    while still_waiting():
        if now() > end:
            return max(SPIN_MIN_NS, budget_ns // 2)
    return min(SPIN_MAX_NS, max(budget_ns, 2 * (now() - start)))


def _unmoved(ring: Ring, head: int) -> bool:
    return ring.head == head


def _sleep(wakeup: Wakeup, deadline: float | None) -> None:
    if deadline is None:
        wakeup.wait(WAIT_SLICE)
        return
    left = deadline - time.monotonic()
    if left > 0:
        wakeup.wait(min(left, WAIT_SLICE))


def _post_if_zero(wakeup: Wakeup) -> None:
    if wakeup.value() == 0:
        wakeup.post()
