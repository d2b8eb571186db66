"""The sync side of the connection: URLs, one server per URL and process, errors, leases.

Commands go through :class:`Server`, which keeps a small pool of redis-py connections
and waits for every reply with a bound: the caller's deadline plus
:data:`REPLY_GRACE`, or :data:`REPLY_TIMEOUT` when the caller has no deadline, plus
however long the command itself may block on the server. A server that stops
answering therefore raises :class:`~shmchan.RemoteTimeout` instead of hanging, and
the connection it left in an unknown state is dropped. Commands are never retried
after they were sent (a retried "take" could lose a record, a retried "put" could
queue it twice); a pooled connection the server had closed (after a restart, say)
is noticed before anything is sent on it, and replaced.

:class:`Renewer` is the process's one lease thread: it renews the leases of every
live handle (writers, readers, holders of unnamed queues) and keeps the records a
consumer holds from being handed to others, on the server's clock.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.backoff
import redis.connection
import redis.exceptions
import redis.retry

from .._errors import (
    BadURL,
    ChannelNotFound,
    NoSpace,
    NotAShmchanSegment,
    RemoteAuthFailed,
    RemoteError,
    RemoteTimeout,
    RemoteUnavailable,
)
from . import URL_ENV
from . import _scripts as L

REPLY_GRACE: Final = 1.0
"""Seconds a reply may take beyond the caller's deadline before the call raises
RemoteTimeout (a non-blocking call, ``timeout=0``, waits this long for its reply)."""

REPLY_TIMEOUT: Final = 5.0
"""Seconds a call without a deadline waits for a reply (beyond the time the command
blocks on the server by design) before it raises RemoteTimeout."""

CONNECT_TIMEOUT: Final = 5.0
"""The longest a connection attempt may take (less if the caller's deadline is nearer)."""

SLICE: Final = 0.5
"""The longest a blocking command (BLPOP) waits on the server at a time. Between
slices a waiter re-checks: records to reclaim, the end of a stream, its deadline.
Ctrl-C interrupts a sync slice at once (the hint it may lose is only a hint); an
async one is ended early by a push onto a private list (see _async.sleep_on)."""

MIN_SERVER: Final = {"redis": (7, 0), "valkey": (7, 2)}
"""The oldest servers whose commands the scripts use (XAUTOCLAIM's 7.0 reply,
PEXPIRE GT, PEXPIRETIME)."""


def resolve_url(url: str | None) -> str:
    """``url``, or ``$SHMCHAN_REDIS_URL`` when it is None; BadURL if neither is usable."""
    if url is None:
        url = os.environ.get(URL_ENV) or None
        if url is None:
            raise BadURL(f"backend='redis' needs url='redis://host:port/db' (or ${URL_ENV} set)")
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    try:
        kwargs = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        port = urlsplit(url).port  # raises ValueError for a malformed port
    except ValueError as exc:
        raise BadURL(f"unusable redis URL {redact(url)!r}: {exc}") from None
    if url.lower().startswith(("redis://", "rediss://")) and not kwargs.get("host"):
        raise BadURL(f"unusable redis URL {redact(url)!r}: no host")
    if url.lower().startswith("unix://") and not kwargs.get("path"):
        raise BadURL(f"unusable redis URL {redact(url)!r}: no socket path")
    db = kwargs.get("db", 0)
    if not isinstance(db, int) or db < 0 or (port is not None and not 0 < port < 65536):
        raise BadURL(f"unusable redis URL {redact(url)!r}: bad port or database number")
    return url


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def reply_wait(deadline: float | None, blocks: float = 0.0) -> float:
    """How long to wait for the reply of a command that blocks ``blocks`` seconds on
    the server, for a caller whose deadline is ``deadline``."""
    if deadline is None:
        return blocks + REPLY_TIMEOUT
    return min(blocks + REPLY_TIMEOUT, max(0.0, deadline - time.monotonic()) + REPLY_GRACE)


def translate(exc: BaseException, url: str) -> BaseException:
    """The shmchan exception for a redis-py (or socket) error met talking to ``url``."""
    where = redact(url)
    if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError):
        return RemoteAuthFailed(f"redis server {where} refused the credentials: {exc}")
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return RemoteAuthFailed(f"redis server {where} denied a command to this user: {exc}")
    if isinstance(exc, redis.exceptions.TimeoutError | socket.timeout):
        return RemoteTimeout(f"redis server {where} did not answer in time: {exc}")
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return RemoteUnavailable(f"redis server {where} is loading its data: {exc}")
    if isinstance(exc, redis.exceptions.ConnectionError | OSError):
        return RemoteUnavailable(f"cannot reach redis server {where}: {exc}")
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return NoSpace(f"redis server {where} is out of memory (maxmemory): {exc}")
    if isinstance(exc, redis.exceptions.ResponseError):
        text = str(exc)
        if text.startswith(("NOAUTH", "WRONGPASS")):
            return RemoteAuthFailed(f"redis server {where} refused the credentials: {exc}")
        if text.startswith("NOGROUP"):
            return ChannelNotFound(f"queue or channel data is gone from redis server {where}: {exc}")
        if text.startswith("WRONGTYPE"):
            return NotAShmchanSegment(f"a key on redis server {where} is not shmchan's: {exc}")
        return RemoteError(f"redis server {where} failed a command: {exc}")
    return exc


