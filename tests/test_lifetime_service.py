"""The lifetime service of unnamed queues under attack, under load, and killed.

* It obeys only its own uid, removes only queues it registered and whose header names
  it, bounds what one connection may hold, and never blocks on a client.
* A killed service is replaced: its queues still open by name and by pickle, and are
  still removed once their last user is gone.
* A tree killed at once leaves nothing behind within a second, whatever the start
  method, even while its children were still unpickling their queues.
* It starts wherever the process found shmchan (vendored, on a path added at run time).

Root tests run the attacks as ``nobody`` (uid 65534); they are skipped otherwise.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import DEV_SHM, Snapshot, leaks_since, snapshot, unique_name
from helpers.children import Child, descendants, run_child, wait_until
from helpers.procs import ROOT, child_env

import shmchan
from shmchan import _reaper
from shmchan._backends import get_backend
from shmchan._queue import read_owner

NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the attacker runs as nobody (uid 65534)"
)
SPAWN = mp.get_context("spawn")


@contextmanager
def raw_client(address: str) -> Iterator[socket.socket]:
    """A connection to the service at ``address``, speaking its protocol by hand."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(10)
        sock.connect("\0" + address)
        yield sock
    finally:
        sock.close()


def ask(sock: socket.socket, *words: str) -> str:
    sock.send("\t".join(words).encode())
    return sock.recv(4096).decode()


def service_info(address: str) -> dict[str, str]:
    """The service's one-line diagnostics (pid, address, pkg, clients, ...)."""
    with raw_client(address) as sock:
        reply = ask(sock, "?")
    return dict(word.split("=", 1) for word in reply.split())


def listening(address: str) -> bool:
    try:
        with raw_client(address):
            return True
    except ConnectionRefusedError:
        return False


def wait_clean(baseline: Snapshot, timeout: float) -> None:
    wait_until(lambda: not leaks_since(baseline), timeout, "the queue to be removed")


def kill_service(address: str) -> None:
    os.kill(int(service_info(address)["pid"]), signal.SIGKILL)
    wait_until(lambda: not listening(address), 10, "the killed service's socket to close")


# -- whom it obeys ----------------------------------------------------------------------------

ATTACKER = """
import os, socket
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
assert os.geteuid() == 65534
for request in requests:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    try:
        s.connect("\\0" + address)
        for _ in range(repeat):
            s.send(request.encode())
        reply = s.recv(4096)
    except OSError:
        reply = b""
    s.close()
    print("reply" if reply else "closed", repr(request), reply, flush=True)
print("done", flush=True)
"""


