"""A three-stage pipeline across processes: producer -> transformers -> consumer.

* The **producer** makes ``--records`` records (a sequence number and a few KiB of
  pseudo-random bytes) and puts them on a bounded ``raw`` queue, so it is slowed down
  when the transformers fall behind (back-pressure).
* Each **transformer** takes raw records, computes their SHA-256 and size, and puts
  the result on the ``cooked`` queue. There are ``--transformers`` of them, so results
  arrive out of order.
* The **consumer** restores the order by sequence number and folds every digest
  into one final SHA-256, which it sends to the parent on a ``results`` queue.

Shutdown uses sentinels: the producer puts one ``None`` per transformer; each
transformer forwards one ``None`` when it stops; the consumer stops after it has
seen one ``None`` per transformer. The parent recomputes everything on its own,
prints one summary line and exits 0 if the pipeline's answer is right (1 otherwise).

This is an ordinary multiprocessing program. Moving it to shmchan is one line::

    -from multiprocessing import Queue
    +from shmchan import Queue

Processes are still ``multiprocessing.Process``; the queues work under every start
method (spawn by default here).

Run it from the repository root::

    python examples/pipeline.py                     # 5000 records, 2 transformers
    python examples/pipeline.py --records 20000 --transformers 3 --start-method forkserver
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import random
import sys
import time
from multiprocessing import Process

from shmchan import Queue


def make_record(seq: int) -> dict:
    rng = random.Random(seq)
    return {"seq": seq, "payload": rng.randbytes(rng.randint(64, 4096))}


def producer(raw, count: int, transformers: int) -> None:
    for seq in range(count):
        raw.put(make_record(seq))
    for _ in range(transformers):
        raw.put(None)


def transformer(raw, cooked) -> None:
    while True:
        record = raw.get()
        if record is None:
            cooked.put(None)
            return
        payload = record["payload"]
        cooked.put((record["seq"], len(payload), hashlib.sha256(payload).hexdigest()))


def consumer(cooked, results, transformers: int) -> None:
    stopped = 0
    pending = {}
    next_seq = 0
    total_bytes = 0
    final = hashlib.sha256()
    while stopped < transformers:
        item = cooked.get()
        if item is None:
            stopped += 1
            continue
        seq, size, digest = item
        pending[seq] = size, digest
        while next_seq in pending:  # fold in sequence order
            size, digest = pending.pop(next_seq)
            total_bytes += size
            final.update(digest.encode())
            next_seq += 1
    results.put(
        {"records": next_seq, "left_over": len(pending), "bytes": total_bytes, "digest": final.hexdigest()}
    )


def expected(count: int) -> dict:
    final = hashlib.sha256()
    total_bytes = 0
    for seq in range(count):
        payload = make_record(seq)["payload"]
        total_bytes += len(payload)
        final.update(hashlib.sha256(payload).hexdigest().encode())
    return {"records": count, "left_over": 0, "bytes": total_bytes, "digest": final.hexdigest()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--transformers", type=int, default=2)
    parser.add_argument("--start-method", default="spawn", choices=multiprocessing.get_all_start_methods())
    args = parser.parse_args()
    multiprocessing.set_start_method(args.start_method, force=True)

    started = time.monotonic()
    raw = Queue(maxsize=100)
    cooked = Queue()
    results = Queue()
    procs = [
        Process(target=producer, args=(raw, args.records, args.transformers), name="producer"),
        *[
            Process(target=transformer, args=(raw, cooked), name=f"transformer-{i}")
            for i in range(args.transformers)
        ],
        Process(target=consumer, args=(cooked, results, args.transformers), name="consumer"),
    ]
    for p in procs:
        p.start()
    got = results.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    for q in (raw, cooked, results):
        q.close()

    want = expected(args.records)
    exitcodes = {p.name: p.exitcode for p in procs}
    elapsed = time.monotonic() - started
    if got != want or any(code != 0 for code in exitcodes.values()):
        print(f"pipeline: FAILED: got {got}, expected {want}, exit codes {exitcodes}")
        return 1
    print(
        f"pipeline: OK: {got['records']} records ({got['bytes']} bytes) through {args.transformers} "
        f"transformers ({args.start_method}), digest {got['digest'][:16]} in {elapsed:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