_raw_signal: Callable[[int, Any], Any] = getattr(importlib.import_module("_signal"), "signal", signal.signal)
"""signal.signal without its enum conversions (a tenth of the cost, on every take)."""


class no_interrupt:
    """Hold Ctrl-C back (on the main thread) while a command that takes records runs:
    the records are the caller's once the server has answered, and an interrupt
    between the server's work and the reply would lose them. The interrupt is
    delivered right after (to the handler that was in place)."""

    __slots__ = ("caught", "old")

    def __enter__(self) -> None:
        self.old: Any = None
        self.caught: tuple[int, Any] | None = None
        if threading.current_thread() is threading.main_thread():
            try:
                self.old = _raw_signal(signal.SIGINT, self._catch)
            except ValueError:  # not the main interpreter
                self.old = None

    def _catch(self, signum: int, frame: Any) -> None:
        self.caught = (signum, frame)

    def __exit__(self, *exc: object) -> None:
        if self.old is None:
            return
        _raw_signal(signal.SIGINT, self.old)
        if self.caught is not None:
            if callable(self.old):
                self.old(*self.caught)
            elif self.old == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


class Server:
    """One redis server (one URL) as seen by this process: pooled connections, the
    server's version, and calls bounded in time. Thread-safe; after ``os.fork()`` the
    child opens connections of its own (it never touches the parent's sockets)."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        self._class: Any = kwargs.pop("connection_class", redis.connection.Connection)
        kwargs.update(
            socket_keepalive=True,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            client_name="shmchan",
        )
        self._kwargs = kwargs
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.version: tuple[str, tuple[int, ...]] | None = None

    # -- connections --------------------------------------------------------------------

    def _acquire(self, deadline: float | None) -> Any:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's sockets are not ours
                self._idle = []
                self._pid = os.getpid()
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            if not _readable(conn, 0.0):
                return conn
            conn.disconnect()  # the server closed it (or sent something unasked): replace it
        # The connection attempt and its handshake (HELLO, AUTH, SELECT) are bounded by
        # the caller's deadline too; so are later reads of a reply that started to arrive.
        left = CONNECT_TIMEOUT if deadline is None else max(0.0, deadline - time.monotonic()) + REPLY_GRACE
        conn = self._class(
            **self._kwargs,
            socket_connect_timeout=min(CONNECT_TIMEOUT, left),
            socket_timeout=min(REPLY_TIMEOUT, left),
        )
        try:
            conn.connect()
            if self.version is None:
                self.version = self._check_version(conn)
        except BaseException as exc:
            conn.disconnect()
            raise translate(exc, self.url) from exc
        return conn

    def _release(self, conn: Any) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._idle.append(conn)

    def _check_version(self, conn: Any) -> tuple[str, tuple[int, ...]]:
        conn.send_command("INFO", "server")
        info = conn.read_response()
        if isinstance(info, bytes):
            info = info.decode("utf-8", "replace")
        fields = dict(line.split(":", 1) for line in str(info).splitlines() if ":" in line)
        kind = "valkey" if "valkey_version" in fields else "redis"
        text = fields.get(f"{kind}_version", "0")
        version = tuple(int(x) for x in text.split(".")[:2] if x.isdigit())
        if version < MIN_SERVER[kind]:
            floor = " or ".join(f"{k.capitalize()} >= {'.'.join(map(str, v))}" for k, v in MIN_SERVER.items())
            raise RemoteError(f"redis server {redact(self.url)} runs {kind} {text}; shmchan needs {floor}")
        return kind, version

    # -- commands -------------------------------------------------------------------------

    def call(self, wait: float, *args: Any, deadline: float | None = None) -> Any:
        """Send one command and return its reply, waiting at most ``wait`` seconds for
        it; ``deadline`` bounds the connection attempt if one is needed."""
        conn = self._acquire(deadline)
        try:
            conn.send_packed_command(_pack(conn, args), check_health=False)
            if not _readable(conn, wait):
                raise RemoteTimeout(f"redis server {redact(self.url)} did not answer within {wait:.3g} s")
            reply = conn.read_response()
        except redis.exceptions.ResponseError as exc:
            self._release(conn)  # an error reply leaves the connection in order
            raise translate(exc, self.url) from exc
        except BaseException as exc:
            conn.disconnect()
            raise translate(exc, self.url) from exc
        self._release(conn)
        return reply

    def take_or_wait(
        self,
        keys: list[str],
        args: list[Any],
        seconds: float,
        deadline: float | None,
        keep: Callable[[list[Any]], None],
    ) -> Any:
        """Take, waiting up to ``seconds`` if there is nothing, in one round trip: the
        pipeline TAKE 'first', BLPOP (the caller's wake list ``keys[8]``, then the items
        hints), TAKE 'second' (the TAKE script says how the three fit together). Returns
        the TAKE reply that answered ([0] if neither took anything). ``keep(reply)``
        runs as soon as a TAKE reply is read, with Ctrl-C held back; a Ctrl-C while the
        BLPOP sleeps pushes the wake list (so 'second' takes nothing), the replies are
        read, and then it is raised."""
        conn = self._acquire(deadline)
        take = ("EVALSHA", L.SHA["take"], len(keys), *keys, *args)
        pending = 0
        interrupted = False

        def read(wait: float) -> Any:
            nonlocal pending
            if not _readable(conn, wait):
                raise RemoteTimeout(f"redis server {redact(self.url)} did not answer in time")
            try:
                return conn.read_response()
            finally:
                pending -= 1

        try:
            with no_interrupt():
                packed = _pack(conn, (*take, "first"))
                packed += _pack(conn, ("BLPOP", keys[8], keys[2], f"{seconds:.3f}"))
                packed += _pack(conn, (*take, "second"))
                conn.send_packed_command(packed, check_health=False)
                pending = 3
                first = read(reply_wait(deadline))
                keep(first)
                if first[0] != 0:  # answered: the BLPOP returns at once, 'second' skips
                    read(reply_wait(deadline))
                    read(reply_wait(deadline))
                    self._release(conn)
                    return first
            try:
                if not _readable(conn, reply_wait(deadline, seconds)):
                    raise RemoteTimeout(f"redis server {redact(self.url)} did not answer in time")
            except KeyboardInterrupt:
                interrupted = True
                with no_interrupt(), contextlib.suppress(RemoteError, OSError):
                    self.script("wake", [keys[8]], [10_000], REPLY_GRACE, deadline)
            with no_interrupt():
                read(reply_wait(deadline))
                second = read(reply_wait(deadline))
                keep(second)
        except redis.exceptions.ResponseError as exc:
            if pending:  # replies are still due: the connection is out of step
                conn.disconnect()
            else:
                self._release(conn)
            if isinstance(exc, redis.exceptions.NoScriptError):
                self.call(REPLY_TIMEOUT, "SCRIPT", "LOAD", L.ALL["take"], deadline=deadline)
                self.call(REPLY_TIMEOUT, "SCRIPT", "LOAD", L.ALL["wake"], deadline=deadline)
                return [0]  # nothing taken: the caller tries again
            raise translate(exc, self.url) from exc
        except BaseException as exc:
            conn.disconnect()
            raise translate(exc, self.url) from exc
        self._release(conn)
        if interrupted:
            raise KeyboardInterrupt
        return [0] if second[0] == L.SKIP else second

    def script(self, name: str, keys: list[str], args: list[Any], wait: float, deadline: float | None) -> Any:
        """Run script ``name`` (loading it first if the server does not know it: a
        restarted server has forgotten every script)."""
        try:
            return self.call(wait, "EVALSHA", L.SHA[name], len(keys), *keys, *args, deadline=deadline)
        except RemoteError as exc:
            if not isinstance(exc.__cause__, redis.exceptions.NoScriptError):
                raise
        self.call(wait, "SCRIPT", "LOAD", L.ALL[name], deadline=deadline)
        return self.call(wait, "EVALSHA", L.SHA[name], len(keys), *keys, *args, deadline=deadline)


def _pack(conn: Any, args: tuple[Any, ...]) -> Any:
    """The command as bytes: hiredis packs bytes, str and int arguments in one C call;
    anything else (memoryviews of large payloads) goes through redis-py, which sends
    them without copying."""
    if _hiredis_pack is not None:
        try:
            return [_hiredis_pack(args)]
        except TypeError:
            pass
    return conn.pack_command(*args)


def _readable(conn: Any, timeout: float) -> bool:
    """Whether ``conn`` has something to read within ``timeout`` seconds: a reply already
    in its parser's buffer, data on its socket, or the server's EOF (the read that
    follows reports that). redis-py checks its buffer, then polls the socket."""
    try:
        return bool(conn.can_read(timeout=timeout))
    except (redis.exceptions.ConnectionError, OSError):
        return True


_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py packs in Python then
    _hiredis_pack = None


_servers: dict[str, Server] = {}
_servers_lock = threading.Lock()


def server(url: str) -> Server:
    """The process's :class:`Server` for ``url`` (made on first use)."""
    try:
        return _servers[url]
    except KeyError:
        pass
    with _servers_lock:
        srv = _servers.get(url)
        if srv is None:
            srv = _servers[url] = Server(url)
        return srv


