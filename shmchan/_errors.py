"""The shmchan exception tree.

Every class also subclasses the stdlib type that code written for
``multiprocessing`` or plain files already catches, so adopting shmchan never
silently changes which ``except`` clause runs::

    ShmchanError
    ├── Empty                 (+ queue.Empty)        nothing to receive before the deadline
    ├── Full                  (+ queue.Full)         no room to send before the deadline
    ├── MessageTooLarge       (+ ValueError)         payload can never fit this ring
    ├── ClosedChannel         (+ ValueError)         this handle was closed by your code
    ├── EndOfChannel          (+ EOFError)           every writer is gone and nothing is left
    ├── BrokenChannel         (+ BrokenPipeError)    every reader is gone
    ├── WrongMode             (+ io.UnsupportedOperation)  sending on "r", receiving on "w"
    ├── UndecodableMessage    (+ ValueError)         a record of a type this reader can't decode
    ├── UndecodableBatch      (+ ValueError)         some items of a batch receive didn't decode
    ├── LayoutError           (+ ValueError)         the segment is not a usable layout-2 ring
    │   ├── NotAShmchanSegment                       wrong magic: foreign or squatted name
    │   ├── IncompatibleLayout                       unknown major version or feature bit
    │   └── CorruptChannel                           impossible sizes, positions or records
    ├── InitializationTimeout (+ TimeoutError)       creator never published the segment
    ├── ChannelExists         (+ FileExistsError)    create() found the name taken
    ├── ChannelNotFound       (+ FileNotFoundError)  open()/remove() found no such channel
    ├── AccessDenied          (+ PermissionError)    the OS refused access to the channel
    │   └── UntrustedChannel                         owned by another user, or writable by others
    ├── TooManyPeers          (+ OSError, EUSERS)    every peer slot is held by a live handle
    ├── NoSpace               (+ OSError, ENOSPC)    the OS (or a redis server) could not back the memory
    ├── BackendUnavailable    (+ ImportError)        the backend's module or OS support is missing
    ├── BadURL                (+ ValueError)         a redis URL that cannot be used (or none given)
    └── RemoteError           (+ OSError)            the redis server refused or failed a command
        └── RemoteUnavailable (+ ConnectionError)    no connection, or it broke during a call
            ├── RemoteTimeout     (+ TimeoutError)   the server did not answer in time
            └── RemoteAuthFailed  (+ PermissionError)  the server refused the credentials
"""

from __future__ import annotations

import errno
import io
import queue
from typing import Any

__all__ = (
    "AccessDenied",
    "BackendUnavailable",
    "BadURL",
    "BrokenChannel",
    "ChannelExists",
    "ChannelNotFound",
    "ClosedChannel",
    "CorruptChannel",
    "Empty",
    "EndOfChannel",
    "Full",
    "IncompatibleLayout",
    "InitializationTimeout",
    "LayoutError",
    "MessageTooLarge",
    "NoSpace",
    "NotAShmchanSegment",
    "RemoteAuthFailed",
    "RemoteError",
    "RemoteTimeout",
    "RemoteUnavailable",
    "ShmchanError",
    "TooManyPeers",
    "UndecodableBatch",
    "UndecodableMessage",
    "UntrustedChannel",
    "WrongMode",
)


class ShmchanError(Exception):
    """Base class of every exception shmchan raises on its own account."""


class Empty(ShmchanError, queue.Empty):
    """Raised when a receive finds nothing before its deadline (or at once, non-blocking).

    Nothing was consumed. It is a :class:`queue.Empty`, like ``multiprocessing``'s.
    """


class Full(ShmchanError, queue.Full):
    """Raised when a send finds no room before its deadline (or at once, non-blocking).

    A single ``put``/``send`` wrote nothing. A batch send (``put_many``,
    ``send_many``) sets :attr:`sent` to how many of its items went in before the
    deadline: the first ones, in order (0 otherwise). It is a :class:`queue.Full`,
    like ``multiprocessing``'s.
    """

    def __init__(self, *args: object, sent: int = 0) -> None:
        super().__init__(*args)
        self.sent = sent


class MessageTooLarge(ShmchanError, ValueError):
    """Raised at once when a message is larger than the ring's maximum record.

    It is raised before anything blocks, even for a blocking send with no timeout:
    waiting could never help. Nothing was written.
    """


class ClosedChannel(ShmchanError, ValueError):
    """Raised when a handle is used after *your* code called its ``close()``.

    It says nothing about other processes: the channel itself may still be in use.
    It is a :class:`ValueError`, as for a closed ``multiprocessing.Queue``.
    """


class EndOfChannel(ShmchanError, EOFError):
    """Raised by a receive once no handle with write rights remains open anywhere and
    everything sent has been received (a pipe's end of file). Iteration just stops.

    A writer process that died without closing counts as closed (within about
    :data:`shmchan._core.WAIT_SLICE`). Until a first writer has opened the channel,
    receivers wait instead.
    """


class BrokenChannel(ShmchanError, BrokenPipeError):
    """Raised by a send once no handle with read rights remains open anywhere (a
    pipe's EPIPE): nobody could ever receive it. Nothing was written.

    It is about *other* handles; a handle closed by your own code raises
    :class:`ClosedChannel` instead. On the redis backend it is also raised by a
    writer whose lease ran out (its process stopped renewing it for longer than
    the lease) after the readers had seen the end of the stream: what it sends
    could no longer reach them.
    """


