"""What a backend provides, and the steps every backend shares.

A backend turns a name into memory and attaches a :class:`shmchan._cext.Core` to it.
Each backend is one small module:

=========  =============================  ===========================================
backend    memory                         liveness (who is alive: the kernel decides)
=========  =============================  ===========================================
posix      POSIX shm (``shm_open``)       OFD locks on the segment's file
mmap       a file the user names          OFD locks on the segment's file
sysv       SysV shm (``shmget``)          a SysV semaphore set operated with SEM_UNDO
=========  =============================  ===========================================

Locks, wakeups and everything else live in the segment itself (docs/layout.md), so the
backends differ only in how memory is named, created, opened, trusted and removed, and
in the side objects that carry messages too large for the ring (section 2.5).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from .. import _cext
from .. import _layout as L
from .._errors import (
    CorruptChannel,
    IncompatibleLayout,
    InitializationTimeout,
    NotAShmchanSegment,
    UntrustedChannel,
)

DEFAULT_OPEN_TIMEOUT = 2.0
"""Seconds ``open()`` waits for a creator that has not published the segment yet."""

SIDE_GRANULE = 1 << 20
"""Side objects are sized in whole MiB, so similar messages reuse one object."""


class CreateParams(NamedTuple):
    """What a creator chooses; everything else in the header is derived."""

    capacity: int
    max_record: int
    permissions: int = 0o600
    max_items: int = 0
    owner: bytes = b""
    max_peers: int = L.DEFAULT_MAX_PEERS
    side_slots: int = L.DEFAULT_SIDE_SLOTS
    side_retained: int = L.DEFAULT_SIDE_RETAINED


class SideMap:
    """A mapped side object. ``view`` is its writable memory, and keeps the mapping alive:
    the mapping goes away with the last reference to it (or to a slice of it), never
    under a reader. ``ident`` tells one backing object from its replacement (a file's
    device and inode, a SysV segment's id)."""

    __slots__ = ("ident", "size", "view")

    def __init__(self, view: memoryview, size: int, ident: object) -> None:
        self.view = view
        self.size = size
        self.ident = ident


class Backend(Protocol):
    """Creates, opens and removes channels of one kind, and their side objects."""

    name: str

    def normalize_name(self, name: str) -> str:
        """Return the canonical form of ``name`` or raise ValueError/TypeError."""

    def create(self, name: str, params: CreateParams, ctx: Any) -> _cext.Core:
        """Create a new channel exclusively, publish it and attach to it; roll everything
        back on any failure (ChannelExists, NoSpace, AccessDenied, ValueError)."""

    def open(self, name: str, timeout: float, allow_foreign: bool, ctx: Any) -> _cext.Core:
        """Attach to an existing channel after checking who owns it (UntrustedChannel)
        and validating it (ChannelNotFound, InitializationTimeout, LayoutError...)."""

    def remove(self, name: str, force: bool = False) -> None:
        """Remove the channel's memory, semaphores and side objects (also when its header
        is corrupt, truncated or was never published); ChannelNotFound if none. Without
        ``force``, a file that is plainly not a shmchan segment is refused
        (NotAShmchanSegment)."""

    def peek(self, name: str) -> bytes:
        """The first bytes (up to one page) of the channel's header, without attaching."""

    def owner_of(self, name: str) -> tuple[int, int]:
        """``(uid, mode)`` of the channel's memory (for trust checks of side objects)."""

    def side_create(self, name: str, index: int, size: int, permissions: int) -> SideMap:
        """(Re)create side object ``index`` of channel ``name`` with ``size`` bytes,
        preallocated, replacing any older one, and map it."""

    def side_open(
        self, name: str, index: int, trust: tuple[int, int] | None, cached: SideMap | None
    ) -> SideMap | None:
        """Map side object ``index`` (None if it does not exist). It must be owned by uid
        ``trust[0]`` with no mode bits beyond ``trust[1]`` (UntrustedChannel otherwise;
        None skips the check). ``cached`` is returned if it maps the same object."""

    def side_remove(self, name: str, index: int) -> None:
        """Remove side object ``index`` of channel ``name`` if it exists."""

    def side_remove_all(self, name: str) -> None:
        """Remove every side object of channel ``name``."""


# -- shared steps ----------------------------------------------------------------


def check_permissions(permissions: int) -> int:
    if isinstance(permissions, bool) or not isinstance(permissions, int) or not 0 <= permissions <= 0o777:
        raise ValueError(f"permissions must be an int in 0..0o777, not {permissions!r}")
    return permissions


def check_encodable(name: str) -> None:
    """Refuse names the OS cannot take (a lone surrogate, from a badly decoded path)."""
    try:
        name.encode("utf-8", "strict")
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid channel name {name!r}: not encodable as UTF-8 ({exc.reason})") from None


def check_ipc_name(name: str) -> str:
    """Validate a POSIX/SysV channel name; return it with exactly one leading slash."""
    if not isinstance(name, str):
        raise TypeError(f"channel name must be str, not {type(name).__name__}")
    check_encodable(name)
    bare = name.removeprefix("/")
    if not bare or len(bare) > 200 or "/" in bare or "\0" in bare or bare in (".", ".."):
        raise ValueError(
            f"invalid channel name {name!r}: 1-200 characters, no '/' (except one leading) or NUL"
        )
    check_not_side_name(bare)
    return "/" + bare


def check_not_side_name(name: str) -> None:
    """Refuse names shaped like another channel's side object (docs/layout.md 7.3)."""
    if len(name) > 4 and L.SIDE_SUFFIX.fullmatch(name[-4:]):
        raise ValueError(f"invalid channel name {name!r}: it ends like a side segment ('.S' + 2 hex digits)")


def new_nonce() -> int:
    return int.from_bytes(os.urandom(8), "little") or 1


def check_trust(uid: int, mode: int, name: str, allow_foreign: bool) -> None:
    """Refuse memory that another user owns or may write (docs/security.md): whoever can
    write a channel can make its readers run code (pickle)."""
    if allow_foreign:
        return
    me = os.geteuid()
    if uid != me:
        raise UntrustedChannel(
            f"channel {name!r} is owned by uid {uid}, not by this process's uid {me}: refusing to "
            "read what another user wrote (pass allow_foreign=True to share channels between users "
            "on purpose)"
        )
    if mode & 0o022:
        raise UntrustedChannel(
            f"channel {name!r} has mode {mode & 0o777:#o}, which lets other users write it: refusing "
            "to read what another user could have written (pass allow_foreign=True to share "
            "channels between users on purpose)"
        )


def check_side_trust(uid: int, mode: int, trust: tuple[int, int] | None, what: str) -> None:
    """A side object must belong to the channel's owner, with no more permissions."""
    if trust is None:
        return
    owner, allowed = trust
    if uid != owner or mode & 0o777 & ~allowed:
        raise UntrustedChannel(
            f"{what} is owned by uid {uid} with mode {mode & 0o777:#o}, unlike its channel "
            f"(uid {owner}, mode {allowed:#o}): refusing to read it"
        )


def header_params(params: CreateParams, nonce: int, liveness: int, semids: tuple[int, int]) -> dict[str, int]:
    return {
        "capacity": params.capacity,
        "max_record": params.max_record,
        "max_items": params.max_items,
        "max_peers": params.max_peers,
        "side_slots": params.side_slots,
        "side_retained": params.side_retained,
        "nonce": nonce,
        "liveness": liveness,
        "semid_peers": semids[0],
        "semid_presence": semids[1],
        "creator_pid": os.getpid(),
        "creator_uid": os.geteuid(),
        "created_unix_ns": time.time_ns(),
    }


def initialise(
    buf: memoryview, params: CreateParams, nonce: int, liveness: int, semids: tuple[int, int]
) -> None:
    """Write a fresh segment's owner field and identity block, then publish it (store
    ``magic`` last, with release ordering: docs/layout.md section 4)."""
    if len(params.owner) >= L.OWNER_SIZE:
        raise ValueError("owner address too long")
    buf[L.OFF["owner"] : L.OFF["owner"] + len(params.owner)] = params.owner
    _cext.init_header(buf, **header_params(params, nonce, liveness, semids))
    _cext.publish(buf)


def total_size(params: CreateParams) -> int:
    return L.header_size(params.max_peers) + params.capacity


def wait_published(probe: Callable[[], tuple[int, int, bool]], timeout: float, name: str) -> int:
    """Wait until the creator has stored ``magic``; return the segment's size.

    ``probe`` returns ``(magic, size, creator_busy)``. An unpublished segment whose
    creator is gone (its creation lock is free and it has a size) was abandoned: that is
    reported at once instead of after the timeout.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        magic, size, busy = probe()
        if magic and size >= L.HEADER_BASE:
            return size
        if magic:  # published, then cut short: a creator publishes only a full-size segment
            raise CorruptChannel(f"channel {name!r} is {size} bytes, shorter than a header ({L.HEADER_BASE})")
        if not magic and size > 0 and not busy:
            raise InitializationTimeout(
                f"channel {name!r} exists but its creator died before publishing it (remove the name)"
            )
        if time.monotonic() >= deadline:
            raise InitializationTimeout(
                f"channel {name!r} exists but was not initialised within {timeout:g} s "
                "(its creator is still starting, or died while creating it: remove the name)"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def validate(buf: bytes | memoryview, name: str, liveness: int) -> None:
    """Check a published header (the C library's rules, docs/layout.md section 3)."""
    code, why = _cext.check_header(buf, liveness)
    if code == _cext.OK:
        return
    if code == _cext.E_NOTSHM:
        raise NotAShmchanSegment(f"{name!r}: {why}")
    if code == _cext.E_INCOMPAT:
        raise IncompatibleLayout(f"{name!r}: {why}")
    raise CorruptChannel(f"{name!r}: {why}")


def file_mode(fd: int) -> int:
    return stat.S_IMODE(os.fstat(fd).st_mode)
