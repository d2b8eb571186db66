"""The ``sysv`` backend: SysV shared memory, with SysV semaphore sets for liveness.

Names map to SysV keys by a documented hash (docs/layout.md 7.3), one key per object:
``shm`` (the segment), ``peers`` (one semaphore per peer slot: a live handle holds its
slot's semaphore at 1 with SEM_UNDO, so the kernel releases it when the holder dies),
``presence`` (two semaphores counting writers and readers, also with SEM_UNDO), and
``S<index as 2 hex digits>`` for side objects. The header records both semaphore ids,
and an opener checks that they are the ones found by key.

Removal: SysV objects are destroyed at once by ``IPC_RMID`` (they have no reference
count, unlike POSIX names, although an attached segment stays mapped until detached), so
removing a sysv channel ends it for every handle: presence checks then fail.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import sysv_ipc

from .. import _cext
from .. import _layout as L
from .._errors import AccessDenied, ChannelExists, ChannelNotFound, CorruptChannel, NoSpace
from . import _base
from ._base import CreateParams, SideMap

CREATION_SEM: Final = 0
"""The creator holds semaphore 0 of the peers set (SEM_UNDO) until it publishes."""


def sysv_key(name: str, role: str) -> int:
    """The SysV key of one object of channel ``name`` (role: shm, peers, presence, Sxx).

    First four bytes, little-endian, of SHA-256 over ``b"shmchan\\0" + role + b"\\0" +
    name`` (UTF-8), masked to 31 bits; 0 (IPC_PRIVATE) becomes 1.
    """
    digest = hashlib.sha256(b"shmchan\0" + role.encode() + b"\0" + name.encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF or 1


def _side_role(index: int) -> str:
    return L.side_suffix(index)[1:]  # "Sxx"


def _limit(what: str, exc: BaseException, sysctl: str) -> NoSpace:
    return NoSpace(f"{what}: {exc} (SysV limits are per IPC namespace; see sysctl {sysctl})")


def _lookup_shm(name: str, role: str = "shm") -> sysv_ipc.SharedMemory | None:
    try:
        return sysv_ipc.SharedMemory(sysv_key(name, role))
    except sysv_ipc.ExistentialError:
        return None
    except sysv_ipc.PermissionsError as exc:
        raise AccessDenied(f"channel {name!r} (sysv): permission denied") from exc


class _Mapped(sysv_ipc.SharedMemory):  # type: ignore[misc]
    """A SysV segment attached for as long as this object lives: memoryviews of it keep
    it alive, so it is detached only once no view is left (sysv_ipc never detaches on its
    own, and detaching under a live view would unmap memory in use)."""

    def __del__(self) -> None:
        try:
            self.detach()
        except sysv_ipc.Error:
            pass


def _remove_id(shmid: int) -> None:
    try:
        sysv_ipc.remove_shared_memory(shmid)
    except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError):
        pass


def _remove_shm(shm: sysv_ipc.SharedMemory) -> None:
    try:
        shm.remove()
    except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError):
        pass
    try:
        shm.detach()
    except sysv_ipc.Error:
        pass


class SysVBackend:
    """SysV shm via ``sysv_ipc``; semaphore sets through the C extension."""

    name = "sysv"

    def normalize_name(self, name: str) -> str:
        return _base.check_ipc_name(name)

    def create(self, name: str, params: CreateParams, ctx: Any) -> _cext.Core:
        name = self.normalize_name(name)
        total = _base.total_size(params)
        shm = None
        sems: list[int] = []
        held = False
        try:
            try:
                # sysv_ipc fills a new segment with init_character: that touches every
                # page now, so memory that cannot be backed fails here, not as a SIGBUS.
                shm = sysv_ipc.SharedMemory(
                    sysv_key(name, "shm"),
                    sysv_ipc.IPC_CREX,
                    mode=params.permissions,
                    size=total,
                    init_character=b"\0",
                )
            except sysv_ipc.ExistentialError as exc:
                raise ChannelExists(f"channel {name!r} already exists (sysv)") from exc
            except sysv_ipc.PermissionsError as exc:
                raise AccessDenied(f"channel {name!r} (sysv): permission denied") from exc
            except (sysv_ipc.Error, OSError, ValueError, MemoryError) as exc:
                raise _limit(
                    f"cannot create a {total}-byte SysV segment", exc, "kernel.shmmax/shmall/shmmni"
                ) from exc
            for role, count in (("peers", params.max_peers), ("presence", 2)):
                try:
                    sems.append(_cext.sem_create(sysv_key(name, role), count, params.permissions))
                except FileExistsError as exc:
                    raise ChannelExists(f"a semaphore set of channel {name!r} already exists (sysv)") from exc
                except OSError as exc:
                    raise _limit("cannot create SysV semaphores", exc, "kernel.sem") from exc
                if role == "peers":
                    held = _cext.sem_op(sems[0], CREATION_SEM, 1, True, True)
            with memoryview(shm) as buf:
                _base.initialise(buf, params, _base.new_nonce(), L.LIVENESS_SYSV, (sems[0], sems[1]))
            shm.detach()
            core = _cext.Core(L.LIVENESS_SYSV, shm.id, total, name, ctx)
        except BaseException:
            for semid in sems:
                _cext.sem_remove(semid)
            if shm is not None:
                _remove_shm(shm)
            raise
        finally:
            if held and sems:
                try:
                    _cext.sem_op(sems[0], CREATION_SEM, -1, True, True)
                except OSError:
                    pass
        return core

    def open(self, name: str, timeout: float, allow_foreign: bool, ctx: Any) -> _cext.Core:
        name = self.normalize_name(name)
        shm = _lookup_shm(name)
        if shm is None:
            raise ChannelNotFound(f"no channel {name!r} (sysv)")
        try:
            _base.check_trust(shm.uid, shm.mode, name, allow_foreign)
            size = shm.size
            with memoryview(shm) as buf:

                def probe() -> tuple[int, int, bool]:
                    magic = int.from_bytes(buf[:8], "little") if size >= 8 else 0
                    peers = _cext.sem_lookup(sysv_key(name, "peers"))
                    busy = peers is None or _cext.sem_values(peers)[CREATION_SEM] > 0
                    return magic, size, busy

                _base.wait_published(probe, timeout, name)
                semids = (L.read_field(buf, "semid_peers"), L.read_field(buf, "semid_presence"))
            for role, semid in zip(("peers", "presence"), semids, strict=True):
                found = _cext.sem_lookup(sysv_key(name, role))
                if found is None or found != semid:
                    raise CorruptChannel(
                        f"{name!r}: its {role} semaphore set is not the one it was created with"
                    )
                uid, mode, *_ = _cext.sem_info(semid)
                _base.check_trust(uid, mode, f"{name} ({role} semaphores)", allow_foreign)
            return _cext.Core(L.LIVENESS_SYSV, shm.id, size, name, ctx)
        except OSError as exc:
            if isinstance(exc, PermissionError) and not isinstance(exc, AccessDenied):
                raise AccessDenied(f"channel {name!r} (sysv): {exc}") from exc
            raise
        finally:
            try:
                shm.detach()
            except sysv_ipc.Error:
                pass

    def peek(self, name: str) -> bytes:
        shm = _lookup_shm(self.normalize_name(name))
        if shm is None:
            raise ChannelNotFound(f"no channel {name!r} (sysv)")
        try:
            with memoryview(shm) as buf:
                return bytes(buf[: min(L.HEADER_BASE, buf.nbytes)])
        finally:
            shm.detach()

    def owner_of(self, name: str) -> tuple[int, int]:
        shm = _lookup_shm(self.normalize_name(name))
        if shm is None:
            raise ChannelNotFound(f"no channel {name!r} (sysv)")
        try:
            return int(shm.uid), int(shm.mode) & 0o777
        finally:
            shm.detach()

    def remove(self, name: str, force: bool = False) -> None:
        name = self.normalize_name(name)
        found = False
        shm = _lookup_shm(name)
        if shm is not None:
            found = True
            # SysV objects die at once: tell every handle (they then raise
            # ChannelNotFound) rather than let them run on without liveness.
            try:
                with memoryview(shm) as buf:
                    if buf.nbytes >= L.HEADER_BASE and int.from_bytes(buf[:8], "little") == L.MAGIC:
                        _cext.mark_removed(buf)
            except (ValueError, TypeError):
                pass
            _remove_shm(shm)
        for role in ("peers", "presence"):
            semid = _cext.sem_lookup(sysv_key(name, role))
            if semid is not None:
                found = True
                try:
                    _cext.sem_remove(semid)
                except PermissionError as exc:
                    raise AccessDenied(f"cannot remove channel {name!r} (sysv): {exc}") from exc
        self.side_remove_all(name)
        if not found:
            raise ChannelNotFound(f"no channel {name!r} (sysv)")

    # -- side objects ---------------------------------------------------------------------

    def side_create(self, name: str, index: int, size: int, permissions: int) -> SideMap:
        key = sysv_key(name, _side_role(index))
        old = _cext.shm_lookup(key)
        if old is not None:
            _remove_id(old)  # IPC_RMID frees the key at once; mappings of it stay valid
        try:
            shm = _Mapped(key, sysv_ipc.IPC_CREX, mode=permissions, size=size, init_character=b"\0")
        except sysv_ipc.ExistentialError as exc:
            raise ChannelExists(f"side segment {index} of {name!r} already exists") from exc
        except (sysv_ipc.Error, OSError, ValueError, MemoryError) as exc:
            raise _limit(
                f"cannot create a {size}-byte SysV side segment", exc, "kernel.shmmax/shmall"
            ) from exc
        return SideMap(memoryview(shm), size, int(shm.id))

    def side_open(
        self, name: str, index: int, trust: tuple[int, int] | None, cached: SideMap | None
    ) -> SideMap | None:
        key = sysv_key(name, _side_role(index))
        shmid = _cext.shm_lookup(key)
        if shmid is None:
            return None
        uid, mode, *_ = _cext.shm_info(shmid)
        _base.check_side_trust(uid, mode, trust, f"side segment {index} of {name!r}")
        if cached is not None and cached.ident == shmid:
            return cached
        try:
            shm = _Mapped(key)
        except sysv_ipc.ExistentialError:
            return None
        return SideMap(memoryview(shm), int(shm.size), int(shm.id))

    def side_remove(self, name: str, index: int) -> None:
        shmid = _cext.shm_lookup(sysv_key(name, _side_role(index)))
        if shmid is not None:
            _remove_id(shmid)

    def side_remove_all(self, name: str) -> None:
        for index in range(L.SIDE_SLOTS_MAX):
            shmid = _cext.shm_lookup(sysv_key(name, _side_role(index)))
            if shmid is not None:
                _remove_id(shmid)


backend_class = SysVBackend
