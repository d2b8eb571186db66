"""Client side of the lifetime service of unnamed queues (see :mod:`shmchan._reaper`).

Each process keeps one connection per service it uses, and counts its handles per
queue. Holds follow the handles: a handle registers when it is made (created,
unpickled, opened by name) and unregisters when it is closed; a process's remaining
holds vanish with its connection when it exits, however it dies. ``os.fork()`` is
handled so that a child's inherited handles are held, from the fork on, on a
connection that only the child owns (see the fork section below).
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import sys
import threading
from collections import Counter
from typing import Final

REPLY_TIMEOUT: Final = 10.0
Key = tuple[str, str, str]  # (service address, backend, name)

_lock = threading.RLock()
_conns: dict[str, _Conn] = {}
_held: Counter[Key] = Counter()
_own: str | None = None  # the address of the service this process started


class ServiceGone(Exception):
    """Internal: the queue is no longer held by anyone (or the service is gone)."""


class _Conn:
    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(REPLY_TIMEOUT)
        self.sock.connect("\0" + address)
        self.lock = threading.Lock()

    def request(self, *words: str) -> str:
        with self.lock:
            self.sock.send("\t".join(words).encode())
            return self.sock.recv(64).decode()


def _drop(address: str) -> None:
    conn = _conns.pop(address, None)
    if conn is not None:
        conn.sock.close()


@atexit.register
def _close_all() -> None:
    # Exiting closes them anyway; closing first keeps -X dev / ResourceWarning quiet.
    for address in list(_conns):
        _drop(address)


def _conn(address: str) -> _Conn:
    conn = _conns.get(address)
    if conn is None:
        conn = _conns[address] = _Conn(address)
    return conn


def _spawn_service() -> str:
    """Start a lifetime service for this process; return its address."""
    address = f"shmchan-reaper-{os.getpid()}-{secrets.token_hex(8)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        listener.bind("\0" + address)
        listener.listen(64)
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "shmchan._reaper"],
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),
            ],
            setsid=True,
        )
        # The service forks once more and its first process exits at once; waiting
        # for that guarantees the long-lived service exists before we make anything.
        os.waitpid(pid, 0)
    finally:
        listener.close()  # the service has its own copy
    return address


def create_hold(backend: str, name: str) -> str:
    """Take the creator's hold on a queue about to be created; return the service's
    address (to store in the queue's header)."""
    global _own
    with _lock:
        for _ in range(2):
            if _own is None:
                _own = _spawn_service()
            try:
                reply = _conn(_own).request("c", backend, name)
            except OSError:
                _drop(_own)
                _own = None  # it exited (idle) or was killed: start another
                continue
            if reply == "ok":
                _held[(_own, backend, name)] += 1
                return _own
        raise OSError("cannot reach the shmchan lifetime service")


def hold(address: str, backend: str, name: str) -> None:
    """Take one more hold for a handle in this process; ServiceGone if the queue was
    already released by everyone."""
    with _lock:
        try:
            reply = _conn(address).request("+", backend, name)
        except OSError as exc:
            _drop(address)
            raise ServiceGone(f"lifetime service {address} is unreachable") from exc
        if reply != "ok":
            raise ServiceGone(f"queue {name!r} has been released by every process")
        _held[(address, backend, name)] += 1


def release(address: str, backend: str, name: str) -> None:
    """Drop one hold (a handle was closed); the last hold anywhere removes the queue."""
    key = (address, backend, name)
    with _lock:
        if _held[key] <= 0:
            return
        _held[key] -= 1
        if not _held[key]:
            del _held[key]
        try:
            _conn(address).request("-", backend, name)
        except OSError:
            _drop(address)


def transfer(address: str, backend: str, name: str) -> str:
    """A hold for a pickled copy in flight; returns the token to redeem on unpickling."""
    token = secrets.token_hex(12)
    with _lock:
        try:
            reply = _conn(address).request("t", backend, name, token)
        except OSError:
            _drop(address)
            return ""
    return token if reply == "ok" else ""


def redeem(address: str, token: str) -> None:
    if not token:
        return
    with _lock:
        try:
            _conn(address).request("r", token)
        except OSError:
            _drop(address)


# -- fork ------------------------------------------------------------------------------
#
# A forked child inherits its parent's handles, so it must hold their queues from its
# first instant: if the parent closed its handle at once, nothing else would keep the
# queue alive for the child. Before the fork, the parent opens one new connection per
# service and takes on it one hold per queue it holds; after the fork the parent closes
# its copy of those connections and the child adopts them as its own. A hold is thus
# always owned by the process whose death drops it: a child killed at any instant
# after the fork (even before it ran a line of Python) takes its holds with it.

_fork_conns: dict[str, _Conn] = {}


def _before_fork() -> None:
    _lock.acquire()
    for address in {address for address, _, _ in _held}:
        try:
            conn = _Conn(address)
        except OSError:
            continue  # the service is gone: so are its queues
        try:
            for addr, backend, name in _held:
                if addr == address:
                    conn.request("+", backend, name)
        except OSError:
            conn.sock.close()
            continue
        _fork_conns[address] = conn
    for conn in _conns.values():
        conn.lock.acquire()  # keep the shared sockets quiet across the fork


def _after_fork_in_parent() -> None:
    for conn in _fork_conns.values():
        conn.sock.close()  # the child's now: its holds last as long as the child's copy
    _fork_conns.clear()
    for conn in _conns.values():
        conn.lock.release()
    _lock.release()


def _after_fork_in_child() -> None:
    global _lock, _own
    for conn in _conns.values():
        conn.sock.close()  # the parent's connections stay open in the parent
    _conns.clear()
    for address, conn in _fork_conns.items():
        conn.lock = threading.Lock()
        _conns[address] = conn
    _fork_conns.clear()
    _own = None  # the parent's service stays the parent's; a child starts its own
    _lock = threading.RLock()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
