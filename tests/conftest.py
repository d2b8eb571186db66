"""Shared fixtures: one parameter per backend, unique names, and a leak check.

Every test that takes ``backend`` runs once per backend; a backend that cannot load
here is reported as skipped with the reason, never silently dropped. The autouse
``no_leaks`` fixture fails any test that leaves an object in /dev/shm or in SysV IPC.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmchan
from shmchan._backends import BACKENDS, available_backends

AVAILABLE = available_backends()
BACKEND_PARAMS = [
    pytest.param(b, id=b, marks=pytest.mark.skipif(b not in AVAILABLE, reason=f"backend {b} unavailable"))
    for b in BACKENDS
]
DEV_SHM = Path("/dev/shm")
HELPER_THREADS = ("shmchan-async-wait", "shmchan-aselect-wait")
"""Names of the async face's helper threads (each sleeps at most one wait slice)."""


def _sysv_ids(kind: str) -> set[str]:
    try:
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {line.split()[1] for line in lines if line.strip()}


def snapshot() -> tuple[set[str], set[str], set[str]]:
    """Names in /dev/shm, SysV shm ids, SysV semaphore ids."""
    return set(os.listdir(DEV_SHM)), _sysv_ids("shm"), _sysv_ids("sem")


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it left anything in /dev/shm or SysV IPC."""
    before = snapshot()
    yield
    after = snapshot()
    leaked = [sorted(a - b) for a, b in zip(after, before, strict=True)]
    assert leaked == [[], [], []], f"leaked (/dev/shm, sysv shm ids, sysv sem ids): {leaked}"


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
