"""Child interpreters for crash and OS tests, driven by their output lines.

Parents wait for a line a child prints (or poll a shared counter) against a deadline,
never by sleeping for a guessed time.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import shmchan
from shmchan import Channel, _cext
from shmchan import _layout as L
from shmchan._backends.sysv import sysv_key

from . import procs


class Child:
    """A child interpreter running ``code`` with ``params`` bound as globals.

    A thread collects its stdout lines, so the parent can wait for a given line with
    a deadline instead of sleeping.
    """

    def __init__(self, code: str, env: dict[str, str] | None = None, **params: object) -> None:
        prelude = "".join(f"{key} = {value!r}\n" for key, value in params.items())
        self.proc = procs.popen(prelude + textwrap.dedent(code), env=env)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.complete: list[str] = []  # every full line, in order (for the stress test)
        self.partial = ""
        self._stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump_out, daemon=True),
            threading.Thread(target=self._pump_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.endswith("\n"):
                self.complete.append(line[:-1])
                self.lines.put(line[:-1])
            else:
                self.partial = line  # the child died in the middle of a line
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def expect(self, want: str, timeout: float = 10.0) -> str:
        """Wait for a line starting with ``want``; fail with the child's stderr if it
        does not come (EOF or timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, left))
            except queue.Empty:
                pytest.fail(
                    f"child {self.pid} did not print {want!r} within {timeout} s; stderr:\n{self.stderr}"
                )
            if line is None:
                self.lines.put(None)
                self.proc.wait(timeout=10)
                pytest.fail(
                    f"child {self.pid} exited ({self.proc.returncode}) before printing {want!r}; "
                    f"stderr:\n{self.stderr}"
                )
            if line.startswith(want):
                return line

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap; the output threads have seen EOF when this returns."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)  # a stopped child still dies of SIGKILL, but be plain
            os.kill(self.pid, signal.SIGKILL)
        self.finish(timeout=10)

    def finish(self, timeout: float) -> int:
        """Wait for the child to exit (killing it if it does not) and reap its output."""
        try:
            self.proc.wait(timeout=timeout)
        except BaseException:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise
        finally:
            for t in self._threads:
                t.join(timeout=10)
            for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except BrokenPipeError:
                        pass
        return self.proc.returncode


@contextmanager
def child(code: str, env: dict[str, str] | None = None, **params: object) -> Iterator[Child]:
    c = Child(code, env=env, **params)
    try:
        yield c
    finally:
        c.kill()


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a shared-memory condition until it holds, with a deadline."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (found through /proc parent links)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == pid]
        found += kids
        frontier += kids
    return found


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2]


def drain(ch: Channel) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(ch.recv_bytes_nowait())
        except shmchan.Empty:
            return out


