"""Machinery shared by the fd-backed backends (posix shm and mmap of a file).

* Locks (lock_kind 1): ``F_OFD_SETLK``/``F_OFD_SETLKW`` write locks on one byte of the
  segment's file. Open-file-description locks belong to the open file, not the
  process, conflict between two opens even within one process, and are released by
  the kernel when the last descriptor of that open file is closed, which includes
  process death by SIGKILL. A per-handle ``threading.RLock`` excludes the threads of
  one process that share the handle's descriptor.
* Wakeups (wakeup_kind 1): POSIX named semaphores named from the header's nonce.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import posix_ipc

from .. import _layout as L

if not posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED:  # pragma: no cover - not on Linux
    # Without sem_timedwait every wait would be unbounded: refuse rather than hang.
    raise ImportError("this posix_ipc build has no timed semaphore waits (sem_timedwait)")
from .._errors import (
    ChannelExists,
    ClosedChannel,
    CorruptChannel,
    NoSpace,
    ShmchanError,
)
from . import _base
from ._base import Segment

# struct flock on Linux (x86-64 and aarch64 share it): short l_type, short l_whence,
# off_t l_start, off_t l_len, pid_t l_pid (must be 0 for OFD locks), padding.
_FLOCK = struct.Struct("hhqqi4x")
_SPIN_YIELDS = 64
_NONCE = L.OFF["nonce"]
_NOSPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM)


class FileHandle:
    """The segment's descriptor; reopened in a forked child so the child gets its own
    open file description (sharing the parent's would share its OFD locks)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def reopen(self) -> None:
        new = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        os.close(self.fd)  # the parent's copy keeps the parent's locks alive, not ours
        self.fd = new

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class OfdMutex:
    """One byte's OFD write lock, plus a thread lock for the threads of this process."""

    def __init__(self, handle: FileHandle, byte: int) -> None:
        self._handle = handle
        self._lock = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        self._unlock = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, byte, 1, 0)
        self._tlock = threading.RLock()
        self._closed = False

    def close(self) -> None:
        with self._tlock:
            self._closed = True

    def acquire(self, deadline: float | None) -> bool:
        tlock = self._tlock
        if tlock.acquire(False):  # uncontended in this process: the common case
            pass
        elif deadline is None:
            tlock.acquire()
        elif not tlock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        if self._closed:
            tlock.release()
            raise ClosedChannel("this handle is closed")
        try:
            try:  # the first try inline (hot path): uncontended, it simply succeeds
                fcntl.fcntl(self._handle.fd, fcntl.F_OFD_SETLK, self._lock)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if deadline is None:
                # Kernel-queued sleep; EINTR is retried by fcntl() unless a signal
                # handler raised (Ctrl-C), which propagates to the except below.
                fcntl.fcntl(self._handle.fd, fcntl.F_OFD_SETLKW, self._lock)
                return True
            if self._poll_until(deadline):
                return True
            tlock.release()
            return False
        except BaseException:
            self._unlock_quietly()
            tlock.release()
            raise

    def _try(self) -> bool:
        try:
            fcntl.fcntl(self._handle.fd, fcntl.F_OFD_SETLK, self._lock)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _poll_until(self, deadline: float) -> bool:
        # A timed wait on a contended lock. Holders keep it for microseconds, so
        # yielding the CPU to them usually suffices; a holder that is stopped (not
        # dead: the kernel frees a dead one's lock) makes us back off to 1 ms sleeps
        # until the deadline, which is what lets every timeout be honoured.
        n = 0
        while True:
            if self._try():
                return True
            if time.monotonic() >= deadline:
                return False
            n += 1
            if n < _SPIN_YIELDS:
                os.sched_yield()
            else:
                time.sleep(min(0.001, 0.00002 * (n - _SPIN_YIELDS + 1)))

    def release(self) -> None:
        tlock = self._tlock
        if cast(Any, tlock)._is_owned():
            try:
                fcntl.fcntl(self._handle.fd, fcntl.F_OFD_SETLK, self._unlock)
            finally:
                tlock.release()

    def _unlock_quietly(self) -> None:
        # Unlocking a byte we do not hold is a no-op, and only this thread can hold
        # this handle's lock right now (it holds the thread lock).
        try:
            fcntl.fcntl(self._handle.fd, fcntl.F_OFD_SETLK, self._unlock)
        except OSError:
            pass

    def after_fork_in_child(self) -> None:
        self._tlock = threading.RLock()


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_libc = ctypes.CDLL(None, use_errno=True)
_sem_open = _libc.sem_open
_sem_open.argtypes = (ctypes.c_char_p, ctypes.c_int)
_sem_open.restype = ctypes.c_void_p
_sem_close = _libc.sem_close
_sem_close.argtypes = (ctypes.c_void_p,)
_sem_close.restype = ctypes.c_int
# glibc >= 2.30: sem_clockwait on CLOCK_MONOTONIC, immune to wall-clock steps.
_sem_clockwait = getattr(_libc, "sem_clockwait", None)
if _sem_clockwait is not None:
    _sem_clockwait.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec))
    _sem_clockwait.restype = ctypes.c_int
