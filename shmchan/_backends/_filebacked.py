"""Steps shared by the fd-backed backends (posix shm and mmap of a file).

* Liveness (kind 1): the C core takes OFD locks on the segment's file: an exclusive lock
  on its peer slot's byte for as long as it is attached, shared locks on the presence
  bytes for the roles it holds. The kernel releases them when the last descriptor of
  that open file is closed, which includes the death of the process by any signal.
* Creation lock: the creator holds an exclusive OFD lock on bytes [0, 8) from the moment
  the file exists until it is published, so an opener (and ``shmchan gc``) can tell an
  abandoned half-made segment (lock free, magic still 0) from one still being made.
* Memory is allocated at creation (``posix_fallocate``), so a full tmpfs is ``NoSpace``
  now instead of a SIGBUS later.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Callable
from typing import Any

from .. import _cext
from .. import _layout as L
from .._errors import (
    AccessDenied,
    ChannelExists,
    ChannelNotFound,
    CorruptChannel,
    NoSpace,
    NotAShmchanSegment,
    ShmchanError,
)
from . import _base
from ._base import CreateParams, SideMap

CREATION_LOCK = (0, 8)
"""Bytes locked (exclusively) by a creator until it publishes the segment."""
_NOSPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM)
_LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE)


def os_error(what: str, exc: OSError) -> OSError:
    """The shmchan error for an OS failure during a create or an open."""
    if exc.errno in _NOSPACE_ERRNOS:
        return NoSpace(f"{what}: {exc.strerror}")
    if exc.errno in _LIMIT_ERRNOS:
        err = NoSpace(
            f"{what}: {exc.strerror} (each posix or mmap channel handle uses one file descriptor; "
            "raise the limit with `ulimit -n` or resource.setrlimit(RLIMIT_NOFILE))"
        )
        err.errno = exc.errno
        return err
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AccessDenied(f"{what}: {exc.strerror}")
    return exc


def fallocate(fd: int, size: int) -> None:
    """Back every byte now, so a full tmpfs is an ENOSPC here instead of a SIGBUS later."""
    while True:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno in _NOSPACE_ERRNOS:
                raise NoSpace(f"cannot allocate {size} bytes: {exc.strerror}") from exc
            raise


def build(fd: int, name: str, params: CreateParams, ctx: Any) -> _cext.Core:
    """Turn a freshly and exclusively created file ``fd`` into a published, attached
    channel. On failure everything this function made is undone; the caller unlinks the
    name and closes ``fd``."""
    if not _cext.ofd_lock(fd, *CREATION_LOCK, True):
        raise ChannelExists(f"channel {name!r} is being created by another process")
    try:
        os.fchmod(fd, params.permissions)  # exact, whatever the umask
        total = _base.total_size(params)
        os.ftruncate(fd, total)
        fallocate(fd, total)
        mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            with memoryview(mm) as buf:
                _base.initialise(buf, params, _base.new_nonce(), L.LIVENESS_OFD, (-1, -1))
        finally:
            mm.close()
        return _cext.Core(L.LIVENESS_OFD, os.dup(fd), total, name, ctx)
    finally:
        _cext.ofd_unlock(fd, *CREATION_LOCK)


def attach(fd: int, name: str, timeout: float, allow_foreign: bool, ctx: Any) -> _cext.Core:
    """Check who owns the file ``fd``, wait for its publication and attach a Core to it
    (the Core gets its own descriptor; the caller closes ``fd``)."""
    st = os.fstat(fd)
    _base.check_trust(st.st_uid, st.st_mode, name, allow_foreign)

    def probe() -> tuple[int, int, bool]:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0) if size >= 8 else b""
        magic = int.from_bytes(head, "little") if len(head) == 8 else 0
        return magic, size, _cext.ofd_held(fd, *CREATION_LOCK)

    size = _base.wait_published(probe, timeout, name)
    return _cext.Core(L.LIVENESS_OFD, os.dup(fd), size, name, ctx)


def guard(what: str, fn: Callable[[], _cext.Core]) -> _cext.Core:
    """Translate stray OS errors of a create/open into shmchan's tree."""
    try:
        return fn()
    except ShmchanError:
        raise
    except OSError as exc:
        err = os_error(what, exc)
        if err is exc:
            raise
        raise err from exc


def peek(fd: int) -> bytes:
    """The first bytes of a segment (up to one header page), without attaching."""
    try:
        return os.pread(fd, L.HEADER_BASE, 0)
    except OSError:
        return b""


# -- side objects (docs/layout.md 2.5) -----------------------------------------------------


def side_build(fd: int, size: int, permissions: int) -> SideMap:
    """Size, preallocate and map a freshly created side file ``fd`` (the caller closes it)."""
    os.fchmod(fd, permissions)
    os.ftruncate(fd, size)
    fallocate(fd, size)
    st = os.fstat(fd)
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return SideMap(memoryview(mm), size, (st.st_dev, st.st_ino))


def side_map(fd: int, trust: tuple[int, int] | None, cached: SideMap | None, what: str) -> SideMap:
    """Map an existing side file ``fd`` after checking its owner (the caller closes
    ``fd``); ``cached`` if it already maps this very file."""
    st = os.fstat(fd)
    _base.check_side_trust(st.st_uid, st.st_mode, trust, what)
    ident = (st.st_dev, st.st_ino)
    if cached is not None and cached.ident == ident and cached.size == st.st_size:
        return cached
    if st.st_size == 0:
        raise CorruptChannel(f"{what} is empty")
    mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return SideMap(memoryview(mm), st.st_size, ident)


def side_names_in(directory: str, prefix: str) -> list[str]:
    """Entries of ``directory`` that are side objects of the channel ``prefix``: exactly
    ``<prefix>.S`` and 2 lowercase hex digits (never another channel whose name merely
    starts the same way)."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return [e for e in entries if e.startswith(prefix) and L.SIDE_SUFFIX.fullmatch(e[len(prefix) :])]


def check_removable(fd: int, name: str) -> None:
    """Refuse to remove what is not a shmchan segment: a file that is not regular, or
    whose first word is some other non-zero magic (a shmchan segment's is MAGIC, or 0
    while it is created). ``shmchan rm --force`` skips this check."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise NotAShmchanSegment(f"{name!r} is not a regular file: not removed")
    head = os.pread(fd, 8, 0) if st.st_size >= 8 else b""
    magic = int.from_bytes(head, "little") if len(head) == 8 else 0
    if magic not in (0, L.MAGIC):
        raise NotAShmchanSegment(f"{name!r} is not a shmchan segment (magic {magic:#018x}): not removed")


def not_found(name: str, backend: str) -> ChannelNotFound:
    return ChannelNotFound(f"no channel {name!r} ({backend})")
