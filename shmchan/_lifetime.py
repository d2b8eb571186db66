"""Client side of the lifetime service of unnamed queues (see :mod:`shmchan._reaper`).

**Holds.** Each process keeps one connection per service it uses, and counts its
handles per queue. Holds follow the handles: a handle registers when it is made
(created, unpickled, opened by name) and unregisters when it is closed; a process's
remaining holds vanish with its connection when it exits, however it dies.
``os.fork()`` is handled so that a child's inherited handles are held, from the fork
on, on a connection that only the child owns (the fork section below).

**Pickled copies.** A queue pickled while multiprocessing starts a spawn or
forkserver child (a ``Process`` argument) travels with a connection of its own to
the service, holding the queue, which multiprocessing hands to the child as an
inherited descriptor. The parent closes its copy as soon as the child exists; the
child drops that hold once it holds the queue itself. So the hold lasts exactly
while the parent may still start the child or the child may still unpickle it, and
the kernel, not a timer, ends it: a whole tree killed at once leaves nothing behind
(no PID is involved, so no PID reuse can fool it). A queue pickled any other way
(through another queue, to a pool's task pipe) carries a transfer token instead:
its hold lasts until the token is redeemed, or until a grace period after the
pickling process is gone (:data:`shmchan._reaper.TRANSFER_GRACE`).

**Services that die.** A service can be killed. Its queues must still open, by
name and by pickle, and still be removed once their last user is gone. So every
process that holds queues notices at once when one of its services hangs up: a
daemon thread (``shmchan-lifetime``) sleeps in ``poll()`` on the connections. It then
*re-homes* what this process held there: it adopts the holds (and recent transfer
tokens) on a live service, its own (started if needed), and points each queue's
header ``owner`` field at it by compare-and-set under the queue's write lock (a
lock the kernel releases if its holder dies). The first process to re-home a queue
picks the new service; the others find the field changed and adopt their holds
there. A process that finds a service dead while it opens or unpickles a queue does
the same for the hold it takes. At exit (atexit) a process re-homes what is still
registered with a dead service, so the last user's exit still removes the queue.
A service keeps an adopted queue at least :data:`shmchan._reaper.REHOME_GRACE`
seconds, so that no user that has not re-homed yet (it has milliseconds to do so)
sees its queue removed. A service is judged dead only when the kernel says so: its
socket hung up, nothing listens at its address, or a socket of another uid does (a
squatter; if that uid owns the queue, it is rather another user's live service, and
opening the queue raises PermissionError). One that is merely slow or stopped makes
requests fail with a timeout instead, so that a live service's holds are never
bypassed.

What remains impossible: if every user of a queue is SIGKILLed (or stopped) after
its service was killed and before it re-homed, nobody is left to remove the queue;
a later ``shmchan gc`` command will clean such leftovers. A queue in flight as a
transfer token when its service dies survives only while the process that pickled
it lives (it re-registers its most recent tokens).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import socket
import struct
import sys
import threading
import time
import weakref
from collections import Counter, OrderedDict
from multiprocessing import context as mp_context
from multiprocessing import reduction as mp_reduction
from typing import Any, Final

from . import _reaper

REPLY_TIMEOUT: Final = 10.0
"""Seconds to wait for a service's reply (or a free accept backlog) before OSError."""
LOCK_TIMEOUT: Final = 5.0
"""Seconds re-homing waits for a queue's write lock (held by a stopped process?)."""
_RECENT_TOKENS: Final = 4096
_MAX_CHILD_FDS: Final = 128  # forkserver passes at most 256 descriptors to a child

Key = tuple[str, str, str]  # (service address, backend, name)

_lock = threading.RLock()
_conns: dict[str, _Conn] = {}
_held: Counter[Key] = Counter()
_moved: dict[Key, str] = {}  # re-homed: (dead address, backend, name) -> new address, '' if gone
_tokens: OrderedDict[str, Key] = OrderedDict()  # transfer tokens this process issued lately
_passed: list[tuple[weakref.ref[Any], socket.socket]] = []  # our copies of handed-over connections
_stale: list[socket.socket] = []  # connections whose reply timed out: kept open, never used
_own: str | None = None  # the address of the service this process started
_wake: list[int] = []  # the watcher's wake-up pipe: [read end, write end]
_watcher: threading.Thread | None = None
_stopping = False  # set at exit: no more watcher


