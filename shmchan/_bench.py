"""``python -m shmchan bench``: shmchan beside the queues a user would otherwise pick.

Workloads: A, one producer -> one consumer of ``bytes`` (64 B, 1 KiB, 64 KiB, 1 MiB); B,
small Python objects; C, ping-pong round trips of 64 B; D, 2 producers x 2 consumers of
64 B; E, an 8 MiB NumPy float32 array; F, A-64 B and C again through the async face
(``q.async_q`` on asyncio, via anyio). Every shmchan queue uses its **default settings**
(a 4 MiB ring: E's arrays travel in side segments). Peers: multiprocessing's Queue,
SimpleQueue and Pipe, faster_fifo and pyzmq (ipc:// PUSH/PULL) when installed, and
shmchan.Queue on each backend (the default backend's row is the headline). Last, the
cost of one ``put`` and one ``get`` of 64 B ``bytes`` in one process.

How a case runs: fresh ``spawn`` processes attach to a transport made by the parent
and meet at a barrier; a warm-up round (a tenth of the messages, untimed) then the
timed round follow, each ended by empty end-of-stream messages. A stream's time runs
from the producers' start (after the barrier) to the last consumer's last message; a
ping-pong times every round trip. Figures are medians of ``--repeat`` runs that are
interleaved across peers, and every ratio compares with multiprocessing.Queue measured
in the same invocation: only same-run ratios mean anything on a shared machine. Every
case has a time limit (its processes are stopped and the case reported as failed) and
removes what it made, also on Ctrl-C.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import cProfile
import ctypes
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from types import FrameType
from typing import Any, Final, Literal, cast

from ._backends import BACKENDS, DEFAULT_BACKEND, available_backends
from ._queue import DEFAULT_QUEUE_CAPACITY, Queue

SPAWN: Final = mp.get_context("spawn")
KiB: Final = 1024
MiB: Final = 1024 * KiB
BASELINE: Final = "mp.Queue"

Send = Callable[[Any], object]
Recv = Callable[[], Any]
AsyncSend = Callable[[Any], Awaitable[object]]
AsyncRecv = Callable[[], Awaitable[Any]]
SendMany = Callable[[list[Any]], object]
RecvMany = Callable[[], list[Any]]
Role = tuple[Callable[..., Any], tuple[Any, ...]]
BATCH: Final = 256
"""Messages per ``put_many`` / most per ``get_many`` in the batch rows."""


class CaseFailed(Exception):
    """A case that did not produce a figure (timeout, crash, lost messages)."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _need(module: str) -> Any:
    """Import an optional dependency (typed Any: the bench extra may be absent)."""
    return importlib.import_module(module)


# -- what travels -------------------------------------------------------------------------

OBJECT: Final = (123456789, 3.14159, "abcdefghijklmnopqrst")
"""Workload B's message: an int, a float and a 20-character str."""


