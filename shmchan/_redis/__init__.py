"""The redis backend: shmchan's queues and channels on a Redis (>= 7.0) or Valkey
(>= 7.2) server, so that processes on different hosts share them.

The public faces (``shmchan.Queue(backend="redis", url=...)``, ``Channel.create(...,
backend="redis")``, their async faces and ``select``) stay the same; at each point
marked ``# redis dispatch`` they hand the work to a core of this package:

* :class:`~shmchan._redis._queue.RedisQueueCore` for the three queues,
* :class:`~shmchan._redis._channel.RedisChannelCore` for channels,

whose methods take absolute ``time.monotonic()`` deadlines (None: no limit; a past
deadline: one attempt that does not wait) and have async twins for anyio (asyncio
and trio). docs/redis.md describes the semantics, the keys and the Lua scripts.

Importing this package needs nothing beyond shmchan; the cores need the ``redis``
extra (``pip install 'shmchan[redis]'``: redis-py, hiredis, and coredis for the
async face), and say so with :class:`~shmchan.BackendUnavailable` if it is missing.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Final

from .._errors import BackendUnavailable

if TYPE_CHECKING:
    from ._channel import RedisChannelCore
    from ._queue import RedisQueueCore

__all__ = ("BACKEND", "URL_ENV", "channel_core", "queue_core", "require")

BACKEND: Final = "redis"
"""The backend name the public faces dispatch on."""

URL_ENV: Final = "SHMCHAN_REDIS_URL"
"""The environment variable that supplies ``url`` when a call gives none."""

EXTRA: Final = "pip install 'shmchan[redis]'"


def require(*modules: str) -> None:
    """Raise BackendUnavailable, naming the extra, unless ``modules`` can be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailable(
            f"the redis backend needs {', '.join(missing)}, which is not installed: {EXTRA}"
        )


def queue_core() -> type[RedisQueueCore]:
    """The queue core class (BackendUnavailable without the extra)."""
    require("redis")
    from ._queue import RedisQueueCore

    return RedisQueueCore


def channel_core() -> type[RedisChannelCore]:
    """The channel core class (BackendUnavailable without the extra)."""
    require("redis")
    from ._channel import RedisChannelCore

    return RedisChannelCore
