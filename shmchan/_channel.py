"""The public named channel: a thin face over the compiled core (:mod:`shmchan._core`)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, Final, Self

from . import _core
from . import _layout as L
from . import _redis as _remote
from ._backends import DEFAULT_BACKEND, get_backend
from ._backends._base import DEFAULT_OPEN_TIMEOUT, CreateParams, check_permissions
from ._core import F_BROKEN, F_EOF, F_RAW, NOTHING, READER, WRITER, deadline_after
from ._errors import (
    BrokenChannel,
    ClosedChannel,
    Empty,
    EndOfChannel,
    Full,
    ShmchanError,
    WrongMode,
)

__all__ = ("DEFAULT_CAPACITY", "Channel")

DEFAULT_CAPACITY: Final = 1 << 20
"""Ring bytes of a channel created without ``capacity`` (1 MiB)."""

BROKEN_RECHECK: Final = 0.1
"""Seconds between a sender's checks that the channel's readers are alive (a reader
that closed cleanly is noticed at once; one that died, within this time)."""


def check_timeout(timeout: float | None) -> float | None:
    """Validate a ``timeout`` argument the way the stdlib queues do."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return float(timeout)


def geometry(capacity: int, max_message: int | None) -> tuple[int, int]:
    """Turn user sizes into ``(capacity, max_record)``; ValueError if impossible."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
    if not L.MIN_CAPACITY <= capacity <= L.MAX_CAPACITY:
        raise ValueError(f"capacity must be between {L.MIN_CAPACITY} and 2**40 bytes, not {capacity}")
    capacity = 1 << (capacity - 1).bit_length()  # round up to a power of two
    if max_message is None:
        max_record = min(capacity // 2, L.MAX_RECORD_LIMIT)
    else:
        if isinstance(max_message, bool) or not isinstance(max_message, int) or max_message < 0:
            raise ValueError(f"max_message must be a non-negative int, not {max_message!r}")
        max_record = L.record_size(max_message)
    why = L.check_geometry(capacity, max_record)
    if why:
        raise ValueError(f"max_message {max_message} does not fit a {capacity}-byte ring: {why}")
    return capacity, max_record


class Channel:
    """A named, shared-memory, multi-producer multi-consumer channel.

    Unrelated processes reach the same channel by name: one calls :meth:`create`, the
    others :meth:`open`. Messages are delivered whole (never torn), exactly once, and
    in the order their sends completed, so each producer's messages stay in order.
    Objects are sent with :meth:`send` (pickled like a Queue's items, any size) and
    raw bytes with :meth:`send_bytes` (what C, Go or Rust peers exchange).

    Like a pipe, every handle has a mode: "r", "w" or "rw". Once no handle with
    write rights remains open anywhere, receivers drain what is left and then get
    :class:`EndOfChannel` (iteration simply stops); once no handle with read rights
    remains, senders get :class:`BrokenChannel`. A process that dies without closing
    its handles (SIGKILL included) counts as having closed them.

    A handle is thread-safe and may be pickled (for example as a ``Process``
    argument under fork, spawn or forkserver); unpickling opens the channel by name
    with the same mode. Handles survive ``os.fork()``: the child re-attaches on its own.
    :attr:`aio` is the same handle as an anyio object stream, for asyncio and trio.

    Trust: :meth:`open` refuses a channel that another user owns or may write, since
    receiving unpickles what was sent (docs/security.md); ``allow_foreign=True`` opts in.

    Crash behaviour (docs/layout.md, "Crash safety"): a process killed at any instant
    never leaves a torn message visible, never leaves a lock held (another process takes
    it over within about 10 ms), and never blocks the others for more than about
    :data:`shmchan._core.WAIT_SLICE`. A sender killed before its send returned may or may
    not have delivered that message; a receiver killed inside a receive either leaves
    the message for another receiver or takes it with it.
    """

    __slots__ = (
        "__weakref__",
        "_allow_foreign",
        "_backend",
        "_broken_checked",
        "_closed",
        "_core",
        "_mode",
        "_name",
    )

    def __init__(self, core: Any, backend: str, mode: str, allow_foreign: bool = False) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self._core = core
        self._backend = backend
        self._name: str = core.name
        self._mode = mode
        self._closed = False
        self._broken_checked = 0.0
        self._allow_foreign = allow_foreign
        try:
            if "w" in mode:
                core.enter_role(WRITER)
            if "r" in mode:
                core.enter_role(READER)
        except BaseException:
            core.close()
            raise

    # -- construction and naming -------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        max_message: int | None = None,
        backend: str = DEFAULT_BACKEND,
        permissions: int = 0o600,
        mode: str = "rw",
        url: str | None = None,
        lease: float | None = None,
    ) -> Channel:
        """Create a new channel called ``name`` and return a handle to it.

        ``capacity`` is the ring's size in bytes (rounded up to a power of two, at
        least 4096); ``max_message`` the largest payload :meth:`send_bytes` accepts
        (default and maximum: about half the capacity, which guarantees that an empty
        ring always accepts a largest message; :meth:`send` takes objects of any
        size). The memory is allocated now, and the segment gets exactly
        ``permissions``, whatever the umask. ``mode`` is this handle's rights.

        ``backend="redis"`` puts the channel on the Redis/Valkey server at ``url``
        (default ``$SHMCHAN_REDIS_URL``), for processes on any host; ``capacity``
        then bounds the payload bytes queued, ``permissions`` does not apply, and
        ``lease`` is how long (seconds, default 5) the handle's writer or reader
        lease lasts without renewal: a process that dies is gone after that long
        (docs/redis.md).

        Raises:
            ChannelExists: the name is taken.
            NoSpace: the OS cannot back the memory (nothing is left behind).
            AccessDenied: the OS refused (e.g. the mmap backend's directory).
            ValueError: bad name, sizes, permissions or mode.
            BackendUnavailable: unknown or unusable backend.
        """
        _check_mode(mode)
        if backend == _remote.BACKEND:  # redis dispatch: a channel core, created by URL and name
            return cls(
                _remote.channel_core().create(url, name, mode, capacity, max_message, lease), backend, mode
            )
        _local_only(url, lease)
        cap, max_record = geometry(capacity, max_message)
        perms = check_permissions(permissions)
        core = _core.create(backend, name, CreateParams(cap, max_record, perms))
        return cls(core, backend, mode)

    @classmethod
    def open(
        cls,
        name: str,
        *,
        backend: str = DEFAULT_BACKEND,
        timeout: float = DEFAULT_OPEN_TIMEOUT,
        mode: str = "rw",
        allow_foreign: bool = False,
        url: str | None = None,
        lease: float | None = None,
    ) -> Channel:
        """Attach to the existing channel ``name`` with ``mode`` "r", "w" or "rw".

        Waits up to ``timeout`` seconds for a creator that is still initialising it.

        Raises:
            ChannelNotFound: no such channel.
            UntrustedChannel: another user owns it or may write it (receiving would
                run what they wrote); pass ``allow_foreign=True`` to share on purpose.
            AccessDenied: its permissions do not admit this user.
            InitializationTimeout: it exists but was never published.
            NotAShmchanSegment, IncompatibleLayout, CorruptChannel: it is not a
                usable channel (checked before any of its memory is trusted).
            TooManyPeers: every peer slot is held by a live handle.
        """
        _check_mode(mode)
        if backend == _remote.BACKEND:  # redis dispatch: attach a channel core by URL and name
            return cls(_remote.channel_core().open(url, name, mode, lease), backend, mode)
        _local_only(url, lease)
        core = _core.attach(backend, name, check_timeout(timeout) or 0.0, allow_foreign)
        return cls(core, backend, mode, allow_foreign)

    @staticmethod
    def remove(
        name: str, *, backend: str = DEFAULT_BACKEND, force: bool = False, url: str | None = None
    ) -> None:
        """Remove channel ``name`` (its memory and side segments) from the system.

        On the posix and mmap backends, handles that are open keep working; on sysv
        their presence checks fail (SysV objects die at once). New :meth:`open` calls
        fail. It works on a channel whose header is corrupt or was never published.
        Raises ChannelNotFound if there is no such channel, and NotAShmchanSegment for
        a file that plainly is not one (some other magic number) unless ``force``.
        On redis (``url``) the channel is deleted from the server.
        """
        if backend == _remote.BACKEND:  # redis dispatch: delete by URL and name
            _remote.channel_core().remove(url, name)
            return
        _local_only(url, None)
        get_backend(backend).remove(name, force)

    def unlink(self) -> None:
        """Remove this channel's name (see :meth:`remove`)."""
        if self._backend == _remote.BACKEND:  # redis dispatch: the core knows its URL
            _remote.channel_core().remove(self._core.url, self._name)
            return
        self.remove(self._name, backend=self._backend)

    @property
    def name(self) -> str:
        """The channel's canonical name (a path for the mmap backend)."""
        return self._name

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def mode(self) -> str:
        """This handle's rights: "r", "w" or "rw" (``send_eof`` drops the "w")."""
        return self._mode

    @property
    def capacity(self) -> int:
        """Ring size in bytes (on redis: the most payload bytes queued)."""
        capacity: int = self._core.capacity
        return capacity

    @property
    def max_message(self) -> int:
        """Largest payload, in bytes, that :meth:`send_bytes` accepts."""
        size: int = self._core.max_payload
        return size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def aio(self) -> Any:
        """This handle as an ``anyio.abc.ObjectStream`` (asyncio and trio)."""
        from ._async import ChannelStream

        return ChannelStream(self)

    # -- sending ----------------------------------------------------------------------

    def send(self, obj: Any, timeout: float | None = None) -> None:
        """Send one object (pickled here, protocol 5; any size).

        Blocks while the ring is full, for at most ``timeout`` seconds (None: no
        limit; 0: do not wait). The message is delivered once this returns; if it
        raises, nothing was sent.

        Raises:
            Full: no room before the deadline.
            BrokenChannel: no handle with read rights is left.
            ClosedChannel: this handle was closed.
            WrongMode: this handle has no write rights.
            CorruptChannel: the channel was found corrupt.
            (and whatever pickling ``obj`` raises)
        """
        self._send(obj, check_timeout(timeout), 0)

    def send_nowait(self, obj: Any) -> None:
        """Send without waiting for room; raise :class:`Full` if there is none."""
        self._send(obj, 0.0, 0)

    def send_bytes(self, data: Any, timeout: float | None = None) -> None:
        """Send one message of raw bytes: any bytes-like object (bytes, bytearray,
        memoryview, array), of at most :attr:`max_message` bytes.

        As :meth:`send`, plus MessageTooLarge (raised at once) for a larger message.
        """
        self._send(data, check_timeout(timeout), F_RAW)

    def send_bytes_nowait(self, data: Any) -> None:
        """Send bytes without waiting for room; raise :class:`Full` if there is none."""
        self._send(data, 0.0, F_RAW)

    def _writable(self) -> int:
        """Check the handle may send; return the flags for the core."""
        if self._closed:
            raise ClosedChannel(f"channel handle {self._name!r} is closed")
        if "w" not in self._mode:
            raise WrongMode(f"channel handle {self._name!r} has mode {self._mode!r}: it cannot send")
        if "r" in self._mode:
            return 0
        if self._broken():
            raise BrokenChannel(f"channel {self._name!r}: every reader is gone")
        return F_BROKEN

    def _send(self, data: Any, timeout: float | None, flags: int) -> None:
        flags |= self._writable()
        if not self._core.put(data, deadline_after(timeout), flags):
            raise Full(f"channel {self._name!r} stayed full for {timeout} s")

    def send_many(self, objs: Iterable[Any], timeout: float | None = None) -> None:
        """Send every object of ``objs`` in order: like one :meth:`send` each, but
        many per lock and per commit (much faster for small messages).

        Every object is pickled first, so a pickling error raises before anything is
        sent. Waits while there is no room for the next one, for at most ``timeout``
        seconds in all; then raises :class:`Full`, whose ``sent`` attribute says how
        many went in (the first ones). Raises as :meth:`send` otherwise.
        """
        flags = self._writable()
        items = objs if isinstance(objs, (list, tuple)) else list(objs)
        sent = self._core.put_many(items, deadline_after(check_timeout(timeout)), flags)
        if sent < len(items):
            raise Full(
                f"channel {self._name!r}: {sent} of {len(items)} messages were sent before the deadline",
                sent=sent,
            )

    def _broken(self) -> bool:
        """Cheap check before a send. While the header counts open readers, ask the
        kernel at most every BROKEN_RECHECK seconds (for readers that died); once
        the count is 0 (every counted reader closed), ask it on every send (a
        forked child may still hold an inherited reader handle)."""
        core = self._core
        if not core.role_seen(READER):
            return False
        if core.role_open(READER) > 0:
            now = time.monotonic()
            if now - self._broken_checked < BROKEN_RECHECK:
                return False
            self._broken_checked = now
        gone: bool = core.role_gone(READER)
        return gone

    def send_eof(self) -> None:
        """Give up this handle's write rights: once no handle anywhere has them,
        receivers get EndOfChannel after draining. The handle may still receive."""
        if self._closed or "w" not in self._mode:
            return
        self._mode = self._mode.replace("w", "")
        self._core.leave_role(WRITER)

    # -- receiving ----------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> Any:
        """Receive the oldest message, as the object that was sent.

        Blocks while the channel is empty, sleeping, for at most ``timeout`` seconds
        (None: no limit; 0: do not wait). If it raises Empty or is interrupted
        (Ctrl-C), nothing was consumed. A message sent with :meth:`send_bytes` (or by a
        non-Python peer) arrives as ``bytes``.

        Raises:
            Empty: nothing arrived before the deadline.
            EndOfChannel: every writer is gone and nothing is left.
            ClosedChannel: this handle was closed.
            WrongMode: this handle has no read rights.
            CorruptChannel: the channel was found corrupt.
            (and whatever unpickling the message raises; it is consumed)
        """
        return self._recv(check_timeout(timeout), 0)

    def recv_nowait(self) -> Any:
        """Receive without waiting; raise :class:`Empty` if nothing is there."""
        return self._recv(0.0, 0)

    def recv_many(self, max_items: int, timeout: float | None = None) -> list[Any]:
        """Receive between 1 and ``max_items`` of the oldest messages, in order, under
        one lock: whatever is there, without waiting for more.

        Waits only while the channel is empty, for at most ``timeout`` seconds. If
        some messages taken cannot be unpickled here, raises
        :class:`~shmchan.UndecodableBatch`, which carries the others in ``items``.
        Raises as :meth:`recv` otherwise (EndOfChannel once every writer is gone and
        nothing is left).
        """
        flags = self._readable()
        _check_max_items(max_items)
        items: list[Any] = self._core.get_many(max_items, deadline_after(check_timeout(timeout)), flags)
        if not items:
            raise Empty(f"channel {self._name!r} stayed empty for {timeout} s")
        return items

    def recv_bytes(self, timeout: float | None = None) -> bytes:
        """Receive the oldest message, which must be raw bytes, as ``bytes``.

        As :meth:`recv`; a message that is not raw bytes raises UndecodableMessage
        (and is consumed).
        """
        data: bytes = self._recv(check_timeout(timeout), F_RAW)
        return data

    def recv_bytes_nowait(self) -> bytes:
        """Receive bytes without waiting; raise :class:`Empty` if nothing is there."""
        data: bytes = self._recv(0.0, F_RAW)
        return data

    def _readable(self) -> int:
        """Check the handle may receive; return the flags for the core."""
        if self._closed:
            raise ClosedChannel(f"channel handle {self._name!r} is closed")
        if "r" not in self._mode:
            raise WrongMode(f"channel handle {self._name!r} has mode {self._mode!r}: it cannot receive")
        return 0 if "w" in self._mode else F_EOF

    def _recv(self, timeout: float | None, flags: int) -> Any:
        flags |= self._readable()
        item = self._core.get(deadline_after(timeout), flags)
        if item is NOTHING:
            raise Empty(f"channel {self._name!r} stayed empty for {timeout} s")
        return item

    def _recv_or_nothing(self) -> Any:
        """One non-blocking receive for select(): the item or NOTHING."""
        return self._core.get(0.0, self._readable())

    def __iter__(self) -> Iterator[Any]:
        """Receive messages until end of stream."""
        while True:
            try:
                yield self.recv()
            except EndOfChannel:
                return

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Detach this handle (idempotent). The channel itself stays; see :meth:`unlink`.

        If this was the last handle with write rights, receivers see end of stream
        once they have drained the channel; if the last with read rights, senders
        get BrokenChannel. Threads of this process blocked on this handle return with
        ClosedChannel.
        """
        if self._closed:
            return
        self._closed = True
        if self._backend == _remote.BACKEND:  # redis dispatch: core.close() ends the handle's leases
            self._core.close()
            return
        try:
            # Best effort: on a removed sysv channel the presence semaphores are gone,
            # and closing must still succeed (there is nobody left to tell).
            with contextlib.suppress(ShmchanError, OSError):
                self._core.leave_role(WRITER)
            with contextlib.suppress(ShmchanError, OSError):
                self._core.leave_role(READER)
        finally:
            self._core.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        if self._closed:
            raise ClosedChannel(f"cannot pickle closed channel handle {self._name!r}")
        if self._backend == _remote.BACKEND:  # redis dispatch: reopen by URL and name, same mode and lease
            return (_reopen_remote, (self._core.url, self._name, self._mode or "r", self._core.lease))
        return (_reopen, (self._name, self._backend, self._mode or "r", self._allow_foreign))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"mode={self._mode!r} capacity={self.capacity}"
        return f"<shmchan.Channel {self._name!r} backend={self._backend!r} {state}>"

    def __del__(self) -> None:
        # A handle dropped without close() detaches quietly, as a file object does.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(ShmchanError, OSError, ValueError, BufferError):
                self.close()


def _check_mode(mode: str) -> None:
    if mode not in ("r", "w", "rw"):
        raise ValueError(f"mode must be 'r', 'w' or 'rw', not {mode!r}")


def _check_max_items(max_items: int) -> None:
    if isinstance(max_items, bool) or not isinstance(max_items, int):
        raise TypeError(f"max_items must be an int, not {type(max_items).__name__}")
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, not {max_items}")


def _reopen(name: str, backend: str, mode: str = "rw", allow_foreign: bool = False) -> Channel:
    return Channel.open(name, backend=backend, mode=mode, allow_foreign=allow_foreign)


def _reopen_remote(url: str, name: str, mode: str, lease: float) -> Channel:
    return Channel.open(name, backend=_remote.BACKEND, mode=mode, url=url, lease=lease)


def _local_only(url: str | None, lease: float | None) -> None:
    """Refuse the redis backend's options on a local backend."""
    if url is not None or lease is not None:
        raise ValueError("url and lease: only for backend='redis'")
