"""Shared fixtures: one parameter per backend, unique names, and a leak check.

Every test that takes ``backend`` runs once per backend; a backend that cannot load
here is reported as skipped with the reason, never silently dropped. The autouse
``no_leaks`` fixture fails any test that leaves behind an object shmchan or the tests
made (see :func:`leaks_since` for what counts), while ignoring what other programs
sharing the machine create meanwhile.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.children import descendants

import shmchan
from shmchan._backends import BACKENDS, available_backends

AVAILABLE = available_backends()
BACKEND_PARAMS = [
    pytest.param(b, id=b, marks=pytest.mark.skipif(b not in AVAILABLE, reason=f"backend {b} unavailable"))
    for b in BACKENDS
]
DEV_SHM = Path("/dev/shm")
SHM_PREFIXES = ("shmchan", "sem.shmchan")
"""The /dev/shm names shmchan and these tests make: segments and their side segments
(``shmchan-q-*`` unnamed queues, ``shmchan-test-*`` test channels, ``shmchan-bench-*``)
and POSIX semaphores (``sem.shmchan.<nonce>.*``)."""

_libc = ctypes.CDLL(None, use_errno=True)
_GETPID = 11  # semctl command: pid of the last semop (Linux also sets it at SETVAL)

# A suite started from a non-interactive shell's background job inherits SIGINT ignored,
# and so would every child it starts (an ignored signal stays ignored across exec): the
# Ctrl-C tests' children would never see their KeyboardInterrupt. Restore Python's own
# handler here, so children start with the default disposition as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

HELPER_THREADS = ("shmchan-async-wait", "shmchan-aselect-wait")
"""Names of the async face's helper threads (each sleeps at most one wait slice)."""


@dataclass(frozen=True)
class Snapshot:
    """shmchan's names in /dev/shm, and every SysV object: (kind, id, key) -> pid of its
    creator (shm) or of its last operation (sem), and the uid that created it."""

    shm: frozenset[str]
    sysv: dict[tuple[str, str, str], tuple[int, int]]


def _sysv(kind: str) -> dict[tuple[str, str, str], tuple[int, int]]:
    try:
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
    except OSError:
        return {}
    out = {}
    for line in lines:
        f = line.split()
        if not f:
            continue
        if kind == "shm":  # key shmid perms size cpid lpid nattch uid gid cuid ...
            pid, cuid = int(f[4]), int(f[9])
        else:  # key semid perms nsems uid gid cuid ...
            pid, cuid = _libc.semctl(int(f[1]), 0, _GETPID), int(f[6])
        out[(kind, f[1], f[0])] = (pid, cuid)
    return out


def snapshot() -> Snapshot:
    names = frozenset(n for n in os.listdir(DEV_SHM) if n.startswith(SHM_PREFIXES))
    return Snapshot(names, _sysv("shm") | _sysv("sem"))


def leaks_since(before: Snapshot) -> list[str]:
    """What shmchan or the tests made since ``before`` and is still there.

    * /dev/shm: names with shmchan's prefixes (:data:`SHM_PREFIXES`) that are new.
    * SysV: objects that are new, of our uid, and not made by another program: a SysV
      object's key derives from a shmchan name by a hash that cannot be inverted, so
      attribution goes by process instead. A new segment whose creator, or a new
      semaphore set whose last operator, is a live process outside this test's process
      tree belongs to another program and is ignored; one made by this process, by a
      live descendant, or by a process that has exited counts. shmchan's lifetime
      services (outside the tree) never create SysV objects or operate semaphores, and
      a process killed by a test has exited. What this can still blame on a test: an
      object another program of the same uid created and left behind while exiting
      during the test. What it cannot miss: anything this test's processes made (a
      semaphore set nobody ever operated has no pid, but shmchan sets every value it
      creates, which records its pid).
    """
    now = snapshot()
    leaked = sorted(now.shm - before.shm)
    new = {k: v for k, v in now.sysv.items() if k not in before.sysv and v[1] == os.geteuid()}
    if new:
        tree = {os.getpid(), *descendants(os.getpid())}
        for (kind, ident, key), (pid, _) in sorted(new.items()):
            if pid > 0 and (pid in tree or not os.path.exists(f"/proc/{pid}")):
                leaked.append(f"sysv {kind} id={ident} key={key} pid={pid}")
    return leaked


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it left anything of shmchan's in /dev/shm or SysV IPC."""
    before = snapshot()
    yield
    leaked = leaks_since(before)
    assert not leaked, f"leaked: {leaked}"


@pytest.fixture
def helper_threads_end() -> Iterator[None]:
    """After the test, and after its channels are closed and removed but before the leak
    check: every async helper thread has ended within a few wait slices. A thread still
    inside a wait keeps its handle mapped, and a removed SysV segment is only destroyed
    at its last detach. (Request it with ``pytest.mark.usefixtures``.)"""
    yield
    deadline = time.monotonic() + 0.6
    while alive := [t.name for t in threading.enumerate() if t.name in HELPER_THREADS]:
        assert time.monotonic() < deadline, f"async helper threads still alive after the test: {alive}"
        time.sleep(0.005)


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def unique_name(backend: str) -> str:
    """A fresh channel name for ``backend`` (a /dev/shm path for mmap)."""
    token = f"shmchan-test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    return str(DEV_SHM / token) if backend == "mmap" else token


@pytest.fixture
def name(backend: str) -> Iterator[str]:
    """A unique channel name for this test and backend, removed afterwards."""
    chan = unique_name(backend)
    yield chan
    try:
        shmchan.Channel.remove(chan, backend=backend)
    except shmchan.ChannelNotFound:
        pass


@pytest.fixture
def channel(backend: str, name: str) -> Iterator[shmchan.Channel]:
    """A fresh 64 KiB channel on ``backend``, closed and removed afterwards."""
    ch = shmchan.Channel.create(name, capacity=1 << 16, backend=backend)
    yield ch
    ch.close()
