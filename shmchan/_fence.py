"""Memory fences for pure Python, and monotonic deadlines.

CPython exposes no atomics or fences. What it does expose cheaply is a lock whose
``release()`` and ``acquire()`` are, on Linux with glibc, ``sem_post`` (a
release-ordered compare-and-swap) and ``sem_trywait`` (an acquire-ordered
compare-and-swap); on CPython 3.13+ they are the sequentially consistent
compare-and-swaps of ``PyMutex``. A release RMW followed in program order by an
acquire RMW is a full barrier on both target architectures:

* x86-64: both are ``LOCK``-prefixed instructions, each a full barrier.
* aarch64: ``STLXR``/``CASL`` then ``LDAXR``/``CASA``: a store-release followed by a
  load-acquire is observed in program order (ARMv8's RCsc rule), so every access
  before the pair is ordered before every access after it.

:func:`full_fence` is that pair on a private, per-thread lock (~0.1 µs here).
:data:`WEAK_ORDERING` tells whether the host may reorder ordinary stores with stores
or loads with loads (aarch64 yes, x86-64 no); the ring calls :func:`full_fence` at
its release and acquire points only where that is so. docs/layout.md gives the whole
argument.
"""

from __future__ import annotations

import platform
import threading
import time
from typing import Final

WEAK_ORDERING: Final = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")
"""True where plain stores/loads may be reordered among themselves (aarch64 and others)."""

_local = threading.local()


def full_fence() -> None:
    """Order every memory access before the call before every access after it."""
    try:
        lock = _local.lock
    except AttributeError:
        lock = _local.lock = threading.Lock()
        lock.acquire()
    lock.release()
    lock.acquire()


def deadline_after(timeout: float | None) -> float | None:
    """Turn a ``timeout`` in seconds into an absolute ``time.monotonic()`` deadline.

    ``None`` means wait forever. Negative timeouts are treated as zero here; the
    public methods that must reject them (as the stdlib does) check before calling.
    """
    if timeout is None:
        return None
    return time.monotonic() + max(0.0, timeout)


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative), or None for no deadline."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())