class ServiceGone(Exception):
    """Internal: the queue is no longer held by anyone."""


class ServiceDead(Exception):
    """Internal: the service at this address is gone: its socket hung up, nothing
    listens at its address, or another user's socket does."""


class _Foreign(ServiceDead):
    """The socket at the address runs as another uid: a squatter at a dead service's
    address, or the live service of another user's queue."""

    def __init__(self, address: str, uid: int) -> None:
        super().__init__(address)
        self.uid = uid


class _Refused(OSError):
    """The service answered ``error`` and closed the connection (it is full)."""


def unnamed_name(backend: str) -> str:
    """A fresh random name for an unnamed queue of ``backend`` (96 random bits)."""
    return _reaper.unnamed_name(backend, os.urandom(12).hex())


class _Conn:
    def __init__(self, address: str, sock: socket.socket | None = None) -> None:
        self.address = address
        self.sock = _connect(address) if sock is None else sock
        self.lock = threading.Lock()

    def request(self, *words: str) -> str:
        """Send one request and wait for its reply. Raises ServiceDead if the service
        is gone, OSError if it refuses or does not answer within REPLY_TIMEOUT."""
        with self.lock:
            try:
                self.sock.send("\t".join(words).encode())
                data = self.sock.recv(4096)
            except (BrokenPipeError, ConnectionResetError) as exc:
                data = b""
                with contextlib.suppress(OSError):  # a refusal it sent before closing?
                    data = self.sock.recv(4096, socket.MSG_DONTWAIT)
                if not data.startswith(b"error"):
                    raise ServiceDead(self.address) from exc
        if not data:
            raise ServiceDead(self.address)
        reply = data.decode("ascii", "replace")
        if reply.startswith("error"):
            why = f"the shmchan lifetime service {self.address} refused {words[0]!r}: {reply[6:]}"
            raise _Refused(why) if self.hung_up() else OSError(why)
        return reply

    def hung_up(self) -> bool:
        """Whether the service closed its end (without reading or waiting)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP)
        dead = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL
        return any(events & dead for _, events in poller.poll(0))


def _connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(REPLY_TIMEOUT)
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            try:
                sock.connect("\0" + address)
                break
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                raise ServiceDead(address) from exc
            except BlockingIOError:  # its accept backlog is full: alive, and busy
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the shmchan lifetime service {address} accepts nothing") from None
                time.sleep(0.001)
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.geteuid():
            raise _Foreign(address, uid)
    except BaseException:
        sock.close()
        raise
    return sock


def _conn(address: str) -> _Conn:
    conn = _conns.get(address)
    if conn is None:
        conn = _conns[address] = _Conn(address)
        _watch_changed()
    return conn


def _drop(address: str) -> None:
    conn = _conns.pop(address, None)
    if conn is not None:
        conn.sock.close()
        _watch_changed()


def _call(address: str, *words: str) -> str:
    """One request on this process's connection to ``address`` (made if needed)."""
    try:
        return _conn(address).request(*words)
    except (ServiceDead, _Refused):
        _drop(address)
        raise
    except TimeoutError:
        # Its late reply would answer our next request: never use it again. But keep
        # it open, for its holds: dropping them could remove queues still in use here.
        conn = _conns.pop(address, None)
        if conn is not None:
            _stale.append(conn.sock)
            _watch_changed()
        raise


def _resolve(address: str, backend: str, name: str) -> str:
    """Where this process's holds of a queue registered at ``address`` are now."""
    for _ in range(64):
        new = _moved.get((address, backend, name))
        if new is None:
            break
        address = new
    return address


@atexit.register
def _at_exit() -> None:
    # Re-home what is still registered with a dead service, so that this exit, if it
    # is the last user's, still removes the queue; then close every connection (exiting
    # closes them anyway; closing first keeps -X dev / ResourceWarning quiet).
    global _stopping
    with _lock:
        for address in {address for address, _, _ in _held if address}:
            with contextlib.suppress(Exception):
                try:
                    dead = _conn(address).hung_up()
                except ServiceDead:
                    dead = True
                if dead:
                    _service_died(address)
        # Stop the watcher now: a daemon thread frozen at finalization while it held
        # _lock would deadlock any handle's __del__ that runs after this.
        _stopping = True
        watcher = _watcher
        if _wake:
            with contextlib.suppress(OSError):
                os.write(_wake[1], b"\0")
    if watcher is not None:
        watcher.join(timeout=REPLY_TIMEOUT)
    with _lock:
        _held.clear()
        for address in list(_conns):
            _drop(address)
        for sock in [*(sock for _, sock in _passed), *_stale]:
            sock.close()
        _passed.clear()
        _stale.clear()


