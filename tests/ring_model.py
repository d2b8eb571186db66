"""A pure-Python model of the layout-2 ring (docs/layout.md sections 2.3, 2.6, 5): the
executable specification the compiled ring is tested against, byte for byte.

It keeps the whole segment in a ``bytearray`` and implements put, put_many, get and
get_many exactly as the document states them, for one process (no locks, no waits):
``tests/test_ring.py`` applies the same random operations to it and to a real channel
and compares the records returned and every byte of the two segments.
"""

from __future__ import annotations

import struct

from shmchan import _layout as L

_Q = struct.Struct("<Q")
_BATCH_BYTES = 64 * 1024


class RingModel:
    """The ring of one segment, as a bytearray copy of it."""

    def __init__(self, segment: bytes) -> None:
        self.seg = bytearray(segment)
        h = L.decode_header(self.seg)
        self.capacity: int = h["capacity"]
        self.max_record: int = h["max_record"]
        self.max_items: int = h["max_items"]
        self.base: int = h["header_size"]

    # -- words -----------------------------------------------------------------------

    def _word(self, name: str) -> int:
        value: int = _Q.unpack_from(self.seg, L.OFF[name])[0]
        return value

    def _set(self, name: str, value: int) -> None:
        _Q.pack_into(self.seg, L.OFF[name], value)

    def _positions(self) -> tuple[int, int, int, int]:
        """(head units, tail units, records in ring, used bytes)."""
        h, t = self._word("head"), self._word("tail")
        used = ((t & L.UNIT_MASK) - (h & L.UNIT_MASK) & L.UNIT_MASK) << 4
        records = ((t >> L.UNIT_BITS) - (h >> L.UNIT_BITS)) & L.COUNT_MASK
        assert used <= self.capacity and records * 16 <= used
        return h & L.UNIT_MASK, t & L.UNIT_MASK, records, used

    # -- producer ----------------------------------------------------------------------

    def put_many(self, payloads: list[bytes], rtype: int = L.RT_BYTES) -> int:
        """Append as many of ``payloads`` as fit now, in order, with one commit; return
        how many (the wrap rule of section 2.6)."""
        _, tail_units, records, used = self._positions()
        free = self.capacity - used
        pos = tail_units
        k = 0
        for payload in payloads:
            need = L.record_size(len(payload))
            if need > self.max_record:
                raise ValueError("record larger than max_record")
            if self.max_items and records + k >= self.max_items:
                break
            if k and ((pos - tail_units) & L.UNIT_MASK) << 4 >= _BATCH_BYTES:
                break
            idx = (pos << 4) & (self.capacity - 1)
            rem = self.capacity - idx
            pad = 0 if need <= rem else rem
            if pad + need > free:
                break
            if pad:
                L.RECORD_HEADER.pack_into(self.seg, self.base + idx, rem - 16, L.RT_PADDING, 0, 0)
                idx = 0
            L.RECORD_HEADER.pack_into(self.seg, self.base + idx, len(payload), rtype, 0, 0)
            self.seg[self.base + idx + 16 : self.base + idx + 16 + len(payload)] = payload
            pos = (pos + (pad + need) // 16) & L.UNIT_MASK
            free -= pad + need
            k += 1
        if k:
            tail = self._word("tail")
            total = L.extend_total(self._word("msgs_put"), tail)
            self._set("tail", L.make_word((tail >> L.UNIT_BITS) + k, pos << 4))
            self._set("msgs_put", total + k)
        return k

    def put(self, payload: bytes) -> bool:
        return self.put_many([payload]) == 1

    # -- consumer ----------------------------------------------------------------------

    def get_many(self, max_records: int) -> list[bytes]:
        """Take up to ``max_records`` (and at most 64 KiB of ring after the first) with
        one commit, skipping padding."""
        head_units, tail_units, _, _ = self._positions()
        at = head_units
        out: list[bytes] = []
        while len(out) < max_records:
            avail = ((tail_units - at) & L.UNIT_MASK) << 4
            if not avail:
                break
            idx = (at << 4) & (self.capacity - 1)
            n, rtype, _, _ = L.RECORD_HEADER.unpack_from(self.seg, self.base + idx)
            if rtype == L.RT_PADDING:
                assert idx + 16 + n == self.capacity
                at = (at + (self.capacity - idx) // 16) & L.UNIT_MASK
                continue
            size = L.record_size(n)
            if out and (((at + size // 16) - head_units) & L.UNIT_MASK) << 4 > _BATCH_BYTES:
                break
            out.append(bytes(self.seg[self.base + idx + 16 : self.base + idx + 16 + n]))
            at = (at + size // 16) & L.UNIT_MASK
        head = self._word("head")
        if at != head_units or out:
            total = L.extend_total(self._word("msgs_got"), head)
            self._set("head", L.make_word((head >> L.UNIT_BITS) + len(out), at << 4))
            if out:
                self._set("msgs_got", total + len(out))
        return out

    def get(self) -> bytes | None:
        got = self.get_many(1)
        return got[0] if got else None

    # -- what the comparison looks at ------------------------------------------------------

    def ring_bytes(self) -> bytes:
        return bytes(self.seg[self.base : self.base + self.capacity])

    def words(self) -> dict[str, int]:
        return {name: self._word(name) for name in ("tail", "head", "msgs_put", "msgs_got")}
