"""The lifetime service of unnamed queues: ``python -m shmchan._reaper`` (internal).

A process that creates an unnamed queue starts one of these (docs/layout.md section
12). It runs in its own session and, after a double fork, is nobody's descendant, so
killing the creator's whole process tree does not kill it. Every Python process that
uses one of its queues keeps a connection to it and registers each handle. The
kernel closes a process's connections when it exits, however it dies; when nothing
holds a queue any more, the service removes it. It exits once it holds nothing and
nobody is connected.

Wire protocol: one ``SOCK_SEQPACKET`` datagram per request, tab-separated UTF-8,
answered by ``ok`` or ``gone``:

=====================  ============================================================
``c backend name``     the creator's first hold (made before the queue exists)
``+ backend name``     one more hold, on this connection (``gone`` if none is left)
``- backend name``     drop one hold of this connection; the last one removes it
``t backend name tok`` a transfer hold for a pickled copy, kept until redeemed, or
                       until :data:`TRANSFER_GRACE` seconds after the connection
                       that took it is gone
``r tok``              redeem a transfer hold
``?``                  diagnostics: a one-line summary of what is held
=====================  ============================================================
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time
from collections import Counter
from typing import Final

TRANSFER_GRACE: Final = 5.0
"""A transfer hold lasts while the process that pickled the queue is connected, and
this many seconds after it is gone (time for a starting child to unpickle it)."""
IDLE_EXIT: Final = 30.0
"""Exit after this long with nothing held and nobody connected (or never contacted)."""

Key = tuple[str, str]


class Reaper:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ)
        self.holds: dict[socket.socket, Counter[Key]] = {}
        self.totals: Counter[Key] = Counter()
        self.transfers: dict[str, tuple[Key, socket.socket, float | None]] = {}
        self.idle_since = time.monotonic()

    def run(self) -> None:
        while True:
            self.expire_transfers()
            if not self.holds and not self.totals and not self.transfers:
                if time.monotonic() - self.idle_since > IDLE_EXIT:
                    return
            else:
                self.idle_since = time.monotonic()
            for key, _ in self.sel.select(timeout=1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    conn, _ = self.listener.accept()
                    self.holds[conn] = Counter()
                    self.sel.register(conn, selectors.EVENT_READ)
                else:
                    self.serve(sock)

    def serve(self, conn: socket.socket) -> None:
        if conn not in self.holds:
            return  # already closed while absorbing hang-ups in this same select batch
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:  # the peer process closed it or died: drop its holds
            self.sel.unregister(conn)
            held = self.holds.pop(conn)
            expiry = time.monotonic() + TRANSFER_GRACE
            for token, (key, owner, _) in list(self.transfers.items()):
                if owner is conn:
                    self.transfers[token] = (key, owner, expiry)
            conn.close()
            for key, n in held.items():
                self.drop(key, n)
            return
        if data[:1] == b"-":
            # A release may be the last: first absorb connections that have already
            # hung up (processes that exited), so the answer, and the removal, happen
            # before the releasing process goes on.
            self.absorb_hangups(conn)
        try:
            reply = self.handle(conn, data.decode().split("\t"))
        except (IndexError, UnicodeDecodeError):
            reply = "error"  # a malformed request must never take the service down
        try:
            conn.send(reply.encode())
        except OSError:
            pass

    def absorb_hangups(self, current: socket.socket) -> None:
        for key, _ in self.sel.select(timeout=0):
            sock = key.fileobj
            if sock is self.listener or sock is current or not isinstance(sock, socket.socket):
                continue
            try:
                hung_up = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                hung_up = False
            except OSError:
                hung_up = True
            if hung_up:
                self.serve(sock)

    def handle(self, conn: socket.socket, words: list[str]) -> str:
        op = words[0]
        if op == "?":  # diagnostics: what is held, by how many connections
            held = {f"{b} {n}": c for (b, n), c in self.totals.items()}
            return f"conns={len(self.holds)} transfers={len(self.transfers)} totals={held}"
        if op == "r":
            entry = self.transfers.pop(words[1], None)
            if entry is not None:
                self.drop(entry[0], 1)
            return "ok"
        key = (words[1], words[2])
        if op == "c" or (op in "+t" and self.totals[key] > 0):
            self.totals[key] += 1
            if op == "t":
                self.transfers[words[3]] = (key, conn, None)
            else:
                self.holds[conn][key] += 1
            return "ok"
        if op in "+t":
            return "gone"
        if op == "-" and self.holds[conn][key] > 0:
            self.holds[conn][key] -= 1
            self.drop(key, 1)
        return "ok"

    def drop(self, key: Key, n: int) -> None:
        self.totals[key] -= n
        if self.totals[key] <= 0:
            del self.totals[key]
            remove(*key)

    def expire_transfers(self) -> None:
        now = time.monotonic()
        for token, (key, _, expiry) in list(self.transfers.items()):
            if expiry is not None and expiry < now:
                del self.transfers[token]
                self.drop(key, 1)


def remove(backend: str, name: str) -> None:
    """Remove a queue's name, semaphores and side segments; never raise."""
    from ._backends import get_backend

    with contextlib.suppress(Exception):  # gone already, or unremovable: nothing to do
        get_backend(backend).remove(name)


def run_forever(listener: socket.socket) -> None:
    """Serve until idle. Whatever goes wrong in one request must not end the service:
    every queue it holds would leak."""
    reaper = Reaper(listener)
    while True:
        try:
            reaper.run()
            return
        except Exception:  # noqa: BLE001, S112 - resume with the state as it is: stdout is /dev/null
            continue


def main() -> None:
    # Started by posix_spawn in a new session with the listening socket as fd 3.
    # Fork once more so that we are not a descendant of the creator: killing its
    # process tree must not take the service that cleans up after it.
    if os.fork() != 0:
        os._exit(0)
    listener = socket.socket(fileno=3)
    try:
        run_forever(listener)
    finally:
        listener.close()


if __name__ == "__main__":
    main()