@dataclass(frozen=True)
class Payload:
    kind: Literal["bytes", "object", "array"]
    size: int = 0  # bytes per message (0 for "object")

    def message(self) -> Any:
        if self.kind == "bytes":
            return b"x" * self.size
        if self.kind == "object":
            return OBJECT
        np = _need("numpy")
        return np.ones(self.size // 4, dtype=np.float32)

    def nbytes(self) -> int:
        """Bytes of one message (about, for objects)."""
        return self.size or 64

    def end(self) -> Any:
        """The end-of-stream marker: an empty message of the same kind (receivers test
        ``len``, which costs every peer the same)."""
        if self.kind == "bytes":
            return b""
        if self.kind == "object":
            return ()
        np = _need("numpy")
        return np.empty(0, dtype=np.float32)


# -- transports ---------------------------------------------------------------------------


class Link(abc.ABC):
    """One direction of one transport: made in the parent, pickled to the children,
    which each open one end of it. ``index`` numbers the senders and the receivers."""

    @abc.abstractmethod
    def sending(self, index: int, payload: Payload) -> AbstractContextManager[Send]: ...

    @abc.abstractmethod
    def receiving(self, index: int, payload: Payload) -> AbstractContextManager[Recv]: ...

    @abc.abstractmethod
    def cleanup(self) -> None:
        """In the parent, once the case's processes are gone, however the case ended."""

    def async_sending(self, index: int, payload: Payload) -> AbstractContextManager[AsyncSend]:
        raise NotImplementedError

    def async_receiving(self, index: int, payload: Payload) -> AbstractContextManager[AsyncRecv]:
        raise NotImplementedError

    batch: int = 0
    """If > 0, streams use :meth:`batch_sending` and :meth:`batch_receiving` with
    lists of up to this many messages instead of one call per message."""

    def batch_sending(self, index: int, payload: Payload) -> AbstractContextManager[SendMany]:
        raise NotImplementedError

    def batch_receiving(self, index: int, payload: Payload) -> AbstractContextManager[RecvMany]:
        raise NotImplementedError


@dataclass
class QueueLink(Link):
    """Anything with ``put``/``get``: multiprocessing's queues, faster_fifo."""

    queue: Any

    def sending(self, index: int, payload: Payload) -> AbstractContextManager[Send]:
        return contextlib.nullcontext(self.queue.put)

    def receiving(self, index: int, payload: Payload) -> AbstractContextManager[Recv]:
        return contextlib.nullcontext(self.queue.get)

    def cleanup(self) -> None:
        self.queue.close()


class ShmchanLink(QueueLink):
    """A named shmchan.Queue: the parent removes it whatever happened to the children.
    Its async ends are ``q.async_q.put`` and ``q.async_q.get``."""

    def async_sending(self, index: int, payload: Payload) -> AbstractContextManager[AsyncSend]:
        return contextlib.nullcontext(self.queue.async_q.put)

    def async_receiving(self, index: int, payload: Payload) -> AbstractContextManager[AsyncRecv]:
        return contextlib.nullcontext(self.queue.async_q.get)

    def cleanup(self) -> None:
        self.queue.close()
        self.queue.unlink()


class ShmchanBatchLink(ShmchanLink):
    """A named shmchan.Queue driven by ``put_many(list)`` and ``get_many(BATCH)``."""

    batch = BATCH

    def batch_sending(self, index: int, payload: Payload) -> AbstractContextManager[SendMany]:
        return contextlib.nullcontext(self.queue.put_many)

    def batch_receiving(self, index: int, payload: Payload) -> AbstractContextManager[RecvMany]:
        return contextlib.nullcontext(functools.partial(self.queue.get_many, self.batch))


@dataclass
class PipeLink(Link):
    """A one-way multiprocessing.Pipe: ``send_bytes``/``recv_bytes`` for bytes, else
    ``send``/``recv`` (which pickle)."""

    reader: Connection
    writer: Connection

    def sending(self, index: int, payload: Payload) -> AbstractContextManager[Send]:
        w = self.writer
        return contextlib.nullcontext(w.send_bytes if payload.kind == "bytes" else w.send)

    def receiving(self, index: int, payload: Payload) -> AbstractContextManager[Recv]:
        r = self.reader
        return contextlib.nullcontext(r.recv_bytes if payload.kind == "bytes" else r.recv)

    def cleanup(self) -> None:
        self.reader.close()
        self.writer.close()


ZMQ_ZERO_COPY: Final = 64 * KiB
"""pyzmq sends and receives frames of this size and more without copying them."""


@dataclass
class ZmqLink(Link):
    """pyzmq PUSH/PULL over ipc://: receiver ``i`` binds ``addresses[i]``, every sender
    connects to all of them. With several receivers the high-water marks are lifted so
    that PUSH's round robin is strict and each receiver gets one end marker from each
    sender, behind everything that sender sent it."""

    addresses: list[str]
    directory: str

    @contextlib.contextmanager
    def _socket(self, kind: str) -> Iterator[Any]:
        zmq = _need("zmq")
        ctx = zmq.Context()
        sock = ctx.socket(getattr(zmq, kind))
        if len(self.addresses) > 1:
            sock.setsockopt(zmq.SNDHWM if kind == "PUSH" else zmq.RCVHWM, 0)
        try:
            yield sock
        finally:
            sock.close()
            ctx.term()

    @contextlib.contextmanager
    def sending(self, index: int, payload: Payload) -> Iterator[Send]:
        with self._socket("PUSH") as sock:
            for address in self.addresses:
                sock.connect(address)
            if payload.kind == "object":
                yield sock.send_pyobj
            elif payload.kind == "array" or payload.size >= ZMQ_ZERO_COPY:
                yield lambda data: sock.send(data, copy=False)
            else:
                yield sock.send

    @contextlib.contextmanager
    def receiving(self, index: int, payload: Payload) -> Iterator[Recv]:
        with self._socket("PULL") as sock:
            sock.bind(self.addresses[index])
            if payload.kind == "object":
                yield sock.recv_pyobj
            elif payload.kind == "array":
                np = _need("numpy")
                yield lambda: np.frombuffer(sock.recv(copy=False).buffer, dtype=np.float32)
            elif payload.size >= ZMQ_ZERO_COPY:
                yield lambda: sock.recv(copy=False).buffer
            else:
                yield sock.recv

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# -- what each process does (module level, so that spawn can import it) ----------------------


@dataclass
class Gate:
    """A barrier every process of a case meets at, bounded by the case's time limit."""

    barrier: Any
    timeout: float

    def start(self) -> float:
        """Wait for every process, then return the time (a round starts)."""
        self.barrier.wait(self.timeout)
        return time.perf_counter()


def _stream_producer(
    link: Link, index: int, payload: Payload, rounds: Sequence[int], consumers: int, gate: Gate
) -> float:
    """Send each round's messages, then one end marker per consumer; return when the
    timed (last) round started."""
    if link.batch:
        return _batch_producer(link, index, payload, rounds, consumers, gate)
    msg, end, start = payload.message(), payload.end(), 0.0
    with link.sending(index, payload) as send:
        for n in rounds:
            start = gate.start()
            for _ in range(n):
                send(msg)
            for _ in range(consumers):
                send(end)
        gate.start()  # every end stays open until all is received (pyzmq drops the
        # last messages of a PUSH socket closed while its PULL peer is at its high-water mark)
    return start


def _batch_producer(
    link: Link, index: int, payload: Payload, rounds: Sequence[int], consumers: int, gate: Gate
) -> float:
    """:func:`_stream_producer` with lists of ``link.batch`` messages (the list is made
    once, as the single message is for the other rows)."""
    msg, end, start = payload.message(), payload.end(), 0.0
    chunk = [msg] * link.batch
    with link.batch_sending(index, payload) as send_many:
        for n in rounds:
            start = gate.start()
            full, rest = divmod(n, link.batch)
            for _ in range(full):
                send_many(chunk)
            send_many([msg] * rest + [end] * consumers)
        gate.start()
    return start


def _stream_consumer(
    link: Link, index: int, payload: Payload, rounds: Sequence[int], producers: int, gate: Gate
) -> tuple[float, int]:
    """Receive until one end marker per producer; return when the timed round ended and
    how many messages it brought."""
    if link.batch:
        return _batch_consumer(link, index, payload, rounds, producers, gate)
    got, end = 0, 0.0
    with link.receiving(index, payload) as recv:
        for _ in rounds:
            gate.start()
            got = ends = 0
            while ends < producers:
                if len(recv()):
                    got += 1
                else:
                    ends += 1
            end = time.perf_counter()
        gate.start()
    return end, got


def _batch_consumer(
    link: Link, index: int, payload: Payload, rounds: Sequence[int], producers: int, gate: Gate
) -> tuple[float, int]:
    """:func:`_stream_consumer` taking up to ``link.batch`` messages per call. A batch
    may hold end markers meant for another consumer: those go back to the link."""
    got, end = 0, 0.0
    with link.batch_receiving(index, payload) as recv_many, link.batch_sending(index, payload) as send_many:
        for _ in rounds:
            gate.start()
            got = ends = 0
            surplus: list[Any] = []
            while ends < producers:
                for item in recv_many():
                    if len(item):
                        got += 1
                    elif ends < producers:
                        ends += 1
                    else:
                        surplus.append(item)
            end = time.perf_counter()
            if surplus:
                send_many(surplus)
        gate.start()
    return end, got


def _ping_client(
    there: Link, back: Link, payload: Payload, rounds: Sequence[int], gate: Gate
) -> tuple[float, float]:
    """Time every round trip; return p50 and p99 in µs of those after the warm-up."""
    msg, clock = payload.message(), time.perf_counter_ns
    times = [0] * sum(rounds)
    with there.sending(0, payload) as send, back.receiving(0, payload) as recv:
        gate.start()
        for i in range(len(times)):
            t = clock()
            send(msg)
            recv()
            times[i] = clock() - t
        send(payload.end())
        gate.start()
    return _percentiles(times[rounds[0] :])


def _percentiles(times: list[int]) -> tuple[float, float]:
    """p50 and p99 of round-trip times in ns, in µs."""
    times.sort()
    n = len(times)
    return times[n // 2] / 1e3, times[min(n - 1, math.ceil(0.99 * n) - 1)] / 1e3


def _ping_server(there: Link, back: Link, payload: Payload, gate: Gate) -> None:
    """Echo every message until the end marker."""
    with there.receiving(0, payload) as recv, back.sending(0, payload) as send:
        gate.start()
        while len(msg := recv()):
            send(msg)
        gate.start()


# Workload F: the same roles on the async face, each process running one asyncio loop
# (through anyio). The endpoints are coroutine functions: ``await send(x)``, ``await recv()``.


def _on_asyncio(main: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return _need("anyio").run(main, *args, backend="asyncio")


async def _async_stream_producer(
    link: Link, index: int, payload: Payload, rounds: Sequence[int], consumers: int, gate: Gate
) -> float:
    msg, end, start = payload.message(), payload.end(), 0.0
    with link.async_sending(index, payload) as send:
        for n in rounds:
            start = gate.start()
            for _ in range(n):
                await send(msg)
            for _ in range(consumers):
                await send(end)
        gate.start()
    return start


async def _async_stream_consumer(
    link: Link, index: int, payload: Payload, rounds: Sequence[int], producers: int, gate: Gate
) -> tuple[float, int]:
    got, end = 0, 0.0
    with link.async_receiving(index, payload) as recv:
        for _ in rounds:
            gate.start()
            got = ends = 0
            while ends < producers:
                if len(await recv()):
                    got += 1
                else:
                    ends += 1
            end = time.perf_counter()
        gate.start()
    return end, got


async def _async_ping_client(
    there: Link, back: Link, payload: Payload, rounds: Sequence[int], gate: Gate
) -> tuple[float, float]:
    msg, clock = payload.message(), time.perf_counter_ns
    times = [0] * sum(rounds)
    with there.async_sending(0, payload) as send, back.async_receiving(0, payload) as recv:
        gate.start()
        for i in range(len(times)):
            t = clock()
            await send(msg)
            await recv()
            times[i] = clock() - t
        await send(payload.end())
        gate.start()
    return _percentiles(times[rounds[0] :])


async def _async_ping_server(there: Link, back: Link, payload: Payload, gate: Gate) -> None:
    with there.async_receiving(0, payload) as recv, back.async_sending(0, payload) as send:
        gate.start()
        while len(msg := await recv()):
            await send(msg)
        gate.start()


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


PR_SET_PDEATHSIG: Final = 1


def _term_with_parent() -> None:
    """Get SIGTERM if the bench itself dies (even SIGKILLed): a case never outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it was already gone
        raise SystemExit(143)


def _child(ctl: Connection, role: Callable[..., Any], args: tuple[Any, ...], profile: str) -> None:
    """A case's process: run ``role`` and report ``("ok", result)`` or ``("error", why)``.

    Ctrl-C is left to the parent, which stops its children; SIGTERM unwinds the role's
    ``with`` blocks so that endpoints close. ``profile`` is a path for cProfile stats.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _term_with_parent()
    try:
        if profile:
            prof = cProfile.Profile()
            result = prof.runcall(role, *args)
            prof.dump_stats(profile)
        else:
            result = role(*args)
    except Exception as exc:  # noqa: BLE001 - any failure is reported to the parent as the case's
        where = traceback.extract_tb(exc.__traceback__)[-1]
        ctl.send(
            ("error", f"{type(exc).__name__}: {exc} ({os.path.basename(where.filename)}:{where.lineno})")
        )
    else:
        ctl.send(("ok", result))


# -- patterns -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    higher_is_better: bool


RATE: Final = Metric("msgs_per_s", True)
P50: Final = Metric("p50_us", False)
P99: Final = Metric("p99_us", False)


class Pattern(abc.ABC):
    """How a workload uses its processes: which roles run, and what the results mean.
    An asynchronous pattern runs the same roles on the async face (workload F)."""

    links: int = 1
    metrics: tuple[Metric, ...] = (RATE,)

    def __init__(self, asynchronous: bool = False) -> None:
        self.asynchronous = asynchronous

    def role(self, sync: Callable[..., Any], on_async: Callable[..., Any], *args: Any) -> Role:
        return (_on_asyncio, (on_async, *args)) if self.asynchronous else (sync, args)

    @abc.abstractmethod
    def roles(self, w: Workload, links: list[Link], rounds: tuple[int, int], gate: Gate) -> list[Role]: ...

    @abc.abstractmethod
    def summarize(self, w: Workload, count: int, results: list[Any]) -> dict[str, float]: ...

    def parties(self, w: Workload) -> int:
        return w.producers + w.consumers


class Stream(Pattern):
    """Producers -> consumers over one link; figure: messages per second."""

    def roles(self, w: Workload, links: list[Link], rounds: tuple[int, int], gate: Gate) -> list[Role]:
        (link,) = links
        consumers = [
            self.role(_stream_consumer, _async_stream_consumer, link, i, w.payload, rounds, w.producers, gate)
            for i in range(w.consumers)
        ]
        producers = [
            self.role(_stream_producer, _async_stream_producer, link, i, w.payload, rounds, w.consumers, gate)
            for i in range(w.producers)
        ]
        return consumers + producers

    def summarize(self, w: Workload, count: int, results: list[Any]) -> dict[str, float]:
        ends, starts = results[: w.consumers], results[w.consumers :]
        got, expected = sum(n for _, n in ends), count * w.producers
        if got != expected:
            raise CaseFailed(f"received {got} of {expected} messages")
        return {RATE.key: expected / (max(t for t, _ in ends) - min(starts))}


class PingPong(Pattern):
    """A client and an echo server over a link each way; figures: p50, p99 round trip."""

    links = 2
    metrics = (P50, P99)

    def roles(self, w: Workload, links: list[Link], rounds: tuple[int, int], gate: Gate) -> list[Role]:
        there, back = links
        return [
            self.role(_ping_server, _async_ping_server, there, back, w.payload, gate),
            self.role(_ping_client, _async_ping_client, there, back, w.payload, rounds, gate),
        ]

    def summarize(self, w: Workload, count: int, results: list[Any]) -> dict[str, float]:
        p50, p99 = results[1]
        return {P50.key: p50, P99.key: p99}

    def parties(self, w: Workload) -> int:
        return 2


STREAM: Final = Stream()
PINGPONG: Final = PingPong()
ASYNC_STREAM: Final = Stream(asynchronous=True)
ASYNC_PINGPONG: Final = PingPong(asynchronous=True)


# -- workloads and peers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    table: str  # which printed table it belongs to
    pattern: Pattern
    payload: Payload
    count: int  # messages per producer, or round trips; the full run's
    quick_count: int
    producers: int = 1
    consumers: int = 1
    capacity: int | None = None  # ring bytes of shmchan.Queue and faster_fifo (None: the default)
    requires: str = ""  # a module it needs
    baseline: str = ""  # the workload whose mp.Queue figure its ratios use (default: its own)

    def total(self, quick: bool) -> int:
        return (self.quick_count if quick else self.count) * self.producers


def _bytes_a(size: int, label: str, count: int, quick: int, capacity: int | None = None) -> Workload:
    return Workload(
        f"A-{label}", f"A {label}", "A", STREAM, Payload("bytes", size), count, quick, capacity=capacity
    )


WORKLOADS: Final[tuple[Workload, ...]] = (
    _bytes_a(64, "64B", 200_000, 10_000),
    _bytes_a(KiB, "1KiB", 150_000, 10_000),
    _bytes_a(64 * KiB, "64KiB", 15_000, 1_000),
    _bytes_a(MiB, "1MiB", 600, 60),
    Workload("B", "B objects", "B-E", STREAM, Payload("object"), 200_000, 10_000),
    Workload("C", "C 64B", "B-E", PINGPONG, Payload("bytes", 64), 5_000, 500),
    Workload("D", "D 2x2 64B", "B-E", STREAM, Payload("bytes", 64), 100_000, 5_000, producers=2, consumers=2),
    Workload(
        "E",
        "E numpy 8MiB",
        "B-E",
        STREAM,
        Payload("array", 8 * MiB),
        100,
        6,
        requires="numpy",
    ),
    Workload(
        "F-A-64B", "F async A 64B", "F", ASYNC_STREAM, Payload("bytes", 64), 100_000, 5_000, baseline="A-64B"
    ),
    Workload("F-C", "F async C 64B", "F", ASYNC_PINGPONG, Payload("bytes", 64), 2_000, 300, baseline="C"),
)


def _ring_bytes(w: Workload) -> int:
    return w.capacity or DEFAULT_QUEUE_CAPACITY


def _mp_queue(w: Workload) -> Link:
    return QueueLink(SPAWN.Queue())


def _mp_simple_queue(w: Workload) -> Link:
    return QueueLink(SPAWN.SimpleQueue())


def _mp_pipe(w: Workload) -> Link:
    reader, writer = SPAWN.Pipe(duplex=False)
    return PipeLink(reader, writer)


def _faster_fifo(w: Workload) -> Link:
    # faster_fifo cannot send a message larger than its buffer (its issue #21): give it
    # room for a few of this workload's messages.
    size = max(_ring_bytes(w), 4 * w.payload.nbytes())
    return QueueLink(_need("faster_fifo").Queue(max_size_bytes=size))


def _zmq(w: Workload) -> Link:
    directory = tempfile.mkdtemp(prefix="shmchan-bench-zmq-")
    return ZmqLink([f"ipc://{directory}/{i}" for i in range(w.consumers)], directory)


def _shmchan_queue(backend: str, w: Workload, kind: type[ShmchanLink] = ShmchanLink) -> Link:
    # Named, so that the parent removes it (unlink) however the children ended, and no
    # lifetime service is started; the data path is the same as an unnamed queue's.
    token = f"shmchan-bench-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    name = f"/dev/shm/{token}" if backend == "mmap" else token
    return kind(Queue(name=name, backend=backend, capacity=w.capacity))


def _any(w: Workload) -> str:
    return ""


def _no_shared_reader(w: Workload) -> str:
    if w.consumers > 1:
        return "a bare Pipe has no lock: concurrent readers interleave frames (use SimpleQueue)"
    return ""


@dataclass(frozen=True)
class Peer:
    name: str
    link: Callable[[Workload], Link]
    requires: str = ""  # a module that must be installed
    cannot: Callable[[Workload], str] = _any  # why it cannot run a workload ("" if it can)
    unavailable: str = ""  # why it cannot run at all here
    asynchronous: bool = False  # whether its links have async ends (workload F)


def _shmchan_peer(backend: str) -> Peer:
    why = "" if backend in available_backends() else f"backend {backend!r} is unavailable here"

    def link(w: Workload) -> Link:
        return _shmchan_queue(backend, w)

    return Peer(f"shmchan.Queue[{backend}]", link, unavailable=why, asynchronous=True)


def _batch_peer(backend: str) -> Peer:
    def link(w: Workload) -> Link:
        return _shmchan_queue(backend, w, ShmchanBatchLink)

    return Peer(f"shmchan.Queue[{backend}] batch", link, cannot=_streams_only)


def _streams_only(w: Workload) -> str:
    if isinstance(w.pattern, Stream) and not w.pattern.asynchronous:
        return ""
    return f"put_many/get_many (batches of {BATCH}) are measured on the sync streams only"


def all_peers() -> list[Peer]:
    """The rows, baseline first; the default backend leads shmchan's (the headline)."""
    backends = sorted(BACKENDS, key=lambda b: b != DEFAULT_BACKEND)
    peers = [
        Peer(BASELINE, _mp_queue),
        Peer("mp.SimpleQueue", _mp_simple_queue),
        Peer("mp.Pipe", _mp_pipe, cannot=_no_shared_reader),
        Peer("faster_fifo", _faster_fifo, requires="faster_fifo"),
        Peer("pyzmq", _zmq, requires="zmq"),
        *(_shmchan_peer(b) for b in backends),
        _batch_peer(DEFAULT_BACKEND),
    ]
    return _with_redis_rows(
        [
            p
            if not p.requires or _installed(p.requires)
            else Peer(p.name, p.link, unavailable="not installed (pip install 'shmchan[bench]')")
            for p in peers
        ]
    )


HEADLINE: Final = f"shmchan.Queue[{DEFAULT_BACKEND}]"
HEADLINE_BATCH: Final = f"{HEADLINE} batch"


# -- running a case --------------------------------------------------------------------------


def _collect(ctls: list[Connection], procs: list[Any], deadline: float, limit: float) -> list[Any]:
    """Each child's result, in order; CaseFailed on an error, a death or the deadline."""
    results: dict[int, Any] = {}
    pending = {conn: i for i, conn in enumerate(ctls)}
    while pending:
        left = deadline - time.monotonic()
        ready = wait(list(pending), left) if left > 0 else []
        if not ready:
            raise CaseFailed(f"timed out after {limit:g} s (processes stopped)")
        for ready_conn in ready:
            conn = cast(Connection, ready_conn)
            i = pending.pop(conn)
            try:
                status, value = conn.recv()
            except EOFError:
                procs[i].join(1.0)
                raise CaseFailed(f"{procs[i].name} died (exit code {procs[i].exitcode})") from None
            if status != "ok":
                raise CaseFailed(f"{procs[i].name}: {value}")
            results[i] = value
    return [results[i] for i in range(len(ctls))]


def _stop(procs: list[Any], grace: float) -> None:
    """Let the processes exit within ``grace`` seconds, then terminate, then kill."""
    end = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join()
        p.close()


def run_case(w: Workload, peer: Peer, quick: bool, limit: float, profile_dir: str = "") -> dict[str, float]:
    """Run one case in fresh processes; its figures, or CaseFailed."""
    count = w.quick_count if quick else w.count
    rounds = (max(1, count // 10), count)
    deadline = time.monotonic() + limit
    links: list[Link] = []
    procs: list[Any] = []
    ctls: list[Connection] = []
    grace = 0.0
    try:
        for _ in range(w.pattern.links):
            links.append(peer.link(w))
        gate = Gate(SPAWN.Barrier(w.pattern.parties(w)), limit)
        for n, (role, args) in enumerate(w.pattern.roles(w, links, rounds, gate)):
            name = f"{(args[0] if role is _on_asyncio else role).__name__.lstrip('_')}-{n}"
            prof = os.path.join(profile_dir, f"{w.key}.{peer.name}.{name}.prof") if profile_dir else ""
            reader, writer = SPAWN.Pipe(duplex=False)
            ctls.append(reader)
            proc = SPAWN.Process(target=_child, args=(writer, role, args, prof), name=name, daemon=True)
            proc.start()
            procs.append(proc)
            writer.close()
        results = _collect(ctls, procs, deadline, limit)
        grace = 5.0
        return w.pattern.summarize(w, count, results)
    finally:
        with _sigint_deferred():  # a second Ctrl-C must not cut the clean-up short
            _stop(procs, grace)
            for conn in ctls:
                conn.close()
            for link in links:
                link.cleanup()


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C back until the block is done, then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught:
            raise KeyboardInterrupt


# -- the run as a whole --------------------------------------------------------------------


@dataclass
class Cell:
    """One peer on one workload: the figures of each run, or why there are none."""

    workload: Workload
    peer: str
    runs: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: str = ""

    def value(self, metric: Metric) -> float | None:
        if not self.runs:
            return None
        return statistics.median(r[metric.key] for r in self.runs)


@dataclass
class Report:
    quick: bool
    repeat: int
    peers: list[Peer]
    workloads: list[Workload]
    cells: dict[tuple[str, str], Cell]
    machine: dict[str, str]
    scale: float = 1.0
    seconds: float = 0.0
    complete: bool = True
    percall: list[str] = field(default_factory=list)  # the per-call table, when measured

    def cell(self, w: Workload, peer: str) -> Cell:
        return self.cells[(w.key, peer)]

    def value(self, key: str, peer: str, metric: Metric) -> float | None:
        cell = self.cells.get((key, peer))
        return cell.value(metric) if cell else None

    def ratio(
        self, w: Workload, peer: str, metric: Metric, versus: tuple[str, str] | None = None
    ) -> float | None:
        """``peer``'s figure over mp.Queue's (on ``w.baseline`` if set), or over
        ``versus`` = (workload key, peer); > 1 is better."""
        base = self.value(*(versus or (w.baseline or w.key, BASELINE)), metric)
        value = self.value(w.key, peer, metric)
        if not base or not value:
            return None
        return value / base if metric.higher_is_better else base / value


NO_ASYNC_FACE: Final = "no async face measured"
LEFT_OUT: Final = {NO_ASYNC_FACE}
"""Reasons for which a row that cannot run any workload of a table is left out of it."""


def _why_not(w: Workload, peer: Peer) -> str:
    if peer.unavailable:
        return peer.unavailable
    if w.requires and not _installed(w.requires):
        return f"{w.requires} is not installed"
    if w.pattern.asynchronous and not peer.asynchronous:
        return NO_ASYNC_FACE
    return peer.cannot(w)


def measure(report: Report, limit: float, profile_dir: str, progress: Callable[[str], None]) -> None:
    """Fill ``report``: per workload, ``repeat`` rounds over the peers (interleaved, so
    that a burst of noise hits every peer alike)."""
    plan = []
    skipped: dict[tuple[str, str], list[str]] = {}
    for w in report.workloads:
        for peer in report.peers:
            cell = report.cells[(w.key, peer.name)] = Cell(w, peer.name, skipped=_why_not(w, peer))
            if cell.skipped:
                skipped.setdefault((peer.name, cell.skipped), []).append(w.key)
        plan += [(w, peer, r) for r in range(report.repeat) for peer in report.peers if not _why_not(w, peer)]
    for (peer_name, why), keys in skipped.items():
        progress(f"n/a: {peer_name} on {', '.join(keys)}: {why}")
    for i, (w, peer, r) in enumerate(plan):
        cell = report.cell(w, peer.name)
        start = time.monotonic()
        try:
            cell.runs.append(run_case(w, peer, report.quick, limit, profile_dir))
            said = _brief(w, cell.runs[-1])
        except CaseFailed as exc:
            cell.errors.append(str(exc))
            said = f"FAILED: {exc}"
        took = time.monotonic() - start
        progress(
            f"[{i + 1:>3}/{len(plan)}] {w.key:<8} {peer.name:<22} run {r + 1}/{report.repeat}: {said} ({took:.1f} s)"
        )


def _brief(w: Workload, values: dict[str, float]) -> str:
    return ", ".join(_fmt(w, m, values[m.key]) for m in w.pattern.metrics)


# -- output ------------------------------------------------------------------------------------


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _fmt(w: Workload, metric: Metric, value: float) -> str:
    if metric is not RATE:
        return f"{_num(value)} µs"
    if w.payload.kind == "array":
        return f"{_num(1e3 / value)} ms/msg"
    text = f"{_si(value)} msgs/s"
    if w.table == "A":
        text += f", {_num(value * w.payload.size / 1e6)} MB/s"
    return text


def _name(w: Workload, metric: Metric) -> str:
    return f"{w.title} {metric.key.split('_')[0]}" if len(w.pattern.metrics) > 1 else w.title


def _header(w: Workload, metric: Metric, quick: bool) -> str:
    return f"{_name(w, metric)} (n={w.total(quick):,})"


def _columns(report: Report, table: str) -> list[tuple[Workload, Metric]]:
    return [(w, m) for w in report.workloads if w.table == table for m in w.pattern.metrics]


class Notes:
    """Numbered footnotes, each text once."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def _cell_text(report: Report, w: Workload, peer: str, metric: Metric, notes: Notes) -> str:
    cell = report.cell(w, peer)
    if cell.skipped:
        return f"n/a {notes.mark(cell.skipped)}"
    value = cell.value(metric)
    if value is None:
        return f"failed {notes.mark('; '.join(dict.fromkeys(cell.errors)))}" if cell.errors else "-"
    ratio = report.ratio(w, peer, metric)
    text = f"{_fmt(w, metric, value)}, {ratio:.2f}x" if ratio else _fmt(w, metric, value)
    if cell.errors:
        text += " " + notes.mark(f"{len(cell.errors)} run(s) failed: {'; '.join(dict.fromkeys(cell.errors))}")
    return text


def _label(peer: str) -> str:
    return f"**{peer}**" if peer == HEADLINE else peer


def render(report: Report) -> str:
    m = report.machine
    run = f"{'quick' if report.quick else 'full'} run, median of {report.repeat} interleaved repeat(s)"
    if report.scale != 1:
        run += f", counts x{report.scale:g}"
    where = f"{m['cpu']} x{m['cores']} | Linux {m['kernel']} | Python {m['python']}"
    noise = f"other processes used {m.get('others_cpu', '?')} of the CPU time during the run"
    out = [
        f"shmchan bench {m['date']} | {where} | spawn | {run} | {report.seconds:.0f} s",
        f"Load average (1, 5, 15 min): {m['load_before']} before, {m.get('load_after', '?')} after; {noise}",
        f"Versions: {m['versions']}",
        "",
        "x = speed-up over mp.Queue in this run (>1 is better; for latency and time per message it is",
        f"mp.Queue's time / the peer's). MB = 10^6 B. Bold: {HEADLINE}, the default backend.",
    ]
    notes = Notes()
    for table in dict.fromkeys(w.table for w in report.workloads):
        cols = _columns(report, table)
        out += ["", f"#### {TABLES[table]}", ""]
        out.append("| peer | " + " | ".join(_header(w, mt, report.quick) for w, mt in cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        left_out: dict[str, list[str]] = {}
        for peer in report.peers:
            reasons = {report.cell(w, peer.name).skipped for w, _ in cols}
            if reasons <= LEFT_OUT:  # it runs nothing here, for reasons the table states
                reason = min(reasons - {NO_ASYNC_FACE}, default=NO_ASYNC_FACE)
                left_out.setdefault(reason, []).append(peer.name)
                continue
            cells = [_cell_text(report, w, peer.name, mt, notes) for w, mt in cols]
            out.append(f"| {_label(peer.name)} | " + " | ".join(cells) + " |")
        for reason, names in left_out.items():
            out += ["", f"Not in this table ({reason}): {', '.join(names)}."]
    rings = ", ".join(
        f"{w.key} {_ring_bytes(w) // MiB} MiB" for w in report.workloads if w.capacity is not None
    )
    default = f"{DEFAULT_QUEUE_CAPACITY // MiB} MiB (the default)" + (f", except {rings}" if rings else "")
    out += ["", f"Ring bytes (capacity) of the shmchan.Queue rows: {default}."]
    out += [f"[{i + 1}] {text}" for i, text in enumerate(notes.texts)]
    out += ["", *targets_table(report)]
    out += redis_targets_table(report)
    if report.percall:
        out += ["", *report.percall]
    if not report.complete:
        out += ["", "(interrupted: the tables show the cases that had finished)"]
    return "\n".join(out)


TABLES: Final = {
    "A": "A. One producer -> one consumer, bytes: msgs/s, MB/s, x mp.Queue",
    "B-E": "B-E. Objects (msgs/s), ping-pong round trip (µs), 2x2 (total msgs/s), numpy (time per message)",
    "F": "F. The async face (anyio on asyncio): A 64B and C 64B; x = against mp.Queue's sync A 64B and C",
}


@dataclass(frozen=True)
class Target:
    """What the headline row should reach: a ratio to mp.Queue (or, with ``versus``, to
    mp.Queue's figure for another workload), or with ``at_most`` an absolute figure."""

    key: str
    metric: Metric
    ratio: float = 0.0
    versus: str = ""  # compare with mp.Queue's figure for this workload instead
    at_most: float = 0.0  # an absolute bound on the metric (latency, µs)
    batch: bool = False  # the target is for the batch row (put_many/get_many)

    def label(self) -> str:
        text = f"{self.key} {self.metric.key.split('_')[0]}" if self.metric is not RATE else self.key
        if self.batch:
            text += " (put_many/get_many)"
        return f"{text} / mp.Queue {self.versus}" if self.versus else text


TARGETS: Final = (
    Target("A-64B", RATE, 7.0),
    Target("A-64B", RATE, 20.0, batch=True),
    Target("A-1KiB", RATE, 5.0),
    Target("A-64KiB", RATE, 10.0),
    Target("A-1MiB", RATE, 40.0),
    Target("B", RATE, 3.0),
    Target("C", P50, at_most=3.0),
    Target("C", P99, at_most=50.0),
    Target("D", RATE, 5.0),
    Target("E", RATE, 20.0),
    Target("F-A-64B", RATE, 3.0, versus="A-64B"),
)


def targets_table(report: Report) -> list[str]:
    """The headline row (or its batch row) against each target."""
    by_key = {w.key: w for w in report.workloads}
    lines = [
        f"#### {HEADLINE} against its targets (default settings)",
        "",
        "| workload | target | measured | met |",
        "|---|---|---|---|",
    ]
    for t in TARGETS:
        w = by_key.get(t.key)
        if w is None:
            continue
        peer = HEADLINE_BATCH if t.batch else HEADLINE
        if t.at_most:
            value = report.cell(w, peer).value(t.metric)
            if value is None:
                continue
            ok = value <= t.at_most
            lines.append(f"| {t.label()} | <= {t.at_most:g} µs | {value:.2f} µs | {'yes' if ok else 'no'} |")
            continue
        versus = (t.versus, BASELINE) if t.versus else None
        ratio = report.ratio(w, peer, t.metric, versus)
        if ratio is None:
            continue
        met = "yes" if ratio >= t.ratio else f"no ({ratio / t.ratio:.0%} of it)"
        lines.append(f"| {t.label()} | >= {t.ratio:g}x | {ratio:.2f}x | {met} |")
    return lines if len(lines) > 4 else []


PERCALL_N: Final = 200_000
PERCALL_CHUNK: Final = 10_000
"""Calls per burst of the per-call table: 10 000 records of 64 B fill a fifth of the ring."""
PERCALL_TARGET_US: Final = 0.6


def percall(backends: Sequence[str], n: int = PERCALL_N) -> list[str]:
    """The cost of one call, in one process: ``put`` then ``get`` of 64 B ``bytes`` in
    loops of :data:`PERCALL_CHUNK` calls (so the ring never fills, and a get never finds
    it empty), and per item of ``put_many``/``get_many`` of 256. Best of 3 runs of
    ``n`` calls each."""
    lines = [
        "#### Per call, one process: 64 B bytes (best of 3)",
        "",
        "| backend | put | get | put_many, per item | get_many, per item | target (put, get) |",
        "|---|---|---|---|---|---|",
    ]
    payload = b"x" * 64
    for backend in backends:
        token = f"shmchan-bench-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        q: Queue[bytes] = Queue(name=f"/dev/shm/{token}" if backend == "mmap" else token, backend=backend)
        try:
            best = [math.inf] * 4
            chunk = min(n, PERCALL_CHUNK)
            rounds = max(1, n // chunk)
            batch = [payload] * BATCH
            for _ in range(3):
                put, get = q.put, q.get
                spent = [0.0] * 4
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    for _ in range(chunk):
                        put(payload)
                    t1 = time.perf_counter()
                    for _ in range(chunk):
                        get()
                    t2 = time.perf_counter()
                    for _ in range(chunk // BATCH):
                        q.put_many(batch)
                    t3 = time.perf_counter()
                    for _ in range(chunk // BATCH):
                        q.get_many(BATCH)
                    t4 = time.perf_counter()
                    for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                        spent[i] += dt
                calls, items = rounds * chunk, rounds * (chunk // BATCH * BATCH)
                now = [spent[0] / calls, spent[1] / calls, spent[2] / items, spent[3] / items]
                best = [min(a, b) for a, b in zip(best, now, strict=True)]
        finally:
            q.close()
            q.unlink()
        ns = [f"{x * 1e9:,.0f} ns" for x in best]
        met = "yes" if max(best[:2]) * 1e6 <= PERCALL_TARGET_US else "no"
        lines.append(f"| {backend} | " + " | ".join(ns) + f" | <= {PERCALL_TARGET_US * 1000:.0f} ns: {met} |")
    return lines


def to_json(report: Report) -> dict[str, Any]:
    rows = []
    for (_, peer), cell in report.cells.items():
        w = cell.workload
        row: dict[str, Any] = {
            "workload": w.key,
            "peer": peer,
            "messages": w.total(report.quick),
            "ring_bytes": _ring_bytes(w) if peer.startswith(("shmchan", "faster_fifo")) else None,
            "skipped": cell.skipped or None,
            "errors": cell.errors,
            "runs": cell.runs,
        }
        for metric in w.pattern.metrics:
            row[metric.key] = cell.value(metric)
            row[f"{metric.key}_x_mpq"] = report.ratio(w, peer, metric)
        rows.append(row)
    return {
        "machine": report.machine,
        "quick": report.quick,
        "repeat": report.repeat,
        "scale": report.scale,
        "seconds": report.seconds,
        "complete": report.complete,
        "headline": HEADLINE,
        "percall": report.percall,
        "results": rows,
    }


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported only for --plot)."""
    mpl = _need("matplotlib")
    mpl.use("Agg")
    return _need("matplotlib.pyplot")


def plot(report: Report, path: str) -> None:
    """A grouped bar chart of every ratio to mp.Queue (log scale)."""
    plt = _pyplot()
    cols = [c for table in TABLES for c in _columns(report, table)]
    peers = [p.name for p in report.peers if p.name != BASELINE]
    width = 0.84 / max(1, len(peers))
    fig, ax = plt.subplots(figsize=(14, 7))
    for j, peer in enumerate(peers):
        xs, ys = [], []
        for i, (w, metric) in enumerate(cols):
            ratio = report.ratio(w, peer, metric)
            if ratio:
                xs.append(i - 0.42 + width * (j + 0.5))
                ys.append(ratio)
        bars = ax.bar(xs, ys, width, label=peer, edgecolor="black" if peer == HEADLINE else None)
        if peer == HEADLINE:
            ax.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
    target_at = {(t.key, t.metric.key): t.ratio for t in TARGETS if t.ratio and not (t.versus or t.batch)}
    for i, (w, metric) in enumerate(cols):
        target = target_at.get((w.key, metric.key))
        if target:
            ax.plot([i - 0.45, i + 0.45], [target, target], color="red", linestyle="--", linewidth=1)
    ax.plot([], [], color="red", linestyle="--", linewidth=1, label=f"target for {HEADLINE}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_need("matplotlib.ticker").FuncFormatter(lambda y, _: f"{y:g}x"))
    ax.set_xticks(range(len(cols)), [textwrap.fill(_name(w, m), 10) for w, m in cols], fontsize=9)
    ax.set_ylabel("speed-up over multiprocessing.Queue (= 1x, the black line; log scale)")
    m = report.machine
    ax.set_title(
        f"shmchan bench, {'quick' if report.quick else 'full'} run {m['date']}: "
        f"{m['cpu']} x{m['cores']}, Python {m['python']} (higher is better)"
    )
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    versions = ", ".join(
        f"{d} {_version(d)}" for d in ("shmchan", "faster-fifo", "pyzmq", "numpy", "matplotlib")
    )
    git = _git_state()
    if git:
        versions = versions.replace(
            f"shmchan {_version('shmchan')}", f"shmchan {_version('shmchan')} (git {git})"
        )
    if _installed("zmq"):
        versions += f" (libzmq {_need('zmq').zmq_version()})"
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "load_before": _load(),
    }


def _git_state() -> str:
    """``git describe --always --dirty`` of the checkout shmchan runs from, if any."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, ".git")):
        return ""
    try:
        cmd = ["git", "-C", root, "describe", "--always", "--dirty"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent not idle, from /proc/stat (0 if unknown)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


def _others_share(busy_before: float, seconds: float) -> str:
    """How much of the machine's CPU time other processes used during the run: the
    machine's busy time less this process's and its (reaped) children's."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    others = _busy_cpu_seconds() - busy_before - own
    if not busy_before or seconds <= 0:
        return "?"
    return f"{max(0.0, others) / (seconds * (os.cpu_count() or 1)):.0%}"


def _scaled(w: Workload, scale: float) -> Workload:
    return replace(w, count=max(1, round(w.count * scale)), quick_count=max(1, round(w.quick_count * scale)))


def _workload_is(w: Workload, wanted: str) -> bool:
    """``A-64B`` names one workload, ``A`` all of A."""
    key, wanted = w.key.lower(), wanted.lower()
    return key == wanted or key.startswith(wanted + "-")


def _peer_is(peer: Peer, wanted: str) -> bool:
    return wanted.lower() in peer.name.lower()


def _select(items: Sequence[Any], wanted: list[str] | None, match: Callable[[Any, str], bool]) -> list[Any]:
    if not wanted:
        return list(items)
    chosen = [x for x in items if any(match(x, s) for s in wanted)]
    if not chosen:
        raise SystemExit(f"nothing matches {', '.join(wanted)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shmchan bench",
        description=(
            "Run shmchan beside the queues a user would otherwise pick (workloads A-E) and print "
            "every figure with its ratio to multiprocessing.Queue in the same run."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of under a minute (1 repeat, few messages)"
    )
    parser.add_argument("--repeat", type=int, help="runs per case, median shown (default 3; 1 with --quick)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument(
        "--plot", metavar="PATH", help="also draw the ratios as a bar chart PNG (needs matplotlib)"
    )
    parser.add_argument(
        "--workload",
        action="append",
        metavar="KEY",
        help="only this workload (A-64B, A-1KiB, A-64KiB, A-1MiB, B, C, D, E, R-A-64B...; A = all of A)",
    )
    parser.add_argument("--peer", action="append", metavar="NAME", help="only peers whose name contains NAME")
    parser.add_argument("--case-timeout", type=float, metavar="S", help="time limit per case (default 30 s)")
    parser.add_argument("--profile", metavar="DIR", help="write cProfile stats of every process to DIR")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every message count by this")
    parser.add_argument("--no-percall", action="store_true", help="skip the per-call costs in one process")
    args = parser.parse_args(argv)
    if args.plot and not _installed("matplotlib"):
        print("--plot needs matplotlib: pip install 'shmchan[bench]' (or leave out --plot)", file=sys.stderr)
        return 2
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    # The children import NumPy (workload E); its BLAS thread pool would otherwise spin on
    # two cores beside the queues it has no part in. Every peer runs with this setting.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    peers = all_peers()
    chosen = _select(peers, args.peer, _peer_is)
    report = Report(
        quick=args.quick,
        repeat=args.repeat or (1 if args.quick else 3),
        peers=[peers[0], *(p for p in chosen if p.name != BASELINE)],  # the baseline always runs
        workloads=[
            _scaled(w, args.scale)
            for w in _select(
                (*WORKLOADS, *redis_workloads(args.quick, args.workload)), args.workload, _workload_is
            )
        ],
        scale=args.scale,
        cells={},
        machine=machine_info(),
    )
    limit = args.case_timeout or 30.0

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start, busy = time.monotonic(), _busy_cpu_seconds()
    try:
        with redis_server_for(report, progress):
            measure(report, limit, os.path.abspath(args.profile) if args.profile else "", progress)
        if not args.no_percall and any(p.name.startswith("shmchan") for p in report.peers):
            progress("per call, one process")
            backends = [
                b for b in sorted(BACKENDS, key=lambda b: b != DEFAULT_BACKEND) if b in available_backends()
            ]
            report.percall = percall(backends, PERCALL_N // 10 if args.quick else PERCALL_N)
    except KeyboardInterrupt:
        report.complete = False
        progress("interrupted: the running case stopped its processes and removed its queues")
    report.seconds = time.monotonic() - start
    report.machine["load_after"] = _load()
    report.machine["others_cpu"] = _others_share(busy, report.seconds)
    print(render(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(report), f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return 0 if report.complete else 130


# -- the redis backend (issue 10) ---------------------------------------------------------
#
# Table R runs shmchan.Queue(backend="redis") on a redis-server that the bench starts
# itself (a free port of 127.0.0.1, a temporary directory, no persistence) and stops at
# the end, beside mp.Queue (the ratios' baseline) and shmchan's default-backend rows.
# Its counts are smaller than tables A-F's: a remote queue moves thousands of messages
# per second, not millions. The redis rows run table R only; the other rows that would
# only add time are left out of it.

REDIS: Final = "shmchan.Queue[redis]"
REDIS_PREFETCH: Final = 64
REDIS_ROWS: Final = (REDIS, f"{REDIS} prefetch {REDIS_PREFETCH}", f"{REDIS} batch")
REDIS_WITH: Final = (BASELINE, HEADLINE, HEADLINE_BATCH)
"""The local rows that also run table R."""
REDIS_ONLY_R: Final = "the redis rows run table R"
NOT_IN_R: Final = "table R runs on mp.Queue, shmchan's default-backend rows and redis only"
LEFT_OUT.update({REDIS_ONLY_R, NOT_IN_R})
TABLES["R"] = "R. The redis backend on a loopback redis-server (smaller counts), beside local rows"


def _redis_stream(
    key: str, size: int, count: int, quick: int, pattern: Pattern = STREAM, **kw: Any
) -> Workload:
    label = f"{size // KiB}KiB" if size >= KiB else f"{size}B"
    title = {STREAM: "R stream", PINGPONG: "R ping-pong", ASYNC_STREAM: "R async stream"}[pattern]
    if kw.get("producers", 1) > 1:
        title = f"R {kw['producers']}x{kw['consumers']}"
    return Workload(key, f"{title} {label}", "R", pattern, Payload("bytes", size), count, quick, **kw)


REDIS_WORKLOADS: Final = (
    _redis_stream("R-A-64B", 64, 20_000, 2_000),
    _redis_stream("R-A-64KiB", 64 * KiB, 2_000, 200),
    _redis_stream("R-C", 64, 2_000, 200, PINGPONG),
    _redis_stream("R-D", 64, 10_000, 1_000, producers=2, consumers=2),
    _redis_stream("R-F", 64, 5_000, 500, ASYNC_STREAM),
)


def redis_workloads(quick: bool, chosen: list[str] | None) -> tuple[Workload, ...]:
    """Table R's workloads: in a ``--quick`` run that names no workload, only R-A-64B
    (each case starts fresh processes: the whole table would double a smoke run)."""
    if quick and not chosen:
        return REDIS_WORKLOADS[:1]
    return REDIS_WORKLOADS


_redis_url: list[str] = []
"""The URL of the server the bench started (empty while none runs)."""


class RedisLink(ShmchanLink):
    """A named redis-backed shmchan.Queue; the parent deletes it however the case ended."""


class RedisBatchLink(ShmchanBatchLink):
    """The same, driven by ``put_many(list)`` and ``get_many(BATCH)``."""


def _redis_link(kind: type[ShmchanLink], prefetch: int | None = None) -> Callable[[Workload], Link]:
    def link(w: Workload) -> Link:
        if not _redis_url:
            raise CaseFailed("no redis-server is running")
        name = f"shmchan-bench-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        return kind(Queue(name=name, backend="redis", url=_redis_url[0], prefetch=prefetch))

    return link


def _redis_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def _redis_unavailable() -> str:
    if _redis_binary() is None:
        return "no redis-server on PATH (Debian: apt-get install redis-server)"
    if not (_installed("redis") and _installed("coredis")):
        return "not installed (pip install 'shmchan[redis]')"
    return ""


def _only_r(w: Workload) -> str:
    return "" if w.table == "R" else REDIS_ONLY_R


def _with_redis_rows(peers: list[Peer]) -> list[Peer]:
    """``peers`` with the redis rows added, and the rows that skip table R marked so."""

    def skips_r(cannot: Callable[[Workload], str]) -> Callable[[Workload], str]:
        return lambda w: NOT_IN_R if w.table == "R" else cannot(w)

    why = _redis_unavailable()
    out = [p if p.name in REDIS_WITH else replace(p, cannot=skips_r(p.cannot)) for p in peers]

    def batch_only(w: Workload) -> str:
        return _only_r(w) or _streams_only(w)

    def one_consumer(w: Workload) -> str:
        # Another consumer's end marker may sit in a prefetch buffer until that handle closes.
        return _only_r(w) or ("prefetch is measured with one consumer" if w.consumers > 1 else "")

    out += [
        Peer(REDIS_ROWS[0], _redis_link(RedisLink), cannot=_only_r, unavailable=why, asynchronous=True),
        Peer(REDIS_ROWS[1], _redis_link(RedisLink, REDIS_PREFETCH), cannot=one_consumer, unavailable=why),
        Peer(REDIS_ROWS[2], _redis_link(RedisBatchLink), cannot=batch_only, unavailable=why),
    ]
    return out


@contextlib.contextmanager
def redis_server_for(report: Report, progress: Callable[[str], None]) -> Iterator[None]:
    """Run a redis-server for the run if it has a redis case; stop it and remove its
    directory afterwards (also on Ctrl-C or a failure)."""
    wanted = any(
        w.table == "R" and p.name in REDIS_ROWS and not p.unavailable
        for w in report.workloads
        for p in report.peers
    )
    binary = _redis_binary()
    if not wanted or binary is None:
        yield
        return
    directory = tempfile.mkdtemp(prefix="shmchan-bench-redis-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", directory, "--logfile", os.path.join(directory, "log")]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise CaseFailed(f"redis-server did not start (exit {proc.poll()})") from None
                time.sleep(0.02)
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
        report.machine["versions"] += f", {version.split(' sha=')[0].strip()}"
        progress(f"redis-server on 127.0.0.1:{port} (directory {directory})")
        _redis_url.append(url)
        yield
    finally:
        _redis_url.clear()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


REDIS_TARGETS: Final = (("R-A-64B", REDIS, 4_000.0), ("R-A-64B", REDIS_ROWS[2], 100_000.0))
"""Issue 10: 1P/1C 64 B on loopback, single put/get and batches (msgs/s)."""


def redis_targets_table(report: Report) -> list[str]:
    """The redis rows against issue 10's targets (absolute msgs/s, not ratios)."""
    lines = ["", "#### The redis backend against the targets of issue 10", ""]
    lines += ["| case | row | target | measured | met |", "|---|---|---|---|---|"]
    for key, peer, target in REDIS_TARGETS:
        value = report.value(key, peer, RATE)
        if value is None:
            continue
        met = "yes" if value >= target else f"no ({value / target:.0%} of it)"
        lines.append(f"| {key} | {peer} | >= {_si(target)} msgs/s | {_si(value)} msgs/s | {met} |")
    return lines if len(lines) > 5 else []
