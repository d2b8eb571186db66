"""Drop-in twins of multiprocessing.Queue, JoinableQueue and SimpleQueue.

Change ``from multiprocessing import Queue`` to ``from shmchan import Queue`` and the
program keeps working: the same methods, arguments, exceptions (``queue.Empty``,
``queue.Full``, ``ValueError`` on a closed queue), blocking and timeouts. What
differs, and why:

* Objects are pickled by ``put`` itself, not by a feeder thread, so an unpicklable
  object raises in ``put`` and leaves the queue unchanged; nothing is buffered in the
  producer, so a process never hangs at exit flushing a queue, and ``empty()`` and
  ``qsize()`` are exact (``qsize`` works on every platform).
* The ring holds ``capacity`` bytes (4 MiB unless told otherwise). A ``put`` blocks
  when ``maxsize`` items are queued, as in multiprocessing, and also when the ring is
  out of bytes (multiprocessing would keep buffering in the producer's memory).
  A message that can never fit the ring goes through a one-shot side segment
  instead, with the same ordering and blocking.
* Queues can be pickled at any time (through another queue, as ``Pool`` or
  ``ProcessPoolExecutor`` arguments), not only as ``Process`` arguments, and other
  processes can attach by name with :meth:`Queue.open`.
* A negative ``timeout`` raises ``ValueError``, like ``queue.Queue``.
* Extra: ``put_many`` and ``get_many`` move many items per lock and per commit,
  several times faster than one ``put``/``get`` per item for small items.
* After ``close()``, every method but ``close``, ``join_thread`` and
  ``cancel_join_thread`` raises ``ValueError`` (multiprocessing still answers
  ``qsize`` and ``full``, and raises OSError from ``empty``); a closed
  :class:`SimpleQueue` raises an error that is both a ValueError and an OSError.

Lifetime: a queue created without a name is removed, with everything it uses in
/dev/shm or SysV IPC, once every process that used it has closed it or exited,
whatever way it exited (docs/layout.md, section 12). A queue created with a name
lives until :meth:`Queue.unlink`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Final, Generic, TypeVar

from . import _core, _lifetime
from . import _layout as L
from . import _redis as _remote
from ._backends import DEFAULT_BACKEND, get_backend
from ._backends._base import DEFAULT_OPEN_TIMEOUT, Backend, CreateParams
from ._channel import _check_max_items, check_timeout, geometry
from ._core import NOTHING, deadline_after
from ._errors import ChannelNotFound, ClosedChannel, Empty, Full

__all__ = ("DEFAULT_QUEUE_CAPACITY", "JoinableQueue", "Queue", "SimpleQueue")

T = TypeVar("T")

DEFAULT_QUEUE_CAPACITY: Final = 4 << 20
"""Ring bytes of a queue created without ``capacity`` (4 MiB)."""


class _ClosedSimpleQueue(ClosedChannel, OSError):
    """A closed SimpleQueue: a ValueError (shmchan) and an OSError (multiprocessing)."""


def _deadline(block: bool, timeout: float | None) -> float | None:
    """The absolute deadline of a put/get: None (no limit), or a monotonic time (in the
    past for a non-blocking call, which then makes one attempt)."""
    if not block:
        return 0.0
    return deadline_after(check_timeout(timeout))


def read_owner(header: bytes) -> str:
    """The owner field of a header: the lifetime service of an unnamed queue, or ''."""
    raw = header[L.OFF["owner"] : L.OFF["owner"] + L.OWNER_SIZE]
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


class _QueueCore(Generic[T]):
    """What every queue face shares: the attachment, the codec, the lifetime hold."""

    _core: Any
    _impl: Backend
    _name: str
    _backend: str
    _owner: str
    _maxsize: int
    _closed: bool

    def _create(
        self,
        maxsize: int,
        name: str | None,
        backend: str | None,
        capacity: int | None,
        remote: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int, not {type(maxsize).__name__}")
        self._closed = True  # until fully made, for __del__
        self._maxsize = max(0, maxsize)
        self._backend = backend or DEFAULT_BACKEND
        if self._backend == _remote.BACKEND:  # redis dispatch: the face needs a queue core
            options = dict(remote or {})
            core = _remote.queue_core().create(
                options.pop("url", None),
                name,
                self._maxsize,
                capacity,
                joinable=isinstance(self, JoinableQueue),
                **options,
            )
            self._adopt(core)
            return
        _local_only(remote)
        self._impl = get_backend(self._backend)
        cap, max_record = geometry(DEFAULT_QUEUE_CAPACITY if capacity is None else capacity, None)
        if name is None:
            self._name = self._impl.normalize_name(_lifetime.unnamed_name(self._backend))
            self._owner = _lifetime.create_hold(self._backend, self._name)
        else:
            self._name = self._impl.normalize_name(name)
            self._owner = ""
        try:
            params = CreateParams(cap, max_record, 0o600, max_items=self._maxsize, owner=self._owner.encode())
            self._core = _core.create(self._backend, self._name, params)
        except BaseException:
            if self._owner:
                _lifetime.release(self._owner, self._backend, self._name)
            raise
        self._closed = False

    def _attach(
        self,
        name: str,
        backend: str,
        handoff: Any = "",
        owner: str | None = None,
        remote: dict[str, Any] | None = None,
    ) -> None:
        self._closed = True
        self._backend = backend
        if backend == _remote.BACKEND:  # redis dispatch: attach a queue core by URL and name
            options = dict(remote or {})
            self._adopt(_remote.queue_core().attach(options.pop("url", None), name, **options))
            return
        _local_only(remote)
        self._impl = get_backend(backend)
        self._name = self._impl.normalize_name(name)
        held = ""  # the address of the service that holds this handle
        try:
            if owner:  # unpickled: hold it before opening, so it cannot go meanwhile
                try:
                    held = _lifetime.hold(owner, backend, self._name)
                except _lifetime.ServiceGone:
                    raise ChannelNotFound(
                        f"queue {self._name!r} was released by every process that used it"
                    ) from None
            core = _core.attach(backend, self._name, DEFAULT_OPEN_TIMEOUT)
            found = read_owner(core.raw(0, L.HEADER_BASE))
            if owner is None and found:  # opened by name: hold it like any other user
                try:
                    held = _lifetime.hold(found, backend, self._name)
                except _lifetime.ServiceGone:
                    core.close()
                    raise ChannelNotFound(f"queue {self._name!r} is being removed") from None
        except BaseException:
            if held:
                _lifetime.release(held, backend, self._name)
            raise
        finally:
            if owner:
                _lifetime.redeem(held or owner, backend, self._name, handoff)
        self._owner = held
        self._maxsize = core.max_items
        self._core = core
        self._closed = False

    def _adopt(self, core: Any) -> None:
        """Become the face of remote queue core ``core`` (redis dispatch). It has the
        compiled core's put/get/put_many/get_many/qsize/task_done/join/close, so the
        operations below need no dispatch of their own."""
        self._backend = _remote.BACKEND
        self._core = core
        self._name, self._owner = core.name, ""
        self._maxsize = core.maxsize
        self._closed = False

    # -- shared operations -----------------------------------------------------------------

    def _closed_error(self) -> ClosedChannel:
        return ClosedChannel(f"Queue {self!r} is closed")

    def _put(self, obj: Any, block: bool, timeout: float | None) -> None:
        if self._closed:
            raise self._closed_error()
        if not self._core.put(obj, None if block and timeout is None else _deadline(block, timeout)):
            raise Full

    def _get(self, block: bool, timeout: float | None) -> Any:
        if self._closed:
            raise self._closed_error()
        item = self._core.get(None if block and timeout is None else _deadline(block, timeout))
        if item is NOTHING:
            raise Empty
        return item

    def _put_many(self, objs: Iterable[Any], block: bool, timeout: float | None) -> None:
        if self._closed:
            raise self._closed_error()
        items = objs if isinstance(objs, (list, tuple)) else list(objs)
        sent = self._core.put_many(items, _deadline(block, timeout))
        if sent < len(items):
            raise Full(f"{sent} of {len(items)} items were put before the deadline", sent=sent)

    def _get_many(self, max_items: int, block: bool, timeout: float | None) -> list[Any]:
        if self._closed:
            raise self._closed_error()
        _check_max_items(max_items)
        items: list[Any] = self._core.get_many(max_items, _deadline(block, timeout))
        if not items:
            raise Empty
        return items

    def _get_or_nothing(self) -> Any:
        """One non-blocking get for select(): the item or NOTHING."""
        if self._closed:
            raise self._closed_error()
        return self._core.get(0.0)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def async_q(self) -> Any:
        """This queue as an ``asyncio.Queue``-shaped object for asyncio or trio code
        (``await put``, ``await get``, ``put_nowait``, ``get_nowait``, ``qsize``,
        ``empty``, ``full``, and ``task_done`` / ``await join`` on a JoinableQueue),
        usable while other processes use the queue synchronously."""
        from ._async import AsyncQueue

        view = self.__dict__.get("_async_view")
        if view is None:
            view = self.__dict__["_async_view"] = AsyncQueue(self)
        return view

    def _qsize(self) -> int:
        if self._closed:
            raise self._closed_error()
        size: int = self._core.qsize()
        return size

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The queue's name; other processes can attach with ``open(name)``."""
        return self._name

    @property
    def backend(self) -> str:
        return self._backend

    def close(self) -> None:
        """Close this handle (idempotent): later calls on it raise ValueError.

        Nothing is lost: every ``put`` that returned is already in shared memory.
        The queue itself stays for the other processes that use it.
        """
        if self._closed:
            return
        self._closed = True
        self._core.close()
        if self._owner:
            _lifetime.release(self._owner, self._backend, self._name)

    def unlink(self) -> None:
        """Remove the queue's name and OS objects now (for a named queue).

        Handles that are open keep working on the posix and mmap backends. On redis
        the queue is deleted from the server: handles still open get ChannelNotFound.
        """
        if self._backend == _remote.BACKEND:  # redis dispatch: core.unlink()
            self._core.unlink()
            return
        self._impl.remove(self._name)

    def __reduce__(self) -> tuple[Any, ...]:
        if self._closed:
            raise self._closed_error()
        if self._backend == _remote.BACKEND:  # redis dispatch: the core pickles (url, name) and re-attaches
            return (_rebuild_remote, (type(self), self._core))
        owner, handoff = (
            _lifetime.transfer(self._owner, self._backend, self._name) if self._owner else ("", "")
        )
        return (_rebuild, (type(self), self._name, self._backend, owner, handoff))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"maxsize={self._maxsize}"
        return f"<shmchan.{type(self).__name__} {self._name!r} backend={self._backend!r} {state}>"

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # never raise from a finalizer
                self.close()


