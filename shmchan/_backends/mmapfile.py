"""The ``mmap`` backend: a file the user names, mapped with ``mmap``.

The name is a filesystem path (under ``/dev/shm`` for memory speed, or on disk to
survive reboots of nothing but the data). The file is created with
``O_CREAT | O_EXCL | O_NOFOLLOW``, so an existing file or a symlink planted at the
path is never reused. Locks are OFD locks on the file and wakeups are POSIX named
semaphores, as for the posix backend (:mod:`shmchan._backends._filebacked`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from .. import _layout as L
from .._errors import ChannelExists, ChannelNotFound, CorruptChannel
from . import _base, _filebacked
from ._base import Segment

_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


class MmapBackend:
    """A memory-mapped file, with OFD locks and POSIX named semaphores."""

    name = "mmap"

    def normalize_name(self, name: str | os.PathLike[str]) -> str:
        path = os.fspath(name)
        if not isinstance(path, str) or not path or "\0" in path:
            raise ValueError(f"the mmap backend needs a file path, not {name!r}")
        _base.check_not_side_name(os.path.basename(path))
        return os.path.abspath(path)

    def create(
        self,
        name: str,
        capacity: int,
        max_record: int,
        permissions: int,
        max_items: int = 0,
        owner: bytes = b"",
    ) -> Segment:
        path = self.normalize_name(name)
        try:
            fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, permissions)
        except FileExistsError as exc:
            raise ChannelExists(f"{path!r} already exists (mmap)") from exc
        try:
            return _filebacked.guard(
                f"creating {path!r}",
                lambda: _filebacked.build(
                    path, self.name, fd, capacity, max_record, permissions, max_items, owner
                ),
            )
        except BaseException:
            _unlink_quietly(path)
            raise
        finally:
            os.close(fd)

    def open(self, name: str, timeout: float) -> Segment:
        path = self.normalize_name(name)
        fd = _open_existing(path)
        try:
            return _filebacked.guard(
                f"opening {path!r}", lambda: _filebacked.attach(path, self.name, fd, timeout)
            )
        finally:
            os.close(fd)

    def remove(self, name: str) -> None:
        path = self.normalize_name(name)
        fd = _open_existing(path)
        try:
            nonce = _filebacked.read_nonce(fd)
        finally:
            os.close(fd)
        if nonce is not None:
            _filebacked.unlink_wakeups(nonce)
        directory, base = os.path.split(path)
        for side in _filebacked.side_names_in(directory, base):
            _unlink_quietly(os.path.join(directory, side))
        _unlink_quietly(path)

    def create_side(
        self, name: str, seq: int, size: int, permissions: int
    ) -> tuple[memoryview, Callable[[], None]]:
        side = name + L.side_segment_suffix(seq)
        try:
            fd = os.open(side, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, permissions)
        except FileExistsError as exc:
            raise ChannelExists(f"side segment {side!r} already exists") from exc
        try:
            return _filebacked.create_side_file(fd, size, permissions)
        except BaseException:
            _unlink_quietly(side)
            raise
        finally:
            os.close(fd)

    def open_side(self, name: str, seq: int) -> memoryview:
        side = name + L.side_segment_suffix(seq)
        try:
            fd = os.open(side, _OPEN_FLAGS)
        except FileNotFoundError as exc:
            raise CorruptChannel(f"side segment {side!r} of a message is missing") from exc
        try:
            _unlink_quietly(side)
            return _filebacked.map_side_file(fd)
        finally:
            os.close(fd)

    def remove_side(self, name: str, seq: int) -> None:
        _unlink_quietly(name + L.side_segment_suffix(seq))


def _open_existing(path: str) -> int:
    try:
        return os.open(path, _OPEN_FLAGS)
    except FileNotFoundError as exc:
        raise ChannelNotFound(f"no channel file {path!r} (mmap)") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path!r} is a symbolic link; refusing to follow it") from exc
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


backend_class = MmapBackend
