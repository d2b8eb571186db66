"""What the redis tests' child processes run (importable, so that ``spawn`` and a
ProcessPoolExecutor can pickle these functions and the queue handles they take)."""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any

import shmchan


def produce(q: Any, producer: int, count: int, batch: int) -> int:
    """Put ``(producer, seq)`` for seq in range(count), ``batch`` at a time."""
    for start in range(0, count, batch):
        q.put_many([(producer, seq) for seq in range(start, min(count, start + batch))])
    q.close()
    return count


def consume(q: Any, batch: int, out: Connection) -> None:
    """Take items (get_many(batch), or get() if batch is 0) until None; send them back.
    A batch may hold the stops of other consumers too: those go back on the queue."""
    got: list[Any] = []
    stops = 0
    while not stops:
        items = q.get_many(batch) if batch else [q.get()]
        for item in items:
            if item is None:
                stops += 1
            else:
                got.append(item)
    if stops > 1:
        q.put_many([None] * (stops - 1))
    q.close()
    out.send(got)
    out.close()


def put_in_pool(q: Any, items: list[Any]) -> str:
    """A ProcessPoolExecutor task: put ``items`` on a queue that came as an argument."""
    for item in items:
        q.put(item)
    q.close()
    return "ok"


def open_by_name(name: str, url: str, item: Any) -> str:
    """A ProcessPoolExecutor task: attach by name and URL, put one item."""
    q = shmchan.Queue.open(name, backend="redis", url=url)
    q.put(item)
    q.close()
    return "ok"


def read_channel(ch: Any) -> list[Any]:
    """Read a channel handle that came pickled, to the end of the stream."""
    got = list(ch)
    ch.close()
    return got


def outlive_the_parent(q: Any, ready: Any, go: Any) -> None:
    """A forked child: use an inherited queue handle after the parent closed its own."""
    q.put("before")
    ready.set()
    if not go.wait(30):
        raise SystemExit(2)
    q.put("after")
    got = [q.get(timeout=5), q.get(timeout=5)]
    q.close()
    raise SystemExit(0 if got == ["before", "after"] else 1)