def _rebuild(cls: type[_QueueCore[Any]], name: str, backend: str, owner: str, handoff: Any) -> Any:
    obj = cls.__new__(cls)
    obj._attach(name, backend, handoff, owner)
    return obj


def _rebuild_remote(cls: type[_QueueCore[Any]], core: Any) -> Any:
    obj = cls.__new__(cls)
    obj._adopt(core)
    return obj


def _local_only(remote: dict[str, Any] | None) -> None:
    """Refuse the redis backend's options on a local backend."""
    given = sorted(k for k, v in (remote or {}).items() if v is not None)
    if given:
        raise ValueError(f"{', '.join(given)}: only for backend='redis'")


class Queue(_QueueCore[T]):
    """A process-shared FIFO queue with the API of ``multiprocessing.Queue``.

    Args:
        maxsize: the most items it holds; ``put`` blocks while it is full. 0 (or
            less) means no item limit (the ring's ``capacity`` still bounds bytes).
        name: attach-by-name identity; None makes an unnamed queue that cleans up
            after itself when every process using it is gone.
        backend: "posix" (default), "sysv" or "mmap"; or "redis" for a queue on a
            Redis/Valkey server that processes on other hosts share (docs/redis.md).
        capacity: ring bytes (default 4 MiB, rounded up to a power of two). Messages
            larger than half of it travel through side segments. On redis: the most
            payload bytes queued (default None: no byte limit).
        url: the redis server, ``redis://[[user]:password@]host:port/db`` (also
            ``rediss://`` and ``unix://``); default ``$SHMCHAN_REDIS_URL``. Redis only.
        prefetch: redis only: records a ``get`` takes from the server at once (default
            1); the others wait in this handle for the next gets. Faster, at a cost
            on a crash (docs/redis.md, "Prefetch").
        lease: redis only: seconds a handle's leases last without renewal (default 5).
    """

    def __init__(
        self,
        maxsize: int = 0,
        *,
        name: str | None = None,
        backend: str | None = None,
        capacity: int | None = None,
        url: str | None = None,
        prefetch: int | None = None,
        lease: float | None = None,
    ) -> None:
        self._create(maxsize, name, backend, capacity, {"url": url, "prefetch": prefetch, "lease": lease})

    @classmethod
    def open(
        cls,
        name: str,
        *,
        backend: str | None = None,
        url: str | None = None,
        prefetch: int | None = None,
        lease: float | None = None,
    ) -> Any:
        """Attach to an existing queue by name, from any process (on redis: any host)."""
        obj = cls.__new__(cls)
        obj._attach(
            name, backend or DEFAULT_BACKEND, remote={"url": url, "prefetch": prefetch, "lease": lease}
        )
        return obj

    def put(self, obj: T, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` on the queue.

        Blocks (sleeping) while the queue holds ``maxsize`` items or its ring is out
        of room, for at most ``timeout`` seconds, then raises ``queue.Full``. With
        ``block=False`` it never waits. ``obj`` is pickled here, so a pickling error
        raises here and nothing is queued. Once ``put`` returns, the item is in
        shared memory: it survives this process's exit or death.
        """
        self._put(obj, block, timeout)

    def put_nowait(self, obj: T) -> None:
        """``put(obj, block=False)``."""
        self._put(obj, False, None)

    def put_many(self, objs: Iterable[T], block: bool = True, timeout: float | None = None) -> None:
        """Put every item of ``objs``, in order: like ``for o in objs: put(o)``, but
        many items per lock and per commit, which is much faster for small items.

        Every item is pickled first, so a pickling error raises before anything is
        queued. Blocks (sleeping) while there is no room for the next item, for at
        most ``timeout`` seconds in all, then raises ``queue.Full`` whose ``sent``
        attribute says how many items went in (the first ones). With
        ``block=False`` it puts what fits now. Another producer's items never land
        between two items written under the same lock, but may between batches.
        All items are encoded before the first is queued, so the whole batch is in
        memory at once: pass batches of a sensible size (hundreds, not millions).
        A Ctrl-C while it waits leaves the items already put in the queue.
        """
        self._put_many(objs, block, timeout)

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        """Remove and return the oldest item.

        Blocks (sleeping) while the queue is empty, for at most ``timeout`` seconds,
        then raises ``queue.Empty``. With ``block=False`` it never waits. An item that
        cannot be unpickled here raises the unpickling error, and is consumed so it
        cannot block the queue. A Ctrl-C while waiting consumes nothing.
        """
        item: T = self._get(block, timeout)
        return item

    def get_nowait(self) -> T:
        """``get(block=False)``."""
        item: T = self._get(False, None)
        return item

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list[T]:
        """Remove and return between 1 and ``max_items`` of the oldest items, in order,
        under one lock: whatever is there, without waiting for more.

        Blocks (sleeping) only while the queue is empty, for at most ``timeout``
        seconds, then raises ``queue.Empty``. If some items taken cannot be
        unpickled here, raises :class:`~shmchan.UndecodableBatch` after decoding the
        others, which it carries in ``items``: nothing taken is lost.
        """
        items: list[T] = self._get_many(max_items, block, timeout)
        return items

    def qsize(self) -> int:
        """The number of items in the queue now (exact at the time it is read)."""
        return self._qsize()

    def empty(self) -> bool:
        return self._qsize() == 0

    def full(self) -> bool:
        """True if a ``put`` would block now for lack of an item slot."""
        return self._maxsize > 0 and self._qsize() >= self._maxsize

    def join_thread(self) -> None:
        """Return at once: there is no feeder thread to wait for. Like
        multiprocessing, it is an error (AssertionError) before ``close()``."""
        if not self._closed:
            raise AssertionError(f"Queue {self!r} not closed")

    def cancel_join_thread(self) -> None:
        """Do nothing: there is no feeder thread, so exiting never waits on a queue."""


class JoinableQueue(Queue[T]):
    """A :class:`Queue` with ``task_done()`` and ``join()``, like
    ``multiprocessing.JoinableQueue``. Every ``put`` adds an unfinished task.

    ``redeliver_after`` (redis only, seconds): at-least-once delivery. An item is
    then acknowledged by ``task_done()`` on the handle whose ``get`` returned it, not
    by the ``get``; one held by a consumer that died (stopped renewing it) for that
    long is handed to another consumer.
    """

    def __init__(
        self,
        maxsize: int = 0,
        *,
        name: str | None = None,
        backend: str | None = None,
        capacity: int | None = None,
        url: str | None = None,
        prefetch: int | None = None,
        lease: float | None = None,
        redeliver_after: float | None = None,
    ) -> None:
        remote = {"url": url, "prefetch": prefetch, "lease": lease, "redeliver_after": redeliver_after}
        self._create(maxsize, name, backend, capacity, remote)

    def task_done(self) -> None:
        """Mark one item as processed. Raises ValueError if called more times than
        items were put (with ``redeliver_after``: on a handle that holds no item)."""
        if self._closed:
            raise self._closed_error()
        self._core.task_done()

    def join(self) -> None:
        """Block (sleeping) until every item put so far has been marked done."""
        if self._closed:
            raise self._closed_error()
        self._core.join(None)


class SimpleQueue(_QueueCore[T]):
    """A process-shared FIFO queue with the API of ``multiprocessing.SimpleQueue``:
    ``put``, ``get``, ``empty`` and ``close``, with no size limit or timeouts."""

    def __init__(
        self,
        *,
        name: str | None = None,
        backend: str | None = None,
        capacity: int | None = None,
        url: str | None = None,
        lease: float | None = None,
    ) -> None:
        self._create(0, name, backend, capacity, {"url": url, "lease": lease})

    @classmethod
    def open(
        cls, name: str, *, backend: str | None = None, url: str | None = None, lease: float | None = None
    ) -> Any:
        """Attach to an existing queue by name, from any process (on redis: any host)."""
        obj = cls.__new__(cls)
        obj._attach(name, backend or DEFAULT_BACKEND, remote={"url": url, "lease": lease})
        return obj

    def _closed_error(self) -> ClosedChannel:
        return _ClosedSimpleQueue(f"SimpleQueue {self!r}: handle is closed")

    def put(self, obj: T) -> None:
        """Put ``obj`` on the queue (pickled here); blocks while the ring is full."""
        self._put(obj, True, None)

    def put_many(self, objs: Iterable[T]) -> None:
        """Put every item of ``objs`` in order, many per lock (see
        :meth:`Queue.put_many`); blocks while the ring is full."""
        self._put_many(objs, True, None)

    def get(self) -> T:
        """Remove and return the oldest item, blocking while the queue is empty."""
        item: T = self._get(True, None)
        return item

    def get_many(self, max_items: int) -> list[T]:
        """Remove and return between 1 and ``max_items`` of the oldest items under one
        lock (see :meth:`Queue.get_many`), blocking while the queue is empty."""
        items: list[T] = self._get_many(max_items, True, None)
        return items

    def empty(self) -> bool:
        return self._qsize() == 0