def _spawn_service() -> str:
    """Start a lifetime service for this process; return its address.

    The service imports this very package (its directory is passed explicitly, with
    this process's ``sys.path`` for its dependencies), so it works wherever this
    process found shmchan: vendored, in a plugin directory, or on a path added at
    run time. ``-I`` keeps the environment (PYTHONPATH, PYTHONSTARTUP, ...) out of it.
    The package's ``__init__`` is not run there (the service needs none of the public
    API), which keeps its start, and so the first unnamed queue, fast.
    """
    address = f"shmchan-reaper-{os.getpid()}-{os.urandom(8).hex()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        listener.bind("\0" + address)
        listener.listen(socket.SOMAXCONN)
        package = os.path.dirname(os.path.abspath(__file__))
        path = [os.path.abspath(entry) for entry in sys.path]
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-I", "-c", _BOOT, package, *path],
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
        _, status = os.waitpid(pid, 0)
    finally:
        listener.close()  # the service has its own copy
    if status != 0:
        raise OSError(f"the shmchan lifetime service did not start (wait status {status:#x})")
    return address


_BOOT: Final = """\
import sys, types
package = types.ModuleType("shmchan")
package.__path__ = [sys.argv[1]]
sys.path[:] = sys.argv[2:]
sys.modules["shmchan"] = package
from shmchan._reaper import main
main()
"""


def _own_service() -> str:
    global _own
    if _own is None:
        _own = _spawn_service()
    return _own


# -- holds --------------------------------------------------------------------------------


def create_hold(backend: str, name: str) -> str:
    """Take the creator's hold on a queue about to be created; return the service's
    address (to store in the queue's header)."""
    with _lock:
        _sweep_passed()
        for _ in range(3):
            address = _own_service()
            try:
                _call(address, "c", backend, name)
            except ServiceDead:
                _service_died(address)  # it was killed: start another
                continue
            _held[(address, backend, name)] += 1
            return address
        raise OSError("cannot reach the shmchan lifetime service")


def hold(address: str, backend: str, name: str) -> str:
    """Take one more hold for a handle in this process; return the address of the
    service that holds it (which is not ``address`` if that one died). ServiceGone
    if the queue was already released by everyone."""
    with _lock:
        address = _resolve(address, backend, name)
        for _ in range(8):
            if not address:
                break
            try:
                reply = _call(address, "+", backend, name)
            except ServiceDead as exc:
                if isinstance(exc, _Foreign) and exc.uid == _reaper.segment_uid(backend, name):
                    raise PermissionError(
                        f"queue {name!r} belongs to uid {exc.uid}, whose lifetime service serves "
                        "no other user (docs/security.md)"
                    ) from None
                _service_died(address)  # re-homes this process's own holds of it, if any
                moved = _resolve(address, backend, name)
                if moved != address:
                    address = moved
                    continue
                address = _adopt(address, backend, name, 1)  # this hold is its first here
                if address:
                    _held[(address, backend, name)] += 1
                    return address
                break
            if reply != "ok":
                break
            _held[(address, backend, name)] += 1
            return address
        raise ServiceGone(f"queue {name!r} has been released by every process")


def release(address: str, backend: str, name: str) -> None:
    """Drop one hold (a handle was closed); the last hold anywhere removes the queue."""
    with _lock:
        for _ in range(4):
            address = _resolve(address, backend, name)
            key = (address, backend, name)
            if not address or _held[key] <= 0:
                return
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
            try:
                _call(address, "-", backend, name)
                return
            except ServiceDead:
                _held[key] += 1  # still ours: re-home it with the others, release it there
                _service_died(address)
            except OSError:
                return  # stopped or refusing: at worst the queue lives until we exit