def run_child(
    code: str, timeout: float = 30, env: dict[str, str] | None = None, **params: object
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (with ``params`` bound as globals) to completion."""
    prelude = "".join(f"{key} = {value!r}\n" for key, value in params.items())
    return procs.run(prelude + textwrap.dedent(code), timeout=timeout, env=env)


# -- the shared header, as the compiled core keeps it (layout 2) -------------------------------


def header(handle: Any) -> dict[str, Any]:
    """Every field of the channel's shared header, decoded (of a Channel or a Queue)."""
    core = handle._core
    return L.decode_header(core.raw(0, core.header_size))


def consumers_waiting(handle: Any) -> int:
    """How many handles (peer slots) have a consumer registered as sleeping."""
    return len(header(handle)["waiting_consumers"])


def producers_waiting(handle: Any) -> int:
    """How many handles (peer slots) have a producer registered as sleeping."""
    return len(header(handle)["waiting_producers"])


def joiners_waiting(handle: Any) -> int:
    """How many handles (peer slots) have a join() registered as sleeping."""
    return len(header(handle)["waiting_joiners"])


def ring_positions(handle: Any) -> tuple[int, int]:
    """``(head, tail)``: the consumers' and producers' commit words."""
    h = header(handle)
    return h["head"], h["tail"]


def records(handle: Any) -> list[tuple[int, int, int]]:
    """The records in the ring, head to tail, as ``(ring offset, type, payload length)``
    (padding records skipped)."""
    core = handle._core
    h = L.decode_header(core.raw(0, core.header_size))
    out = []
    at, end = h["head_position"], h["tail_position"]
    while at != end:
        off = at % core.capacity
        length, rtype, _, _ = L.RECORD_HEADER.unpack(core.raw(core.header_size + off, L.RECORD_HEADER_SIZE))
        size = L.record_size(length)
        if rtype == L.RT_PADDING:
            size = core.capacity - off
        else:
            out.append((off, rtype, length))
        at = (at + size) % ((L.UNIT_MASK + 1) << 4)
    return out


def lock_holder(handle: Any, which: str) -> int | None:
    """The peer slot holding the write ("w") or read ("r") lock, or None when free."""
    token = L.decode_lock(header(handle)[f"{which}lock"])
    return None if token is None else token[0]


def side_entries(handle: Any) -> list[dict[str, int | str]]:
    """The channel's side-segment pool table (one dict per entry)."""
    core = handle._core
    buf = core.raw(0, core.header_size)
    return [L.decode_side_entry(buf, i) for i in range(core.side_slots)]


def side_objects(handle: Any) -> set[int]:
    """Indexes of the side-pool objects that exist for ``handle``'s channel (posix:
    ``/dev/shm/<name>.Sxx``, mmap: ``<path>.Sxx``, sysv: key ``sysv_key(name, "Sxx")``)."""
    name, backend = handle.name, handle.backend
    found = set()
    for index in range(L.SIDE_SLOTS_MAX):
        suffix = L.side_suffix(index)
        if backend == "sysv":
            exists = _cext.shm_lookup(sysv_key(name, suffix[1:])) is not None
        elif backend == "posix":
            exists = os.path.exists("/dev/shm/" + name.lstrip("/") + suffix)
        else:
            exists = os.path.lexists(name + suffix)
        if exists:
            found.add(index)
    return found


# -- a process holding a lock -------------------------------------------------------------------

LOCK_HOLDER = """
    import sys
    import shmchan
    h = shmchan.Channel.open(NAME, backend=BACKEND)
    print("slot", h._core.slot, flush=True)
    if LOCK == "w":
        h.send_bytes(PAYLOAD)  # stops itself at w.locked, holding the write lock
        print("sent", flush=True)
    else:
        try:
            got = h.recv_bytes_nowait()  # stops itself at r.locked, holding the read lock
        except shmchan.Empty:
            print("got nothing", flush=True)
        else:
            print("got", repr(got), flush=True)
    sys.stdin.readline()
    h.close()
    print("closed", flush=True)
"""


@contextmanager
def holding_lock(handle: Any, which: str, payload: bytes = b"held") -> Iterator[Child]:
    """A child process that opens ``handle``'s channel and stops (SIGSTOP, at a test fault
    point) right after taking its write ("w": inside a send of ``payload``) or read ("r":
    inside a non-blocking receive) lock. A stopped holder is alive: nobody takes its lock
    over. ``SIGCONT`` lets it finish that one call (it prints "sent", or "got ..."/"got
    nothing") and wait for a line on stdin before it closes; leaving the block kills it."""
    point = {"w": "w.locked", "r": "r.locked"}[which]
    c = Child(
        LOCK_HOLDER,
        env={"SHMCHAN_TEST_FAULT": f"{point}:stop"},
        NAME=handle.name,
        BACKEND=handle.backend,
        LOCK=which,
        PAYLOAD=payload,
    )
    try:
        slot = int(c.expect("slot").split()[1])
        wait_until(lambda: c.proc.poll() is not None or proc_state(c.pid) in "Tt", 10, "the holder to stop")
        assert c.proc.poll() is None, f"the lock holder exited ({c.proc.returncode}):\n{c.stderr}"
        assert lock_holder(handle, which) == slot, "the stopped child does not hold the lock"
        yield c
    finally:
        c.kill()


def fill(ch: Channel) -> None:
    """Send until the channel's ring is full to the last byte."""
    for size in (500, 1):
        while True:
            try:
                ch.send_bytes_nowait(b"z" * size)
            except shmchan.Full:
                break
