"""The ``mmap`` backend: a file the user names, mapped with ``mmap``.

The name is a filesystem path (under ``/dev/shm`` for memory speed, or on disk). The file
is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so an existing file or a symlink
planted at the path is never reused, and opened with ``O_NOFOLLOW``. Side objects are
``<path>.S<index as 2 hex digits>``. Liveness is OFD locks on the file
(:mod:`shmchan._backends._filebacked`).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from .. import _cext
from .. import _layout as L
from .._errors import AccessDenied, ChannelExists, ChannelNotFound, NotAShmchanSegment
from . import _base, _filebacked
from ._base import CreateParams, SideMap

_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


def _open(path: str, create: bool = False, permissions: int = 0o600) -> int:
    try:
        if create:
            return os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, permissions)
        return os.open(path, _OPEN_FLAGS)
    except FileExistsError as exc:
        raise ChannelExists(f"{path!r} already exists (mmap)") from exc
    except FileNotFoundError as exc:
        if create:
            raise ChannelNotFound(
                f"cannot create {path!r} (mmap): directory {os.path.dirname(path)!r} does not exist"
            ) from exc
        raise _filebacked.not_found(path, "mmap") from exc
    except PermissionError as exc:
        raise AccessDenied(f"{path!r} (mmap): permission denied") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path!r} is a symbolic link; refusing to follow it") from exc
        if exc.errno == errno.EISDIR:
            raise NotAShmchanSegment(f"{path!r} is a directory, not a channel (mmap)") from exc
        if exc.errno == errno.ENOTDIR:
            raise _filebacked.not_found(path, "mmap") from exc
        raise _filebacked.os_error(f"opening {path!r}", exc) from exc


class MmapBackend:
    """A memory-mapped file."""

    name = "mmap"

    def normalize_name(self, name: str | os.PathLike[str]) -> str:
        path = os.fspath(name)
        if not isinstance(path, str) or not path or "\0" in path:
            raise ValueError(f"the mmap backend needs a file path, not {name!r}")
        _base.check_encodable(path)
        full = os.path.abspath(path)
        base = os.path.basename(full)
        if not base or path.endswith("/"):
            raise ValueError(f"the mmap backend needs a file path, not the directory {path!r}")
        if len(base.encode()) > 255 or len(full.encode()) >= 4096:
            raise ValueError(f"the mmap path {path!r} is too long (file names: 255 bytes, paths: 4095)")
        _base.check_not_side_name(base)
        return full

    def create(self, name: str, params: CreateParams, ctx: Any) -> _cext.Core:
        path = self.normalize_name(name)
        fd = _open(path, create=True, permissions=params.permissions)
        try:
            return _filebacked.guard(f"creating {path!r}", lambda: _filebacked.build(fd, path, params, ctx))
        except BaseException:
            _unlink_quietly(path)
            raise
        finally:
            os.close(fd)

    def open(self, name: str, timeout: float, allow_foreign: bool, ctx: Any) -> _cext.Core:
        path = self.normalize_name(name)
        fd = _open(path)
        try:
            return _filebacked.guard(
                f"opening {path!r}", lambda: _filebacked.attach(fd, path, timeout, allow_foreign, ctx)
            )
        finally:
            os.close(fd)

    def peek(self, name: str) -> bytes:
        fd = _open(self.normalize_name(name))
        try:
            return _filebacked.peek(fd)
        finally:
            os.close(fd)

    def owner_of(self, name: str) -> tuple[int, int]:
        fd = _open(self.normalize_name(name))
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return st.st_uid, st.st_mode & 0o777

    def remove(self, name: str, force: bool = False) -> None:
        path = self.normalize_name(name)
        fd = _open(path)  # O_NOFOLLOW: a symlink is refused (ELOOP), never followed
        try:
            if not force:
                _filebacked.check_removable(fd, path)
        finally:
            os.close(fd)
        self.side_remove_all(path)
        try:
            os.unlink(path)
        except FileNotFoundError as exc:
            raise _filebacked.not_found(path, "mmap") from exc
        except PermissionError as exc:
            raise AccessDenied(f"cannot remove {path!r} (mmap): permission denied") from exc

    # -- side objects ---------------------------------------------------------------------

    def side_create(self, name: str, index: int, size: int, permissions: int) -> SideMap:
        side = name + L.side_suffix(index)
        _unlink_quietly(side)
        fd = _open(side, create=True, permissions=permissions)
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
            fd = _open(side)
        except FileNotFoundError:
            return None
        try:
            return _filebacked.side_map(fd, trust, cached, f"side segment {side!r}")
        finally:
            os.close(fd)

    def side_remove(self, name: str, index: int) -> None:
        _unlink_quietly(name + L.side_suffix(index))

    def side_remove_all(self, name: str) -> None:
        directory, base = os.path.split(name)
        for side in _filebacked.side_names_in(directory, base):
            _unlink_quietly(os.path.join(directory, side))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


backend_class = MmapBackend
