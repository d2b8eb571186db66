"""The compiled ring against the executable specification (tests/ring_model.py).

A Hypothesis state machine applies the same random puts, batch puts, gets and batch
gets, of random sizes (wrapping often in a small ring, with and without an item limit),
to a real channel and to the model, and after every step compares what they returned
and every byte of the two rings and commit words. So the C code places, pads, commits
and counts exactly as docs/layout.md says, and a C, Go or Rust peer written from the
document interoperates with it.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from ring_model import RingModel

import shmchan
from shmchan import _layout as L
from shmchan._core import NOTHING

SIZES = st.integers(min_value=0, max_value=3000) | st.sampled_from([0, 1, 15, 16, 17, 2000, 2032])


class RingMatchesModel(RuleBasedStateMachine):
    """One real queue (posix, 16 KiB ring) and its model, driven together."""

    def __init__(self) -> None:
        super().__init__()
        self.q: shmchan.Queue[bytes] | None = None
        self.model: RingModel | None = None
        self.counter = 0

    @initialize(maxsize=st.sampled_from([0, 0, 3, 40]), capacity=st.sampled_from([4096, 16384]))
    def create(self, maxsize: int, capacity: int) -> None:
        self.q = shmchan.Queue(maxsize, capacity=capacity)
        core = self.q._core
        self.model = RingModel(core.raw(0, core.header_size + core.capacity))

    def teardown(self) -> None:
        if self.q is not None:
            self.q.close()

    def _payload(self, n: int) -> bytes:
        self.counter += 1
        tag = self.counter.to_bytes(4, "little")
        core = self.q._core  # type: ignore[union-attr]
        n = min(n, core.max_payload)
        return (tag * (n // 4 + 1))[:n]

    @rule(n=SIZES)
    def put(self, n: int) -> None:
        assert self.q is not None and self.model is not None
        payload = self._payload(n)
        assert self.q._core.put(payload, 0.0) is self.model.put(payload)

    @rule(sizes=st.lists(SIZES, min_size=1, max_size=12))
    def put_many(self, sizes: list[int]) -> None:
        assert self.q is not None and self.model is not None
        payloads = [self._payload(n) for n in sizes]
        assert self.q._core.put_many(payloads, 0.0) == self.model.put_many(payloads)

    @rule()
    def get(self) -> None:
        assert self.q is not None and self.model is not None
        got = self.q._core.get(0.0)
        expected = self.model.get()
        assert (None if got is NOTHING else got) == expected

    @rule(n=st.integers(min_value=1, max_value=20))
    def get_many(self, n: int) -> None:
        assert self.q is not None and self.model is not None
        assert self.q._core.get_many(n, 0.0) == self.model.get_many(n)

    @precondition(lambda self: self.q is not None)
    @invariant()
    def segments_agree(self) -> None:
        assert self.q is not None and self.model is not None
        core = self.q._core
        assert core.raw(core.header_size, core.capacity) == self.model.ring_bytes()
        header = L.decode_header(core.raw(0, L.HEADER_BASE))
        assert {k: header[k] for k in ("tail", "head", "msgs_put", "msgs_got")} == self.model.words()
        assert core.qsize() == header["records"] == core.put_total() - core.got_total()


RingMatchesModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingMatchesModel = RingMatchesModel.TestCase


@pytest.mark.parametrize("offset", range(0, 4096, 16 * 13))
def test_a_largest_record_fits_an_empty_ring_at_every_offset(backend: str, offset: int) -> None:
    """docs/layout.md 2.6: an empty ring accepts a record of max_record bytes wherever
    its tail is (directly, or after padding to the end)."""
    q: shmchan.Queue[bytes] = shmchan.Queue(capacity=4096, backend=backend)
    try:
        core = q._core
        if offset:
            filler = offset - 16
            assert core.put(b"f" * filler, 0.0) if filler >= 0 else True
            if filler >= 0:
                assert core.get(0.0) == b"f" * filler
        big = bytes(range(256)) * (core.max_payload // 256) + b"x" * (core.max_payload % 256)
        assert core.put(big, 0.0) is True
        assert core.get(0.0) == big
        assert core.qsize() == 0
    finally:
        q.close()


def test_counts_follow_the_commit_words(backend: str) -> None:
    """qsize, the totals and the record count in the commit words agree after puts,
    batches and gets (they are one store each: docs/layout.md 2.3)."""
    q: shmchan.Queue[bytes] = shmchan.Queue(capacity=4096, backend=backend)
    try:
        core = q._core
        core.put_many([b"a" * 10] * 7, 0.0)
        core.get_many(3, 0.0)
        header = L.decode_header(core.raw(0, L.HEADER_BASE))
        assert (header["records"], header["put_total"], header["got_total"]) == (4, 7, 3)
        assert (header["tail_count"], header["head_count"]) == (7, 3)
        assert core.qsize() == q.qsize() == 4
    finally:
        q.close()
