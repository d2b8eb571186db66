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

import functools
import os
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Final

from . import _layout as L
from ._backends._base import Mutex, Segment, Wakeup
from ._errors import CorruptChannel
from ._fence import full_fence
from ._ring import Ring

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
        _live.add(self)

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        _live.discard(self)
        self.ring.release()
        self.seg.close()

    def after_fork_in_child(self) -> None:
        self.seg.after_fork_in_child()

    def _check_state(self) -> None:
        if self.ring.state() != L.STATE_NORMAL:
            raise CorruptChannel(f"channel {self.seg.name!r} was marked corrupt")

    # -- send ---------------------------------------------------------------------

    def send(
        self,
        payload: memoryview | None,
        rtype: int,
        deadline: float | None,
        n: int = 0,
        parts: Sequence[tuple[int, memoryview]] = (),
    ) -> bool:
        """Append one record. Return False if ``deadline`` passed with no room.

        The payload is ``payload``, or (if it is None) ``n`` bytes gathered from
        ``parts`` (see :meth:`Ring.try_write_parts`). Blocks while the ring is full, or
        holds ``max_items`` records: after at most 100 µs of adaptive polling, it
        sleeps on a semaphore. A KeyboardInterrupt
        leaves the ring unchanged and unlocked.
        """
        ring = self.ring
        seg = self.seg
        lock = seg.wlock
        registered = False
        spin = self._spin_send > 0
        try:
            while True:
                if not lock.acquire(_lock_deadline(deadline)):
                    return False
                try:
                    if registered:
                        ring.add_producers_waiting(-1)
                        registered = False
                    self._check_state()
                    if (
                        ring.try_write(payload, rtype)
                        if payload is not None
                        else ring.try_write_parts(n, rtype, parts)
                    ):
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    if spin:  # poll below, without the lock, before registering
                        head = ring.head  # room appears when consumers move the head
                    else:
                        ring.add_producers_waiting(1)
                        registered = True
                        full_fence()  # Dekker: registration visible before the re-check
                        if (
                            ring.try_write(payload, rtype)
                            if payload is not None
                            else ring.try_write_parts(n, rtype, parts)
                        ):
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
        return True

    # -- receive --------------------------------------------------------------------

    def recv(self, deadline: float | None) -> tuple[int, bytes | bytearray] | None:
        """Remove the oldest record as ``(type, payload)``; None if ``deadline`` passed.

        Blocks while the ring is empty: after at most 100 µs of adaptive polling, it
        sleeps on a semaphore. A KeyboardInterrupt while waiting consumes nothing.
        """
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
                    got = ring.try_read()
                    if got is not None:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        return None
                    if not spin:  # (with spin left, poll below without the lock first)
                        ring.add_consumers_waiting(1)
                        registered = True
                        full_fence()  # Dekker: registration visible before the re-check
                        got = ring.try_read()
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
        # cannot be had within DEREGISTER_PATIENCE, because its holder is stopped, the
        # counter stays one too high, which only costs peers an extra post.
        if lock.acquire(time.monotonic() + DEREGISTER_PATIENCE):
            try:
                adjust(-1)
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

    # -- introspection ----------------------------------------------------------------

    def used_bytes(self) -> int:
        return self.ring.used()


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
