"""What a backend provides, and the steps every backend shares.

A backend turns a name into a :class:`Segment`: the mapped memory plus the four
synchronisation objects the core needs. Each backend is one small module:

=========  =============================  =====================  ======================
backend    memory                         locks (lock_kind)      wakeups (wakeup_kind)
=========  =============================  =====================  ======================
posix      POSIX shm (``shm_open``)       OFD locks on its fd    POSIX named semaphores
mmap       a file the user names          OFD locks on its fd    POSIX named semaphores
sysv       SysV shm (``shmget``)          SysV sems, SEM_UNDO    SysV semaphores
=========  =============================  =====================  ======================

The locks are the kind the kernel releases when their holder dies, however it dies;
the wakeup semaphores are only counting hints, never locks (docs/layout.md,
"Crash safety").
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .. import _layout as L
from .._errors import (
    CorruptChannel,
    IncompatibleLayout,
    InitializationTimeout,
    NotAShmchanSegment,
)
from .._fence import full_fence

DEFAULT_OPEN_TIMEOUT = 2.0
"""Seconds ``open()`` waits for a creator that has not published the segment yet."""


class Mutex(Protocol):
    """A process-shared lock that the kernel releases if its holder dies."""

    def acquire(self, deadline: float | None) -> bool:
        """Take the lock before the monotonic ``deadline`` (None: no limit).

        Return False on timeout. May raise KeyboardInterrupt; then the lock is not held.
        """

    def release(self) -> None:
        """Release the lock if the calling thread holds it; otherwise do nothing.

        Being a no-op when not held is what lets callers release in a ``finally``
        even when an exception (Ctrl-C) arrived between acquiring and recording it.
        """

    def after_fork_in_child(self) -> None:
        """Forget any holding inherited from the parent (called in a forked child)."""

    def close(self) -> None:
        """Wait for this process's threads to leave their critical sections, then make
        every later ``acquire`` raise ClosedChannel (the handle is being closed)."""


WRITER = 0
READER = 1


class Presence(Protocol):
    """Which handles hold write or read rights, as the kernel sees it: a holder that
    dies stops counting at once (docs/layout.md, "Presence and end of stream")."""

    def enter(self, role: int) -> None:
        """Count this handle as a holder of ``role`` (WRITER or READER)."""

    def leave(self, role: int) -> None:
        """Stop counting this handle as a holder of ``role``."""

    def others(self, role: int) -> bool:
        """Whether a handle other than this one holds ``role`` now (a system call)."""

    def after_fork_in_child(self) -> None:
        """Count the child's inherited handle again (the parent's count stays the
        parent's)."""


class Wakeup(Protocol):
    """A process-shared counting semaphore used only to wake sleepers."""

    def post(self) -> None:
        """Add one token."""

    def value(self) -> int:
        """Current number of tokens (a snapshot)."""

    def wait(self, timeout: float) -> bool:
        """Take a token, sleeping at most ``timeout`` seconds (> 0).

        Return True if a token was taken, False on timeout or when a signal
        interrupted the sleep (Python signal handlers have run by then, so a
        KeyboardInterrupt propagates from here or the caller's next step).
        """

    def close(self) -> None:
        """Drop this process's handle (the semaphore itself stays)."""


@dataclass(eq=False)
class Segment:
    """One process's attachment to a channel: memory, locks and wakeups."""

    name: str
    backend: str
    buf: memoryview
    info: L.HeaderInfo
    wlock: Mutex
    rlock: Mutex
    not_empty: Wakeup
    not_full: Wakeup
    joined: Wakeup
    presence: Presence
    permissions: int
    closers: list[Callable[[], None]] = field(default_factory=list)
    fork_hooks: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Unmap and drop every OS handle of this attachment (idempotent)."""
        closers, self.closers = self.closers, []
        self.not_empty.close()
        self.not_full.close()
        self.joined.close()
        for close in reversed(closers):
            close()

    def after_fork_in_child(self) -> None:
        self.wlock.after_fork_in_child()
        self.rlock.after_fork_in_child()
        for hook in self.fork_hooks:
            hook()


class Backend(Protocol):
    """Creates, opens and removes segments of one kind."""

    name: str

    def create(
        self,
        name: str,
        capacity: int,
        max_record: int,
        permissions: int,
        max_items: int = 0,
        owner: bytes = b"",
    ) -> Segment:
        """Create a new channel exclusively; roll everything back on any failure.

        ``owner`` is written to the header's owner field before publication."""

    def open(self, name: str, timeout: float) -> Segment:
        """Attach to an existing channel, validating it first."""

    def remove(self, name: str) -> None:
        """Remove the channel's name and OS objects; attached handles keep working."""

    def normalize_name(self, name: str) -> str:
        """Return the canonical form of ``name`` or raise ValueError."""

    def create_side(
        self, name: str, seq: int, size: int, permissions: int
    ) -> tuple[memoryview, Callable[[], None]]:
        """Create side segment ``seq`` of channel ``name`` exclusively, preallocated;
        return a writable view of its ``size`` bytes and a function that unmaps it."""

    def open_side(self, name: str, seq: int) -> memoryview:
        """Open side segment ``seq``, remove its name, and return its bytes as a view
        that stays valid for as long as it (or a slice of it) is referenced."""

    def remove_side(self, name: str, seq: int) -> None:
        """Remove side segment ``seq`` if it exists."""


# -- shared steps ----------------------------------------------------------------


def check_permissions(permissions: int) -> int:
    if not isinstance(permissions, int) or not 0 <= permissions <= 0o777:
        raise ValueError(f"permissions must be an int in 0..0o777, not {permissions!r}")
    return permissions


