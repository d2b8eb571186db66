"""The ``sysv`` backend: SysV shared memory and SysV semaphores via ``sysv_ipc``.

Names map to SysV keys by a documented hash (docs/layout.md, "SysV keys"), one key
per object: the segment and four single-semaphore sets (write lock, read lock,
not-empty, not-full). The locks are operated with ``SEM_UNDO``, so the kernel
releases a lock whose holder dies. The header records every semaphore id.

Removal: SysV semaphores are destroyed at once by ``IPC_RMID`` (they have no
reference count, unlike POSIX names), so removing a sysv channel ends it for every
handle: an operation on a handle whose channel was removed raises ChannelNotFound.

Timed waits: sysv_ipc wheels built without ``semtimedop`` report
``SEMAPHORE_TIMEOUT_SUPPORTED == False`` and treat every timeout (even 0) as
infinite. That is detected at import; such builds get their timed waits from
libc's ``semtimedop`` through ctypes, and non-blocking attempts use ``IPC_NOWAIT``.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable
from typing import Final

import sysv_ipc

from .. import _layout as L
from .._errors import ChannelExists, ChannelNotFound, ClosedChannel, CorruptChannel, NoSpace, ShmchanError
from .._fence import remaining
from . import _base
from ._base import Segment

TIMEOUTS_FROM_SYSV_IPC: Final = bool(sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED)
"""Whether this sysv_ipc build does timed waits itself (else libc semtimedop is used)."""

_SEM_UNDO: Final = 0x1000  # <sys/sem.h> on Linux
_ROLES: Final = ("shm", "wlock", "rlock", "ne", "nf", "jn", "wp", "rp")

_libc = ctypes.CDLL(None, use_errno=True)


class _Sembuf(ctypes.Structure):
    _fields_ = (("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short), ("sem_flg", ctypes.c_short))


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_semtimedop = _libc.semtimedop
_semtimedop.argtypes = (ctypes.c_int, ctypes.POINTER(_Sembuf), ctypes.c_size_t, ctypes.POINTER(_Timespec))
_semtimedop.restype = ctypes.c_int


_ROLES_INITIAL: Final = (("wlock", 1), ("rlock", 1), ("ne", 0), ("nf", 0), ("jn", 0), ("wp", 0), ("rp", 0))


def sysv_key(name: str, role: str) -> int:
    """The SysV key of one object of channel ``name`` (role: shm, wlock, rlock, ne, nf).

    First four bytes, little-endian, of SHA-256 over ``b"shmchan\\0" + role + b"\\0" +
    name`` (UTF-8), masked to 31 bits; 0 (IPC_PRIVATE) becomes 1.
    """
    digest = hashlib.sha256(b"shmchan\0" + role.encode() + b"\0" + name.encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF or 1


def _removed(exc: BaseException | None = None) -> ChannelNotFound:
    err = ChannelNotFound("the channel was removed (its SysV semaphores no longer exist)")
    err.__cause__ = exc
    return err


def _timed_op(sem: sysv_ipc.Semaphore, flags: int, timeout: float | None) -> bool:
    """Take one unit of ``sem`` within ``timeout`` seconds (None: no limit).

    Return False on timeout or when a signal interrupted the wait; raise
    ChannelNotFound if the semaphore was removed.
    """
    try:
        return _timed_op_raw(sem, flags, timeout)
    except sysv_ipc.ExistentialError as exc:
        raise _removed(exc) from exc


def _timed_op_raw(sem: sysv_ipc.Semaphore, flags: int, timeout: float | None) -> bool:
    if timeout is not None and timeout <= 0:
        sem.block = False
        try:
            sem.acquire()
        except sysv_ipc.BusyError:
            return False
        finally:
            sem.block = True
        return True
    if timeout is None or TIMEOUTS_FROM_SYSV_IPC:
        try:
            sem.acquire(timeout)
        except sysv_ipc.BusyError:
            return False
        except sysv_ipc.Error as exc:
            if "signal" in str(exc).lower():  # sysv_ipc's EINTR: 'Signaled while waiting'
                return False
            raise
        return True
    whole = int(timeout)
    ts = _Timespec(whole, int((timeout - whole) * 1e9))
    op = _Sembuf(0, -1, flags)
    if _semtimedop(sem.id, ctypes.byref(op), 1, ctypes.byref(ts)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EINTR):
        return False
    if err in (errno.EIDRM, errno.EINVAL):
        raise _removed()
    raise OSError(err, os.strerror(err))


class SysVMutex:
    """A SysV semaphore (value 1 = free) operated with SEM_UNDO, plus a thread lock."""

    def __init__(self, sem: sysv_ipc.Semaphore) -> None:
        sem.undo = True
        self._sem = sem
        self._tlock = threading.RLock()
        self._held = False
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
            while True:
                left = remaining(deadline)
                if _timed_op(self._sem, _SEM_UNDO, left):
                    self._held = True
                    return True
                if left is not None and remaining(deadline) == 0:
                    tlock.release()
                    return False
        except BaseException:
            tlock.release()
            raise

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                self._sem.release()
            except sysv_ipc.ExistentialError as exc:
                raise _removed(exc) from exc
            finally:
                self._tlock.release()

    def after_fork_in_child(self) -> None:
        # SEM_UNDO adjustments are not inherited: the child holds nothing.
        self._tlock = threading.RLock()
        self._held = False


class SysVPresence:
    """Presence (lock_kind 2): a SysV semaphore per role counts its holders, each
    counted with SEM_UNDO, so the kernel uncounts a holder that dies."""

    def __init__(self, writers: sysv_ipc.Semaphore, readers: sysv_ipc.Semaphore) -> None:
        self._sems = (writers, readers)
        for sem in self._sems:
            sem.undo = True
            sem.block = True
        self._held: set[int] = set()

    def enter(self, role: int) -> None:
        try:
            self._sems[role].release()
        except sysv_ipc.ExistentialError as exc:
            raise _removed(exc) from exc
        self._held.add(role)

    def leave(self, role: int) -> None:
        if role in self._held:
            self._held.discard(role)
            try:
                self._sems[role].acquire()  # never blocks: our own unit is in it
            except sysv_ipc.ExistentialError as exc:
                raise _removed(exc) from exc

    def others(self, role: int) -> bool:
        try:
            value = int(self._sems[role].value)
        except sysv_ipc.ExistentialError as exc:
            raise _removed(exc) from exc
        return value - (role in self._held) > 0

    def after_fork_in_child(self) -> None:
        for role in self._held:  # SEM_UNDO adjustments are not inherited: count anew
            self._sems[role].release()


class SysVWakeup:
    """A SysV semaphore used as a wakeup counter (no SEM_UNDO)."""

    def __init__(self, sem: sysv_ipc.Semaphore) -> None:
        self._sem = sem

    def post(self) -> None:
        try:
            self._sem.release()
        except sysv_ipc.ExistentialError as exc:
            raise _removed(exc) from exc

    def value(self) -> int:
        try:
            return int(self._sem.value)
        except sysv_ipc.ExistentialError as exc:
            raise _removed(exc) from exc

    def wait(self, timeout: float) -> bool:
        return _timed_op(self._sem, 0, timeout)

    def close(self) -> None:
        pass  # SysV semaphores have no per-process handle to drop


class SysVBackend:
    """SysV shm + SysV semaphores, via ``sysv_ipc``."""

    name = "sysv"

    def normalize_name(self, name: str) -> str:
        return _base.check_ipc_name(name)

    def create(
        self,
        name: str,
        capacity: int,
        max_record: int,
        permissions: int,
        max_items: int = 0,
        owner: bytes = b"",
    ) -> Segment:
        name = self.normalize_name(name)
        total = L.HEADER_SIZE + capacity
        made: list[sysv_ipc.Semaphore] = []
        shm = None
        try:
            try:
                # sysv_ipc fills a new segment with init_character: that touches every
                # page now, so memory that cannot be backed fails here (ENOMEM at
                # shmget under overcommit accounting), never as a SIGBUS later.
                shm = sysv_ipc.SharedMemory(
                    sysv_key(name, "shm"),
                    sysv_ipc.IPC_CREX,
                    mode=permissions,
                    size=total,
                    init_character=b"\0",
                )
            except sysv_ipc.ExistentialError as exc:
                raise ChannelExists(f"channel {name!r} already exists (sysv)") from exc
            except (sysv_ipc.Error, OSError, ValueError, MemoryError) as exc:
                raise NoSpace(f"cannot create a {total}-byte SysV segment: {exc}") from exc
            for role, initial in _ROLES_INITIAL:
                try:
                    made.append(
                        sysv_ipc.Semaphore(
                            sysv_key(name, role),
                            sysv_ipc.IPC_CREX,
                            mode=permissions,
                            initial_value=initial,
                        )
                    )
                except sysv_ipc.ExistentialError as exc:
                    raise ChannelExists(f"a semaphore of channel {name!r} already exists") from exc
                except (sysv_ipc.Error, OSError) as exc:
                    raise NoSpace(f"cannot create SysV semaphores (kernel.sem limits?): {exc}") from exc
            buf = memoryview(shm)
            try:
                info = _base.initial_header(
                    capacity,
                    max_record,
                    _base.new_nonce(),
                    L.LOCK_SYSV,
                    L.WAKEUP_SYSV,
                    semid_wlock=made[0].id,
                    semid_rlock=made[1].id,
                    semid_ne=made[2].id,
                    semid_nf=made[3].id,
                    semid_jn=made[4].id,
                    semid_wp=made[5].id,
                    semid_rp=made[6].id,
                    max_items=max_items,
                )
                _base.publish(buf, info, owner)
            except BaseException:
                buf.release()
                raise
        except BaseException:
            for sem in made:
                _remove_quietly(sem)
            if shm is not None:
                shm.detach()
                _remove_quietly(shm)
            raise
        return self._segment(name, shm, buf, info, made, permissions)

    def open(self, name: str, timeout: float) -> Segment:
        name = self.normalize_name(name)
        try:
            shm = sysv_ipc.SharedMemory(sysv_key(name, "shm"))
        except sysv_ipc.ExistentialError as exc:
            raise ChannelNotFound(f"no channel {name!r} (sysv)") from exc
        buf = memoryview(shm)
        try:
            size = buf.nbytes
            _base.wait_published(
                lambda: _base.read_magic(buf) if size >= L.HEADER_SIZE else None, timeout, name
            )
            info = _base.validate(buf, size, name, L.LOCK_SYSV, L.WAKEUP_SYSV)
            sems = []
            for role, semid in zip(
                _ROLES[1:],
                (
                    info.semid_wlock,
                    info.semid_rlock,
                    info.semid_ne,
                    info.semid_nf,
                    info.semid_jn,
                    info.semid_wp,
                    info.semid_rp,
                ),
                strict=True,
            ):
                try:
                    sem = sysv_ipc.Semaphore(sysv_key(name, role))
                except sysv_ipc.ExistentialError as exc:
                    raise CorruptChannel(f"{name!r}: its {role} semaphore is missing") from exc
                if sem.id != semid:
                    raise CorruptChannel(f"{name!r}: its {role} semaphore is not the one it was created with")
                sems.append(sem)
        except BaseException:
            buf.release()
            shm.detach()
            raise
        return self._segment(name, shm, buf, info, sems, shm.mode & 0o777)

    def _segment(
        self,
        name: str,
        shm: sysv_ipc.SharedMemory,
        buf: memoryview,
        info: L.HeaderInfo,
        sems: list[sysv_ipc.Semaphore],
        permissions: int,
    ) -> Segment:
        for sem in sems[2:5]:
            sem.undo = False
            sem.block = True

        def close_map() -> None:
            buf.release()
            try:
                shm.detach()
            except sysv_ipc.Error:
                pass

        seg = Segment(
            name=name,
            backend=self.name,
            buf=buf,
            info=info,
            wlock=SysVMutex(sems[0]),
            rlock=SysVMutex(sems[1]),
            not_empty=SysVWakeup(sems[2]),
            not_full=SysVWakeup(sems[3]),
            joined=SysVWakeup(sems[4]),
            presence=SysVPresence(sems[5], sems[6]),
            permissions=permissions,
        )
        seg.closers.append(close_map)
        seg.fork_hooks.append(seg.presence.after_fork_in_child)
        return seg

    def remove(self, name: str) -> None:
        name = self.normalize_name(name)
        found = False
        self._remove_sides(name)
        for role in _ROLES:
            cls = sysv_ipc.SharedMemory if role == "shm" else sysv_ipc.Semaphore
            try:
                obj = cls(sysv_key(name, role))
            except sysv_ipc.ExistentialError:
                continue
            found = True
            _remove_quietly(obj)
            if isinstance(obj, sysv_ipc.SharedMemory):
                obj.detach()  # constructing it attached it; IPC_RMID waits for nattch 0
        if not found:
            raise ChannelNotFound(f"no channel {name!r} (sysv)")

    # -- side segments (docs/layout.md 2.5) ---------------------------------------------

    def create_side(
        self, name: str, seq: int, size: int, permissions: int
    ) -> tuple[memoryview, Callable[[], None]]:
        try:
            shm = sysv_ipc.SharedMemory(
                sysv_key(name, _side_role(seq)),
                sysv_ipc.IPC_CREX,
                mode=permissions,
                size=max(size, 1),
                init_character=b"\0",
            )
        except sysv_ipc.ExistentialError as exc:
            raise ChannelExists(f"side segment {seq} of {name!r} already exists") from exc
        except (sysv_ipc.Error, OSError, ValueError, MemoryError) as exc:
            raise NoSpace(f"cannot create a {size}-byte SysV side segment: {exc}") from exc
        view = memoryview(shm)[:size]

        def close() -> None:
            view.release()
            shm.detach()

        return view, close

    def open_side(self, name: str, seq: int) -> memoryview:
        try:
            shm = sysv_ipc.SharedMemory(sysv_key(name, _side_role(seq)))
        except sysv_ipc.ExistentialError as exc:
            raise CorruptChannel(f"side segment {seq} of a message in {name!r} is missing") from exc
        try:
            _remove_quietly(shm)
            # sysv_ipc never detaches on its own, so copy out and detach now.
            with memoryview(shm) as view:
                return memoryview(bytearray(view))
        finally:
            shm.detach()

    def remove_side(self, name: str, seq: int) -> None:
        try:
            shm = sysv_ipc.SharedMemory(sysv_key(name, _side_role(seq)))
        except sysv_ipc.ExistentialError:
            return
        _remove_quietly(shm)
        shm.detach()

    def _remove_sides(self, name: str) -> None:
        """Remove the side segments that can still exist: those of the last
        capacity/16 + 1024 sequence numbers (the most that can be in flight)."""
        try:
            shm = sysv_ipc.SharedMemory(sysv_key(name, "shm"))
        except sysv_ipc.ExistentialError:
            return
        try:
            with memoryview(shm) as buf:
                if buf.nbytes < L.HEADER_SIZE:
                    return
                with buf.cast("Q") as q:
                    top = q[L.Q_LARGE_SEQ]
                    capacity = q[L.OFF["capacity"] // 8]
        finally:
            shm.detach()
        window = min(capacity, L.MAX_CAPACITY) // 16 + 1024
        wanted = {sysv_key(name, _side_role(s)) for s in range(max(0, top - window), top)}
        if not wanted:
            return
        try:
            with open("/proc/sysvipc/shm") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            return
        for line in lines:
            fields = line.split()
            if fields and int(fields[0]) in wanted:
                try:
                    sysv_ipc.remove_shared_memory(int(fields[1]))
                except sysv_ipc.Error:
                    pass


def _side_role(seq: int) -> str:
    return "L" + L.side_segment_suffix(seq)[2:]


def _remove_quietly(obj: sysv_ipc.SharedMemory | sysv_ipc.Semaphore) -> None:
    try:
        obj.remove()
    except (sysv_ipc.ExistentialError, ShmchanError):
        pass


backend_class = SysVBackend
