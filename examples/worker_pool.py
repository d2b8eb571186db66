"""A pool of worker processes fed by a JoinableQueue: count the primes below a limit.

The parent cuts ``[0, limit)`` into chunks and puts one task per chunk on a
``JoinableQueue``. Each worker process takes tasks, counts and sums the primes in its
chunk (trial division by odd numbers), puts the result on a ``Queue`` and calls
``task_done()``. The parent waits with ``tasks.join()``, stops the workers with one
``None`` sentinel each, collects the results and checks them against a sieve of
Eratosthenes computed on its own. It prints one summary line and exits 0 if every
chunk is right (1 otherwise).

This is an ordinary multiprocessing program. Moving it to shmchan is one line::

    -from multiprocessing import JoinableQueue, Queue
    +from shmchan import JoinableQueue, Queue

Processes are still ``multiprocessing.Process``; only the queues change, and they
work under every start method (spawn by default here, as on macOS and Windows).

Run it from the repository root::

    python examples/worker_pool.py                  # 4 workers, primes below 300 000
    python examples/worker_pool.py --workers 2 --limit 100000 --start-method fork
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from multiprocessing import Process

from shmchan import JoinableQueue, Queue


def count_primes(lo: int, hi: int) -> tuple[int, int]:
    """(count, sum) of the primes in [lo, hi), by trial division."""
    count = total = 0
    for n in range(max(lo, 2), hi):
        if n % 2 == 0:
            if n == 2:
                count, total = count + 1, total + n
            continue
        d = 3
        while d * d <= n:
            if n % d == 0:
                break
            d += 2
        else:
            count, total = count + 1, total + n
    return count, total


def worker(tasks, results) -> None:
    while True:
        task = tasks.get()
        try:
            if task is None:  # the sentinel: no more work
                return
            lo, hi = task
            count, total = count_primes(lo, hi)
            results.put((lo, hi, count, total))
        finally:
            tasks.task_done()


def sieve(limit: int) -> bytearray:
    """is_prime[n] for n < limit."""
    is_prime = bytearray([1]) * limit
    is_prime[: min(limit, 2)] = bytes(min(limit, 2))
    for n in range(2, int(limit**0.5) + 1):
        if is_prime[n]:
            is_prime[n * n :: n] = bytes(len(range(n * n, limit, n)))
    return is_prime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--limit", type=int, default=300_000)
    parser.add_argument("--chunk", type=int, default=10_000)
    parser.add_argument("--start-method", default="spawn", choices=multiprocessing.get_all_start_methods())
    args = parser.parse_args()
    multiprocessing.set_start_method(args.start_method, force=True)

    started = time.monotonic()
    tasks = JoinableQueue()
    results = Queue()
    workers = [Process(target=worker, args=(tasks, results), daemon=True) for _ in range(args.workers)]
    for w in workers:
        w.start()

    chunks = [(lo, min(lo + args.chunk, args.limit)) for lo in range(0, args.limit, args.chunk)]
    for chunk in chunks:
        tasks.put(chunk)
    tasks.join()  # every chunk has been counted
    for _ in workers:
        tasks.put(None)
    tasks.join()  # every worker has taken its sentinel

    got = {}
    for _ in chunks:
        lo, hi, count, total = results.get(timeout=60)
        got[lo, hi] = count, total
    for w in workers:
        w.join(timeout=60)
    tasks.close()
    results.close()

    is_prime = sieve(args.limit)
    wrong = []
    for lo, hi in chunks:
        primes = [n for n in range(lo, hi) if is_prime[n]]
        if got.get((lo, hi)) != (len(primes), sum(primes)):
            wrong.append((lo, hi))
    exitcodes = [w.exitcode for w in workers]
    count = sum(c for c, _ in got.values())
    elapsed = time.monotonic() - started
    if wrong or len(got) != len(chunks) or any(code != 0 for code in exitcodes):
        print(
            f"worker_pool: FAILED: {len(wrong)} wrong chunks {wrong[:5]}, {len(got)} of {len(chunks)} "
            f"results, worker exit codes {exitcodes}"
        )
        return 1
    print(
        f"worker_pool: OK: {count} primes below {args.limit} from {len(chunks)} tasks "
        f"on {args.workers} workers ({args.start_method}) in {elapsed:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
