"""The queue core: what ``Queue``, ``JoinableQueue`` and ``SimpleQueue`` do on redis.

Semantics (docs/redis.md has the whole story):

* **Delivery.** By default a record is acknowledged and deleted by the same script
  that takes it: once ``get`` returns, the item is its consumer's, as on the local
  backends (a consumer killed inside ``get`` may take the item with it). With
  ``redeliver_after`` (JoinableQueue only) a taken record stays in the stream's
  pending list until ``task_done()`` acknowledges it; the lease thread keeps the
  records a live consumer holds, and those of a consumer that stopped renewing them
  (it died, or stalled) for ``redeliver_after`` seconds are taken by the next
  consumer that looks: at-least-once delivery.
* **Order.** One stream: FIFO for the records of each producer (and overall, except
  for records handed out again after a consumer died, and for prefetched records a
  closing handle puts back at the tail).
* **maxsize** counts records put and not yet taken; a ``put`` that finds no room
  waits (in slices, woken by the consumers' hints) until there is, or its deadline.
* **prefetch**: a ``get`` takes up to this many records at once and hands out the
  others from the handle's buffer (one round trip per ``prefetch`` items). They are
  the handle's: ``close()`` puts those not handed out back at the tail; a crash loses
  them (with ``redeliver_after``, they are handed out again instead).
* **Lifetime.** A named queue lives until ``unlink()``. An unnamed one is held by a
  lease per handle (renewed by the lease thread, on the server's clock); every key
  expires once no handle renews it, and the last handle to close deletes them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any, Final

from .._core import NOTHING
from .._errors import ChannelExists
from . import _client as C
from . import _scripts as L
from ._stream import StreamCore, decode_batch, decode_record, encode_all, encode_record

DEFAULT_LEASE: Final = 5.0
"""Seconds a handle's leases last without renewal (renewed every third of that)."""

TRANSIT: Final = 300.0
"""Seconds an unnamed queue is held for a pickled handle that has not been unpickled."""


def check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    if not name or len(name) > 200 or "{" in name or "}" in name or not name.isprintable():
        raise ValueError(
            f"redis queue and channel names are 1-200 printable characters without braces: {name!r}"
        )
    return name


def check_lease(lease: float | None) -> float:
    if lease is None:
        return DEFAULT_LEASE
    if isinstance(lease, bool) or not isinstance(lease, int | float) or not 0.05 <= lease <= 86400:
        raise ValueError(f"lease must be a number of seconds from 0.05 to 86400, not {lease!r}")
    return float(lease)


def check_prefetch(prefetch: int | None) -> int:
    if prefetch is None:
        return 1
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= 10_000:
        raise ValueError(f"prefetch must be an int from 1 to 10000, not {prefetch!r}")
    return prefetch


def check_max_items(max_items: int) -> None:
    if isinstance(max_items, bool) or not isinstance(max_items, int):
        raise TypeError(f"max_items must be an int, not {type(max_items).__name__}")
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, not {max_items}")


