"""``select`` and ``aselect`` over redis-backed queues and channels.

Each round tries every source once, without waiting (one TAKE script each, of one
record: exactly one item is consumed, from one source), starting one source further
than the last round, as the local select does. While none has anything, the caller
sleeps in one BLPOP on the ``items`` hint lists of every source on the same server (a
producer's hint wakes it), for one slice at most; the source whose hint woke it is
tried first. Sources on several servers are watched in turn, a short slice each.

Redis and local sources cannot be mixed in one call (ValueError): a local source is
woken by a semaphore, a redis one by the server, and no single wait covers both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

from .._core import NOTHING
from .._errors import Empty, EndOfChannel
from .._select import next_start, try_each
from . import BACKEND
from . import _client as C

MULTI_SERVER_SLICE: Final = 0.05
"""Seconds each server is watched in turn when the sources live on several servers."""


def _check_remote(sources: Sequence[Any]) -> None:
    if not all(s.backend == BACKEND for s in sources):
        raise ValueError("select() cannot mix redis-backed queues or channels with local ones")


def _groups(sources: Sequence[Any]) -> dict[str, list[int]]:
    """Source indexes by server URL."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        groups.setdefault(s._core.url, []).append(i)
    return groups


def select(sources: Sequence[Any], deadline: float | None) -> tuple[Any, Any]:
    """:func:`shmchan.select` over redis sources (see the module docstring)."""
    _check_remote(sources)
    groups = _groups(sources)
    start = next_start()
    while True:
        found = try_each(sources, start)
        if found is not None:
            return found
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if left == 0.0:
            raise Empty(f"no item arrived on any of {len(sources)} sources")
        start = next_start()
        for url, members in groups.items():
            slice_ = C.SLICE if len(groups) == 1 else MULTI_SERVER_SLICE
            slice_ = slice_ if left is None else min(left, slice_)
            if slice_ < 0.001:
                break
            keys = [sources[i]._core.keys[2] for i in members]
            got = C.server(url).call(C.reply_wait(deadline, slice_), "BLPOP", *keys, f"{slice_:.3f}")
            if got:
                start = members[keys.index(got[0].decode())]
                break


def _try_async_prologue(source: Any) -> None:
    from .._channel import Channel

    if isinstance(source, Channel):
        source._readable()
    elif source._closed:
        raise source._closed_error()


async def aselect(sources: Sequence[Any]) -> tuple[Any, Any]:
    """:func:`shmchan.aselect` over redis sources: cancelling it consumes nothing."""
    import anyio.lowlevel

    from . import _async as A

    _check_remote(sources)
    groups = _groups(sources)
    await anyio.lowlevel.checkpoint_if_cancelled()
    start = next_start()
    n = len(sources)
    while True:
        ended = 0
        for i in range(n):
            source = sources[(start + i) % n]
            _try_async_prologue(source)
            try:
                item = await source._core.get_nowait_async()
            except EndOfChannel:
                ended += 1
                continue
            if item is not NOTHING:
                return source, item
        if ended == n:
            raise EndOfChannel("every channel given to select() is at end of stream")
        start = next_start()
        for url, members in groups.items():
            srv = await A.server(url)
            keys = [sources[i]._core.keys[2] for i in members]
            slice_ = C.SLICE if len(groups) == 1 else MULTI_SERVER_SLICE
            got = await A.sleep_on(srv, keys, slice_)
            if got:
                start = members[keys.index(got[0].decode())]
                break
