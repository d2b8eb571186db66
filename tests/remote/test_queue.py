"""The drop-in queues on the redis backend: the API of the local ones, against a real
server (semantics in docs/redis.md)."""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing as mp
import pickle
import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmchan
from shmchan import JoinableQueue, Queue, SimpleQueue

from . import children
from .conftest import RedisServer, keys_on, unique, wait_no_keys

SPAWN = mp.get_context("spawn")


class Unpicklable:
    """Pickles fine; raises on unpickling (a record this reader cannot decode)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_fail, ())


def _fail() -> None:
    raise RuntimeError("cannot be rebuilt here")


def test_round_trip_through_the_codec(url: str) -> None:
    q: Queue[Any] = Queue(backend="redis", url=url)
    arr = np.arange(100_000, dtype=np.float64)
    items: list[Any] = [b"raw", {"a": [1, 2.5, "x"]}, None, bytearray(b"y" * 5000), memoryview(b"mv"), arr]
    for item in items:
        q.put(item)
    got = [q.get(timeout=5) for _ in items]
    assert got[:3] == items[:3]
    assert got[3] == items[3] and type(got[3]) is bytearray  # out of band, rebuilt as a bytearray
    assert bytes(got[4]) == b"mv"
    np.testing.assert_array_equal(got[5], arr)
    assert got[5].flags.writeable  # a private copy, as on the local backends
    assert q.empty()
    q.close()


def test_large_messages(url: str) -> None:
    q: Queue[Any] = Queue(backend="redis", url=url)
    arr = np.random.default_rng(1).random(2 << 20)  # 16 MiB, out of band
    blob = bytes(range(256)) * (40 << 10)  # 10 MiB of bytes
    q.put(arr)
    q.put_many([blob, "small", blob])
    np.testing.assert_array_equal(q.get(timeout=10), arr)
    assert q.get_many(10, timeout=10) == [blob, "small", blob]
    q.close()


def test_a_get_that_can_answer_does_not_wait(url: str) -> None:
    """One round trip per get: the BLPOP behind the take returns at once (were it to
    sleep its slice, 100 gets would take 50 s)."""
    q: Queue[int] = Queue(backend="redis", url=url)
    q.put_many(range(100))
    start = time.monotonic()
    assert [q.get() for _ in range(100)] == list(range(100))
    assert time.monotonic() - start < 10
    q.close()


def test_a_backlog_is_taken_one_command_per_get(url: str) -> None:
    """While gets find records already waiting, each is one plain TAKE: no BLPOP (the
    server's command counters tell). The first get that finds nothing goes back to
    waiting, and is woken by a put."""
    import redis

    server = redis.Redis.from_url(url)
    q: Queue[int] = Queue(backend="redis", url=url)
    q.put_many(range(200))

    def blpops() -> int:
        stats: dict[str, Any] = server.info("commandstats")
        return int(stats.get("cmdstat_blpop", {}).get("calls", 0))

    before = blpops()
    assert [q.get(timeout=5) for _ in range(200)] == list(range(200))
    assert blpops() - before <= 1  # the first get's pipeline only
    with pytest.raises(shmchan.Empty):
        q.get(timeout=0.2)
    waiting = threading.Event()
    got: list[int] = []

    def consume() -> None:
        waiting.set()
        got.append(q.get(timeout=10))

    t = threading.Thread(target=consume)
    t.start()
    waiting.wait(5)
    q.put(7)
    t.join(10)
    assert got == [7]
    server.close()
    q.close()


def test_timeouts_and_non_blocking(url: str) -> None:
    q: Queue[int] = Queue(1, backend="redis", url=url)
    with pytest.raises(shmchan.Empty):
        q.get_nowait()
    start = time.monotonic()
    with pytest.raises(shmchan.Empty):
        q.get(timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 1.5
    with pytest.raises(ValueError):
        q.get(timeout=-1)
    q.put(1)
    with pytest.raises(shmchan.Full):
        q.put_nowait(2)
    start = time.monotonic()
    with pytest.raises(shmchan.Full):
        q.put(2, timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 1.5
    assert q.full() and q.qsize() == 1
    assert q.get(block=False) == 1
    q.close()


def test_put_blocks_while_full_until_a_get(url: str) -> None:
    q: Queue[int] = Queue(2, backend="redis", url=url)
    q.put(1)
    q.put(2)
    started, done = threading.Event(), threading.Event()

    def producer() -> None:
        started.set()
        q.put(3)  # blocks: maxsize items are queued
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert started.wait(5)
    assert not done.wait(0.5), "put returned while the queue was full"
    assert q.qsize() == 2
    assert q.get() == 1
    assert done.wait(5), "put did not return once there was room"
    t.join(5)
    assert [q.get(), q.get()] == [2, 3]
    q.close()


def test_batches(url: str) -> None:
    q: Queue[Any] = Queue(5, backend="redis", url=url)
    with pytest.raises(shmchan.Full) as err:
        q.put_many(range(8), timeout=0.1)
    assert err.value.sent == 5  # the first five went in
    assert q.get_many(3) == [0, 1, 2]
    assert q.get_many(100) == [3, 4]
    with pytest.raises(shmchan.Empty):
        q.get_many(10, timeout=0.05)
    q.put_many([1, Unpicklable(), 3])
    with pytest.raises(shmchan.UndecodableBatch) as bad:
        q.get_many(10)
    assert bad.value.items == [1, 3] and bad.value.errors[0][0] == 1
    with pytest.raises(TypeError):
        q.put_many([1, threading.Lock()])  # unpicklable: nothing is queued
    assert q.empty()
    with pytest.raises(ValueError):
        q.get_many(0)
    q.close()


def test_undecodable_item_is_consumed(url: str) -> None:
    q: Queue[Any] = Queue(backend="redis", url=url)
    q.put(Unpicklable())
    q.put("next")
    with pytest.raises(RuntimeError, match="cannot be rebuilt"):
        q.get()
    assert q.get() == "next"
    q.close()


def test_closed_handle(url: str) -> None:
    q: Queue[int] = Queue(backend="redis", url=url)
    q.close()
    q.close()
    for call in (q.get_nowait, q.qsize, lambda: q.put(1), lambda: pickle.dumps(q)):
        with pytest.raises(ValueError):
            call()
    q.join_thread()
    s: SimpleQueue[int] = SimpleQueue(backend="redis", url=url)
    s.put(1)
    assert s.get() == 1
    s.close()
    with pytest.raises(OSError):
        s.get()


def test_unnamed_queue_is_deleted_by_its_last_holder(url: str, redis_server: RedisServer) -> None:
    q: Queue[int] = Queue(backend="redis", url=url)
    q.put(1)
    other = pickle.loads(pickle.dumps(q))  # a second holder (the transit hold is redeemed)
    q.close()
    assert other.get() == 1  # still there for the other holder
    other.put(2)
    assert keys_on(redis_server)
    other.close()
    assert keys_on(redis_server) == []


def test_named_queue_lives_until_unlink(url: str) -> None:
    name = unique()
    q: Queue[str] = Queue(name=name, backend="redis", url=url)
    with pytest.raises(shmchan.ChannelExists):
        Queue(name=name, backend="redis", url=url)
    q.put("a")
    q.close()
    again: Queue[str] = Queue.open(name, backend="redis", url=url)
    assert again.get() == "a"
    again.unlink()
    with pytest.raises(shmchan.ChannelNotFound):
        Queue.open(name, backend="redis", url=url)
    with pytest.raises(shmchan.ChannelNotFound):
        again.put("b")  # the handle outlives the queue: it says so
    again.close()
    shmchan.Channel.create(name, backend="redis", url=url).close()
    with pytest.raises(ValueError, match="is a channel, not a queue"):
        Queue.open(name, backend="redis", url=url)
    shmchan.Channel.remove(name, backend="redis", url=url)


def test_url_from_the_environment(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMCHAN_REDIS_URL", url)
    q: Queue[int] = Queue(backend="redis")
    q.put(7)
    assert q.get() == 7
    q.close()
    monkeypatch.delenv("SHMCHAN_REDIS_URL")
    with pytest.raises(shmchan.BadURL, match="SHMCHAN_REDIS_URL"):
        Queue(backend="redis")


def test_local_backends_refuse_redis_options(url: str) -> None:
    with pytest.raises(ValueError, match="only for backend='redis'"):
        Queue(url=url)
    with pytest.raises(ValueError, match="only for backend='redis'"):
        JoinableQueue(redeliver_after=1.0)
    with pytest.raises(TypeError):
        Queue(backend="redis", url=url, redeliver_after=1.0)  # type: ignore[call-arg]


def test_handles_travel_to_a_process_pool(url: str) -> None:
    q: Queue[Any] = Queue(backend="redis", url=url)
    name = unique()
    named: Queue[Any] = Queue(name=name, backend="redis", url=url)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=SPAWN) as pool:
        futures = [pool.submit(children.put_in_pool, q, [i, i + 100]) for i in range(4)]
        futures.append(pool.submit(children.open_by_name, name, url, "by name"))
        assert [f.result(timeout=60) for f in futures] == ["ok"] * 5
    assert sorted(q.get(timeout=5) for _ in range(8)) == [0, 1, 2, 3, 100, 101, 102, 103]
    assert named.get(timeout=5) == "by name"
    named.unlink()
    named.close()
    q.close()


def test_unnamed_queue_expires_once_every_holder_is_killed(redis_server: RedisServer) -> None:
    from helpers.children import child

    q: Queue[str] = Queue(backend="redis", url=redis_server.url, lease=0.5)
    code = """
        import pickle, sys, shmchan
        q = pickle.loads(bytes.fromhex(blob))
        q.put("from the child")
        print("ready", flush=True)
        sys.stdin.readline()
    """
    with child(code, blob=pickle.dumps(q).hex()) as c:
        c.expect("ready")
        q.close()  # the child still holds it
        assert keys_on(redis_server)
        c.kill()
    assert wait_no_keys(redis_server, 5.0) == [], "the queue outlived every holder"


def test_forked_child_keeps_an_unnamed_queue(redis_server: RedisServer) -> None:
    """A handle inherited through fork holds the queue under leases of its own: the
    parent may close first, the child goes on, and its close deletes the queue."""
    fork = mp.get_context("fork")
    q: Queue[str] = Queue(backend="redis", url=redis_server.url, lease=1.0)
    ready, go = fork.Event(), fork.Event()
    p = fork.Process(target=children.outlive_the_parent, args=(q, ready, go))
    p.start()
    try:
        assert ready.wait(30)
        q.close()  # the parent's hold ends; the child's remains
        assert keys_on(redis_server)
        go.set()
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join()
    assert wait_no_keys(redis_server, 5.0) == []


def test_joinable_queue(url: str) -> None:
    q: JoinableQueue[int] = JoinableQueue(backend="redis", url=url)
    q.put(1)
    q.put(2)
    joined = threading.Event()
    t = threading.Thread(target=lambda: (q.join(), joined.set()))
    t.start()
    q.get()
    q.task_done()
    assert not joined.wait(0.3)
    q.get()
    q.task_done()
    assert joined.wait(5)
    t.join(5)
    with pytest.raises(ValueError, match="more times"):
        q.task_done()
    q.close()


def test_redelivery_of_a_killed_consumers_items(redis_server: RedisServer) -> None:
    from helpers.children import child

    url = redis_server.url
    q: JoinableQueue[int] = JoinableQueue(backend="redis", url=url, redeliver_after=0.5, lease=0.5)
    q.put_many(range(20))
    code = """
        import pickle, sys
        q = pickle.loads(bytes.fromhex(blob))
        got = [q.get(timeout=10) for _ in range(5)]
        q.task_done()  # the first one is done; four are held
        print("got", got, flush=True)
        sys.stdin.readline()
    """
    with child(code, blob=pickle.dumps(q).hex()) as c:
        line = c.expect("got")
        c.kill()
    taken = eval(line[4:])
    assert taken == [0, 1, 2, 3, 4]
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 19 and time.monotonic() < deadline:
        try:
            got.append(q.get(timeout=1))
        except shmchan.Empty:
            continue
        q.task_done()
    assert sorted(got) == list(range(1, 20)), "items were lost (or the done one came back)"
    q.join()  # every item was acknowledged exactly once
    q.close()
    assert wait_no_keys(redis_server, 5.0) == []


def test_live_consumer_keeps_what_it_holds(url: str) -> None:
    q: JoinableQueue[int] = JoinableQueue(backend="redis", url=url, redeliver_after=0.2)
    other: JoinableQueue[int] = pickle.loads(pickle.dumps(q))
    q.put(1)
    assert q.get() == 1  # held, and renewed by the lease thread
    with pytest.raises(shmchan.Empty):
        other.get(timeout=1.0)  # five times redeliver_after: not handed out again
    q.task_done()
    with pytest.raises(ValueError, match="holds no item"):
        other.task_done()
    other.close()
    q.close()


def test_prefetch(url: str) -> None:
    q: Queue[int] = Queue(backend="redis", url=url, prefetch=10)
    other: Queue[int] = Queue.open(q.name, backend="redis", url=url)
    q.put_many(range(30))
    assert q.get() == 0  # took ten at once
    assert other.qsize() == 20 and q.qsize() == 29
    assert q.get_many(3) == [1, 2, 3]
    q.close()  # six unreturned items go back, at the tail
    assert other.get_many(100) == [*range(10, 30), *range(4, 10)]
    other.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(0, 4),
    st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers()),
            st.tuples(st.just("get"), st.none()),
            st.tuples(st.just("put_many"), st.lists(st.integers(), max_size=5)),
            st.tuples(st.just("get_many"), st.integers(1, 4)),
            st.tuples(st.just("qsize"), st.none()),
        ),
        max_size=25,
    ),
)
def test_behaves_like_a_bounded_deque(url: str, maxsize: int, ops: list[tuple[str, Any]]) -> None:
    q: Queue[int] = Queue(maxsize, backend="redis", url=url)
    model: collections.deque[int] = collections.deque()
    room = (lambda: maxsize - len(model)) if maxsize else (lambda: 1 << 30)
    for op, arg in ops:
        if op == "put":
            if room() > 0:
                q.put_nowait(arg)
                model.append(arg)
            else:
                with pytest.raises(shmchan.Full):
                    q.put_nowait(arg)
        elif op == "put_many":
            fit = min(len(arg), room())
            if fit == len(arg):
                q.put_many(arg, block=False)
            else:
                with pytest.raises(shmchan.Full) as err:
                    q.put_many(arg, block=False)
                assert err.value.sent == fit
            model.extend(arg[:fit])
        elif op == "get":
            if model:
                assert q.get_nowait() == model.popleft()
            else:
                with pytest.raises(shmchan.Empty):
                    q.get_nowait()
        elif op == "get_many":
            if model:
                want = [model.popleft() for _ in range(min(arg, len(model)))]
                assert q.get_many(arg, block=False) == want
            else:
                with pytest.raises(shmchan.Empty):
                    q.get_many(arg, block=False)
        else:
            assert q.qsize() == len(model)
    q.close()
