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
_ZEROS = bytes(16)
_pack_header = L.RECORD_HEADER.pack
_unpack_header = L.RECORD_HEADER.unpack_from
_BLOCK = 1 << 16
"""At most this many bytes of the ring are copied at once by :meth:`Ring.try_read_many`."""
_BATCH_BYTES = 1 << 16
"""A batch publishes (or releases) what it has once it spans this many bytes of the
ring, and goes on under a new lock: so the other side can copy big records while
this side copies the next ones, as with single operations."""
_RUN_MAX = 2048
"""Records with a payload up to this size are assembled into runs by
:meth:`Ring.try_write_many` and read out of one block by :meth:`Ring.try_read_many`;
larger ones are copied straight into and out of the ring."""
"""At most this many bytes of the ring are copied at once by :meth:`Ring.try_read_many`."""

Record = tuple[int, bytes | bytearray]
"""A received record: ``(type, payload)``."""


OutRecord = tuple[int, int, "bytes | memoryview | None", Sequence[tuple[int, memoryview]]]
"""A record to write: ``(type, n, payload, parts)``, ``n`` payload bytes taken from
``payload`` or, if that is None, gathered from ``parts`` (``(offset, view)`` pairs)."""


class Ring:
    """A view of one segment's ring. Not thread-safe: callers hold the side's lock."""

    __slots__ = (
        "_data",
        "_end",
        "_hdr",
        "_i",
        "_q",
        "capacity",
        "mask",
        "max_items",
        "max_payload",
        "max_record",
    )

    def __init__(self, buf: memoryview, capacity: int, max_record: int, max_items: int = 0) -> None:
        self._q = buf.cast("Q")  # 8-byte words: aligned stores are single instructions
        self._i = buf.cast("I")
        self._hdr = L.HEADER_SIZE // 8
        self._data = buf[L.HEADER_SIZE : L.HEADER_SIZE + capacity]
        self.capacity = capacity
        self.mask = capacity - 1
        self.max_record = max_record
        self.max_payload = L.max_payload(max_record)
        self.max_items = max_items
        self._end = 0  # set by _place_at: the position after the record it placed

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

    def items(self) -> int:
        """Records put and not yet got (a snapshot; never negative)."""
        return max(0, self._q[L.Q_MSGS_PUT] - self._q[L.Q_MSGS_GOT])

    def unfinished(self) -> int:
        """Records put and not yet marked done with task_done (a snapshot)."""
        return max(0, self._q[L.Q_MSGS_PUT] - self._q[L.Q_TASKS_DONE])

    def task_done(self) -> int:
        """Count one task done; return how many remain. Caller holds the read lock.

        Raises ValueError if called more times than records were put.
        """
        q = self._q
        done = q[L.Q_TASKS_DONE]
        put = q[L.Q_MSGS_PUT]
        if done >= put:
            raise ValueError("task_done() called too many times")
        q[L.Q_TASKS_DONE] = done + 1
        return put - done - 1

    def joiners_waiting(self) -> int:
        return self._i[L.I_JOINERS_WAITING]

    def add_joiners_waiting(self, delta: int) -> None:
        """Adjust the counter. Joiners write it under the read lock."""
        self._i[L.I_JOINERS_WAITING] = (self._i[L.I_JOINERS_WAITING] + delta) & _MASK32

    _OPEN = (L.I_WRITERS_OPEN, L.I_READERS_OPEN)
    _SEEN = (L.I_WRITERS_SEEN, L.I_READERS_SEEN)

    def role_open(self, role: int) -> int:
        """Handles that opened with ``role`` (0 writer, 1 reader) and closed cleanly
        not yet: a hint, too high if some holder died (presence is the truth)."""
        return self._i[self._OPEN[role]]

    def role_seen(self, role: int) -> bool:
        return self._i[self._SEEN[role]] != 0

    def add_role(self, role: int, delta: int) -> None:
        """Adjust the ``role`` counter; writers under the write lock, readers under
        the read lock."""
        i = self._i
        i[self._OPEN[role]] = max(0, i[self._OPEN[role]] + delta)

    def mark_seen(self, role: int) -> None:
        """Record that ``role`` has had a holder (a store of 1 that is never undone,
        so it needs no lock)."""
        self._i[self._SEEN[role]] = 1

    def reserve_large_seq(self) -> int:
        """Take the next side-segment sequence number. Caller holds the write lock."""
        seq = self._q[L.Q_LARGE_SEQ]
        self._q[L.Q_LARGE_SEQ] = seq + 1
        return seq

    def state(self) -> int:
        return self._i[L.I_STATE]

    def mark_corrupt(self) -> None:
        self._i[L.I_STATE] = L.STATE_CORRUPT

    # -- producer side (caller holds the write lock) ----------------------------

    def try_write(self, payload: memoryview, rtype: int = L.RT_BYTES) -> bool:
        """Append one record; return False (and write nothing visible) if it doesn't fit.

        ``payload`` must be a C-contiguous byte view of at most ``max_payload`` bytes.
        A ring with ``max_items`` also refuses a record while it holds that many.
        """
        return self.try_write_record((rtype, payload.nbytes, payload, ())) == 1

    def try_write_record(self, record: OutRecord) -> int:
        """Like :meth:`try_write` for ``(type, n, payload, parts)`` (see
        :data:`OutRecord`): each part is copied once, straight into the ring.
        Return 1 if it was appended, 0 if it does not fit now."""
        rtype, n, payload, parts = record
        head, tail = self._positions()
        if WEAK_ORDERING:
            full_fence()  # acquire: consumers' reads of freed bytes precede our writes
        q = self._q
        if self.max_items and q[L.Q_MSGS_PUT] - q[L.Q_MSGS_GOT] >= self.max_items:
            return 0
        idx = self._place_at(tail, head, n, rtype)
        if idx < 0:
            return 0
        if payload is None:
            self._fill(idx, parts)
        elif n:
            self._data[idx + 16 : idx + 16 + n] = payload
        # The commit point of a put (the same three steps as _publish, inline: hot path).
        if WEAK_ORDERING:
            full_fence()  # release: the record's bytes are visible before the tail
        q[L.Q_MSGS_PUT] = q[L.Q_MSGS_PUT] + 1
        q[L.Q_TAIL] = self._end
        return 1

    def try_write_many(self, records: Sequence[OutRecord], start: int = 0) -> int:
        """Append ``records[start:]``, as many as fit now (and up to about
        :data:`_BATCH_BYTES` of ring), in order, and publish them together with one
        store of ``tail`` (one commit point for all of them, so a crash before it
        leaves none visible). Return how many were appended.

        Runs of records that need no wrap are assembled in a private buffer and
        copied into the ring at once; the bytes are the same as one
        :meth:`try_write_record` per record.
        """
        head, tail = self._positions()
        if WEAK_ORDERING:
            full_fence()  # acquire, as in try_write_record
        q = self._q
        limit = len(records) - start
        if self.max_items:
            limit = min(limit, self.max_items - (q[L.Q_MSGS_PUT] - q[L.Q_MSGS_GOT]))
        cap = self.capacity
        mask = self.mask
        room = cap - (tail - head)  # free bytes
        end = tail  # where the next record goes (unpublished)
        run = bytearray()  # records assembled for [end - len(run), end)
        pack = _pack_header
        zeros = _ZEROS
        count = 0
        stop_at = tail + _BATCH_BYTES  # publish at least this often: consumers copy meanwhile
        while count < limit and (end < stop_at or not count):
            rtype, n, payload, parts = records[start + count]
            need = (n + 31) & ~15
            at = end & mask
            if run and not at:  # the run reached the ring's end: it ends there
                self._flush_run(end, run)
                run = bytearray()
            # In a run: small (a big payload is better copied once, straight in), room
            # for it, no wrap (it ends by the ring's end), one payload view.
            if n <= _RUN_MAX and payload is not None and need <= room and at + need <= cap:
                run += pack(n, rtype, 0, 0)
                run += payload
                run += zeros[: need - 16 - n]
                end += need
                room -= need
                count += 1
                continue
            self._flush_run(end, run)
            run = bytearray()
            idx = self._place_at(end, head, n, rtype)
            if idx < 0:
                break
            if payload is None:
                self._fill(idx, parts)
            elif n:
                self._data[idx + 16 : idx + 16 + n] = payload
            room -= self._end - end
            end = self._end
            count += 1
        self._flush_run(end, run)
        if count:
            if WEAK_ORDERING:
                full_fence()  # release: the records' bytes are visible before the tail
            q[L.Q_MSGS_PUT] = q[L.Q_MSGS_PUT] + count  # before the tail: a consumer that
            # sees a record also sees it counted (task_done relies on that)
            q[L.Q_TAIL] = end
        return count

    def _flush_run(self, end: int, run: bytearray) -> None:
        if run:
            at = (end - len(run)) & self.mask
            self._data[at : at + len(run)] = run

    def _place_at(self, end: int, head: int, n: int, rtype: int) -> int:
        """Find room at position ``end`` (the tail, or past records not yet
        published), given ``head``, for a record of ``n`` payload bytes; write its
        header (and any padding before it) and return its ring index, or -1 if it
        does not fit now. Sets ``_end`` to the position after the record."""
        need = (n + 31) & ~15  # record_size(n): 16-byte header + payload, 16-aligned
        idx = end & self.mask
        rem = self.capacity - idx
        pad = 0 if need <= rem else rem
        if pad + need > self.capacity - (end - head):
            return -1
        q = self._q
        base = self._hdr
        if pad:
            # Wrap rule: a padding record fills [idx, capacity); the record goes at 0.
            q[base + (idx >> 3)] = (rem - L.RECORD_HEADER_SIZE) | (L.RT_PADDING << 32)
            q[base + (idx >> 3) + 1] = 0
            idx = 0
        q[base + (idx >> 3)] = n | (rtype << 32)
        q[base + (idx >> 3) + 1] = 0
        self._end = end + pad + need
        return idx

    def _fill(self, idx: int, parts: Sequence[tuple[int, memoryview]]) -> None:
        data = self._data
        base = idx + 16
        for off, view in parts:
            data[base + off : base + off + view.nbytes] = view

    # -- consumer side (caller holds the read lock) -----------------------------

    def try_read(self) -> Record | None:
        """Remove the oldest record and return ``(type, payload)``, or None if empty.

        Padding records are skipped (and released). Every field is validated before it
        is used to index memory; a violation marks the channel corrupt and raises
        :class:`CorruptChannel`. (The one-record twin of :meth:`try_read_many`, kept
        apart because it is the hot path of every ``get``.)
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
            view = self._data[idx + 16 : idx + 16 + n]
            # Out-of-band pickle buffers become the received objects' memory (NumPy
            # arrays, bytearrays): give them a private, writable copy.
            payload = bytearray(view) if rtype == L.RT_PICKLE_OOB else bytes(view)
            if WEAK_ORDERING:
                full_fence()  # release: our reads finish before producers may reuse bytes
            q[L.Q_MSGS_GOT] = q[L.Q_MSGS_GOT] + 1
            q[L.Q_HEAD] = head + size  # commit point of the get
            return rtype, payload
        if head != start:
            q[L.Q_HEAD] = head  # only padding was left: release it
        return None

    def try_read_many(self, max_records: int) -> list[Record] | None:
        """Remove up to ``max_records`` of the oldest records (and up to about
        :data:`_BATCH_BYTES` of ring), in order, with one store of ``head`` (one
        commit point); None if the ring is empty. Validation as in
        :meth:`try_read`: a bad record raises CorruptChannel and consumes nothing.

        Small payloads are sliced out of one private copy of the bytes they occupy
        (one copy for many records); larger ones are copied out one by one.
        """
        head, tail = self._positions()
        if head == tail:
            return None
        if WEAK_ORDERING:
            full_fence()  # acquire: the tail we read is ordered before the record bytes
        data = self._data
        cap = self.capacity
        mask = self.mask
        max_record = self.max_record
        unpack = _unpack_header
        small = _RUN_MAX
        want = min(_BLOCK, max_records * 256)
        padding, oob = L.RT_PADDING, L.RT_PICKLE_OOB
        start = head
        out: list[Record] = []
        append = out.append
        count = 0
        block = b""
        block_at = block_end = head  # ring positions of the copy (it never wraps)
        stop_at = head + _BATCH_BYTES  # release at least this often: producers refill meanwhile
        while head != tail and count < max_records and (head < stop_at or not count):
            idx = head & mask
            n, rtype, _, _ = unpack(data, idx)
            size = (n + 31) & ~15
            if rtype == padding:
                if idx + 16 + n != cap or size > tail - head:
                    self._corrupt(f"bad padding record at {head}: length {n}")
                head += cap - idx
                continue
            if size > max_record or idx + size > cap or size > tail - head:
                self._corrupt(f"bad record at {head}: length {n}, type {rtype}")
            if n <= small and rtype != oob:
                if head + 16 + n > block_end:  # copy from here on: this record, then up to `want`
                    block = data[idx : idx + min(tail - head, cap - idx, max(want, 16 + n))].tobytes()
                    block_at, block_end = head, head + len(block)
                off = head - block_at + 16
                append((rtype, block[off : off + n]))
            elif rtype == oob:
                # Out-of-band pickle buffers become the received objects' memory (NumPy
                # arrays, bytearrays): give them a private, writable copy.
                append((rtype, bytearray(data[idx + 16 : idx + 16 + n])))
            else:
                append((rtype, data[idx + 16 : idx + 16 + n].tobytes()))
            head += size
            count += 1
        if head != start:
            if count:
                if WEAK_ORDERING:
                    full_fence()  # release: our reads finish before producers reuse bytes
                q = self._q
                q[L.Q_MSGS_GOT] = q[L.Q_MSGS_GOT] + count
            self._q[L.Q_HEAD] = head  # commit point of the get (or: only padding was released)
        return out or None

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
