"""An async producer/consumer pipeline across processes, under asyncio or trio.

::

    source ──records──▶ workers ──digests──▶ sink
    (a parent task)     (--workers processes,   (a parent task)
                         --tasks tasks in each)

* The parent runs one anyio program with two tasks: the **source** sends
  ``--records`` records (a sequence number and a few KiB of pseudo-random bytes, and
  now and then one larger than the ring) on the ``records`` channel, and the
  **sink** collects what arrives on the ``digests`` channel.
* Each **worker** process runs its own anyio program: ``--tasks`` tasks share one
  handle of ``records``, and each one hashes the records it gets and sends the
  SHA-256 on ``digests``. Results arrive out of order.
* Shutdown needs no sentinels: the channels end like pipes. When the source closes
  its handle (the last with write rights), the workers' ``async for`` loops end once
  ``records`` is drained; each worker then closes its ``digests`` handle, and the
  sink's ``async for`` ends when the last worker has. A worker opens ``digests``
  before ``records``, so it can never hold a record the sink would miss.

The parent recomputes every digest on its own, checks that each record came back
exactly once, prints one summary line and exits 0 (1 if anything is wrong). It
removes both channels, so nothing is left in /dev/shm.

Run it from the repository root (or with shmchan installed)::

    python examples/async_pipeline.py                      # asyncio, 5000 records, 3 workers
    python examples/async_pipeline.py --backend trio --records 20000 --workers 2 --tasks 8
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import random
import secrets
import sys
import time
from typing import Any

import anyio

from shmchan import Channel

BIG_EVERY = 1000  # every 1000th record is larger than the 64 KiB ring


def make_payload(seq: int) -> bytes:
    rng = random.Random(seq)
    size = 200_000 if seq % BIG_EVERY == BIG_EVERY - 1 else rng.randint(64, 4096)
    return rng.randbytes(size)


# -- a worker process -------------------------------------------------------------------------


def worker(records_name: str, digests_name: str, lib: str, tasks: int) -> None:
    anyio.run(work, records_name, digests_name, tasks, backend=lib)


async def work(records_name: str, digests_name: str, tasks: int) -> None:
    # Output first: once this worker can take a record, it already counts as a writer
    # of digests, so the sink cannot reach end of stream while a record is in flight.
    with (
        Channel.open(digests_name, mode="w") as digests,
        Channel.open(records_name, mode="r") as records,
    ):
        pid = os.getpid()

        async def hash_records() -> None:
            async for seq, payload in records.aio:  # ends at end of stream
                await digests.aio.send((seq, hashlib.sha256(payload).digest(), pid))

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(hash_records)


# -- the parent: source and sink ------------------------------------------------------------------


async def source(records: Channel, count: int) -> None:
    async with records.aio as stream:  # closing the last writer is the end of stream
        for seq in range(count):
            await stream.send((seq, make_payload(seq)))


async def sink(digests: Channel, got: dict[int, bytes], pids: set[int]) -> None:
    async for seq, digest, pid in digests.aio:
        if seq in got:
            raise RuntimeError(f"record {seq} came back twice")
        got[seq] = digest
        pids.add(pid)


async def watch(procs: list[Any]) -> None:
    """Fail fast if a worker dies, instead of waiting for records nobody will hash."""
    while True:
        for p in procs:
            if p.exitcode not in (None, 0):
                raise RuntimeError(f"worker {p.pid} exited with code {p.exitcode}")
        await anyio.sleep(0.1)


async def pipeline(records: Channel, digests: Channel, count: int, procs: list[Any]) -> tuple[dict, set]:
    got: dict[int, bytes] = {}
    pids: set[int] = set()
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(source, records, count)
            tg.start_soon(watch, procs)
            await sink(digests, got, pids)
            tg.cancel_scope.cancel()  # the sink is done: stop the watcher
    return got, pids


def fold(digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(digests)).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio", help="event loop")
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per worker process")
    args = parser.parse_args()

    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    token = f"shmchan-example-{os.getpid()}-{secrets.token_hex(4)}"
    records_name, digests_name = f"{token}-records", f"{token}-digests"
    procs: list[Any] = []
    with (
        Channel.create(records_name, capacity=1 << 16, mode="w") as records,
        Channel.create(digests_name, capacity=1 << 16, mode="r") as digests,
    ):
        try:
            procs = [
                ctx.Process(target=worker, args=(records_name, digests_name, args.backend, args.tasks))
                for _ in range(args.workers)
            ]
            for p in procs:
                p.start()
            got, pids = anyio.run(pipeline, records, digests, args.records, procs, backend=args.backend)
            for p in procs:
                p.join(30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(10)
            for name in (records_name, digests_name):
                Channel.remove(name)

    want = [hashlib.sha256(make_payload(seq)).digest() for seq in range(args.records)]
    elapsed = time.monotonic() - started
    exitcodes = [p.exitcode for p in procs]
    problems = []
    if sorted(got) != list(range(args.records)):
        problems.append(f"{len(got)} of {args.records} records came back")
    elif [got[seq] for seq in range(args.records)] != want:
        problems.append("wrong digests")
    if any(code != 0 for code in exitcodes):
        problems.append(f"worker exit codes {exitcodes}")
    if not pids <= {p.pid for p in procs}:
        problems.append("digests from unknown processes")
    if problems:
        print(f"async_pipeline: FAILED: {'; '.join(problems)}")
        return 1
    print(
        f"async_pipeline: OK: {args.records} records through {args.workers} worker processes "
        f"({args.backend}), digest {fold(want)[:16]} in {elapsed:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
