"""The channel core: what ``Channel`` does on redis.

A channel is a queue (records are taken and deleted in one step) plus roles. Each
handle with write rights holds a *writer lease*, each with read rights a *reader
lease*: a member of the ``w`` or ``r`` sorted set whose score is its deadline on the
server's clock, renewed by the lease thread every third of the lease.

* **End of stream.** A receiver without write rights that finds nothing checks, in the
  same script: a writer was seen, no writer lease is left (closed, or run out: the
  writer's process died or stalled), and nothing is left to take. Then it gets
  EndOfChannel. The last writer to close wakes the waiting readers at once; a writer
  that died is noticed once its lease has run out (within a slice after that).
* **Broken channel.** A send from a handle without read rights fails with
  BrokenChannel once a reader was seen and no reader lease is left.
* **Fencing.** A writer whose lease ran out (it stalled longer than the lease) may go
  on sending unless a reader saw the end of the stream meanwhile (the ``epoch``
  counter moved): then its sends raise BrokenChannel, since no reader would get them.
* **capacity** bounds the payload bytes queued: a send waits while the next message
  would not fit (one message always fits an empty channel).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import _layout as LT
from .._channel import geometry
from .._core import F_RAW, NOTHING, WRITER
from .._errors import ChannelExists, ChannelNotFound, MessageTooLarge
from . import _client as C
from . import _scripts as L
from ._queue import check_lease, check_max_items, check_name
from ._stream import MAX_PAYLOAD, StreamCore, decode_batch, decode_record, encode_all, encode_record


class RedisChannelCore(StreamCore):
    """One handle on a redis-backed channel (see the module docstring)."""

    kind = "channel"

    def __init__(self, url: str, name: str, mode: str, lease: float) -> None:
        super().__init__(
            url,
            name,
            lease=lease,
            writer=C.new_id() if "w" in mode else "",
            reader=C.new_id() if "r" in mode else "",
        )
        self.mode = mode
        self.capacity = 0
        self.max_payload = MAX_PAYLOAD

    @classmethod
    def create(
        cls,
        url: str | None,
        name: str,
        mode: str,
        capacity: int,
        max_message: int | None,
        lease: float | None = None,
    ) -> RedisChannelCore:
        """Create channel ``name`` (ChannelExists if it is taken) and register this
        handle's roles. ``capacity`` bounds the queued payload bytes; ``max_message``
        the size of :meth:`send` with ``raw`` (as for local channels)."""
        url = C.resolve_url(url)
        cap, max_record = geometry(capacity, max_message)
        core = cls(url, check_name(name), mode, check_lease(lease))
        core.capacity = cap
        core.max_payload = min(MAX_PAYLOAD, LT.max_payload(max_record))
        args = ["channel", 0, cap, 0, 0, C.ms(core.lease), "", core.writer, core.reader, core.max_payload]
        reply = core.script("create", args, None)
        if reply[0] == L.EXISTS:
            raise ChannelExists(f"{name!r} already exists on redis server {C.redact(url)}")
        core.epoch = reply[1]
        core._start()
        return core

    @classmethod
    def open(cls, url: str | None, name: str, mode: str, lease: float | None = None) -> RedisChannelCore:
        """Attach to channel ``name`` (ChannelNotFound if there is none)."""
        url = C.resolve_url(url)
        core = cls(url, check_name(name), mode, check_lease(lease))
        reply = core.script("attach", ["channel", C.ms(core.lease), "", "", core.writer, core.reader], None)
        if reply[0] == L.WRONG_KIND:
            raise ValueError(f"{name!r} on redis server {C.redact(url)} is a queue, not a channel")
        core.check(reply)
        core.epoch, core.capacity, core.max_payload = reply[1], reply[3], reply[7]
        core._start()
        return core

    @staticmethod
    def remove(url: str | None, name: str) -> None:
        """Delete channel ``name`` from the server (ChannelNotFound if it is not there)."""
        url = C.resolve_url(url)
        if not C.server(url).script("unlink", L.keys(check_name(name)), [], C.REPLY_TIMEOUT, None):
            raise ChannelNotFound(f"no channel {name!r} on redis server {C.redact(url)}")

    def _start(self) -> None:
        C.renewer.add(self)

    # -- the core protocol (sync) -------------------------------------------------------------

    def send(self, obj: Any, deadline: float | None, raw: bool) -> bool:
        """Send one message; False if there was no room before ``deadline``. Raises
        BrokenChannel once no reader is left (nothing was sent)."""
        return self.put_records([encode_record(obj, raw)], deadline) == 1

    def send_many(self, objs: Iterable[Any], deadline: float | None, raw: bool = False) -> tuple[int, int]:
        out = encode_all(objs, raw)
        return self.put_records(out, deadline), len(out)

    def recv(self, deadline: float | None, raw: bool) -> Any:
        """Take the oldest message; NOTHING on timeout; EndOfChannel at the end."""
        got = self.take(1, deadline, eof="w" not in self.mode)
        if not got:
            return NOTHING
        return decode_record(got[0][1], got[0][2], raw)

    def recv_many(self, max_items: int, deadline: float | None, raw: bool = False) -> list[Any]:
        check_max_items(max_items)
        got = self.take(max_items, deadline, eof="w" not in self.mode)
        return decode_batch(got, raw) if got else []

    # -- the compiled core's protocol, as the Channel face calls it -----------------------------

    def put(self, data: Any, deadline: float | None, flags: int = 0) -> bool:
        if flags & F_RAW:
            size = memoryview(data).nbytes
            if size > self.max_payload:
                raise MessageTooLarge(
                    f"message of {size} bytes exceeds channel {self.name!r}'s max_message "
                    f"({self.max_payload} bytes)"
                )
        return self.send(data, deadline, bool(flags & F_RAW))

    def get(self, deadline: float | None, flags: int = 0) -> Any:
        return self.recv(deadline, bool(flags & F_RAW))

    def put_many(self, items: Iterable[Any], deadline: float | None, flags: int = 0) -> int:
        sent: int = self.send_many(items, deadline, bool(flags & F_RAW))[0]
        return sent

    def get_many(self, max_items: int, deadline: float | None, flags: int = 0) -> list[Any]:
        return self.recv_many(max_items, deadline, bool(flags & F_RAW))

    def enter_role(self, role: int) -> None:
        """Nothing: the handle's leases were registered by create/open."""

    def leave_role(self, role: int) -> None:
        if role == WRITER:
            self.send_eof()

    def role_seen(self, role: int) -> bool:
        """False: the server's scripts raise BrokenChannel themselves (on a send)."""
        return False

    def send_eof(self) -> None:
        """Give up write rights: once no writer lease is left, readers reach the end."""
        if "w" not in self.mode:
            return
        writer, self.writer = self.writer, ""
        self.mode = self.mode.replace("w", "")
        self.script("release", ["", writer, "", ""], None)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release()

    # -- the async twins --------------------------------------------------------------------

    async def send_async(self, obj: Any, raw: bool = False) -> None:
        await self.put_records_async([encode_record(obj, raw)])

    async def send_many_async(self, objs: Iterable[Any], raw: bool = False) -> None:
        await self.put_records_async(encode_all(objs, raw))

    async def recv_async(self, raw: bool = False) -> Any:
        got = await self.take_async(1, eof="w" not in self.mode)
        return decode_record(got[0][1], got[0][2], raw)

    async def recv_many_async(self, max_items: int, raw: bool = False) -> list[Any]:
        check_max_items(max_items)
        return decode_batch(await self.take_async(max_items, eof="w" not in self.mode), raw)

    async def get_nowait_async(self) -> Any:
        """One attempt without waiting (for aselect): the message or NOTHING."""
        got = await self.poll_async(eof="w" not in self.mode)
        return decode_record(got[0][1], got[0][2], False) if got else NOTHING