@pytest.mark.root
@needs_root
def test_another_user_is_refused_and_removes_nothing(backend: str, tmp_path: Path) -> None:
    """As the issue reproduced it: nobody connects to a root service and asks it to
    remove a root-owned 0600 file in a 0700 directory, and the queue itself."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    victim = private / "secret"
    victim.write_text("root's")
    victim.chmod(0o600)
    q: shmchan.Queue[str] = shmchan.Queue(backend=backend)
    try:
        requests = [
            "?",
            f"c\tmmap\t{victim}",
            f"c\t{backend}\t{q.name}",
            f"-\t{backend}\t{q.name}",
            f"+\t{backend}\t{q.name}",
            f"a\t{backend}\t{q.name}\t5",
        ]
        clients = service_info(q._owner)["clients"]
        result = run_child(ATTACKER, address=q._owner, requests=requests, repeat=1)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[-1] == "done" and len(lines) == len(requests) + 1
        assert all(line.startswith("closed") for line in lines[:-1]), lines
        flood = run_child(ATTACKER, address=q._owner, requests=["?"], repeat=2000)
        assert flood.returncode == 0 and flood.stdout.startswith("closed"), (flood.stdout, flood.stderr)
        assert victim.read_text() == "root's"
        assert service_info(q._owner)["clients"] == clients  # none of nobody's was kept
        q.put("still here")
        used = run_child(
            """
            import shmchan
            q = shmchan.Queue.open(name, backend=backend)
            print(q.get(timeout=5), flush=True)
            q.close()
            """,
            name=q.name,
            backend=backend,
        )
        assert used.stdout == "still here\n", used.stderr
    finally:
        q.close()


SQUATTER = """
import os, socket, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind("\\0" + address)
s.listen(16)
print("bound", flush=True)
sys.stdin.readline()
"""


@pytest.mark.root
@needs_root
def test_a_squatted_address_is_not_trusted(backend: str) -> None:
    """After the service is killed, another user binds its abstract address (visible in
    /proc/net/unix). Clients see that the socket is neither their uid's nor the queue
    owner's, treat the service as dead and re-home the queue; nothing is asked of the
    squatter. (Had the socket the queue owner's uid, it would be another user's live
    service: opening raises PermissionError and takes nothing over.)"""
    baseline = snapshot()
    creator = Child(
        """
        import os, signal, sys, shmchan
        q = shmchan.Queue(backend=backend)
        q.put("from the creator")
        print("made", q.name, q._owner, flush=True)
        sys.stdin.readline()
        assert q.qsize() == 1
        q.close()
        print("closed", flush=True)
        sys.stdin.readline()
        """,
        backend=backend,
    )
    squatter = None
    try:
        _, name, address = creator.expect("made", timeout=30).split()
        creator.signal(signal.SIGSTOP)  # so that its own watcher cannot re-home first
        kill_service(address)
        squatter = Child(SQUATTER, address=address)
        squatter.expect("bound", timeout=30)
        if backend != "sysv":  # as if the socket were the live service of nobody's queue
            path = name if backend == "mmap" else f"/dev/shm{name}"
            os.chown(path, NOBODY, NOBODY)
            with pytest.raises(PermissionError, match="uid 65534"):
                shmchan.Queue.open(name, backend=backend)
            # Not taken over (read raw: a segment of another user is not opened at all).
            assert read_owner(get_backend(backend).peek(name)) == address
            os.chown(path, 0, 0)
        q: shmchan.Queue[str] = shmchan.Queue.open(name, backend=backend)
        try:
            now = _reaper.segment_owner(backend, name)
            assert isinstance(now, str) and now not in ("", address)
            assert service_info(now)["pid"]  # a live service of ours holds it now
            creator.signal(signal.SIGCONT)
            creator.tell("check")
            creator.expect("closed", timeout=30)  # the creator re-homed and let go
            assert q.get(timeout=5) == "from the creator"
        finally:
            q.close()
        creator.tell("exit")
        assert creator.finish(timeout=30) == 0, creator.stderr
        wait_clean(baseline, 5)
    finally:
        creator.signal(signal.SIGCONT)
        creator.kill()
        if squatter is not None:
            squatter.kill()


def test_the_service_removes_nothing_but_its_own_queues(backend: str, tmp_path: Path) -> None:
    """Even a client of the same uid cannot make the service remove anything but a queue
    it registered whose header names it: a plain path, a named channel, a file that
    merely has an unnamed queue's name, another service's queue all stay."""
    q: shmchan.Queue[str] = shmchan.Queue(backend=backend)
    plain = tmp_path / "plain"
    plain.write_text("keep")
    named = shmchan.Channel.create(unique_name(backend), capacity=4096, backend=backend)
    other = Child(
        """
        import sys, shmchan
        q = shmchan.Queue(backend=backend)
        print("made", q.name, flush=True)
        sys.stdin.readline()
        q.put("intact")
        print(q.get(timeout=5), flush=True)
        q.close()
        """,
        backend=backend,
    )
    fake: Path | None = None
    try:
        _, others = other.expect("made", timeout=30).split()
        victims = [others]
        if backend != "sysv":  # a foreign file with an unnamed queue's name
            fake = DEV_SHM / f"shmchan-q-{secrets.token_hex(12)}"
            fake.write_bytes(b"not a shmchan segment".ljust(8192, b"!"))
            victims.append(str(fake) if backend == "mmap" else "/" + fake.name)
        with raw_client(q._owner) as sock:
            assert ask(sock, "c", "mmap", str(plain)).startswith("error")
            assert ask(sock, "c", backend, named.name).startswith("error")
            assert ask(sock, "c", "carrier-pigeon", q.name).startswith("error")
            for victim in victims:
                assert ask(sock, "c", backend, victim) == "ok"
                assert ask(sock, "-", backend, victim) == "ok"  # its last hold here: removal?
            for victim in victims:  # and once more, dropped by a hang-up this time
                assert ask(sock, "c", backend, victim) == "ok"
        with raw_client(q._owner) as sock:
            assert ask(sock, "-", backend, q.name) == "ok"  # absorbs the hang-up first
        assert plain.read_text() == "keep"
        assert fake is None or fake.exists()
        named.send_bytes(b"named")
        assert named.recv_bytes(timeout=5) == b"named"
        other.tell("go")
        assert other.expect("intact", timeout=30) == "intact"
        assert other.finish(timeout=30) == 0, other.stderr
        q.put("mine")
        assert q.get(timeout=5) == "mine"
    finally:
        other.kill()
        named.close()
        named.unlink()
        q.close()
        if fake is not None:
            fake.unlink(missing_ok=True)


def test_a_segment_whose_creator_died_before_publishing_it_is_removed(tmp_path: Path) -> None:
    """The exception to the header check: a creator registers a queue before creating
    it, so a segment it never published (magic 0) is removed once its hold is gone,
    as a dead creator's leftovers must be."""
    name = f"/shmchan-q-{secrets.token_hex(12)}"
    path = DEV_SHM / name[1:]
    q: shmchan.Queue[str] = shmchan.Queue()
    try:
        with raw_client(q._owner) as sock:
            assert ask(sock, "c", "posix", name) == "ok"
            path.write_bytes(bytes(8192))  # created, never published
        with raw_client(q._owner) as sock:
            assert ask(sock, "-", "posix", q.name) == "ok"  # absorbs the hang-up first
        assert not path.exists()
    finally:
        path.unlink(missing_ok=True)
        q.close()