def transfer(address: str, backend: str, name: str) -> tuple[str, Any]:
    """A hold for a pickled copy of a queue this process holds. Returns the address
    to put in the pickle and what its receiver passes to :func:`redeem`: a
    connection handed to a spawn/forkserver child being started, a token, or ''."""
    with _lock:
        _sweep_passed()
        for _ in range(4):
            address = _resolve(address, backend, name)
            if not address:
                break
            try:
                return address, _handoff(address, backend, name)
            except ServiceDead:
                _service_died(address)
        return address, ""


def _handoff(address: str, backend: str, name: str) -> Any:
    popen = mp_context.get_spawning_popen()
    if popen is not None and len(getattr(popen, "_fds", ())) < _MAX_CHILD_FDS:
        conn = _Conn(address)
        try:
            if conn.request("+", backend, name) != "ok":
                conn.sock.close()
                return ""
            handoff = mp_reduction.DupFd(conn.sock.fileno())
        except BaseException:
            conn.sock.close()
            raise
        _passed.append((weakref.ref(popen), conn.sock))
        _watch_changed()  # the watcher closes our copy once the child exists
        return handoff
    token = os.urandom(12).hex()
    if _call(address, "t", backend, name, token) != "ok":
        return ""
    _tokens[token] = (address, backend, name)
    while len(_tokens) > _RECENT_TOKENS:
        _tokens.popitem(last=False)
    return token


def redeem(address: str, backend: str, name: str, handoff: Any) -> None:
    """Release the transfer hold of an unpickled copy (after this process took its own)."""
    if isinstance(handoff, str):
        if not handoff:
            return
        with _lock:
            address = _resolve(address, backend, name)
            if address:
                with contextlib.suppress(ServiceDead, OSError):
                    _call(address, "r", handoff)
        return
    # A connection multiprocessing passed to this child: drop its hold, close it.
    sock = socket.socket(fileno=handoff.detach())
    try:
        sock.settimeout(REPLY_TIMEOUT)
        with contextlib.suppress(ServiceDead, OSError):
            _Conn(address, sock).request("-", backend, name)
    finally:
        sock.close()


def _sweep_passed() -> None:
    """Close our copies of connections handed to children that now exist (the child
    has its own), or whose start failed (the Popen object is gone)."""
    keep = []
    for ref, sock in _passed:
        popen = ref()
        if popen is None or getattr(popen, "pid", None) is not None:
            sock.close()
        else:
            keep.append((ref, sock))
    _passed[:] = keep


# -- re-homing ------------------------------------------------------------------------------


def _service_died(address: str) -> None:
    """The service at ``address`` is gone: re-home every hold (and recent transfer
    token) this process has there. Called with ``_lock`` held."""
    global _own
    _drop(address)
    if _own == address:
        _own = None
    for key, count in [(k, c) for k, c in _held.items() if k[0] == address]:
        _, backend, name = key
        try:
            new = _adopt(address, backend, name, count)
        except Exception:  # noqa: BLE001, S112 - kept under the dead address: retried at next use or exit
            continue
        del _held[key]
        _moved[key] = new
        if new:
            _held[(new, backend, name)] += count
    for token, key in [(t, k) for t, k in _tokens.items() if k[0] == address]:
        del _tokens[token]
        _, backend, name = key
        with contextlib.suppress(Exception):
            _rehome_token(address, backend, name, token)


def _rehome_token(address: str, backend: str, name: str, token: str) -> None:
    new = _moved.get((address, backend, name))
    temporary = new is None  # this process no longer holds it: adopt one hold meanwhile
    if new is None:
        new = _moved[(address, backend, name)] = _adopt(address, backend, name, 1)
    if not new:
        return
    try:
        if _call(new, "t", backend, name, token) == "ok":
            _tokens[token] = (new, backend, name)
    finally:
        if temporary:
            _call(new, "-", backend, name)