class RedisQueueCore(StreamCore):
    """One handle on a redis-backed queue (see the module docstring)."""

    kind = "queue"

    def __init__(self, url: str, name: str, *, lease: float, prefetch: int, hold: bool, holder: str) -> None:
        super().__init__(url, name, lease=lease, prefetch=prefetch, hold=hold, holder=holder)
        self.maxsize = 0
        self.capacity = 0
        self.joinable = False
        self.redeliver_after = 0.0

    @classmethod
    def create(
        cls,
        url: str | None,
        name: str | None,
        maxsize: int,
        capacity: int | None,
        *,
        joinable: bool = False,
        redeliver_after: float | None = None,
        prefetch: int | None = None,
        lease: float | None = None,
    ) -> RedisQueueCore:
        """Create a queue (unnamed if ``name`` is None) and return a handle to it.

        Raises ChannelExists (the name is taken), BadURL, RemoteUnavailable and its
        subclasses (the server cannot be used), ValueError (bad settings).
        """
        url = C.resolve_url(url)
        lease_s = check_lease(lease)
        if redeliver_after is not None:
            if not joinable:
                raise ValueError("redeliver_after needs a JoinableQueue: task_done() acknowledges each item")
            if isinstance(redeliver_after, bool) or not isinstance(redeliver_after, int | float):
                raise TypeError("redeliver_after must be a number of seconds")
            if not 0.05 <= redeliver_after <= 86400:
                raise ValueError(f"redeliver_after must be from 0.05 to 86400 seconds, not {redeliver_after}")
        if capacity is not None and (
            isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1
        ):
            raise ValueError(f"capacity must be a positive int (bytes) or None, not {capacity!r}")
        unnamed = name is None
        qname = f"q-{secrets.token_hex(12)}" if name is None else check_name(name)
        hold = redeliver_after is not None
        core = cls(
            url,
            qname,
            lease=lease_s,
            prefetch=check_prefetch(prefetch),
            hold=hold,
            holder=C.new_id() if unnamed else "",
        )
        core.maxsize = max(0, maxsize)
        core.capacity = capacity or 0
        core.joinable = joinable
        core.redeliver_after = float(redeliver_after or 0.0)
        args = [
            "queue",
            core.maxsize,
            core.capacity,
            int(joinable),
            C.ms(redeliver_after) if redeliver_after is not None else 0,
            C.ms(lease_s),
            core.holder,
            "",
            "",
            0,
        ]
        reply = core.script("create", args, None)
        if reply[0] == L.EXISTS:
            raise ChannelExists(f"{qname!r} already exists on redis server {C.redact(url)}")
        core._start()
        return core

    @classmethod
    def attach(
        cls,
        url: str | None,
        name: str,
        *,
        prefetch: int | None = None,
        lease: float | None = None,
        transit: str = "",
    ) -> RedisQueueCore:
        """A new handle on the existing queue ``name`` (ChannelNotFound if there is
        none). An unnamed queue is held by this handle too (``transit``: the hold a
        pickled handle brought along, redeemed)."""
        url = C.resolve_url(url)
        lease_s = check_lease(lease)
        core = cls(
            url,
            check_name(name),
            lease=lease_s,
            prefetch=check_prefetch(prefetch),
            hold=False,
            holder=C.new_id(),
        )
        reply = core.script("attach", ["queue", C.ms(lease_s), core.holder, transit, "", ""], None)
        if reply[0] == L.WRONG_KIND:
            raise ValueError(f"{name!r} on redis server {C.redact(url)} is a channel, not a queue")
        core.check(reply)
        _, _, core.maxsize, core.capacity, joinable, redeliver, leased, _ = reply
        core.joinable = bool(joinable)
        core.redeliver_after = redeliver / 1000
        if redeliver:
            core.hold = True
            core.consumer = C.new_id()
        if not leased:
            core.holder = ""  # a named queue has no holders (ATTACH registered nothing)
        core._start()
        return core

    def _start(self) -> None:
        if self.hold:
            self.renew_every = min(self.lease, self.redeliver_after) / 3
        if self.holder or self.hold:
            C.renewer.add(self)

    # -- the core protocol (sync) -------------------------------------------------------------

    def put(self, obj: Any, deadline: float | None) -> bool:
        """Put one item; False if there was no room before ``deadline`` (nothing was put)."""
        return self.put_records([encode_record(obj, False)], deadline) == 1

    def put_many(self, objs: Iterable[Any], deadline: float | None) -> int:
        """Put every item in order (all are encoded first); how many went in."""
        sent: int = self.put_records(encode_all(objs, False), deadline)
        return sent

    def get(self, deadline: float | None) -> Any:
        """Take the oldest item; NOTHING if none arrived before ``deadline``."""
        got = self.take(1, deadline)
        if not got:
            return NOTHING
        return decode_record(got[0][1], got[0][2], False)

    def get_many(self, max_items: int, deadline: float | None) -> list[Any]:
        """Take 1 to ``max_items`` items (waiting only while there is none); [] on
        timeout. UndecodableBatch if some did not decode (the others are in it)."""
        check_max_items(max_items)
        got = self.take(max_items, deadline)
        return decode_batch(got, False) if got else []

    def qsize(self) -> int:
        """Items queued and not yet taken, plus those in this handle's prefetch buffer."""
        n = self.script("size", [], None)
        self.check(n)
        return int(n) + len(self._buffer)

    def task_done(self) -> None:
        """Mark one item done. With ``redeliver_after``, acknowledge the oldest item this
        handle handed out and has not marked done (ValueError if there is none). ValueError
        if called more times than items were put."""
        if self.hold:
            with self._lock:
                if not self._held:
                    raise ValueError(
                        "task_done(): this handle holds no item (with redeliver_after, call it on "
                        "the handle whose get() returned the item)"
                    )
                entry = self._held.popleft()
            status = self.script("done", [entry], None)
        else:
            status = self.script("done", [""], None)
        if status == L.TOO_MANY:
            raise ValueError("task_done() called more times than there were items")
        self.check(status)

    def join(self, deadline: float | None) -> bool:
        """Wait until every item put has been marked done; False at ``deadline``."""
        while True:
            status = self.script("joined", [], deadline)
            self.check(status)
            if status == 1:
                return True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                return False
            self.wait(4, left, deadline)

    def close(self) -> None:
        """Leave the queue (idempotent): unreturned prefetched items go back, the
        handle's leases end; the last holder of an unnamed queue deletes it."""
        if self.closed:
            return
        self.closed = True
        self.release()

    def unlink(self) -> None:
        """Delete the queue from the server now (ChannelNotFound if it is not there)."""
        if not self.script("unlink", [], None):
            self.check(L.GONE)

    # -- pickling ----------------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        transit = ""
        if self.holder:  # keep an unnamed queue alive while the pickle travels
            transit = f"transit:{C.new_id()}"
            self.check(self.script("transit", [transit, C.ms(TRANSIT)], None))
        return (_reattach, (self.url, self.name, self.prefetch, self.lease, transit))

    # -- the async twins --------------------------------------------------------------------

    async def put_async(self, obj: Any) -> None:
        await self.put_records_async([encode_record(obj, False)])

    async def put_many_async(self, objs: Iterable[Any]) -> None:
        await self.put_records_async(encode_all(objs, False))

    async def get_async(self) -> Any:
        got = await self.take_async(1)
        return decode_record(got[0][1], got[0][2], False)

    async def get_many_async(self, max_items: int) -> list[Any]:
        check_max_items(max_items)
        return decode_batch(await self.take_async(max_items), False)

    async def join_async(self) -> None:
        from . import _async as A

        srv = await A.server(self.url)
        while True:
            status = await srv.script("joined", self.keys, [])
            self.check(status)
            if status == 1:
                return
            await A.gate(self, self.keys[4]).wait(srv, [self.keys[4]])

    async def get_nowait_async(self) -> Any:
        """One attempt without waiting (for aselect): the item or NOTHING."""
        got = await self.poll_async()
        return decode_record(got[0][1], got[0][2], False) if got else NOTHING


def _reattach(url: str, name: str, prefetch: int, lease: float, transit: str) -> RedisQueueCore:
    return RedisQueueCore.attach(url, name, prefetch=prefetch, lease=lease, transit=transit)