def test_holds_per_connection_are_bounded(backend: str) -> None:
    q: shmchan.Queue[str] = shmchan.Queue(backend=backend)
    try:
        with raw_client(q._owner) as sock:
            assert ask(sock, "+", backend, q.name, str(_reaper.MAX_HOLDS - 1)) == "ok"
            assert ask(sock, "t", backend, q.name, "token-1") == "ok"
            assert ask(sock, "+", backend, q.name).startswith("error")
            assert ask(sock, "t", backend, q.name, "token-2").startswith("error")
            assert ask(sock, "a", backend, q.name, "1").startswith("error")
            assert ask(sock, "r", "token-1") == "ok"
            assert ask(sock, "+", backend, q.name) == "ok"
            assert ask(sock, "+", backend, q.name, str(1 << 40)).startswith("error")
        q.put("unaffected")
        assert q.get(timeout=5) == "unaffected"
    finally:
        q.close()


# -- it never blocks on a client ---------------------------------------------------------------


def test_a_client_that_reads_no_replies_cannot_freeze_the_service(backend: str) -> None:
    """~1000 requests whose replies are never read: the client is disconnected, and
    meanwhile another process opens, uses and releases queues of the same service
    promptly. (The service used to block on its send, freezing every queue it held.)"""
    baseline = snapshot()
    q: shmchan.Queue[str] = shmchan.Queue(backend=backend)
    q.put("kept")
    staller = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        staller.connect("\0" + q._owner)
        staller.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 30
        while sent < 1000:
            try:
                staller.send(b"?")
                sent += 1
            except BlockingIOError:  # our own send buffer: wait (bounded) for the service to read
                assert time.monotonic() < deadline, "the service stopped reading requests"
                select.select([], [staller], [], max(0.0, deadline - time.monotonic()))
            except (BrokenPipeError, ConnectionResetError):
                break  # disconnected already
        used = run_child(
            """
            import time, shmchan
            start = time.monotonic()
            q = shmchan.Queue.open(name, backend=backend)
            assert q.get(timeout=5) == "kept"
            q.put("back")
            q.close()
            print(round(time.monotonic() - start, 3), flush=True)
            """,
            name=q.name,
            backend=backend,
        )
        assert used.returncode == 0, used.stderr
        assert float(used.stdout) < 2.0, used.stdout
        assert q.get(timeout=5) == "back"
        staller.setblocking(True)
        staller.settimeout(10)
        replies = 0
        try:
            while staller.recv(4096):
                replies += 1
        except ConnectionResetError:
            pass
        assert replies < sent, "the client that read nothing was never cut off"
    finally:
        staller.close()
    q.close()
    wait_clean(baseline, 2)


