"""The async side: coredis on anyio, for asyncio and trio alike.

coredis (>= 6) is an anyio client, so one code path serves both event loops. Its
client only works inside ``async with client:``, whose task group must outlive every
call; so each event loop gets one :class:`AsyncServer` per URL whose *service task*
(an asyncio task, or a trio system task) holds the client open until the loop ends.

Cancellation never loses or duplicates a record, because no command is ever cancelled
while the server may be answering it:

* every command runs in a shielded cancel scope, bounded by its own timeout (so a
  server that stops answering raises RemoteTimeout instead of hanging);
* waiting is a BLPOP of at most one slice, shielded too; a cancellation makes a
  sibling task push onto a private list the BLPOP also watches, so it returns at once
  (see :func:`sleep_on`), and a wakeup hint it took is pushed back first;
* a command that took records returns them to the caller without any checkpoint in
  between, so a pending cancellation lands at the caller's next checkpoint, after
  the records are safely in the caller's hands.

The tasks of one event loop that wait on the same list of the same handle share one
BLPOP (a :class:`_Gate`): one connection, whatever the number of waiting tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.lowlevel

from .._errors import (
    ChannelNotFound,
    NoSpace,
    NotAShmchanSegment,
    RemoteAuthFailed,
    RemoteError,
    RemoteTimeout,
    RemoteUnavailable,
)
from . import _client as C
from . import _scripts as L
from . import require

MAX_CONNECTIONS: Final = 256
"""Connections an event loop may open to one server (waiting tasks share theirs)."""


def translate(exc: BaseException, url: str) -> BaseException:
    """The shmchan exception for a coredis error met talking to ``url``."""
    import coredis.exceptions as E

    where = C.redact(url)
    if isinstance(exc, E.AuthenticationError | E.AuthorizationError):
        return RemoteAuthFailed(f"redis server {where} refused the credentials: {exc}")
    if isinstance(exc, E.BusyLoadingError):
        return RemoteUnavailable(f"redis server {where} is loading its data: {exc}")
    if isinstance(exc, E.ConnectionError | OSError):
        if isinstance(exc, TimeoutError):
            return RemoteTimeout(f"redis server {where} did not answer in time: {exc}")
        return RemoteUnavailable(f"cannot reach redis server {where}: {exc}")
    if isinstance(exc, E.ResponseError):
        text = str(exc)
        if text.startswith(("NOAUTH", "WRONGPASS")):
            return RemoteAuthFailed(f"redis server {where} refused the credentials: {exc}")
        if text.startswith("OOM"):
            return NoSpace(f"redis server {where} is out of memory (maxmemory): {exc}")
        if text.startswith("NOGROUP"):
            return ChannelNotFound(f"queue or channel data is gone from redis server {where}: {exc}")
        if text.startswith("WRONGTYPE"):
            return NotAShmchanSegment(f"a key on redis server {where} is not shmchan's: {exc}")
        return RemoteError(f"redis server {where} failed a command: {exc}")
    if isinstance(exc, E.RedisError):
        return RemoteError(f"redis server {where}: {exc}")
    return exc


def _bytes(value: Any) -> Any:
    """coredis takes str, bytes, int and float only."""
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    return value


class AsyncServer:
    """One URL as seen by one event loop: a coredis client held open by a service task."""

    def __init__(self, url: str, native: object) -> None:
        import coredis
        import coredis.retry

        self.url = url
        self.native = native
        self.client: Any = coredis.Redis.from_url(
            url,
            decode_responses=False,
            verify_version=False,
            retry_policy=coredis.retry.NoRetryPolicy(),
            connect_timeout=C.CONNECT_TIMEOUT,
            max_connections=MAX_CONNECTIONS,
        )
        self.ready = anyio.Event()
        self.stop = anyio.Event()
        self.error: BaseException | None = None
        self.done = False
        self._task: Any = None

    def start(self) -> None:
        if isinstance(self.native, asyncio.AbstractEventLoop):
            self._task = self.native.create_task(self._run())
        else:
            import trio

            trio.lowlevel.spawn_system_task(self._run)

    async def _run(self) -> None:
        try:
            async with self.client:
                self.ready.set()
                await self.stop.wait()
        except Exception as exc:  # noqa: BLE001 - kept for the calls waiting on ready
            self.error = exc
        finally:
            self.done = True
            self.ready.set()

    def discard(self) -> None:
        """Stop using this client (its connections may be in an unknown state)."""
        self.done = True
        self.stop.set()

    async def call(self, wait: float, command: Callable[[], Awaitable[Any]], cleanup: bool = False) -> Any:
        """Run ``command`` shielded from cancellation, for at most ``wait`` seconds, and
        at most :data:`~shmchan._redis._client.REPLY_GRACE` past the deadline of the
        caller's cancel scopes (a server that stops answering cannot hold a timeout up).
        A timeout drops the client (its connections are in an unknown state), except
        for a ``cleanup`` command (a one-line push or delete, whose late reply coredis
        simply discards)."""
        if self.done:
            raise RemoteUnavailable(f"connection to redis server {C.redact(self.url)} was dropped")
        deadline = anyio.current_effective_deadline()
        if deadline != float("inf"):
            wait = min(wait, max(0.0, deadline - anyio.current_time()) + C.REPLY_GRACE)
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(wait):
                try:
                    return await command()
                except Exception as exc:
                    import coredis.exceptions as E

                    if not isinstance(exc, E.ResponseError):
                        self.discard()
                    raise translate(exc, self.url) from exc
            if not cleanup:
                self.discard()
            raise RemoteTimeout(f"redis server {C.redact(self.url)} did not answer within {wait:.3g} s")

    async def script(
        self,
        name: str,
        keys: list[str],
        args: list[Any],
        wait: float = C.REPLY_TIMEOUT,
        cleanup: bool = False,
    ) -> Any:
        """Run script ``name`` (loading it if the server does not know it), shielded."""
        import coredis.exceptions as E

        args = [_bytes(a) for a in args]
        try:
            return await self.call(wait, lambda: self.client.evalsha(L.SHA[name], keys, args), cleanup)
        except RemoteError as exc:
            if not isinstance(exc.__cause__, E.NoScriptError):
                raise
        await self.call(wait, lambda: self.client.script_load(L.ALL[name]))
        return await self.call(wait, lambda: self.client.evalsha(L.SHA[name], keys, args))

    async def blpop(self, keys: list[str], seconds: float) -> Any:
        """BLPOP for at most ``seconds`` (shielded; bounded by the reply timeout)."""
        return await self.call(seconds + C.REPLY_TIMEOUT, lambda: self.client.blpop(keys, seconds))

    async def take_and_blpop(self, take: Take, wake: str, keys: list[str], seconds: float) -> Any:
        """TAKE 'first', BLPOP ``[wake, *keys]``, TAKE 'second' in one round trip (see
        the TAKE script and :func:`sleep_on`); ``(the TAKE reply that answered, or [0];
        the BLPOP reply)``. A server that forgot the script gets it again, and the take
        counts as having found nothing."""
        import coredis.exceptions as E

        take_keys, args = [*take[0], wake], [_bytes(a) for a in take[1]]

        async def three() -> tuple[Any, Any, Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                first = pipe.evalsha(L.SHA["take"], take_keys, [*args, "first"])
                woke = pipe.blpop([wake, *keys], seconds)
                second = pipe.evalsha(L.SHA["take"], take_keys, [*args, "second"])
            return await first, await woke, await second

        try:
            first, woke, second = await self.call(seconds + C.REPLY_TIMEOUT, three)
        except RemoteError as exc:
            if not isinstance(exc.__cause__, E.NoScriptError):
                raise
            await self.call(C.REPLY_TIMEOUT, lambda: self.client.script_load(L.ALL["take"]))
            await self.call(C.REPLY_TIMEOUT, lambda: self.client.script_load(L.ALL["wake"]))
            return [0], None
        if first[0] != 0:
            return first, woke
        return ([0] if second[0] == L.SKIP else second), woke

    async def lpush(self, key: str | bytes) -> None:
        await self.call(C.REPLY_GRACE, lambda: self.client.lpush(key, [b"1"]), cleanup=True)

    async def delete(self, key: str) -> None:
        await self.call(C.REPLY_TIMEOUT, lambda: self.client.delete([key]), cleanup=True)


_servers: dict[tuple[str, int], AsyncServer] = {}


async def server(url: str) -> AsyncServer:
    """This event loop's :class:`AsyncServer` for ``url`` (started on first use)."""
    require("coredis")
    native = anyio.lowlevel.current_token().native_token
    key = (url, id(native))
    srv = _servers.get(key)
    if srv is None or srv.native is not native or srv.done:
        for old in [k for k, s in _servers.items() if s.done]:
            del _servers[old]  # loops that ended, clients that were dropped
        srv = _servers[key] = AsyncServer(url, native)
        srv.start()
    if not srv.ready.is_set():
        with anyio.move_on_after(C.CONNECT_TIMEOUT + C.REPLY_TIMEOUT):
            await srv.ready.wait()
    if srv.done:
        raise RemoteUnavailable(f"cannot use redis server {C.redact(url)}: {srv.error!r}") from srv.error
    return srv