class WrongMode(ShmchanError, io.UnsupportedOperation):
    """Raised when a handle is used for what its mode does not allow: sending on a
    handle opened with mode "r" (or after ``send_eof``), receiving on mode "w". Like
    a file opened read-only, it is an :class:`io.UnsupportedOperation`."""


class UndecodableMessage(ShmchanError, ValueError):
    """Raised when a received record has a type this reader cannot decode.

    The record was consumed (so it cannot poison the channel); its raw payload and
    type are kept in :attr:`payload` and :attr:`record_type`.
    """

    def __init__(self, message: str, *, record_type: int, payload: bytes) -> None:
        super().__init__(message)
        self.record_type = record_type
        self.payload = payload


class UndecodableBatch(ShmchanError, ValueError):
    """Raised by a batch receive (``get_many``, ``recv_many``) when some of the items it
    took could not be decoded.

    Every item of the batch was consumed, and every one that decoded is here:
    :attr:`items` holds them in order, and :attr:`errors` pairs each failure's
    position in the batch with its exception (an :class:`UndecodableMessage`, or
    whatever unpickling raised). The first failure is also the ``__cause__``.
    """

    def __init__(self, items: list[Any], errors: list[tuple[int, BaseException]]) -> None:
        super().__init__(
            f"{len(errors)} of {len(items) + len(errors)} received items could not be decoded "
            f"(first: {errors[0][1]!r}); the {len(items)} others are in .items"
        )
        self.items = items
        self.errors = errors


class LayoutError(ShmchanError, ValueError):
    """Raised when a segment is not a usable shmchan ring of layout version 2 (see
    subclasses)."""


class NotAShmchanSegment(LayoutError):
    """Raised when the segment's magic is not shmchan's: a foreign or squatted name."""


class IncompatibleLayout(LayoutError):
    """Raised when the segment uses a layout major version or feature this build lacks
    (a segment made by shmchan 0.1, layout 1, is one: the message names both versions)."""


class CorruptChannel(LayoutError):
    """Raised when header fields, positions or a record are impossible.

    When a reader detects corruption in the ring it also marks the channel corrupt
    in the shared header, so every other handle raises this error too, instead of
    reading garbage or waiting forever.
    """


class InitializationTimeout(ShmchanError, TimeoutError):
    """Raised by ``open()`` when the segment exists but its creator never published it.

    The creator may still be initialising (retry), or may have died half way
    (remove the name).
    """


class ChannelExists(ShmchanError, FileExistsError):
    """Raised by ``create()`` when the name (or a semaphore derived from it) is taken."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EEXIST, message)


class ChannelNotFound(ShmchanError, FileNotFoundError):
    """Raised by ``open()`` or ``remove()`` when no channel has that name, on a sysv
    handle whose channel was removed, and by an mmap ``create()`` whose directory does
    not exist."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOENT, message)


class AccessDenied(ShmchanError, PermissionError):
    """Raised when the operating system refuses this process access to a channel's
    segment or its semaphores (their permissions do not include this user)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)


class UntrustedChannel(AccessDenied):
    """Raised by ``open()`` (and by a receive that meets such a side segment) when the
    segment is owned by another user, or other users may write it.

    Whoever can write a channel can make its readers unpickle anything, which runs code:
    shmchan refuses to read what another user could have written. Pass
    ``allow_foreign=True`` to open a channel that several users share on purpose.
    """


class TooManyPeers(ShmchanError, OSError):
    """Raised when a channel's peer table is full: every slot is held by a live handle
    (1024 per channel by default). Handles of processes that died free theirs at once."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EUSERS, message)


class NoSpace(ShmchanError, OSError):
    """Raised at creation when the OS cannot back the memory (``errno.ENOSPC``), and
    by a redis-backed send that the server refuses for lack of memory (``maxmemory``
    reached; nothing was queued).

    Typical causes: a full ``/dev/shm`` or tmpfs, or SysV limits (``kernel.shmall``,
    ``kernel.shmmni``). Everything created so far has been rolled back. shmchan
    allocates the memory up front, so a channel that was created never dies of SIGBUS
    later because the tmpfs filled up.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


class BackendUnavailable(ShmchanError, ImportError):
    """Raised when a backend is unknown, or its module or OS support is missing."""


class BadURL(ShmchanError, ValueError):
    """Raised when the redis backend gets no URL (neither ``url=`` nor the
    ``SHMCHAN_REDIS_URL`` environment variable) or one it cannot use: an unknown
    scheme, a malformed port or database number. Nothing was contacted."""


class RemoteError(ShmchanError, OSError):
    """Raised when the redis server refuses or fails a command for a reason of its own
    (too old a server, a read-only replica, an unexpected error reply). The message
    carries the server's words; the URL is shown without its password."""


class RemoteUnavailable(RemoteError, ConnectionError):
    """Raised when the redis server cannot be reached (refused, unknown host, no
    route) or the connection breaks during a call (the server died or was
    restarted). A call that was interrupted this way may or may not have taken
    effect on the server: a ``put`` may have queued its item, a ``get`` may have
    taken one that is then lost with the connection (see docs/redis.md)."""


class RemoteTimeout(RemoteUnavailable, TimeoutError):
    """Raised when the redis server accepted the connection but did not answer in
    time (it is stopped, overloaded or cut off): within the call's own deadline plus
    a short grace, or within the reply timeout of a call that has none. The
    connection is dropped, as after :class:`RemoteUnavailable`."""


class RemoteAuthFailed(RemoteUnavailable, PermissionError):
    """Raised when the redis server refuses the URL's credentials (wrong or missing
    password or user): a ``ConnectionError`` and a ``PermissionError``."""