_sem_post = _libc.sem_post
_sem_post.argtypes = (ctypes.c_void_p,)
_sem_post.restype = ctypes.c_int
_sem_getvalue = _libc.sem_getvalue
_sem_getvalue.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_int))
_sem_getvalue.restype = ctypes.c_int
_sem_timedwait = _libc.sem_timedwait
_sem_timedwait.argtypes = (ctypes.c_void_p, ctypes.POINTER(_Timespec))
_sem_timedwait.restype = ctypes.c_int


class OfdPresence:
    """Presence (lock_kind 1): a shared OFD lock on the role's byte while held; another
    holder exists iff a write lock on that byte would conflict (F_OFD_GETLK ignores
    this open file's own locks)."""

    _BYTES = (L.OFD_WRITERS_BYTE, L.OFD_READERS_BYTE)

    def __init__(self, handle: FileHandle) -> None:
        self._handle = handle
        self._held: set[int] = set()

    def _lock(self, role: int, kind: int, op: int) -> bytes:
        arg = _FLOCK.pack(kind, os.SEEK_SET, self._BYTES[role], 1, 0)
        result: bytes = fcntl.fcntl(self._handle.fd, op, arg)
        return result

    def enter(self, role: int) -> None:
        self._lock(role, fcntl.F_RDLCK, fcntl.F_OFD_SETLK)  # shared: never conflicts
        self._held.add(role)

    def leave(self, role: int) -> None:
        self._held.discard(role)
        self._lock(role, fcntl.F_UNLCK, fcntl.F_OFD_SETLK)

    def others(self, role: int) -> bool:
        found = _FLOCK.unpack(self._lock(role, fcntl.F_WRLCK, fcntl.F_OFD_GETLK))
        return bool(found[0] != fcntl.F_UNLCK)

    def after_fork_in_child(self) -> None:
        for role in self._held:  # the descriptor was reopened: a new open file
            self._lock(role, fcntl.F_RDLCK, fcntl.F_OFD_SETLK)


class PosixSemWakeup:
    """A POSIX named semaphore used as a wakeup counter.

    posix_ipc creates and unlinks it; everything else goes to libc directly, through
    ctypes, on this process's own ``sem_open`` handle:

    * waits use ``sem_clockwait`` on CLOCK_MONOTONIC, because posix_ipc's ``acquire``
      discards any exception a Python signal handler raises during the wait (all but
      KeyboardInterrupt); this way the handler's exception propagates as soon as the
      interrupted wait returns;
    * ``close()`` is deferred while another thread is inside an operation: unmapping
      a ``sem_t`` under a sleeping thread would crash the process.
    """

    def __init__(self, sem: posix_ipc.Semaphore) -> None:
        # glibc hands back the same mapping posix_ipc already has (refcounted).
        handle = _sem_open(sem.name.encode(), 0)
        if not handle:
            err = ctypes.get_errno()
            raise OSError(err, f"sem_open({sem.name!r}): {os.strerror(err)}")
        self._name = sem.name
        self._sem = sem
        self._handle: int | None = handle
        self._busy = 0
        self._closing = False
        self._lock = threading.Lock()

    def _enter(self) -> int | None:
        with self._lock:
            if self._handle is None or self._closing:
                return None
            self._busy += 1
            return self._handle

    def _exit(self) -> None:
        with self._lock:
            self._busy -= 1
            if self._closing and not self._busy:
                self._release()

    def post(self) -> None:
        handle = self._enter()
        if handle is None:
            return
        try:
            _sem_post(handle)
        finally:
            self._exit()

    def value(self) -> int:
        handle = self._enter()
        if handle is None:
            return 0
        try:
            out = ctypes.c_int()
            _sem_getvalue(handle, ctypes.byref(out))
            return out.value
        finally:
            self._exit()

    def wait(self, timeout: float) -> bool:
        handle = self._enter()
        if handle is None:
            return False
        try:
            if _sem_clockwait is not None:
                clock, now = time.CLOCK_MONOTONIC, time.clock_gettime(time.CLOCK_MONOTONIC)
            else:  # pragma: no cover - glibc < 2.30
                clock, now = time.CLOCK_REALTIME, time.time()
            at = now + timeout
            whole = int(at)
            ts = _Timespec(whole, int((at - whole) * 1e9))
            if _sem_clockwait is not None:
                rc = _sem_clockwait(handle, clock, ctypes.byref(ts))
            else:  # pragma: no cover
                rc = _sem_timedwait(handle, ctypes.byref(ts))
            if rc == 0:
                return True
            err = ctypes.get_errno()
        finally:
            self._exit()
        if err in (errno.ETIMEDOUT, errno.EINTR, errno.EAGAIN):
            return False
        raise OSError(err, f"waiting on {self._name!r}: {os.strerror(err)}")

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if not self._busy:
                self._release()

    def _release(self) -> None:
        # Called with the lock held, once no thread is inside an operation.
        if self._handle is not None:
            _sem_close(self._handle)
            self._handle = None
            with contextlib.suppress(posix_ipc.Error):
                self._sem.close()