def check_ipc_name(name: str) -> str:
    """Validate a POSIX/SysV channel name; return it with exactly one leading slash."""
    if not isinstance(name, str):
        raise TypeError(f"channel name must be str, not {type(name).__name__}")
    bare = name.removeprefix("/")
    if not bare or len(bare) > 200 or "/" in bare or "\0" in bare or bare in (".", ".."):
        raise ValueError(
            f"invalid channel name {name!r}: 1-200 characters, no '/' (except one leading) or NUL"
        )
    check_not_side_name(bare)
    return "/" + bare


def check_not_side_name(name: str) -> None:
    """Refuse names shaped like another channel's side segment (docs/layout.md 7.3)."""
    if len(name) > 18 and L.SIDE_SUFFIX.fullmatch(name[-18:]):
        raise ValueError(f"invalid channel name {name!r}: it ends like a side segment ('.L' + 16 hex digits)")


def new_nonce() -> int:
    return secrets.randbits(64) or 1


def initial_header(
    capacity: int, max_record: int, nonce: int, lock_kind: int, wakeup_kind: int, **more: int
) -> L.HeaderInfo:
    return L.HeaderInfo(
        capacity=capacity,
        max_record=max_record,
        nonce=nonce,
        lock_kind=lock_kind,
        wakeup_kind=wakeup_kind,
        creator_pid=os.getpid(),
        created_unix_ns=time.time_ns(),
        **more,
    )


def publish(buf: memoryview, info: L.HeaderInfo, owner: bytes = b"") -> None:
    """Write the identity block and owner, then store ``magic`` last: the segment is
    ready.

    The fence orders every initialising store (header, ring positions at zero) before
    the magic store, so an opener that sees the magic sees a complete header.
    """
    if len(owner) >= L.OWNER_SIZE:
        raise ValueError("owner address too long")
    buf[L.OFF_OWNER : L.OFF_OWNER + len(owner)] = owner
    L.write_identity(buf, info)
    full_fence()
    q = buf.cast("Q")
    try:
        q[L.Q_MAGIC] = L.MAGIC
    finally:
        q.release()


def read_owner(buf: memoryview) -> str:
    """The owner field: the lifetime service of an unnamed queue, or ''."""
    return bytes(buf[L.OFF_OWNER : L.OFF_OWNER + L.OWNER_SIZE]).rstrip(b"\0").decode("ascii", "replace")


def read_magic(buf: memoryview) -> int:
    q = buf.cast("Q")
    try:
        return int(q[L.Q_MAGIC])
    finally:
        q.release()


def wait_published(get_magic: Callable[[], int | None], timeout: float, name: str) -> None:
    """Wait until the creator has stored the magic (``get_magic`` returns it, or None
    while the segment is still too short to hold a header)."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        magic = get_magic()
        if magic:
            full_fence()  # acquire: header fields read after this see the creator's stores
            return
        if time.monotonic() >= deadline:
            raise InitializationTimeout(
                f"channel {name!r} exists but was not initialised within {timeout:g} s "
                "(its creator is still starting, or died while creating it: remove the name)"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def validate(buf: memoryview, size: int, name: str, lock_kind: int, wakeup_kind: int) -> L.HeaderInfo:
    """Check a published header and the mapped size; return the identity block.

    Raises NotAShmchanSegment, IncompatibleLayout or CorruptChannel. After it
    returns, no reader indexes memory outside the mapping however the ring's
    contents are corrupted, because every record is checked against the geometry
    validated here.
    """
    magic, info, crc = L.read_identity(buf)
    if magic != L.MAGIC:
        raise NotAShmchanSegment(f"{name!r} is not a shmchan channel (magic {magic:#018x})")
    if info.layout_major != L.LAYOUT_MAJOR:
        raise IncompatibleLayout(
            f"{name!r} uses layout {info.layout_major}.{info.layout_minor}; "
            f"this shmchan reads major version {L.LAYOUT_MAJOR} only"
        )
    unknown = info.features_incompat & ~L.SUPPORTED_FEATURES_INCOMPAT
    if unknown:
        raise IncompatibleLayout(f"{name!r} needs unknown incompatible features {unknown:#x}")
    if crc != L.header_crc(buf):
        raise CorruptChannel(f"{name!r}: header checksum mismatch")
    if info.header_size != L.HEADER_SIZE or info.record_header_size != L.RECORD_HEADER_SIZE:
        raise CorruptChannel(f"{name!r}: unsupported header or record header size")
    if info.record_align != L.RECORD_ALIGN:
        raise CorruptChannel(f"{name!r}: unsupported record alignment {info.record_align}")
    why = L.check_geometry(info.capacity, info.max_record)
    if why:
        raise CorruptChannel(f"{name!r}: {why}")
    if size != info.header_size + info.capacity:
        raise CorruptChannel(
            f"{name!r}: segment is {size} bytes, header says {info.header_size + info.capacity}"
        )
    if info.lock_kind != lock_kind or info.wakeup_kind != wakeup_kind:
        raise IncompatibleLayout(
            f"{name!r}: lock/wakeup kind {info.lock_kind}/{info.wakeup_kind} is not this "
            f"backend's {lock_kind}/{wakeup_kind}"
        )
    q = buf.cast("Q")
    try:
        head, tail = q[L.Q_HEAD], q[L.Q_TAIL]
    finally:
        q.release()
    if not 0 <= tail - head <= info.capacity or (head | tail) & 15:
        raise CorruptChannel(f"{name!r}: impossible ring positions head={head} tail={tail}")
    return info


def exact_mode(path: str, permissions: int) -> None:
    """chmod a file we created to exactly ``permissions``, whatever the umask."""
    os.chmod(path, permissions, follow_symlinks=False)


def file_mode(fd: int) -> int:
    return stat.S_IMODE(os.fstat(fd).st_mode)
