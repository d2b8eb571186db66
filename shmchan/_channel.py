"""The public named byte channel: a thin face over :class:`shmchan._core.ChannelCore`."""

from __future__ import annotations

import contextlib
import math
import os
from types import TracebackType
from typing import Any, Final, Self

from . import _layout as L
from ._backends import DEFAULT_BACKEND, get_backend
from ._backends._base import DEFAULT_OPEN_TIMEOUT, check_permissions
from ._core import ChannelCore
from ._errors import ClosedChannel, Empty, Full, MessageTooLarge, ShmchanError, UndecodableMessage
from ._fence import deadline_after

__all__ = ("DEFAULT_CAPACITY", "Channel")

DEFAULT_CAPACITY: Final = 1 << 20
"""Ring bytes of a channel created without ``capacity`` (1 MiB)."""


def check_timeout(timeout: float | None) -> float | None:
    """Validate a ``timeout`` argument the way the stdlib queues do."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return float(timeout)


def as_byte_view(data: Any) -> memoryview:
    """A flat, C-contiguous byte view of any bytes-like object (copying only if it is
    not contiguous). Raises TypeError for objects without the buffer protocol."""
    view = memoryview(data)
    if view.c_contiguous:
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        return view
    return memoryview(view.tobytes())


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
    """A named, shared-memory, multi-producer multi-consumer channel of byte messages.

    Unrelated processes reach the same channel by name: one calls :meth:`create`, the
    others :meth:`open`. Messages are delivered whole (never torn), exactly once, and
    in the order their sends completed, so each producer's messages stay in order.

    A handle is thread-safe and may be pickled (for example as a ``Process``
    argument under fork, spawn or forkserver); unpickling opens the channel by name.
    Handles survive ``os.fork()``: the child re-attaches on its own.

    Crash behaviour (docs/layout.md, "Crash safety"): a process killed at any instant
    never leaves a torn message visible and never blocks the others for more than
    about :data:`shmchan._core.WAIT_SLICE`. A sender killed before its send returned
    may or may not have delivered that message; a receiver killed inside
    ``recv_bytes`` either leaves the message for another receiver or takes it with it.
    """

    __slots__ = ("__weakref__", "_backend", "_closed", "_core", "_name")

    def __init__(self, core: ChannelCore, backend: str) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self._core = core
        self._backend = backend
        self._name = core.seg.name
        self._closed = False

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
    ) -> Channel:
        """Create a new channel called ``name`` and return a handle to it.

        ``capacity`` is the ring's size in bytes (rounded up to a power of two, at
        least 4096); ``max_message`` the largest payload it accepts (default and
        maximum: about half the capacity, which guarantees that an empty ring always
        accepts a largest message). The memory is allocated now, and the segment and
        its semaphores get exactly ``permissions``, whatever the umask.

        Raises:
            ChannelExists: the name is taken.
            NoSpace: the OS cannot back the memory (nothing is left behind).
            ValueError: bad name, sizes or permissions.
            BackendUnavailable: unknown or unusable backend.
        """
        cap, max_record = geometry(capacity, max_message)
        perms = check_permissions(permissions)
        impl = get_backend(backend)
        seg = impl.create(name, cap, max_record, perms)
        return cls(ChannelCore(seg), backend)

    @classmethod
    def open(
        cls, name: str, *, backend: str = DEFAULT_BACKEND, timeout: float = DEFAULT_OPEN_TIMEOUT
    ) -> Channel:
        """Attach to the existing channel ``name``.

        Waits up to ``timeout`` seconds for a creator that is still initialising it.

        Raises:
            ChannelNotFound: no such channel.
            InitializationTimeout: it exists but was never published.
            NotAShmchanSegment, IncompatibleLayout, CorruptChannel: it is not a
                usable v1 channel (checked before any of its memory is trusted).
        """
        impl = get_backend(backend)
        seg = impl.open(name, check_timeout(timeout) or 0.0)
        return cls(ChannelCore(seg), backend)

    @staticmethod
    def remove(name: str, *, backend: str = DEFAULT_BACKEND) -> None:
        """Remove channel ``name`` and its semaphores from the system.

        Handles that are open keep working; new :meth:`open` calls fail. Raises
        ChannelNotFound if there is no such channel.
        """
        get_backend(backend).remove(name)

    def unlink(self) -> None:
        """Remove this channel's name (see :meth:`remove`); the handle stays usable."""
        self.remove(self._name, backend=self._backend)

    @property
    def name(self) -> str:
        """The channel's canonical name (a path for the mmap backend)."""
        return self._name

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def capacity(self) -> int:
        """Ring size in bytes."""
        return self._core.seg.info.capacity

    @property
    def max_message(self) -> int:
        """Largest payload, in bytes, that a send accepts."""
        return self._core.max_payload

    @property
    def closed(self) -> bool:
        return self._closed

    # -- sending ----------------------------------------------------------------------

    def send_bytes(self, data: Any, timeout: float | None = None) -> None:
        """Send one message: any bytes-like object (bytes, bytearray, memoryview, array).

        Blocks while the ring is full, sleeping on a semaphore, for at most ``timeout``
        seconds (None: no limit; 0: do not wait). The message is delivered once this
        returns; if it raises, nothing was sent.

        Raises:
            Full: no room before the deadline.
            MessageTooLarge: larger than :attr:`max_message` (raised at once).
            ClosedChannel: this handle was closed.
            CorruptChannel: the channel was found corrupt.
        """
        self._send(data, check_timeout(timeout))

    def send_bytes_nowait(self, data: Any) -> None:
        """Send without waiting for room; raise :class:`Full` if there is none."""
        self._send(data, 0.0)

    def _send(self, data: Any, timeout: float | None) -> None:
        if self._closed:
            raise ClosedChannel(f"channel handle {self._name!r} is closed")
        view = as_byte_view(data)
        if view.nbytes > self._core.max_payload:
            raise MessageTooLarge(
                f"message of {view.nbytes} bytes exceeds this channel's max_message "
                f"({self._core.max_payload} bytes)"
            )
        if not self._core.send(view, L.RT_BYTES, deadline_after(timeout)):
            raise Full(f"channel {self._name!r} stayed full for {timeout:g} s")

    # -- receiving ----------------------------------------------------------------------

    def recv_bytes(self, timeout: float | None = None) -> bytes:
        """Receive the oldest message as ``bytes``.

        Blocks while the channel is empty, sleeping on a semaphore, for at most
        ``timeout`` seconds (None: no limit; 0: do not wait). If it raises Empty or
        is interrupted (Ctrl-C), nothing was consumed.

        Raises:
            Empty: nothing arrived before the deadline.
            ClosedChannel: this handle was closed.
            UndecodableMessage: the message is not a byte message (it is consumed).
            CorruptChannel: the channel was found corrupt.
        """
        return self._recv(check_timeout(timeout))

    def recv_bytes_nowait(self) -> bytes:
        """Receive without waiting; raise :class:`Empty` if nothing is there."""
        return self._recv(0.0)

    def _recv(self, timeout: float | None) -> bytes:
        if self._closed:
            raise ClosedChannel(f"channel handle {self._name!r} is closed")
        got = self._core.recv(deadline_after(timeout))
        if got is None:
            raise Empty(f"channel {self._name!r} stayed empty for {timeout:g} s")
        rtype, payload = got
        if rtype != L.RT_BYTES:
            raise UndecodableMessage(
                f"record of type {rtype} is not a byte message",
                record_type=rtype,
                payload=bytes(payload),
            )
        return payload  # type: ignore[return-value] # BYTES records are read as bytes

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Detach this handle (idempotent). The channel itself stays; see :meth:`unlink`."""
        if not self._closed:
            self._closed = True
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
        return (_reopen, (self._name, self._backend))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"capacity={self.capacity}"
        return f"<shmchan.Channel {self._name!r} backend={self._backend!r} {state}>"

    def __del__(self) -> None:
        # A handle dropped without close() detaches quietly, as a file object does.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(ShmchanError, OSError, ValueError, BufferError):
                self.close()


def _reopen(name: str, backend: str) -> Channel:
    return Channel.open(name, backend=backend)


def default_name() -> str:
    """A fresh random channel name (96 random bits)."""
    return f"shmchan.{os.urandom(12).hex()}"