def _sem_path(sem_name: str) -> str:
    # glibc keeps named semaphores as files /dev/shm/sem.<name without the slash>.
    return "/dev/shm/sem." + sem_name[1:]


def create_wakeups(buf: memoryview, permissions: int) -> tuple[int, list[posix_ipc.Semaphore]]:
    """Create the two semaphores for a fresh nonce (drawing again on a collision).

    Each nonce is stored in the (unpublished) header *before* its semaphores exist,
    so that ``remove()`` finds them even if the creator dies right here.
    """
    for _ in range(8):
        nonce = _base.new_nonce()
        buf[_NONCE : _NONCE + 8] = nonce.to_bytes(8, "little")
        made: list[posix_ipc.Semaphore] = []
        try:
            for sem_name in L.posix_semaphore_names(nonce):
                made.append(
                    posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=permissions, initial_value=0)
                )
                if os.path.exists(_sem_path(sem_name)):
                    _base.exact_mode(_sem_path(sem_name), permissions)
        except posix_ipc.ExistentialError:
            _unlink_sems(made)
            continue
        except OSError as exc:
            _unlink_sems(made)
            if exc.errno in _NOSPACE_ERRNOS:
                raise NoSpace(f"cannot create wakeup semaphores: {exc.strerror}") from exc
            raise
        except BaseException:
            _unlink_sems(made)
            raise
        return nonce, made
    raise ChannelExists("could not find free semaphore names after 8 random nonces")


def _unlink_sems(sems: list[posix_ipc.Semaphore]) -> None:
    for sem in sems:
        try:
            sem.unlink()
        except posix_ipc.Error:
            pass
        try:
            sem.close()
        except posix_ipc.Error:
            pass


def unlink_wakeups(nonce: int) -> None:
    for sem_name in L.posix_semaphore_names(nonce):
        try:
            posix_ipc.unlink_semaphore(sem_name)
        except posix_ipc.ExistentialError:
            pass


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
                raise NoSpace(f"cannot allocate {size} bytes for the channel: {exc.strerror}") from exc
            raise


def build(
    name: str,
    backend: str,
    fd: int,
    capacity: int,
    max_record: int,
    permissions: int,
    max_items: int = 0,
    owner: bytes = b"",
) -> Segment:
    """Initialise a freshly and exclusively created file ``fd`` into a published segment.

    On failure everything this function made is undone and the fd is left open for
    the caller, who unlinks the name and closes it.
    """
    total = L.HEADER_SIZE + capacity
    os.fchmod(fd, permissions)  # exact, whatever the umask
    os.ftruncate(fd, total)
    fallocate(fd, total)
    mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    buf = memoryview(mm)
    sems: list[posix_ipc.Semaphore] = []
    try:
        nonce, sems = create_wakeups(buf, permissions)
        info = _base.initial_header(
            capacity, max_record, nonce, L.LOCK_OFD, L.WAKEUP_POSIX, max_items=max_items
        )
        _base.publish(buf, info, owner)
    except BaseException:
        _unlink_sems(sems)
        buf.release()
        mm.close()
        raise
    handle = FileHandle(os.dup(fd))
    return _segment(name, backend, handle, mm, buf, info, sems, permissions)


