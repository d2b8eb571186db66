"""The ``posix`` backend (the default): POSIX shared memory and POSIX named semaphores.

The segment is ``shm_open(name)`` (on Linux a file ``/dev/shm/<name>``), locks are
OFD locks on its descriptor and wakeups are two POSIX named semaphores whose names
derive from the header's nonce (see :mod:`shmchan._backends._filebacked`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import posix_ipc

from .. import _layout as L
from .._errors import ChannelExists, ChannelNotFound, CorruptChannel
from . import _base, _filebacked
from ._base import Segment


class PosixBackend:
    """POSIX shm + POSIX named semaphores, via ``posix_ipc``."""

    name = "posix"

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
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=permissions, size=0)
        except posix_ipc.ExistentialError as exc:
            raise ChannelExists(f"channel {name!r} already exists (posix)") from exc
        fd = shm.fd  # ours to close: posix_ipc never closes it behind our back
        try:
            return _filebacked.guard(
                f"creating {name!r}",
                lambda: _filebacked.build(
                    name, self.name, fd, capacity, max_record, permissions, max_items, owner
                ),
            )
        except BaseException:
            _unlink_quietly(name)
            raise
        finally:
            os.close(fd)

    def open(self, name: str, timeout: float) -> Segment:
        name = self.normalize_name(name)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as exc:
            raise ChannelNotFound(f"no channel {name!r} (posix)") from exc
        fd = shm.fd
        try:
            return _filebacked.guard(
                f"opening {name!r}", lambda: _filebacked.attach(name, self.name, fd, timeout)
            )
        finally:
            os.close(fd)

    def remove(self, name: str) -> None:
        name = self.normalize_name(name)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as exc:
            raise ChannelNotFound(f"no channel {name!r} (posix)") from exc
        try:
            nonce = _filebacked.read_nonce(shm.fd)
        finally:
            os.close(shm.fd)
        if nonce is not None:
            _filebacked.unlink_wakeups(nonce)
        for side in _filebacked.side_names_in("/dev/shm", name[1:]):
            _unlink_quietly("/" + side)
        _unlink_quietly(name)

    def create_side(
        self, name: str, seq: int, size: int, permissions: int
    ) -> tuple[memoryview, Callable[[], None]]:
        side = name + L.side_segment_suffix(seq)
        try:
            shm = posix_ipc.SharedMemory(side, posix_ipc.O_CREX, mode=permissions, size=0)
        except posix_ipc.ExistentialError as exc:
            raise ChannelExists(f"side segment {side!r} already exists") from exc
        try:
            return _filebacked.create_side_file(shm.fd, size, permissions)
        except BaseException:
            _unlink_quietly(side)
            raise
        finally:
            os.close(shm.fd)

    def open_side(self, name: str, seq: int) -> memoryview:
        side = name + L.side_segment_suffix(seq)
        try:
            shm = posix_ipc.SharedMemory(side)
        except posix_ipc.ExistentialError as exc:
            raise CorruptChannel(f"side segment {side!r} of a message is missing") from exc
        try:
            _unlink_quietly(side)
            return _filebacked.map_side_file(shm.fd)
        finally:
            os.close(shm.fd)

    def remove_side(self, name: str, seq: int) -> None:
        _unlink_quietly(name + L.side_segment_suffix(seq))


def _unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


backend_class = PosixBackend
