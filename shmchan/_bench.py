"""``python -m shmchan bench``: shmchan beside multiprocessing.Queue, in one run.

Each case runs a producer and a consumer in fresh ``spawn`` processes, exchanges an
untimed warm-up, then times ``count`` messages end to end (first send to last
receive). Figures are medians of ``--repeat`` runs; ratios compare against
multiprocessing.Queue measured in the same invocation, because this kind of machine
is noisy and only same-run ratios mean anything. Every case has a time limit and
removes what it created, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ._backends import available_backends
from ._channel import Channel

SPAWN = mp.get_context("spawn")
CASE_TIME_LIMIT = 120.0


@dataclass
class Result:
    peer: str
    size: int
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds


# -- workers (module level so that spawn can import them) -----------------------------


def _mpq_producer(q: Any, size: int, count: int) -> None:
    msg = b"x" * size
    q.put(msg)  # warm-up
    for _ in range(count):
        q.put(msg)


def _mpq_consumer(q: Any, count: int, out: Any) -> None:
    q.get()
    start = time.perf_counter()
    for _ in range(count):
        q.get()
    out.put(time.perf_counter() - start)


def _chan_producer(name: str, backend: str, size: int, count: int) -> None:
    ch = Channel.open(name, backend=backend)
    msg = b"x" * size
    ch.send_bytes(msg)
    send = ch.send_bytes
    for _ in range(count):
        send(msg)
    ch.close()


def _chan_consumer(name: str, backend: str, count: int, out: Any) -> None:
    ch = Channel.open(name, backend=backend)
    ch.recv_bytes()
    recv = ch.recv_bytes
    start = time.perf_counter()
    for _ in range(count):
        recv()
    out.put(time.perf_counter() - start)
    ch.close()


def _run_pair(
    producer: Callable[..., None],
    pargs: tuple[Any, ...],
    consumer: Callable[..., None],
    cargs: tuple[Any, ...],
) -> float:
    out = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=consumer, args=(*cargs, out)),
        SPAWN.Process(target=producer, args=pargs),
    ]
    try:
        for p in procs:
            p.start()
        seconds: float = out.get(timeout=CASE_TIME_LIMIT)
        for p in procs:
            p.join(CASE_TIME_LIMIT)
        return seconds
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def run_mpq(size: int, count: int) -> float:
    q = SPAWN.Queue()
    return _run_pair(_mpq_producer, (q, size, count), _mpq_consumer, (q, count))


def run_channel(backend: str, size: int, count: int) -> float:
    token = f"shmchan-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    name = f"/dev/shm/{token}" if backend == "mmap" else token
    ch = Channel.create(name, capacity=1 << 20, backend=backend)
    try:
        return _run_pair(_chan_producer, (name, backend, size, count), _chan_consumer, (name, backend, count))
    finally:
        ch.close()
        Channel.remove(name, backend=backend)


# -- driver ------------------------------------------------------------------------------


def measure(quick: bool, repeat: int, progress: Callable[[str], None]) -> list[Result]:
    sizes = {64: 50_000 if quick else 300_000, 1024: 30_000 if quick else 200_000}
    peers: list[tuple[str, Callable[[int, int], float]]] = [("mp.Queue", run_mpq)]
    for backend in available_backends():
        peers.append((f"shmchan.Channel[{backend}]", functools.partial(run_channel, backend)))
    results = []
    for size, count in sizes.items():
        for peer, fn in peers:
            runs = []
            for i in range(repeat):
                progress(f"  {peer:<26} {size:>5} B  run {i + 1}/{repeat} ...")
                runs.append(fn(size, count))
            results.append(Result(peer, size, count, statistics.median(runs)))
    return results


def table(results: list[Result]) -> str:
    base = {r.size: r.rate for r in results if r.peer == "mp.Queue"}
    sizes = sorted(base)
    peers = list(dict.fromkeys(r.peer for r in results))
    by = {(r.peer, r.size): r for r in results}
    head = "| peer | " + " | ".join(f"A {s} B: msgs/s, MB/s, x mp.Queue" for s in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for peer in peers:
        cells = []
        for s in sizes:
            r = by[(peer, s)]
            cells.append(f"{r.rate:,.0f}, {r.rate * s / 1e6:,.1f}, {r.rate / base[s]:.2f}x")
        lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shmchan bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of well under a minute")
    parser.add_argument("--repeat", type=int, default=None, help="runs per case (median shown)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print(
        f"shmchan bench: workload A (1 producer -> 1 consumer, bytes), spawn, "
        f"{'quick' if args.quick else 'full'}, median of {repeat}; "
        f"{platform.machine()} x{os.cpu_count()}, Python {platform.python_version()}",
        flush=True,
    )
    start = time.monotonic()
    try:
        results = measure(args.quick, repeat, progress)
    except KeyboardInterrupt:
        print("interrupted; every case cleaned up after itself", file=sys.stderr)
        return 130
    print(table(results))
    print(f"({time.monotonic() - start:.0f} s; x = speed-up over mp.Queue in this run)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"rate": r.rate} for r in results], f, indent=2)
    return 0
