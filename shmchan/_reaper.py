"""The lifetime service of unnamed queues (internal; started by :mod:`shmchan._lifetime`).

A process that creates an unnamed queue starts one of these (docs/layout.md section
12). It runs in its own session and, after a double fork, is nobody's descendant, so
killing the creator's whole process tree does not kill it. Every Python process that
uses one of its queues keeps a connection to it and registers each handle. The
kernel closes a process's connections when it exits, however it dies; when nothing
holds a queue any more, the service removes it. It exits once it holds nothing and
nobody is connected.

Whom it obeys (docs/security.md):

* only peers running as its own (effective) uid, as the kernel reports them
  (``SO_PEERCRED``); any other connection is closed at once, without a word. Its
  address is an abstract unix socket, which anyone can see in /proc/net/unix and
  connect to, so this check is the only gate;
* it removes only queues it registered itself (``c`` and ``a`` requests), only
  names shaped like an unnamed queue's (:func:`is_unnamed`), and only after reading
  the segment's header through the backend's validating open: a published shmchan
  segment whose ``owner`` field is this service's own address (or a segment its
  creator never published, for a ``c`` registration). A path is never unlinked on
  the strength of a request alone;
* a connection may hold at most :data:`MAX_HOLDS` holds and transfer holds;
* it never blocks on a client: every socket is non-blocking, replies a client does
  not read wait in a queue of at most :data:`MAX_UNREAD`, and a client that lets
  more pile up is disconnected (its holds drop as if it had exited).

Wire protocol: one ``SOCK_SEQPACKET`` datagram per request, tab-separated ASCII;
one reply each: ``ok``, ``gone``, or ``error <why>``.

=========================  ==========================================================
``c backend name``         the creator's first hold (made before the queue exists)
``a backend name n``       ``n`` holds on a queue whose previous service died
                           (re-homing, :mod:`shmchan._lifetime`); the queue is then
                           kept at least :data:`REHOME_GRACE` seconds
``+ backend name [n]``     one (``n``) more hold(s), on this connection (``gone`` if
                           none is left)
``- backend name [n]``     drop one (``n``) hold(s) of this connection; the last one
                           anywhere removes the queue
``t backend name tok``     a transfer hold for a pickled copy, kept until redeemed, or
                           until :data:`TRANSFER_GRACE` seconds after the connection
                           that took it is gone
``r tok``                  redeem a transfer hold
``?``                      diagnostics: a one-line summary
=========================  ==========================================================
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import selectors
import socket
import struct
import time
from collections import Counter, deque
from typing import Final

TRANSFER_GRACE: Final = 5.0
"""A transfer hold lasts while the process that pickled the queue is connected, and
this many seconds after it is gone (time for a receiver to unpickle it)."""
REHOME_GRACE: Final = 1.0
"""A queue adopted from a dead service is not removed before this many seconds have
passed since its last adoption, so that every live user re-homes its holds first."""
IDLE_EXIT: Final = 30.0
"""Exit after this long with nothing held and nobody connected (or never contacted)."""
MAX_HOLDS: Final = 1 << 14
"""Holds plus transfer holds one connection may have at once."""
MAX_UNREAD: Final = 32
"""Replies a client may leave unread beyond what the kernel buffers; one more and it
is disconnected. (shmchan's own clients wait for each reply before the next request.)"""
MAX_CLIENTS: Final = 4096
"""Connections served at once; more are answered ``error`` and closed."""

UNNAMED_DIRS: Final = ("/dev/shm", "/tmp")
"""Where unnamed queues of the mmap backend live."""
_UNNAMED: Final = re.compile(r"shmchan-q-[0-9a-f]{24}")
_BACKENDS: Final = ("posix", "sysv", "mmap")
_PKG: Final = os.path.dirname(os.path.abspath(__file__))

Key = tuple[str, str]  # (backend, name)


class _Unpublished:
    """The owner of a segment whose creator has not stored its magic (see
    :func:`segment_owner`)."""

    def __repr__(self) -> str:
        return "UNPUBLISHED"


UNPUBLISHED: Final = _Unpublished()


def unnamed_name(backend: str, token: str) -> str:
    """The name of an unnamed queue of ``backend`` made from ``token`` (24 hex digits)."""
    base = f"shmchan-q-{token}"
    if backend == "mmap":
        return os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp", base)
    return "/" + base


def is_unnamed(backend: str, name: str) -> bool:
    """Whether ``name`` has the exact shape :func:`unnamed_name` gives (normalised):
    the only names the service registers, and therefore the only ones it removes."""
    if backend in ("posix", "sysv"):
        return name[:1] == "/" and _UNNAMED.fullmatch(name[1:]) is not None
    if backend == "mmap":
        directory, base = os.path.split(name)
        return directory in UNNAMED_DIRS and _UNNAMED.fullmatch(base) is not None
    return False


# -- reading and writing the owner field ------------------------------------------------
#
# The only places that touch a segment on the lifetime service's behalf. They go through
# the backend's public open (which validates the header) so that they can be re-pointed
# at the layout-2 API in one place.


def segment_owner(backend: str, name: str) -> str | _Unpublished | None:
    """The ``owner`` field of segment ``name``, read after the validating open (which
    also refuses a segment another user owns or may write): a service address, ``''``
    for a named channel, :data:`UNPUBLISHED` if the segment exists but its creator never
    stored its magic, or None if there is no such segment or it is not a valid shmchan
    segment (then nothing may remove it). Never raises; never waits."""
    from . import _core
    from ._errors import InitializationTimeout
    from ._queue import read_owner

    try:
        core = _core.attach(backend, name, 0.0)
    except InitializationTimeout:
        return UNPUBLISHED
    except Exception:  # noqa: BLE001 - missing, foreign or damaged: nothing to remove
        return None
    try:
        return read_owner(core.raw(0, 4096))
    finally:
        core.close()


def segment_uid(backend: str, name: str) -> int | None:
    """The uid owning segment ``name`` (its creator's), or None if there is none."""
    try:
        if backend == "sysv":
            from ._backends.sysv import sysv_key

            key = str(sysv_key(name, "shm"))
            with open("/proc/sysvipc/shm") as f:
                for line in f.read().splitlines()[1:]:
                    fields = line.split()
                    if fields and fields[0] == key:
                        return int(fields[7])  # key shmid perms size cpid lpid nattch uid ...
            return None
        path = name if backend == "mmap" else "/dev/shm/" + name.lstrip("/")
        return os.stat(path, follow_symlinks=False).st_uid
    except (OSError, ValueError):
        return None


def swap_owner(backend: str, name: str, expected: str, new: str, timeout: float) -> str | None:
    """Compare-and-set the ``owner`` field of segment ``name``: under the segment's
    write lock, if it reads ``expected``, write ``new``. Return the owner in place
    afterwards (``new`` if the swap happened), or None if the segment is gone.

    The write lock is taken over from a holder that dies, so two processes re-homing
    the same queue at once agree on one winner, and a process killed in the middle
    never blocks the others. Raises TimeoutError if the lock is not free within
    ``timeout`` seconds (its holder is stopped)."""
    from . import _core
    from ._backends._base import DEFAULT_OPEN_TIMEOUT
    from ._queue import read_owner

    try:
        core = _core.attach(backend, name, DEFAULT_OPEN_TIMEOUT)
    except Exception:  # noqa: BLE001 - gone, or no longer a queue we can use
        return None
    try:
        field = core.swap_owner(expected.encode("ascii"), new.encode("ascii"), _core.deadline_after(timeout))
        return read_owner(field)
    finally:
        core.close()


def remove(backend: str, name: str) -> None:
    """Remove a queue's name, semaphores and side segments; never raise."""
    from ._backends import get_backend

    with contextlib.suppress(Exception):  # gone already, or unremovable: nothing to do
        get_backend(backend).remove(name)


# -- the service -------------------------------------------------------------------------


class _Client:
    """One accepted connection: the holds it has, and replies it has not read yet."""

    __slots__ = ("holds", "out", "sock", "taken", "tokens")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.holds: Counter[Key] = Counter()
        self.tokens: set[str] = set()  # its transfer holds not redeemed yet
        self.taken = 0  # holds plus transfer holds, against MAX_HOLDS
        self.out: deque[bytes] = deque()


class Reaper:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        listener.setblocking(False)
        raw = listener.getsockname()
        self.address = (raw if isinstance(raw, str) else raw.decode("ascii")).lstrip("\0")
        self.uid = os.geteuid()
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ)
        self.listening = True
        self.accept_again = 0.0
        self.clients: dict[socket.socket, _Client] = {}
        self.totals: Counter[Key] = Counter()
        self.created: set[Key] = set()  # registered by `c`: may be removed unpublished
        self.transfers: dict[str, tuple[Key, _Client | None]] = {}
        self.orphans: dict[str, float] = {}  # transfers whose taker is gone: expiry
        self.grace: dict[Key, float] = {}  # adopted queues: not removed before then
        self.doomed: dict[Key, float] = {}  # nothing holds them; removed at that time
        self.idle_since = time.monotonic()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.max_clients = max(1, min(MAX_CLIENTS, soft - 16))

    def run(self) -> None:
        while True:
            now = time.monotonic()
            self.expire(now)
            if self.clients or self.totals or self.transfers or self.doomed:
                self.idle_since = now
            elif now - self.idle_since > IDLE_EXIT:
                return
            if not self.listening and now >= self.accept_again:
                self.sel.register(self.listener, selectors.EVENT_READ)
                self.listening = True
            for key, mask in self.sel.select(timeout=self.next_timeout(now)):
                sock = key.fileobj
                if sock is self.listener:
                    self.accept()
                    continue
                assert isinstance(sock, socket.socket)
                client = self.clients.get(sock)
                if client is not None and mask & selectors.EVENT_WRITE:
                    self.flush(client)
                if sock in self.clients and mask & selectors.EVENT_READ:
                    self.serve(self.clients[sock])

    def next_timeout(self, now: float) -> float:
        deadlines = [*self.orphans.values(), *self.doomed.values()]
        if not self.listening:
            deadlines.append(self.accept_again)
        return max(0.0, min([now + 1.0, *deadlines]) - now)

    # -- connections ------------------------------------------------------------------------

    def accept(self) -> None:
        for _ in range(64):  # then serve the others; the rest wait for the next turn
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    self.sel.unregister(self.listener)
                    self.listening = False
                    self.accept_again = time.monotonic() + 0.1
                return
            if self.admit(conn):
                conn.setblocking(False)
                self.clients[conn] = _Client(conn)
                self.sel.register(conn, selectors.EVENT_READ)
            else:
                conn.close()

    def admit(self, conn: socket.socket) -> bool:
        try:
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            return False
        if uid != self.uid:
            return False  # another user: closed without a word
        if len(self.clients) >= self.max_clients:
            with contextlib.suppress(OSError):
                conn.send(b"error too many connections", socket.MSG_DONTWAIT)
            return False
        return True

    def serve(self, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the peer process closed it or died: drop its holds
            self.disconnect(client)
            return
        if data[:1] == b"-":
            # A release may be the last: first absorb connections that have already
            # hung up (processes that exited), so the answer, and the removal, happen
            # before the releasing process goes on.
            self.absorb_hangups(client)
        try:
            reply = self.handle(client, data.decode("ascii").split("\t"))
        except (IndexError, ValueError):  # UnicodeDecodeError is a ValueError
            reply = "error malformed request"  # never take the service down
        self.reply(client, reply)

    def reply(self, client: _Client, text: str) -> None:
        data = text.encode()
        if not client.out:
            try:
                client.sock.send(data, socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                pass
            except OSError:
                self.disconnect(client)
                return
        client.out.append(data)
        if len(client.out) > MAX_UNREAD:
            self.disconnect(client)  # it does not read its replies: it must not stall us
        elif len(client.out) == 1:
            self.sel.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def flush(self, client: _Client) -> None:
        while client.out:
            try:
                client.sock.send(client.out[0], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self.disconnect(client)
                return
            client.out.popleft()
        self.sel.modify(client.sock, selectors.EVENT_READ)

    def disconnect(self, client: _Client) -> None:
        if self.clients.pop(client.sock, None) is None:
            return
        self.sel.unregister(client.sock)
        client.sock.close()
        expiry = time.monotonic() + TRANSFER_GRACE
        for token in client.tokens:
            self.transfers[token] = (self.transfers[token][0], None)
            self.orphans[token] = expiry
        for key, n in client.holds.items():
            self.drop(key, n)

    def absorb_hangups(self, current: _Client) -> None:
        for key, _ in self.sel.select(timeout=0):
            client = self.clients.get(key.fileobj)  # type: ignore[call-overload]
            if client is None or client is current:
                continue
            try:
                hung_up = client.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                hung_up = False
            except OSError:
                hung_up = True
            if hung_up:
                self.disconnect(client)

    # -- requests ---------------------------------------------------------------------------

    def handle(self, client: _Client, words: list[str]) -> str:
        op = words[0]
        if op == "?":
            return (
                f"pid={os.getpid()} address={self.address} pkg={_PKG} clients={len(self.clients)} "
                f"queues={len(self.totals)} holds={sum(self.totals.values())} "
                f"transfers={len(self.transfers)} doomed={len(self.doomed)}"
            )
        if op == "r":
            entry = self.transfers.pop(words[1], None)
            if entry is not None:
                key, owner = entry
                self.orphans.pop(words[1], None)
                if owner is not None:
                    owner.taken -= 1
                    owner.tokens.discard(words[1])
                self.drop(key, 1)
            return "ok"
        key = (words[1], words[2])
        if key[0] not in _BACKENDS:
            return "error unknown backend"
        if op == "-":
            n = min(int(words[3]) if len(words) > 3 else 1, client.holds[key])
            if n > 0:
                client.holds[key] -= n
                if not client.holds[key]:
                    del client.holds[key]
                client.taken -= n
                self.drop(key, n)
            return "ok"
        n = int(words[3]) if op in ("a", "+") and len(words) > 3 else 1
        if not 1 <= n <= MAX_HOLDS - client.taken:
            return "error too many holds on one connection"
        if op in ("c", "a"):
            if not is_unnamed(*key):
                return "error not the name of an unnamed queue"
            if op == "c":
                self.created.add(key)
            else:
                self.grace[key] = max(self.grace.get(key, 0.0), time.monotonic() + REHOME_GRACE)
        elif op in ("+", "t"):
            if self.totals[key] <= 0 and key not in self.doomed:
                return "gone"
            if op == "t":
                if words[3] in self.transfers:
                    return "error duplicate token"
                self.transfers[words[3]] = (key, client)
                client.tokens.add(words[3])
                client.taken += 1
                self.take(key, 1)
                return "ok"
        else:
            return "error unknown request"
        client.holds[key] += n
        client.taken += n
        self.take(key, n)
        return "ok"

    def take(self, key: Key, n: int) -> None:
        self.totals[key] += n
        self.doomed.pop(key, None)

    def drop(self, key: Key, n: int) -> None:
        self.totals[key] -= n
        if self.totals[key] > 0:
            return
        del self.totals[key]
        until = self.grace.get(key, 0.0)
        if until > time.monotonic():
            self.doomed[key] = until
        else:
            self.remove(key)

    def expire(self, now: float) -> None:
        for token, expiry in list(self.orphans.items()):
            if expiry < now:
                del self.orphans[token]
                key, _ = self.transfers.pop(token)
                self.drop(key, 1)
        for key, until in list(self.doomed.items()):
            if until <= now:
                del self.doomed[key]
                self.remove(key)

    def remove(self, key: Key) -> None:
        """Remove a queue nothing holds any more, if it is still this service's."""
        self.grace.pop(key, None)
        created = key in self.created
        self.created.discard(key)
        owner = segment_owner(*key)
        if owner == self.address or (owner is UNPUBLISHED and created):
            remove(*key)


def run_forever(listener: socket.socket) -> None:
    """Serve until idle. Whatever goes wrong in one request must not end the service:
    every queue it holds would leak."""
    reaper = Reaper(listener)
    while True:
        try:
            reaper.run()
            return
        except Exception:  # noqa: BLE001, S112 - resume with the state as it is: stdout is /dev/null
            continue


def main() -> None:
    # Started by posix_spawn in a new session with the listening socket as fd 3 and
    # /dev/null as 0-2. Close whatever else the creator let us inherit (a pipe kept
    # open here would keep its reader waiting for EOF), and do not pin its cwd.
    os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.chdir("/")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, MAX_CLIENTS + 64)), hard))
    # Fork once more so that we are not a descendant of the creator: killing its
    # process tree must not take the service that cleans up after it.
    if os.fork() != 0:
        os._exit(0)
    listener = socket.socket(fileno=3)
    try:
        run_forever(listener)
    finally:
        listener.close()


if __name__ == "__main__":
    main()