# -- leases ---------------------------------------------------------------------------------


class Leased(Protocol):
    """A core with leases to renew: :meth:`renew` is called about every
    :attr:`renew_every` seconds from the lease thread, and must not raise."""

    renew_every: float

    def renew(self) -> None: ...


class Renewer:
    """The process's lease thread (a daemon, so it never delays exit). It holds its
    handles weakly: a handle dropped without ``close()`` stops being renewed, and its
    leases run out on the server as if its process had died."""

    def __init__(self) -> None:
        self._handles: weakref.WeakSet[Any] = weakref.WeakSet()
        self._due: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, handle: Leased) -> None:
        with self._lock:
            self._handles.add(handle)
            self._due[handle] = time.monotonic() + handle.renew_every
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="shmchan-redis-leases", daemon=True)
                self._thread.start()
        self._wake.set()

    def discard(self, handle: Leased) -> None:
        with self._lock:
            self._handles.discard(handle)
            self._due.pop(handle, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._handles:
                    self._thread = None
                    return
                now = time.monotonic()
                due = [h for h in self._handles if self._due.get(h, now) <= now]
                for h in due:
                    self._due[h] = now + h.renew_every
                soonest = min(self._due.values(), default=now + 1.0)
            for h in due:
                h.renew()
            del due
            self._wake.wait(max(0.0, soonest - time.monotonic()))
            self._wake.clear()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._thread = None
        self._wake = threading.Event()
        handles = list(self._handles)
        for h in handles:
            self._due[h] = 0.0  # renew at once, under the child's own ids
        if handles:
            self._thread = threading.Thread(target=self._run, name="shmchan-redis-leases", daemon=True)
            self._thread.start()


renewer = Renewer()


# -- fork ---------------------------------------------------------------------------------

FORK_BUDGET: Final = 1.0
"""The most seconds ``os.fork()`` may spend registering leases for the child."""

_fork_hooks: weakref.WeakSet[Any] = weakref.WeakSet()
"""Cores that must act around ``os.fork()`` (see :func:`_before_fork`)."""


class ForkAware(Protocol):
    def before_fork(self, deadline: float) -> None: ...

    def after_fork_in_child(self) -> None: ...


def on_fork(core: ForkAware) -> None:
    _fork_hooks.add(core)


def _before_fork() -> None:
    # A forked child inherits handles that hold leases under the parent's ids. Each
    # core registers leases for the child under ids of its own first (so the parent
    # may close its handle before the child has renewed anything); the child adopts
    # them (after_fork_in_child). With the server unreachable this gives up after
    # FORK_BUDGET seconds in all, and the child registers at its first renewal.
    deadline = time.monotonic() + FORK_BUDGET
    for core in list(_fork_hooks):
        with contextlib.suppress(Exception):
            core.before_fork(deadline)


def _after_fork_in_child() -> None:
    global _servers_lock
    _servers_lock = threading.Lock()
    for srv in _servers.values():
        srv._lock = threading.Lock()
    for core in list(_fork_hooks):
        with contextlib.suppress(Exception):
            core.after_fork_in_child()
    renewer.after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def new_id() -> str:
    """A handle id, unique across hosts: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(6).hex()}"


def ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def call_quietly(fn: Callable[[], object]) -> None:
    """Run ``fn`` and ignore the failures a best-effort clean-up may meet."""
    with contextlib.suppress(Exception):
        fn()