class _Gate:
    """The tasks of one event loop waiting on one hint list of one handle: one of them
    (the leader) waits on the server, the others until its wait ends."""

    def __init__(self) -> None:
        self.leader = False
        self.round = anyio.Event()

    async def wait(self, srv: AsyncServer, keys: list[str], take: Take | None = None) -> None:
        """Return after a hint or one slice (a follower: when the leader's wait ends).
        The leader's wait may take records for the handle first (see :func:`sleep_on`)."""
        if self.leader:
            await self.round.wait()
            return
        self.leader = True
        try:
            await sleep_on(srv, keys, take=take)
        finally:
            self.leader = False
            finished, self.round = self.round, anyio.Event()
            finished.set()


Take = tuple[list[str], list[Any], Callable[[list[Any]], None]]
"""A TAKE to pipeline before a wait: its keys (without the wake list), its arguments,
and what to do with its reply (keep the records) as soon as it arrives."""


async def sleep_on(
    srv: AsyncServer, keys: list[str], seconds: float = C.SLICE, take: Take | None = None
) -> Any:
    """One BLPOP slice on ``keys``; the popped ``[key, hint]`` or None.

    The BLPOP is shielded (never cancelled while the server may answer it). A sibling
    task waits for the caller's cancellation; when it comes, it pushes onto a private
    *wake* list that the BLPOP also watches, so the BLPOP returns at once and the
    cancellation is delivered, after a hint the BLPOP took has been pushed back.

    With ``take``, a TAKE script goes first in the same round trip (a pipeline): it
    pushes the wake list when it has an answer, so the BLPOP then returns at once too;
    its reply is handed to ``take``'s callback before anything else can happen.
    """
    wake = f"{keys[0]}:wake:{os.urandom(6).hex()}"
    state = {"finished": False, "pushed": False}
    got: Any = None

    async def watch() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            if not state["finished"]:
                state["pushed"] = True
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    # bounded by the grace: a server that does not answer this cannot
                    # answer the BLPOP either, which gives up on its own
                    await srv.script("wake", [wake], [C.ms(seconds + C.REPLY_TIMEOUT)], C.REPLY_GRACE, True)

    failed: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.lowlevel.checkpoint()  # let the watcher start
            try:
                if take is None:
                    got = await srv.blpop([wake, *keys], seconds)
                else:
                    reply, got = await srv.take_and_blpop(take, wake, keys, seconds)
                    take[2](reply)
            except Exception as exc:  # noqa: BLE001 - raised below, not wrapped in an ExceptionGroup
                failed = exc
            state["finished"] = True
            tg.cancel_scope.cancel()
        if failed is not None:
            raise failed
    except BaseException:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            if got and got[0].decode() != wake:
                await srv.lpush(got[0])  # a hint meant for somebody: give it back
        raise
    finally:
        if state["pushed"] and not srv.done:
            # A wake that came too late to be popped. (If the client was dropped, the
            # server did not answer: the list expires on its own, within seconds.)
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await srv.delete(wake)
    return got if got and got[0].decode() != wake else None


def gate(core: Any, key: str) -> _Gate:
    native = id(anyio.lowlevel.current_token().native_token)
    gates: dict[tuple[str, int], _Gate] = core.__dict__.setdefault("_gates", {})
    g = gates.get((key, native))
    if g is None:
        g = gates[(key, native)] = _Gate()
    return g
