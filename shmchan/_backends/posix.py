"""The ``posix`` backend (the default): POSIX shared memory.

The segment is ``shm_open(name)`` (on Linux the file ``/dev/shm/<name>``), and its side
objects are ``<name>.S<index as 2 hex digits>``. Liveness is OFD locks on the segment's
descriptor (:mod:`shmchan._backends._filebacked`); everything else is in the segment.
"""

from __future__ import annotations

import os
from typing import Any

import posix_ipc

from .. import _cext
from .. import _layout as L
from .._errors import AccessDenied, ChannelExists
from . import _base, _filebacked
from ._base import CreateParams, SideMap

SHM_DIR = "/dev/shm"


def _open_fd(name: str, flags: int = 0, mode: int = 0o600) -> int:
    """shm_open through posix_ipc; its errors become shmchan's."""
    try:
        shm = posix_ipc.SharedMemory(name, flags, mode=mode, size=0)
    except posix_ipc.ExistentialError as exc:
        if flags & posix_ipc.O_EXCL:
            raise ChannelExists(f"channel {name!r} already exists (posix)") from exc
        raise _filebacked.not_found(name, "posix") from exc
    except posix_ipc.PermissionsError as exc:
        raise AccessDenied(f"channel {name!r} (posix): permission denied") from exc
    except OSError as exc:
        raise _filebacked.os_error(f"opening {name!r}", exc) from exc
    fd: int = shm.fd  # ours to close: posix_ipc never closes it behind our back
    return fd


class PosixBackend:
    """POSIX shm via ``posix_ipc``."""

    name = "posix"

    def normalize_name(self, name: str) -> str:
        return _base.check_ipc_name(name)

    def create(self, name: str, params: CreateParams, ctx: Any) -> _cext.Core:
        name = self.normalize_name(name)
        fd = _open_fd(name, posix_ipc.O_CREX, params.permissions)
        try:
            return _filebacked.guard(f"creating {name!r}", lambda: _filebacked.build(fd, name, params, ctx))
        except BaseException:
            _unlink_quietly(name)
            raise
        finally:
            os.close(fd)

    def open(self, name: str, timeout: float, allow_foreign: bool, ctx: Any) -> _cext.Core:
        name = self.normalize_name(name)
        fd = _open_fd(name)
        try:
            return _filebacked.guard(
                f"opening {name!r}", lambda: _filebacked.attach(fd, name, timeout, allow_foreign, ctx)
            )
        finally:
            os.close(fd)

    def peek(self, name: str) -> bytes:
        """The header page of the channel, without attaching (b"" if unreadable)."""
        fd = _open_fd(self.normalize_name(name))
        try:
            return _filebacked.peek(fd)
        finally:
            os.close(fd)

    def owner_of(self, name: str) -> tuple[int, int]:
        fd = _open_fd(self.normalize_name(name))
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return st.st_uid, st.st_mode & 0o777

    def remove(self, name: str, force: bool = False) -> None:
        name = self.normalize_name(name)
        fd = _open_fd(name)
        try:
            if not force:
                _filebacked.check_removable(fd, name)
        finally:
            os.close(fd)
        self.side_remove_all(name)
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError as exc:
            raise _filebacked.not_found(name, "posix") from exc
        except posix_ipc.PermissionsError as exc:
            raise AccessDenied(f"cannot remove channel {name!r} (posix): permission denied") from exc

    # -- side objects ---------------------------------------------------------------------

    def side_create(self, name: str, index: int, size: int, permissions: int) -> SideMap:
        side = name + L.side_suffix(index)
        _unlink_quietly(side)
        fd = _open_fd(side, posix_ipc.O_CREX, permissions)
        try:
            return _filebacked.side_build(fd, size, permissions)
        except BaseException:
            _unlink_quietly(side)
            raise
        finally:
            os.close(fd)

    def side_open(
        self, name: str, index: int, trust: tuple[int, int] | None, cached: SideMap | None
    ) -> SideMap | None:
        side = name + L.side_suffix(index)
        try:
            fd = _open_fd(side)
        except FileNotFoundError:
            return None
        try:
            return _filebacked.side_map(fd, trust, cached, f"side segment {side!r}")
        finally:
            os.close(fd)

    def side_remove(self, name: str, index: int) -> None:
        _unlink_quietly(name + L.side_suffix(index))

    def side_remove_all(self, name: str) -> None:
        for side in _filebacked.side_names_in(SHM_DIR, name[1:]):
            _unlink_quietly("/" + side)


def _unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


backend_class = PosixBackend
