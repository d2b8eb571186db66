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
from shmchan import Channel

from . import procs


class Child:
    """A child interpreter running ``code`` with ``params`` bound as globals.

    A thread collects its stdout lines, so the parent can wait for a given line with
    a deadline instead of sleeping.
    """

    def __init__(self, code: str, **params: object) -> None:
        prelude = "".join(f"{key} = {value!r}\n" for key, value in params.items())
        self.proc = procs.popen(prelude + textwrap.dedent(code))
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
def child(code: str, **params: object) -> Iterator[Child]:
    c = Child(code, **params)
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


def run_child(code: str, timeout: float = 30, **params: object) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (with ``params`` bound as globals) to completion."""
    prelude = "".join(f"{key} = {value!r}\n" for key, value in params.items())
    return procs.run(prelude + textwrap.dedent(code), timeout=timeout)


def consumers_waiting(handle: Any) -> int:
    """The channel's shared consumers_waiting counter (of a Channel or a Queue)."""
    n: int = handle._core.ring.consumers_waiting()
    return n


def producers_waiting(handle: Any) -> int:
    """The channel's shared producers_waiting counter (of a Channel or a Queue)."""
    n: int = handle._core.ring.producers_waiting()
    return n


def fill(ch: Channel) -> None:
    """Send until the channel's ring is full to the last byte."""
    for size in (500, 1):
        while True:
            try:
                ch.send_bytes_nowait(b"z" * size)
            except shmchan.Full:
                break
