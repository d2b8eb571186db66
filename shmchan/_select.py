"""``select``: receive exactly one item from whichever of several sources has one.

Like Go's ``select`` over receives: the sources are tried in turn (each call, and each
retry, starting one source further than the last, so none starves), one item is
consumed from the first that has one, and the others are left untouched. While none has
anything, the caller is registered as a waiting consumer on every source and sleeps
until any of them is posted: one FUTEX_WAITV system call over every source's event
counter, for at most one wait slice at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from . import _cext
from . import _redis as _remote
from ._core import EV_NOT_EMPTY, NOTHING, WAIT_SLICE, deadline_after, remaining
from ._errors import Empty, EndOfChannel

_turns = itertools.count()
"""Where the next select starts trying sources: successive calls (and retries) begin
one source further, so a source that always has items cannot starve the others."""


def next_start() -> int:
    return next(_turns)


def check_sources(sources: Sequence[Any]) -> None:
    from ._channel import Channel
    from ._queue import _QueueCore

    if not sources:
        raise ValueError("select() needs at least one channel or queue")
    if len(sources) > 128:
        raise ValueError("select() takes at most 128 sources")
    for source in sources:
        if not isinstance(source, (Channel, _QueueCore)):
            raise TypeError(f"select() takes shmchan channels and queues, not {type(source).__name__}")


def _try_one(source: Any) -> Any:
    """One non-blocking receive: the item, or NOTHING; EndOfChannel at end of stream."""
    from ._channel import Channel

    if isinstance(source, Channel):
        return source._recv_or_nothing()
    return source._get_or_nothing()


def try_each(sources: Sequence[Any], start: int) -> tuple[Any, Any] | None:
    """Try every source once, beginning at ``start``; ``(source, item)`` or None.

    Raises EndOfChannel when every source is a channel at end of stream.
    """
    ended = 0
    n = len(sources)
    for i in range(n):
        source = sources[(start + i) % n]
        try:
            item = _try_one(source)
        except EndOfChannel:
            ended += 1
            continue
        if item is not NOTHING:
            return source, item
    if ended == n:
        raise EndOfChannel("every channel given to select() is at end of stream")
    return None


def try_each_ready(cores: Sequence[Any]) -> bool:
    """Whether any core has a record now (a racy peek, to re-check after registering)."""
    return any(not core.is_empty() for core in cores)


def select(*sources: Any, timeout: float | None = None) -> tuple[Any, Any]:
    """Receive one item from whichever of ``sources`` (Channels and Queues) has one.

    Returns ``(source, item)``; exactly one item is consumed, from one source.
    Blocks (sleeping) while none has anything, for at most ``timeout`` seconds, then
    raises :class:`Empty`; ``timeout=0`` never blocks. A channel at end of stream is
    skipped; once every source is a channel at end of stream, raises EndOfChannel.
    """
    from ._channel import check_timeout

    check_sources(sources)
    deadline = deadline_after(check_timeout(timeout))
    if any(s.backend == _remote.BACKEND for s in sources):  # redis dispatch: select over redis sources
        from ._redis._select import select as remote_select

        return remote_select(sources, deadline)
    cores = [s._core for s in sources]
    while True:
        found = try_each(sources, next_start())
        if found is not None:
            return found
        left = remaining(deadline)
        if left == 0:
            raise Empty(f"no item arrived on any of {len(sources)} sources")
        seqs = [core.seq(EV_NOT_EMPTY) for core in cores]
        for core in cores:
            core.register(EV_NOT_EMPTY, 1)
        try:
            if not try_each_ready(cores):  # re-check after registering (docs/layout.md 8)
                _cext.wait_any(cores, seqs, WAIT_SLICE if left is None else min(left, WAIT_SLICE))
        finally:
            for core in cores:
                core.register(EV_NOT_EMPTY, -1)


async def aselect(*sources: Any) -> tuple[Any, Any]:
    """The async twin of :func:`select`: wait (without blocking the event loop) until
    one of ``sources`` has an item, and return ``(source, item)``. Exactly one item is
    consumed; cancelling consumes none. Use a cancel scope for a timeout. Raises
    EndOfChannel once every source is a channel at end of stream.

    (The async machinery, and anyio, are imported on first use: ``import shmchan``
    stays light for processes that never use the async face.)
    """
    from ._async import aselect as run

    return await run(*sources)