def _adopt(dead: str, backend: str, name: str, count: int) -> str:
    """Register ``count`` holds of a queue whose service ``dead`` is gone on a live
    service, and make sure the queue's header names that service. Returns its address,
    or '' if the queue no longer exists."""
    expected = dead
    for _ in range(8):
        current = _reaper.segment_owner(backend, name)
        if not isinstance(current, str) or not current:
            return ""  # removed (or no longer an unnamed queue)
        if current != expected:
            try:  # another process re-homed it first: join it there
                _call(current, "a", backend, name, str(count))
                return current
            except ServiceDead:
                expected = current  # that service died too
                continue
        target = _own_service()
        try:
            _call(target, "a", backend, name, str(count))
        except ServiceDead:
            _service_died(target)
            continue
        try:
            now = _reaper.swap_owner(backend, name, expected, target, LOCK_TIMEOUT)
        except BaseException:
            _call(target, "-", backend, name, str(count))
            raise
        if now == target:
            return target
        _call(target, "-", backend, name, str(count))  # lost the race: give them back
        if now is None:
            return ""
    raise OSError(f"could not re-home queue {name!r}: its lifetime services keep dying")


# -- the watcher ------------------------------------------------------------------------------


def _watch_changed() -> None:
    """The set of connections changed: make sure the watcher runs and looks again."""
    global _watcher
    if _stopping:
        return
    if not _wake:
        _wake.extend(os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK))
    if _watcher is None or not _watcher.is_alive():
        _watcher = threading.Thread(target=_watch, name="shmchan-lifetime", daemon=True)
        try:
            _watcher.start()
        except RuntimeError:  # interpreter shutdown: the at-exit pass does the work
            _watcher = None
    with contextlib.suppress(BlockingIOError):
        os.write(_wake[1], b"\0")


def _watch() -> None:
    """Sleep until a service hangs up (re-home what we held there) or until one of our
    spawning children exists (close our copy of the connection it inherited)."""
    while not _stopping:
        try:
            with _lock:
                watched = {conn.sock.fileno(): address for address, conn in _conns.items()}
                wake = _wake[0]
                timeout = 10 if _passed else None
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            for fd in watched:
                poller.register(fd, select.POLLRDHUP)
            events = poller.poll(timeout)
            with contextlib.suppress(BlockingIOError):
                os.read(wake, 4096)
            if _stopping:
                return
            with _lock:
                for fd, _ in events:
                    address = watched.get(fd)
                    conn = _conns.get(address) if address else None
                    if address and conn is not None and conn.sock.fileno() == fd and conn.hung_up():
                        _service_died(address)
                _sweep_passed()
        except Exception:  # noqa: BLE001 - never die: retry after a pause
            time.sleep(0.05)


# -- fork ------------------------------------------------------------------------------
#
# A forked child inherits its parent's handles, so it must hold their queues from its
# first instant: if the parent closed its handle at once, nothing else would keep the
# queue alive for the child. Before the fork, the parent opens one new connection per
# service and takes on it as many holds per queue as it has handles; after the fork the
# parent closes its copy of those connections and the child adopts them as its own. A
# hold is thus always owned by the process whose death drops it: a child killed at any
# instant after the fork (even before it ran a line of Python) takes its holds with it.

_fork_conns: dict[str, _Conn] = {}


def _before_fork() -> None:
    _lock.acquire()
    with contextlib.suppress(Exception):  # a dead service: re-home first, for the child
        for address, conn in list(_conns.items()):
            if conn.hung_up():
                _service_died(address)
    for address in {address for address, _, _ in _held if address}:
        try:
            conn = _Conn(address)
        except (ServiceDead, OSError):
            continue  # its holds are re-homed at the child's next use or exit
        try:
            for (addr, backend, name), count in _held.items():
                if addr == address:
                    conn.request("+", backend, name, str(count))
        except (ServiceDead, OSError):
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
    global _lock, _own, _watcher
    for conn in _conns.values():
        conn.sock.close()  # the parent's connections stay open in the parent
    _conns.clear()
    for address, conn in _fork_conns.items():
        conn.lock = threading.Lock()
        _conns[address] = conn
    _fork_conns.clear()
    for sock in [*(sock for _, sock in _passed), *_stale]:
        sock.close()  # the parent's hand-overs to its spawning children, its stale ones
    _passed.clear()
    _stale.clear()
    _tokens.clear()  # the parent's to re-home, not ours
    _own = None  # the parent's service stays the parent's; a child starts its own
    for fd in _wake:
        os.close(fd)
    _wake.clear()
    _watcher = None
    _lock = threading.RLock()
    if _conns:
        _watch_changed()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