def attach(
    name: str,
    backend: str,
    fd: int,
    timeout: float,
) -> Segment:
    """Validate the file ``fd`` and attach to it. The caller closes ``fd`` afterwards."""

    def get_magic() -> int | None:
        if os.fstat(fd).st_size < L.HEADER_SIZE:
            return None
        return int.from_bytes(os.pread(fd, 8, 0), "little")

    _base.wait_published(get_magic, timeout, name)
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    buf = memoryview(mm)
    sems: list[posix_ipc.Semaphore] = []
    try:
        info = _base.validate(buf, size, name, L.LOCK_OFD, L.WAKEUP_POSIX)
        try:
            for sem_name in L.posix_semaphore_names(info.nonce):
                sems.append(posix_ipc.Semaphore(sem_name))
        except posix_ipc.ExistentialError as exc:
            raise CorruptChannel(
                f"{name!r}: its wakeup semaphores are missing (removed by another process?)"
            ) from exc
    except BaseException:
        for sem in sems:
            sem.close()
        buf.release()
        mm.close()
        raise
    handle = FileHandle(os.dup(fd))
    return _segment(name, backend, handle, mm, buf, info, sems, _base.file_mode(fd))


def _segment(
    name: str,
    backend: str,
    handle: FileHandle,
    mm: mmap.mmap,
    buf: memoryview,
    info: L.HeaderInfo,
    sems: list[posix_ipc.Semaphore],
    permissions: int,
) -> Segment:
    def close_map() -> None:
        buf.release()
        mm.close()

    seg = Segment(
        name=name,
        backend=backend,
        buf=buf,
        info=info,
        wlock=OfdMutex(handle, L.OFD_WRITE_LOCK_BYTE),
        rlock=OfdMutex(handle, L.OFD_READ_LOCK_BYTE),
        not_empty=PosixSemWakeup(sems[0]),
        not_full=PosixSemWakeup(sems[1]),
        joined=PosixSemWakeup(sems[2]),
        presence=OfdPresence(handle),
        permissions=permissions,
    )
    seg.closers += [close_map, handle.close]
    seg.fork_hooks += [handle.reopen, seg.presence.after_fork_in_child]
    return seg


def read_nonce(fd: int) -> int | None:
    """The nonce of a segment, published or still being created; None if there is none.

    A creator stores the nonce before it creates the semaphores (and magic stays 0
    until it publishes), so this also finds the semaphores of a creator that died.
    """
    try:
        head = os.pread(fd, 48, 0)
    except OSError:
        return None
    if len(head) < 48 or int.from_bytes(head[:8], "little") not in (L.MAGIC, 0):
        return None
    return int.from_bytes(head[_NONCE : _NONCE + 8], "little") or None


def guard(what: str, fn: Callable[[], Segment]) -> Segment:
    """Translate stray OS errors of a create/open into shmchan's tree."""
    try:
        return fn()
    except ShmchanError:
        raise
    except OSError as exc:
        if exc.errno in _NOSPACE_ERRNOS:
            raise NoSpace(f"{what}: {exc.strerror}") from exc
        raise


# -- side segments (docs/layout.md 2.5) ---------------------------------------------------


def create_side_file(fd: int, size: int, permissions: int) -> tuple[memoryview, Callable[[], None]]:
    """Size, preallocate and map a freshly created side-segment file ``fd`` (which
    the caller closes); return a writable view and a function that unmaps it."""
    length = max(size, 1)
    os.fchmod(fd, permissions)
    os.ftruncate(fd, length)
    fallocate(fd, length)
    mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(mm)[:size]

    def close() -> None:
        view.release()
        mm.close()

    return view, close


def map_side_file(fd: int) -> memoryview:
    """Map a side-segment file ``fd`` (which the caller closes). The view keeps the
    mapping alive; it is unmapped when the last reference to it goes away."""
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return memoryview(mm)[:size]


def side_names_in(directory: str, prefix: str) -> list[str]:
    """Entries of ``directory`` that are side segments of the channel ``prefix``:
    exactly ``<prefix>.L`` and 16 lowercase hex digits (never another channel whose
    name merely starts the same way)."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return [e for e in entries if e.startswith(prefix) and L.SIDE_SUFFIX.fullmatch(e[len(prefix) :])]
