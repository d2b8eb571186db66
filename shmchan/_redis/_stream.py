"""What the queue and channel cores share: records, putting, taking, waiting, leases.

A record is a stream entry with two fields, ``t`` (the record type of docs/layout.md
section 2: 1 bytes, 2 pickle, 3 pickle with out-of-band buffers) and ``p`` (the
payload, exactly as the shared-memory ring would hold it). Objects go through
shmchan's codec (:func:`shmchan._codec.encode` / :func:`~shmchan._codec.decode`), so a
NumPy array is pickled out of band and its buffer copied once into the payload.

Putting is the PUT script (the records that fit go in; while none fits the producer
waits on the ``space`` hint list); taking is the TAKE script (taken and, unless the
handle holds them until ``task_done``, deleted in the same step). A take that may
wait is one round trip: TAKE, a BLPOP on the ``items`` hint list, and a second TAKE,
pipelined (see :meth:`~shmchan._redis._client.Server.take_or_wait`). Waits are BLPOP
slices of at most :data:`~shmchan._redis._client.SLICE` seconds; hints are only
hints, every slice re-checks.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import pickle
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

import anyio.lowlevel

from .. import _layout as LT
from .._codec import UnknownRecordType, decode, encode, write_into
from .._errors import (
    BrokenChannel,
    ChannelNotFound,
    EndOfChannel,
    MessageTooLarge,
    NotAShmchanSegment,
    ShmchanError,
    UndecodableBatch,
    UndecodableMessage,
)
from . import _client as C
from . import _scripts as L

Record = tuple[bytes, bytes, bytes]
"""A taken record: (stream id, type as ASCII digits, payload)."""

Outgoing = tuple[bytes, Any]
"""A record to put: (type as ASCII digits, payload: bytes or a bytes-like object)."""

_RTYPE: Final = {t: str(t).encode() for t in (LT.RT_BYTES, LT.RT_PICKLE, LT.RT_PICKLE_OOB)}

MAX_BATCH_ITEMS: Final = 512
MAX_BATCH_BYTES: Final = 8 << 20
"""One PUT carries at most this many records and (beyond its first record) bytes: the
server runs one script at a time, so a huge one would stall everybody else."""

MAX_PAYLOAD: Final = (512 << 20) - 4096
"""The largest payload a server accepts by default (``proto-max-bulk-len``, 512 MB)."""


def _byte_view(data: Any) -> memoryview:
    """A flat, C-contiguous byte view of any bytes-like object (copying only if it is
    not contiguous). Raises TypeError for objects without the buffer protocol."""
    view = memoryview(data)
    if view.c_contiguous:
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    return memoryview(view.tobytes())


def encode_record(obj: Any, raw: bool) -> Outgoing:
    """``obj`` as a record; ``raw``: a bytes-like object sent as a BYTES record.
    Raises whatever pickling raises (TypeError for ``raw`` data without the buffer
    protocol), or MessageTooLarge beyond what a server accepts; nothing has been sent
    then."""
    if raw:
        out: Outgoing = (_RTYPE[LT.RT_BYTES], _byte_view(obj))
    elif type(obj) is bytes:
        out = (_RTYPE[LT.RT_BYTES], obj)
    else:
        enc = encode(obj)
        if enc.payload is None:
            frame = bytearray(enc.n)  # pickle plus out-of-band buffers, framed as on the ring
            write_into(enc, memoryview(frame))
            out = (_RTYPE[enc.rtype], frame)
        elif isinstance(enc.payload.obj, bytes) and enc.payload.nbytes == len(enc.payload.obj):
            out = (_RTYPE[enc.rtype], enc.payload.obj)  # the pickle itself: hiredis packs bytes
        else:
            out = (_RTYPE[enc.rtype], enc.payload)
    if len(out[1]) > MAX_PAYLOAD:
        raise MessageTooLarge(
            f"a message of {len(out[1])} bytes exceeds what a redis server accepts ({MAX_PAYLOAD} bytes)"
        )
    return out


def decode_record(rtype: bytes, payload: bytes, raw: bool) -> Any:
    """A taken record as the object that was put (bytes for ``raw``). A record this
    reader cannot decode raises UndecodableMessage; it was consumed all the same."""
    if rtype == b"1":
        return payload
    if not raw:
        if rtype == b"2":
            return pickle.loads(payload)
        if rtype == b"3":
            # A private, writable copy: received NumPy arrays are writable, as locally.
            try:
                return decode(LT.RT_PICKLE_OOB, bytearray(payload))
            except UnknownRecordType as exc:
                raise UndecodableMessage(str(exc), record_type=exc.rtype, payload=payload) from None
    try:
        kind = int(rtype)
    except ValueError:
        kind = -1
    why = "not a byte message" if raw else "not a record type this version of shmchan decodes"
    raise UndecodableMessage(f"record of type {kind}: {why}", record_type=kind, payload=payload)


def decode_batch(records: Sequence[Record], raw: bool) -> list[Any]:
    """Decode every record; UndecodableBatch (holding the others) if any fails."""
    items: list[Any] = []
    errors: list[tuple[int, BaseException]] = []
    for i, (_, rtype, payload) in enumerate(records):
        try:
            items.append(decode_record(rtype, payload, raw))
        except Exception as exc:  # noqa: BLE001 - whatever unpickling raises, kept for the caller
            errors.append((i, exc))
    if errors:
        raise UndecodableBatch(items, errors) from errors[0][1]
    return items


def records_of(reply: list[Any]) -> list[Record]:
    """The records of a TAKE reply ``[status, id, type, payload, ...]``."""
    return [(reply[i], reply[i + 1], reply[i + 2]) for i in range(1, len(reply), 3)]


def chunks(out: Sequence[Outgoing], start: int) -> tuple[int, list[Any]]:
    """How many records from ``start`` one PUT carries, and their flattened arguments.
    (Payloads are bytes, bytearrays or flat byte memoryviews: len() is their size.)"""
    stop = min(len(out), start + MAX_BATCH_ITEMS)
    size = 0
    end = start
    for _, payload in itertools.islice(out, start, stop):
        size += len(payload)
        if size > MAX_BATCH_BYTES and end > start:
            break
        end += 1
    args = [x for record in itertools.islice(out, start, end) for x in record]
    return end - start, args


class StreamCore:
    """One handle on a redis-backed queue or channel: its ids, leases, and the records
    it took from the server but has not handed out yet (its prefetch buffer)."""

    kind: str = ""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        lease: float,
        prefetch: int = 1,
        hold: bool = False,
        holder: str = "",
        writer: str = "",
        reader: str = "",
    ) -> None:
        self.url = url
        self.name = name
        self.keys = L.keys(name)
        self.wake_keys = [*self.keys, f"{self.keys[2]}:wake:{C.new_id()}"]  # see Server.take_or_wait
        self.server = C.server(url)
        self.lease = lease
        self.prefetch = prefetch
        self.hold = hold
        self.holder = holder
        self.writer = writer
        self.reader = reader
        self.epoch = 0
        self.consumer = C.new_id() if hold else L.SHARED_CONSUMER
        self.closed = False
        self.fenced = False
        self._buffer: collections.deque[Record] = collections.deque()
        self._held: collections.deque[bytes] = collections.deque()  # handed out, not yet done
        self._lock = threading.Lock()
        self._backlog = False  # the last take found records already waiting (see take)
        self._first: list[Any] = []  # the statuses of one take_or_wait, as they arrive
        self.renew_every = lease / 3
        C.on_fork(self)

    # -- scripts --------------------------------------------------------------------------

    def script(self, name: str, args: list[Any], deadline: float | None, blocks: float = 0.0) -> Any:
        return self.server.script(name, self.keys, args, C.reply_wait(deadline, blocks), deadline)

    def check(self, status: Any) -> None:
        """Raise what a script's negative status means."""
        if isinstance(status, list):
            status = status[0]
        if status == L.GONE:
            raise ChannelNotFound(
                f"{self.kind} {self.name!r} does not exist on redis server {C.redact(self.url)} "
                "(removed, expired after every holder left, or the server restarted without its data)"
            )
        if status == L.FOREIGN:
            raise NotAShmchanSegment(f"{self.name!r} on {C.redact(self.url)} is not a shmchan {self.kind}")
        if status == L.BROKEN:
            raise BrokenChannel(f"channel {self.name!r}: every reader is gone")
        if status == L.FENCED:
            self.fenced = True
            raise BrokenChannel(
                f"channel {self.name!r}: this writer's lease ran out (no renewal for {self.lease:g} s) "
                "and the readers saw the end of the stream; nothing was sent"
            )
        if status == L.EOF:
            raise EndOfChannel(f"channel {self.name!r}: every writer is gone and nothing is left")

    def put_args(self) -> list[Any]:
        """PUT's first four arguments for this handle."""
        return [self.writer, self.epoch, C.ms(self.lease), "1" if self.reader or not self.writer else "0"]

    def take_args(self, count: int, eof: bool) -> list[Any]:
        """TAKE's arguments: up to ``count`` records (or ``prefetch``, if more; at most
        MAX_BATCH_ITEMS in one script)."""
        count = min(max(count, self.prefetch), MAX_BATCH_ITEMS)
        return [self.consumer, count, "1" if self.hold else "0", "1" if eof else "0"]

    # -- putting (sync) ---------------------------------------------------------------------

    def put_records(self, out: Sequence[Outgoing], deadline: float | None) -> int:
        """Put ``out`` in order, as many per PUT as fit, waiting (in slices) for room
        until ``deadline``; return how many went in (the first ones)."""
        sent = 0
        while sent < len(out):
            n, args = chunks(out, sent)
            done = self.script("put", self.put_args() + args, deadline)
            if done < 0:
                self.check(done)
            sent += done
            if done == n:
                continue
            if done == 0:
                left = _remaining(deadline)
                if left == 0.0:
                    break
                self.wait(L.KEY_SUFFIXES.index("space"), left, deadline)
        return sent

    # -- taking (sync) ---------------------------------------------------------------------

    def take(self, count: int, deadline: float | None, eof: bool = False) -> list[Record]:
        """Take between 1 and ``count`` records (the prefetch buffer first, then the
        server, where up to ``prefetch`` are taken at a time); wait in slices until
        ``deadline`` while there are none. An empty list on timeout; EndOfChannel at
        the end of a stream (``eof``: this handle checks for it)."""
        with self._lock:
            if self._buffer:
                return self._from_buffer(count)
        while True:
            left = _remaining(deadline)
            expired = left is not None and left < 0.001
            if expired or self._backlog:
                # A plain TAKE, one command: once the deadline has passed, and while
                # takes keep finding records already waiting (a backlog), where the
                # pipelined wait would only add a BLPOP and a second TAKE that skips.
                # The first take that finds nothing goes back to the pipelined wait.
                with C.no_interrupt():  # an interrupt is raised once the records are kept
                    reply = self.script("take", self.take_args(count, eof), deadline)
                    self._keep(reply)
                self._backlog = reply[0] == L.OK
            else:
                seconds = C.SLICE if left is None else min(left, C.SLICE)
                args = self.take_args(count, eof)
                self._first.clear()
                reply = self.server.take_or_wait(self.wake_keys, args, seconds, deadline, self._keep_first)
                self._backlog = bool(self._first) and self._first[0] == L.OK
            status = reply[0]
            if status == L.OK:
                with self._lock:
                    return self._from_buffer(count)
            if status != 0:
                self.check(status)
            if expired:
                return []

    def _keep_first(self, reply: list[Any]) -> None:
        """:meth:`_keep`, noting the status of each TAKE of the pipeline in order (the
        first one's says whether records were waiting before the BLPOP)."""
        self._first.append(reply[0])
        self._keep(reply)

    def _keep(self, reply: list[Any]) -> None:
        """Put the records of a TAKE reply in the buffer (before anything can interrupt)."""
        if reply[0] == L.OK:
            with self._lock:
                self._buffer.extend(records_of(reply))

    def _from_buffer(self, count: int) -> list[Record]:
        n = min(count, len(self._buffer))
        taken = [self._buffer.popleft() for _ in range(n)]
        if self.hold:
            self._held.extend(r[0] for r in taken)
        return taken

    def wait(self, key: int, left: float | None, deadline: float | None) -> Any:
        """Sleep on hint list ``keys[key]`` for one slice at most; the hint, or None."""
        slice_ = C.SLICE if left is None else min(left, C.SLICE)
        if slice_ < 0.001:
            return None
        return self.server.call(
            C.reply_wait(deadline, slice_), "BLPOP", self.keys[key], f"{slice_:.3f}", deadline=deadline
        )

    # -- the async twins (coredis; see _async) ----------------------------------------------

    async def put_records_async(self, out: Sequence[Outgoing]) -> None:
        """:meth:`put_records` without a deadline, waiting without blocking the event
        loop. Cancelled while it waits, it has put the first records and not the rest."""
        from . import _async as A

        await anyio.lowlevel.checkpoint_if_cancelled()
        srv = await A.server(self.url)
        sent = 0
        while sent < len(out):
            _n, args = chunks(out, sent)
            done = await srv.script("put", self.keys, self.put_args() + args)
            if done < 0:
                self.check(done)
            sent += done
            if done == 0:
                await A.gate(self, self.keys[3]).wait(srv, [self.keys[3]])

    async def take_async(self, count: int, eof: bool = False) -> list[Record]:
        """:meth:`take` without a deadline, waiting without blocking the event loop.
        Cancellation is delivered only while it waits, when it has taken nothing."""
        from . import _async as A

        await anyio.lowlevel.checkpoint_if_cancelled()
        srv = await A.server(self.url)
        answer: list[Any] = []

        def keep(reply: list[Any]) -> None:
            self._keep(reply)
            answer[:] = reply[:1]

        while True:
            with self._lock:
                if self._buffer:
                    return self._from_buffer(count)
            if answer and answer[0] != 0:
                self.check(answer[0])  # the end of the stream, or the queue is gone
            # One round trip: TAKE, and a BLPOP that returns at once if it took something
            # (the tasks waiting on this handle share it; the records go to its buffer).
            take = (self.keys, self.take_args(count, eof), keep)
            await A.gate(self, self.keys[2]).wait(srv, [self.keys[2]], take)

    async def poll_async(self, eof: bool = False) -> list[Record]:
        """One attempt to take a record, without waiting: [] if there is none."""
        from . import _async as A

        with self._lock:
            if self._buffer:
                return self._from_buffer(1)
        srv = await A.server(self.url)
        reply = await srv.script("take", self.keys, self.take_args(1, eof))
        if reply[0] == L.OK:
            with self._lock:
                self._buffer.extend(records_of(reply))
                return self._from_buffer(1)
        if reply[0] != 0:
            self.check(reply[0])
        return []

    # -- leases ------------------------------------------------------------------------------

    def leased(self) -> bool:
        return bool(self.holder or self.writer or self.reader or self.hold)

    def renew(self) -> None:
        """Renew this handle's leases and keep its held records (from the lease thread)."""
        if self.closed:
            return
        with self._lock:
            ids = list(self._held) + [r[0] for r in self._buffer] if self.hold else []
        args = [C.ms(self.lease), self.holder, self.writer, self.epoch, self.reader, self.consumer, *ids]
        with contextlib.suppress(ShmchanError, OSError):
            status = self.script("renew", args, time.monotonic() + self.renew_every)
            if status == L.FENCED:
                self.fenced = True

    def before_fork(self, deadline: float) -> None:
        """Register leases for a forked child under ids of its own (it adopts them in
        :meth:`after_fork_in_child`), so that the parent may close its handle at once
        without ending the stream or deleting the queue under the child. A child that
        never uses them (or execs) lets them run out, like a process that died."""
        self._fork_ids: dict[str, str] | None = None
        if self.closed or not (self.holder or self.writer or self.reader) or time.monotonic() >= deadline:
            return
        ids = {role: getattr(self, role) and C.new_id() for role in ("holder", "writer", "reader")}
        args = [C.ms(self.lease), ids["holder"], ids["writer"], self.epoch, ids["reader"], self.consumer]
        with contextlib.suppress(ShmchanError, OSError):
            self.script("renew", args, deadline)
        self._fork_ids = ids

    def after_fork_in_child(self) -> None:
        """Adopt the ids :meth:`before_fork` registered (or fresh ones): closing here
        never ends the parent's leases."""
        self._lock = threading.Lock()
        self.__dict__.pop("_gates", None)  # the parent's event loops are not the child's
        if self.closed:
            return
        ids = getattr(self, "_fork_ids", None) or {
            role: getattr(self, role) and C.new_id() for role in ("holder", "writer", "reader")
        }
        self.holder, self.writer, self.reader = ids["holder"], ids["writer"], ids["reader"]
        # What the parent had taken stays the parent's to hand out (or requeue).
        self._buffer.clear()
        if self.hold:
            self.consumer = C.new_id()
            self._held.clear()

    def release(self, requeue: bool = True) -> None:
        """Give back what this handle took and did not hand out, and leave: its leases
        end, an unnamed queue whose last holder this was is deleted."""
        C.renewer.discard(self)
        with self._lock:
            left = list(self._buffer)
            self._buffer.clear()
        try:
            if left and requeue:
                args: list[Any] = ["1" if self.hold else "0"]
                for rec in left:
                    args += rec
                self.script("requeue", args, None)
            consumer = self.consumer if self.hold and not self._held else ""
            self.script("release", [self.holder, self.writer, self.reader, consumer], None)
        except (ShmchanError, OSError):
            pass  # unreachable: the leases run out on the server instead

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} on {C.redact(self.url)}>"


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def encode_all(objs: Iterable[Any], raw: bool) -> list[Outgoing]:
    return [encode_record(obj, raw) for obj in objs]
