"""The ring algorithm on a plain bytearray: a model test and the boundary rules."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shmchan import CorruptChannel
from shmchan import _layout as L
from shmchan._ring import Ring


def make_ring(capacity: int = 4096, max_record: int | None = None) -> tuple[bytearray, Ring]:
    buf = bytearray(L.HEADER_SIZE + capacity)
    ring = Ring(memoryview(buf), capacity, max_record or capacity // 2)
    return buf, ring


def set_positions(buf: bytearray, head: int, tail: int) -> None:
    buf[L.OFF_HEAD : L.OFF_HEAD + 8] = head.to_bytes(8, "little")
    buf[L.OFF_TAIL : L.OFF_TAIL + 8] = tail.to_bytes(8, "little")


class RingModel(RuleBasedStateMachine):
    """Predicts every Full/Empty from docs/layout.md section 2.3 alone (not from _ring)."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 16384  # max payload 8176: records on both sides of _RUN_MAX (2048)
        self.buf, self.ring = make_ring(self.capacity)
        self.head = 0
        self.tail = 0
        self.queue: deque[bytes] = deque()
        self.sizes: deque[int] = deque()  # bytes each queued message releases (incl. padding)
        self.counter = 0

    def fits(self, n: int) -> tuple[bool, int]:
        need = (16 + n + 15) // 16 * 16
        idx = self.tail % self.capacity
        rem = self.capacity - idx
        pad = 0 if need <= rem else rem
        return pad + need <= self.capacity - (self.tail - self.head), pad + need

    @rule(n=st.integers(0, 8192 - 16))
    def put(self, n: int) -> None:
        self.counter += 1
        payload = (self.counter.to_bytes(4, "little") * (n // 4 + 1))[:n]
        ok, used = self.fits(n)
        assert self.ring.try_write(memoryview(payload)) is ok
        if ok:
            self.tail += used
            self.queue.append(payload)
            self.sizes.append(used)

    @rule()
    def get(self) -> None:
        got = self.ring.try_read()
        if not self.queue:
            assert got is None
            return
        assert got == (L.RT_BYTES, self.queue.popleft())
        self.head += self.sizes.popleft()

    @rule(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12), start=st.integers(0, 3))
    def put_many(self, sizes: list[int], start: int) -> None:
        """try_write_many appends the longest prefix of records[start:] that fits one
        after another, exactly as single puts would (same positions, same padding)."""
        records = []
        for n in sizes:
            self.counter += 1
            payload = (self.counter.to_bytes(4, "little") * (n // 4 + 1))[:n]
            records.append((L.RT_BYTES, n, payload, ()))
        expected = 0
        for _, n, payload, _ in records[start:]:
            ok, used = self.fits(n)
            if not ok:
                break
            self.tail += used
            self.queue.append(payload)
            self.sizes.append(used)
            expected += 1
        assert self.ring.try_write_many(records, start) == max(expected, 0)

    @rule(most=st.integers(1, 20))
    def get_many(self, most: int) -> None:
        got = self.ring.try_read_many(most)
        if not self.queue:
            assert got is None
            return
        assert got is not None and 1 <= len(got) <= most
        assert len(got) == min(most, len(self.queue))
        for item in got:
            assert item == (L.RT_BYTES, self.queue.popleft())
            self.head += self.sizes.popleft()

    @precondition(lambda self: not self.queue)
    @rule()
    def empty_ring_accepts_a_maximal_record(self) -> None:
        ok, _ = self.fits(self.ring.max_payload)
        assert ok
        self.put(self.ring.max_payload)

    @invariant()
    def positions_agree(self) -> None:
        assert (self.ring.head, self.ring.tail) == (self.head, self.tail) or (
            # a get that found only padding left releases it: head may run ahead
            not self.queue and self.ring.head == self.ring.tail == self.tail
        )
        assert self.ring.tail % 16 == 0 and self.ring.head % 16 == 0
        assert 0 <= self.ring.tail - self.ring.head <= self.capacity


RingModel.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestRingModel = RingModel.TestCase


@pytest.mark.parametrize("offset", range(0, 4096, 16))
def test_empty_ring_accepts_maximal_record_at_every_offset(offset: int) -> None:
    buf, ring = make_ring()
    set_positions(buf, 4096 * 3 + offset, 4096 * 3 + offset)
    payload = bytes(range(256)) * 8
    payload = payload[: ring.max_payload]
    assert ring.try_write(memoryview(payload))
    assert ring.try_read() == (L.RT_BYTES, payload)
    assert ring.is_empty()


def test_padding_fills_to_the_end() -> None:
    buf, ring = make_ring()
    set_positions(buf, 4096 - 64, 4096 - 64)
    assert ring.try_write(memoryview(b"x" * 100))
    assert ring.records() == [(4096 - 64, L.RT_PADDING, 48), (4096, L.RT_BYTES, 100)]
    assert ring.tail == 4096 + 128


def test_zero_length_messages() -> None:
    _, ring = make_ring()
    for _ in range(256):
        assert ring.try_write(memoryview(b""))
    assert not ring.try_write(memoryview(b""))  # 256 x 16 bytes fill 4096
    assert ring.try_read() == (L.RT_BYTES, b"")


@pytest.mark.parametrize(
    ("word", "why"),
    [
        (5000 | (L.RT_BYTES << 32), "length beyond max_record"),
        (100 | (L.RT_PADDING << 32), "padding not ending at the ring end"),
        (2000 | (L.RT_BYTES << 32), "record longer than the committed bytes"),
    ],
)
def test_corrupt_record_is_detected_and_sticks(word: int, why: str) -> None:
    buf, ring = make_ring()
    set_positions(buf, 0, 64)
    buf[L.HEADER_SIZE : L.HEADER_SIZE + 8] = word.to_bytes(8, "little")
    with pytest.raises(CorruptChannel):
        ring.try_read()
    assert ring.state() == L.STATE_CORRUPT, why


@pytest.mark.parametrize(("head", "tail"), [(64, 32), (0, 8192), (8, 8)])
def test_impossible_positions(head: int, tail: int) -> None:
    buf, ring = make_ring()
    set_positions(buf, head, tail)
    with pytest.raises(CorruptChannel):
        ring.try_read()
    assert ring.state() == L.STATE_CORRUPT
    with pytest.raises(CorruptChannel):
        ring.try_write(memoryview(b"x"))


def test_unknown_record_type_is_delivered_not_corruption() -> None:
    _, ring = make_ring()
    assert ring.try_write(memoryview(b"abc"), rtype=0x8001)
    assert ring.try_read() == (0x8001, b"abc")
    assert ring.state() == L.STATE_NORMAL


def test_a_batch_writes_the_same_records_as_single_writes() -> None:
    """The batch path assembles runs in a private buffer; the ring must not be able to
    tell: same records, same padding, same positions, same header counters (only the
    bytes between a payload's end and the next 16-byte boundary, undefined by
    docs/layout.md section 2.2, may differ)."""
    sizes = [0, 1, 15, 16, 17, 100, 1000, 2000, 3, 64] * 6
    records = [(L.RT_BYTES, n, bytes([i % 251 + 1]) * n, ()) for i, n in enumerate(sizes)]
    one_buf, one = make_ring()
    many_buf, many = make_ring()
    for offset in (0, 1000, 3000):  # start the rings at positions that wrap differently
        set_positions(one_buf, offset * 16, offset * 16)
        set_positions(many_buf, offset * 16, offset * 16)
        i = 0
        while i < len(records):
            k = many.try_write_many(records, i)
            assert k >= 1  # an empty ring takes any record of at most max_payload
            for rec in records[i : i + k]:
                assert one.try_write_record(rec) == 1
            if i + k < len(records):
                assert one.try_write_record(records[i + k]) == 0  # the batch stopped when full
            assert one.records() == many.records()
            assert bytes(one_buf[: L.HEADER_SIZE]) == bytes(many_buf[: L.HEADER_SIZE])
            got_one = [one.try_read() for _ in range(k)]
            got_many = many.try_read_many(k)
            assert got_one == got_many == [(L.RT_BYTES, r[2]) for r in records[i : i + k]]
            assert bytes(one_buf[: L.HEADER_SIZE]) == bytes(many_buf[: L.HEADER_SIZE])
            i += k


def test_batches_commit_every_64_kib_so_both_sides_overlap() -> None:
    """A batch of big records is published (and consumed) in slices of about 64 KiB,
    each under its own lock, so the other side can copy while this one does."""
    _, ring = make_ring(1 << 20)
    records = [(L.RT_BYTES, 10_000, bytes([i]) * 10_000, ()) for i in range(20)]
    assert ring.try_write_many(records) == 7  # 7 x 10,016 bytes: the first past 64 KiB
    assert ring.try_write_many(records, 7) == 7
    got = ring.try_read_many(100)
    assert got is not None and len(got) == 7
    assert [p[0] for _, p in got] == list(range(7))
    big = [(L.RT_BYTES, 200_000, b"b" * 200_000, ())] * 3
    assert ring.try_write_many(big) == 1  # one record over the slice still goes
