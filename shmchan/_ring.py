"""The ring algorithm over a mapped segment: place, commit, read and release records.

This module knows the byte layout (through :mod:`shmchan._layout`) and the ordering
rules, and nothing about the OS: it never locks, sleeps or wakes anyone. The caller
(:mod:`shmchan._core`) holds the write lock around :meth:`Ring.try_write` and the
read lock around :meth:`Ring.try_read`, which is what makes the ring
multi-producer, multi-consumer. It works on any writable buffer, so the tests also
run it on a plain ``bytearray``.

Commit points (docs/layout.md, "Commit points"):

* a put is committed by its store of ``tail``: every byte before ``tail`` is a
  complete record, anything a dead producer wrote past it is invisible;
* a get is committed by its store of ``head``: before it the record is still in the
  ring (a consumer that dies there leaves it for the next one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from . import _layout as L
from ._errors import CorruptChannel
from ._fence import WEAK_ORDERING, full_fence

_MASK32 = 0xFFFFFFFF


class Ring:
    """A view of one segment's ring. Not thread-safe: callers hold the side's lock."""

    __slots__ = ("_data", "_hdr", "_i", "_q", "capacity", "mask", "max_payload", "max_record")

    def __init__(self, buf: memoryview, capacity: int, max_record: int) -> None:
        self._q = buf.cast("Q")  # 8-byte words: aligned stores are single instructions
        self._i = buf.cast("I")
        self._hdr = L.HEADER_SIZE // 8
        self._data = buf[L.HEADER_SIZE : L.HEADER_SIZE + capacity]
        self.capacity = capacity
        self.mask = capacity - 1
        self.max_record = max_record
        self.max_payload = L.max_payload(max_record)

    def release(self) -> None:
        """Drop the buffer views so the mapping can be closed."""
        self._q.release()
        self._i.release()
        self._data.release()

    # -- positions -------------------------------------------------------------

    @property
    def head(self) -> int:
        return self._q[L.Q_HEAD]

    @property
    def tail(self) -> int:
        return self._q[L.Q_TAIL]

    def used(self) -> int:
        """Bytes between head and tail (a racy snapshot when not locked)."""
        return self._q[L.Q_TAIL] - self._q[L.Q_HEAD]

    def is_empty(self) -> bool:
        return self._q[L.Q_TAIL] == self._q[L.Q_HEAD]

    def _positions(self) -> tuple[int, int]:
        head = self._q[L.Q_HEAD]
        tail = self._q[L.Q_TAIL]
        if not 0 <= tail - head <= self.capacity or (head | tail) & 15:
            self._corrupt(f"impossible ring positions head={head} tail={tail}")
        return head, tail

    # -- waiter counters and state (plain u32 words) ---------------------------

    def consumers_waiting(self) -> int:
        return self._i[L.I_CONSUMERS_WAITING]

    def add_consumers_waiting(self, delta: int) -> None:
        """Adjust the counter. Only consumers write it, under the read lock."""
        self._i[L.I_CONSUMERS_WAITING] = (self._i[L.I_CONSUMERS_WAITING] + delta) & _MASK32

    def producers_waiting(self) -> int:
        return self._i[L.I_PRODUCERS_WAITING]

    def add_producers_waiting(self, delta: int) -> None:
        """Adjust the counter. Only producers write it, under the write lock."""
        self._i[L.I_PRODUCERS_WAITING] = (self._i[L.I_PRODUCERS_WAITING] + delta) & _MASK32

    def state(self) -> int:
        return self._i[L.I_STATE]

    def mark_corrupt(self) -> None:
        self._i[L.I_STATE] = L.STATE_CORRUPT

    # -- producer side (caller holds the write lock) ----------------------------

    def try_write(self, payload: memoryview, rtype: int = L.RT_BYTES) -> bool:
        """Append one record; return False (and write nothing visible) if it doesn't fit.

        ``payload`` must be a C-contiguous byte view of at most ``max_payload`` bytes.
        """
        n = payload.nbytes
        need = (n + 31) & ~15  # record_size(n): 16-byte header + payload, 16-aligned
        head, tail = self._positions()
        if WEAK_ORDERING:
            full_fence()  # acquire: consumers' reads of freed bytes precede our writes
        idx = tail & self.mask
        rem = self.capacity - idx
        free = self.capacity - (tail - head)
        pad = 0 if need <= rem else rem
        if pad + need > free:
            return False
        q = self._q
        base = self._hdr
        if pad:
            # Wrap rule: a padding record fills [idx, capacity); the record goes at 0.
            q[base + (idx >> 3)] = (rem - L.RECORD_HEADER_SIZE) | (L.RT_PADDING << 32)
            q[base + (idx >> 3) + 1] = 0
            idx = 0
        q[base + (idx >> 3)] = n | (rtype << 32)
        q[base + (idx >> 3) + 1] = 0
        if n:
            self._data[idx + 16 : idx + 16 + n] = payload
        if WEAK_ORDERING:
            full_fence()  # release: the record's bytes are visible before the tail
        q[L.Q_TAIL] = tail + pad + need  # commit point of the put
        return True

    def free_bytes(self) -> int:
        return self.capacity - self.used()

    # -- consumer side (caller holds the read lock) -----------------------------

    def try_read(self) -> tuple[int, bytes] | None:
        """Remove the oldest record and return ``(type, payload)``, or None if empty.

        Padding records are skipped (and released). Every field is validated before it
        is used to index memory; a violation marks the channel corrupt and raises
        :class:`CorruptChannel`.
        """
        head, tail = self._positions()
        if head == tail:
            return None
        if WEAK_ORDERING:
            full_fence()  # acquire: the tail we read is ordered before the record bytes
        q = self._q
        base = self._hdr
        start = head
        while head != tail:
            idx = head & self.mask
            word = q[base + (idx >> 3)]
            n = word & _MASK32
            rtype = (word >> 32) & 0xFFFF
            size = (n + 31) & ~15
            if rtype == L.RT_PADDING:
                if idx + 16 + n != self.capacity or size > tail - head:
                    self._corrupt(f"bad padding record at {head}: length {n}")
                head += self.capacity - idx
                continue
            if size > self.max_record or idx + size > self.capacity or size > tail - head:
                self._corrupt(f"bad record at {head}: length {n}, type {rtype}")
            payload = bytes(self._data[idx + 16 : idx + 16 + n])
            if WEAK_ORDERING:
                full_fence()  # release: our reads finish before producers may reuse bytes
            q[L.Q_HEAD] = head + size  # commit point of the get
            return rtype, payload
        if head != start:
            q[L.Q_HEAD] = head  # only padding was left: release it
        return None

    def _corrupt(self, why: str) -> NoReturn:
        self.mark_corrupt()
        raise CorruptChannel(why)

    # -- debugging aid -----------------------------------------------------------

    def records(self) -> Sequence[tuple[int, int, int]]:
        """List ``(position, type, length)`` of the records between head and tail."""
        out = []
        head, tail = self._positions()
        while head < tail:
            idx = head & self.mask
            word = self._q[self._hdr + (idx >> 3)]
            n, rtype = word & _MASK32, (word >> 32) & 0xFFFF
            out.append((head, rtype, n))
            head += (self.capacity - idx) if rtype == L.RT_PADDING else (n + 31) & ~15
        return out