def test_a_pickled_queue_outlives_the_process_that_pickled_it(backend: str) -> None:
    """A queue pickled (outside a process start) by a process that then exits stays for
    the receiver, which unpickles it afterwards (within the transfer grace)."""
    baseline = snapshot()
    sender = run_child(
        """
        import pickle, shmchan
        q = shmchan.Queue(backend=backend)
        q.put("in flight")
        print(pickle.dumps(q).hex(), flush=True)
        q.close()
        """,
        backend=backend,
    )
    assert sender.returncode == 0, sender.stderr
    q = pickle.loads(bytes.fromhex(sender.stdout))
    try:
        assert q.get(timeout=5) == "in flight"
    finally:
        q.close()
    wait_clean(baseline, 2)


# -- a killed service -----------------------------------------------------------------------------


def _put_pid(q: shmchan.Queue[Any]) -> None:
    q.put(("spawned", os.getpid()))
    q.close()


def test_a_killed_service_is_replaced(backend: str) -> None:
    """After SIGKILL of its service, the queue still opens by name and by pickle (a spawn
    child), its header names a live service, and it is removed after its last close."""
    baseline = snapshot()
    q: shmchan.Queue[Any] = shmchan.Queue(backend=backend)
    dead = q._owner
    kill_service(dead)
    by_name = run_child(
        """
        import shmchan
        q = shmchan.Queue.open(name, backend=backend)
        q.put("by name")
        q.close()
        """,
        name=q.name,
        backend=backend,
    )
    assert by_name.returncode == 0, by_name.stderr
    child = SPAWN.Process(target=_put_pid, args=(q,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert sorted(map(str, [q.get(timeout=5), q.get(timeout=5)])) == sorted(
        ["by name", str(("spawned", child.pid))]
    )
    owner = _reaper.segment_owner(backend, q.name)
    assert isinstance(owner, str) and owner not in ("", dead)
    assert int(service_info(owner)["pid"]) > 0
    q.close()
    wait_clean(baseline, 2 + _reaper.REHOME_GRACE)


@pytest.mark.parametrize("last", ["exit", "kill"])
def test_after_its_service_is_killed_a_queue_goes_with_its_last_user(backend: str, last: str) -> None:
    """The creator exits without closing the queue (interpreter exit), after its service
    was killed; another user keeps it; when that one goes too (exit or SIGKILL), the
    queue is removed."""
    baseline = snapshot()
    creator = Child(
        """
        import sys, shmchan
        q = shmchan.Queue(backend=backend)
        q.put("from the creator")
        print("made", q.name, q._owner, flush=True)
        sys.stdin.readline()
        """,
        backend=backend,
    )
    user = None
    try:
        _, name, address = creator.expect("made", timeout=30).split()
        kill_service(address)
        user = Child(
            """
            import sys, shmchan
            q = shmchan.Queue.open(name, backend=backend)
            print("got", q.get(timeout=10), flush=True)
            sys.stdin.readline()
            """,
            name=name,
            backend=backend,
        )
        user.expect("got", timeout=30)
        creator.close_stdin()
        assert creator.finish(timeout=30) == 0, creator.stderr
        again: shmchan.Queue[str] = shmchan.Queue.open(name, backend=backend)  # the user holds it
        again.close()
        assert leaks_since(baseline)
        if last == "kill":
            user.signal(signal.SIGKILL)
            user.finish(timeout=30)
        else:
            user.close_stdin()
            assert user.finish(timeout=30) == 0, user.stderr
        wait_clean(baseline, 2 + _reaper.REHOME_GRACE)
    finally:
        creator.kill()
        if user is not None:
            user.kill()


# -- a whole tree killed at once ----------------------------------------------------------------------

KILL_TREE = """
import os, sys, multiprocessing as mp
import shmchan

def worker(q, r, big):
    r.put(("up", os.getpid()))
    while True:
        r.put(q.get())

if __name__ == "__main__":
    backend, method, moment = sys.argv[1:]
    ctx = mp.get_context(method)
    q = shmchan.Queue(backend=backend)
    r = shmchan.Queue(backend=backend)
    big = shmchan.Queue(backend=backend, capacity=4096)
    big.put(b"x" * 10000)  # a side segment too
    procs = [ctx.Process(target=worker, args=(q, r, big)) for _ in range(2)]
    for p in procs:
        p.start()
    if moment == "running":
        assert sorted(r.get(timeout=60)[1] for _ in procs) == sorted(p.pid for p in procs)
        q.put("work")
        assert r.get(timeout=30) == "work"
    print("ready", os.getpid(), flush=True)  # "starting": children may still be unpickling
    sys.stdin.readline()
"""


@pytest.mark.parametrize("moment", ["starting", "running"])
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_tree_killed_at_once_leaves_nothing_within_a_second(
    backend: str, method: str, moment: str, tmp_path: Path
) -> None:
    baseline = snapshot()
    script = tmp_path / "tree.py"
    script.write_text(KILL_TREE)
    child = Child(
        "import runpy, sys; sys.argv = ['tree.py', *args]; runpy.run_path(path, run_name='__main__')",
        args=[backend, method, moment],
        path=str(script),
    )
    try:
        child.expect("ready", timeout=90)
        assert leaks_since(baseline)
        tree = descendants(child.pid)
        for pid in [*tree, child.pid]:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        child.finish(timeout=30)
        wait_clean(baseline, max(0.0, 1.0 - (time.monotonic() - killed)))
    finally:
        child.kill()


# -- where it starts ------------------------------------------------------------------------------


def test_the_service_starts_with_shmchan_only_on_a_runtime_path(tmp_path: Path) -> None:
    """A vendored copy of shmchan, found only through a sys.path entry added at run time,
    by an interpreter that cannot import shmchan on its own: unnamed queues work, and
    their service runs that very copy."""
    vendor = tmp_path / "vendor"
    shutil.copytree(ROOT / "shmchan", vendor / "shmchan", ignore=shutil.ignore_patterns("__pycache__"))
    deps = sysconfig.get_paths()["purelib"]  # posix_ipc, sysv_ipc, anyio (not shmchan: its .pth is not read)
    base = getattr(sys, "_base_executable", None) or sys.executable
    env = {k: v for k, v in child_env().items() if not k.startswith("PYTHON")}
    code = f"""
import socket, sys
sys.path[:0] = [{str(vendor)!r}, {deps!r}]
import shmchan
assert shmchan.__file__.startswith({str(vendor)!r}), shmchan.__file__
q = shmchan.Queue()
q.put("vendored")
assert q.get(timeout=5) == "vendored"
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
s.connect("\\0" + q._owner)
s.send(b"?")
print(s.recv(4096).decode(), flush=True)
s.close()
q.close()
"""
    proc = subprocess.run(
        [base, "-I", "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    info = dict(word.split("=", 1) for word in proc.stdout.split())
    assert info["pkg"] == str(vendor / "shmchan")
