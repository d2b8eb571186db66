"""The ``shmchan`` command line: ls, stat, rm, gc, top and bench (docs/cli.md).

Objects are made on every backend and left behind the ways a crash leaves them: a creator
SIGKILLed before publishing, an unnamed queue whose lifetime service and users were
SIGKILLed, a side segment whose channel is gone, SysV semaphore sets without their
segment. Each test checks what ``ls`` says about them and that ``rm``/``gc`` remove
exactly what they should (never what a live process uses). Commands run in-process
(``main(argv)``, output captured) and, once, as ``python -m shmchan`` in a subprocess.
Children are driven by the lines they print and killed in a ``finally``; the autouse
leak check of conftest.py fails any test that leaves an object in /dev/shm or SysV IPC.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sysv_ipc
from conftest import Snapshot, snapshot, unique_name
from helpers.children import Child, child, proc_state, wait_until
from helpers.procs import child_env

import shmchan
from shmchan import _cext
from shmchan import _layout as L
from shmchan._backends.sysv import sysv_key
from shmchan._cli import main

pytestmark = pytest.mark.timeout(60)

DEV_SHM = Path("/dev/shm")
MIB = 1 << 20


# -- running the command line ---------------------------------------------------------------------


def nothing_removed(before: Snapshot) -> bool:
    """Everything in ``before`` is still there (other programs may add objects meanwhile)."""
    now = snapshot()
    return before.shm <= now.shm and before.sysv.keys() <= now.sysv.keys()


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``shmchan argv`` in-process: ``(exit status, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def ls(*argv: str) -> list[dict[str, Any]]:
    rc, out, err = cli("ls", "--json", *argv)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["format"] == "shmchan.ls" and doc["version"] == 1
    channels: list[dict[str, Any]] = doc["channels"]
    return channels


def entry(ref: str, *argv: str, backend: str | None = None) -> dict[str, Any] | None:
    """The ``ls --json`` entry whose ref is ``ref`` (None if not listed)."""
    found = [e for e in ls(*argv) if e["ref"] == ref and (backend is None or e["backend"] == backend)]
    assert len(found) <= 1, found
    return found[0] if found else None


def gc(*argv: str) -> tuple[int, list[dict[str, Any]]]:
    rc, out, err = cli("gc", "--json", *argv)
    doc = json.loads(out)
    assert doc["format"] == "shmchan.gc" and doc["version"] == 1, err
    orphans: list[dict[str, Any]] = doc["orphans"]
    return rc, orphans


def stat_json(ref: str, *argv: str) -> dict[str, Any]:
    rc, out, err = cli("stat", "--json", ref, *argv)
    assert rc == 0, err
    doc: dict[str, Any] = json.loads(out)
    assert doc["format"] == "shmchan.stat" and doc["version"] == 1
    return doc


def ref_of(backend: str, name: str) -> str:
    """What ls lists a channel as: /name (posix, sysv with a known name), the path (mmap)."""
    return name if backend == "mmap" else "/" + name.lstrip("/")


def scope(backend: str, name: str, tmp: Path | None = None) -> list[str]:
    """ls/gc options that make ``name`` visible on ``backend``."""
    if backend == "sysv":
        return ["--backend", "sysv", "--name", name]
    if backend == "mmap":
        return ["--backend", "mmap", "--dir", str(tmp or Path(name).parent)]
    return ["--backend", "posix"]


def mmap_name(tmp_path: Path) -> str:
    return str(tmp_path / f"chan-{os.getpid()}-{time.monotonic_ns()}")


def exists(backend: str, name: str) -> bool:
    if backend == "sysv":
        return _cext.shm_lookup(sysv_key("/" + name.lstrip("/"), "shm")) is not None
    path = Path(name) if backend == "mmap" else DEV_SHM / name.lstrip("/")
    return path.exists()


def sysv_sems(name: str) -> list[int | None]:
    name = "/" + name.lstrip("/")
    return [_cext.sem_lookup(sysv_key(name, role)) for role in ("peers", "presence")]


@pytest.fixture
def chan_name(backend: str, tmp_path: Path) -> Iterator[str]:
    """A unique channel name on ``backend`` (mmap: in a private directory), removed after."""
    name = mmap_name(tmp_path) if backend == "mmap" else unique_name(backend)
    yield name
    with contextlib.suppress(shmchan.ChannelNotFound):
        shmchan.Channel.remove(name, backend=backend)


# -- ls --------------------------------------------------------------------------------------------


def test_ls_shows_every_backend_with_counters_and_presence(backend: str, chan_name: str) -> None:
    with shmchan.Channel.create(chan_name, capacity=1 << 16, backend=backend, mode="w") as w:
        w.send_bytes(b"x" * 100)
        w.send_bytes(b"y")
        with shmchan.Channel.open(chan_name, backend=backend, mode="r") as r:
            assert r.recv_bytes() == b"x" * 100
            e = entry(ref_of(backend, chan_name), *scope(backend, chan_name), backend=backend)
            assert e is not None
            assert e["name"] == ref_of(backend, chan_name)
            assert (e["state"], e["layout"], e["evidence"]) == ("ok", "2.0", "magic")
            assert (e["capacity"], e["queued_messages"], e["queued_bytes"]) == (1 << 16, 1, 32)
            assert (e["put"], e["got"]) == (2, 1)
            assert (e["writers"], e["readers"], e["attached"]) == (1, 1, 2)
            assert e["in_use"] is True
            assert (e["owner"], e["owner_alive"]) == (None, None)
            assert (e["creator_pid"], e["creator_uid"]) == (os.getpid(), os.geteuid())
            assert 0 <= e["age"] < 60
            assert (e["producers_waiting"], e["consumers_waiting"]) == (0, 0)
            if backend == "sysv":
                assert e["sysv"]["key"] == sysv_key("/" + chan_name, "shm")
                assert e["sysv"]["nattch"] == 2
            else:
                assert e["sysv"] is None and e["path"] is not None
            rc, text, _ = cli("ls", *scope(backend, chan_name))
            assert rc == 0 and ref_of(backend, chan_name) in text and "CAPACITY" in text
        e = entry(ref_of(backend, chan_name), *scope(backend, chan_name), backend=backend)
        assert e is not None and (e["writers"], e["readers"], e["attached"]) == (1, 0, 1)


@pytest.mark.parametrize("backend", ["sysv"])
def test_ls_lists_sysv_channels_whose_name_is_unknown(chan_name: str) -> None:
    with shmchan.Channel.create(chan_name, capacity=1 << 16, backend="sysv"):
        key = sysv_key("/" + chan_name, "shm")
        e = entry(f"key:{key:#010x}", "--backend", "sysv")
        assert e is not None and e["name"] is None and e["state"] == "ok"
        assert e["sysv"]["shmid"] == _cext.shm_lookup(key)
        # stat accepts the ref ls printed; the name, once known, is recovered.
        assert stat_json(f"key:{key:#010x}")["channel"]["capacity"] == 1 << 16
        assert entry("/" + chan_name, "--backend", "sysv", "--name", chan_name) is not None


def test_ls_shows_waiting_producers_and_consumers(backend: str, chan_name: str) -> None:
    code = """
        import shmchan
        ch = shmchan.Channel.open(NAME, backend=BACKEND, mode=MODE)
        print("ready", flush=True)
        if MODE == "r":
            ch.recv_bytes(timeout=30)
        else:
            ch.send_bytes(b"z" * 10000, timeout=30)
    """
    ref = ref_of(backend, chan_name)

    def waiting(role: str) -> bool:
        e = entry(ref, *scope(backend, chan_name))
        return e is not None and e[f"{role}_waiting"] == 1

    with shmchan.Channel.create(chan_name, capacity=1 << 15, backend=backend) as ch:
        with child(code, NAME=chan_name, BACKEND=backend, MODE="r") as c:
            c.expect("ready")
            wait_until(lambda: waiting("consumers"), 10, "a consumer waiting")
            c.kill()
        with contextlib.suppress(shmchan.Full):
            while True:
                ch.send_bytes_nowait(b"f" * 10000)
        with child(code, NAME=chan_name, BACKEND=backend, MODE="w") as c:
            c.expect("ready")
            wait_until(lambda: waiting("producers"), 10, "a producer waiting")
            c.kill()
        # A dead sleeper's bit may stay set until a live peer sweeps it: it is not counted.
        e = entry(ref, *scope(backend, chan_name))
        assert e is not None and (e["producers_waiting"], e["consumers_waiting"]) == (0, 0)


def test_python_m_shmchan_ls_json_in_a_subprocess(backend: str, chan_name: str) -> None:
    with shmchan.Channel.create(chan_name, capacity=1 << 16, backend=backend) as ch:
        ch.send_bytes(b"hello")
        proc = subprocess.run(
            [sys.executable, "-m", "shmchan", "ls", "--json", *scope(backend, chan_name)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert (doc["format"], doc["version"], doc["errors"]) == ("shmchan.ls", 1, [])
        [e] = [e for e in doc["channels"] if e["ref"] == ref_of(backend, chan_name)]
        assert (e["queued_messages"], e["put"], e["attached"]) == (1, 1, 1)


# -- corrupt, truncated and foreign segments -------------------------------------------------------


def _scribble(backend: str, name: str, offset: int, data: bytes) -> None:
    if backend == "sysv":
        seg = sysv_ipc.SharedMemory(sysv_key("/" + name, "shm"))
        try:
            seg.write(data, offset)
        finally:
            seg.detach()
        return
    path = name if backend == "mmap" else str(DEV_SHM / name)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_corrupt_header_is_listed_and_removed(backend: str, chan_name: str) -> None:
    shmchan.Channel.create(chan_name, capacity=1 << 16, backend=backend).close()
    _scribble(backend, chan_name, L.OFF["capacity"], (12345).to_bytes(8, "little"))
    e = entry(ref_of(backend, chan_name), *scope(backend, chan_name))
    assert e is not None and e["state"] == "corrupt"
    assert e["problems"] == ["header checksum mismatch"]
    assert e["capacity"] is None and e["queued_messages"] is None
    doc = stat_json(ref_of(backend, chan_name), "--backend", backend)
    assert doc["header"]["capacity"] == 12345 and doc["header"]["header_crc"] != doc["header"]["computed_crc"]
    before = sysv_sems(chan_name) if backend == "sysv" else []
    rc, out, err = cli("rm", chan_name, "--backend", backend)
    assert rc == 0, err
    assert "removed" in out and not exists(backend, chan_name)
    if backend == "sysv":
        assert all(before) and sysv_sems(chan_name) == [None, None]


@pytest.mark.parametrize("backend", ["posix", "mmap"])
def test_truncated_and_foreign_files(backend: str, chan_name: str) -> None:
    path = chan_name if backend == "mmap" else str(DEV_SHM / chan_name)
    shmchan.Channel.create(chan_name, capacity=1 << 16, backend=backend).close()
    os.truncate(path, 100)
    e = entry(ref_of(backend, chan_name), *scope(backend, chan_name))
    assert e is not None and e["state"] == "corrupt" and "shorter than a header" in e["problems"][0]
    assert cli("rm", chan_name, "--backend", backend)[0] == 0 and not os.path.exists(path)
    # Not shmchan's: not listed, and rm wants --force.
    Path(path).write_bytes(b"NOTSHMCH" + bytes(5000))
    assert entry(ref_of(backend, chan_name), *scope(backend, chan_name)) is None
    rc, _, err = cli("rm", chan_name, "--backend", backend)
    assert rc == 1 and "not a shmchan segment" in err and os.path.exists(path)
    assert cli("stat", chan_name, "--backend", backend)[0] == 0
    rc, _, err = cli("rm", "--force", chan_name, "--backend", backend)
    assert rc == 0, err
    assert not os.path.exists(path)


# -- creators killed before publishing -----------------------------------------------------------

MAKE_FILE = """
    import mmap, os, sys
    from shmchan import _cext, _layout as L
    from shmchan._backends import _base
    from shmchan._backends._base import CreateParams
    fd = os.open(PATH, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    assert _cext.ofd_lock(fd, 0, 8, True)      # the creation lock, as _filebacked.build
    params = CreateParams(1 << 16, 1 << 15)
    total = _base.total_size(params)
    os.ftruncate(fd, total)
    if INIT:  # the identity block is written, the magic is not
        with mmap.mmap(fd, total) as mm, memoryview(mm) as buf:
            _cext.init_header(buf, **_base.header_params(params, 77, L.LIVENESS_OFD, (-1, -1)))
    print("made", flush=True)
    sys.stdin.readline()
"""

MAKE_SYSV = """
    import sys
    import sysv_ipc
    from shmchan import _cext, _layout as L
    from shmchan._backends import _base
    from shmchan._backends._base import CreateParams
    from shmchan._backends.sysv import sysv_key
    params = CreateParams(1 << 16, 1 << 15)
    shm = sysv_ipc.SharedMemory(sysv_key(NAME, "shm"), sysv_ipc.IPC_CREX, mode=0o600,
                                size=_base.total_size(params), init_character=b"\\0")
    peers = _cext.sem_create(sysv_key(NAME, "peers"), params.max_peers, 0o600)
    assert _cext.sem_op(peers, 0, 1, True, True)  # the creator's hold, as SysVBackend.create
    presence = _cext.sem_create(sysv_key(NAME, "presence"), 2, 0o600)
    with memoryview(shm) as buf:
        _cext.init_header(buf, **_base.header_params(params, 77, L.LIVENESS_SYSV, (peers, presence)))
    print("made", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize(
    ("backend", "how"), [("posix", "identity"), ("posix", "name"), ("mmap", "identity"), ("sysv", "identity")]
)
def test_creator_killed_before_publishing(backend: str, how: str, tmp_path: Path) -> None:
    if how == "name":
        name = f"shmchan-q-{os.urandom(12).hex()}"
    else:
        name = mmap_name(tmp_path) if backend == "mmap" else unique_name(backend)
    ref = ref_of(backend, name)
    path = name if backend == "mmap" else str(DEV_SHM / name)
    code = MAKE_SYSV if backend == "sysv" else MAKE_FILE
    try:
        with child(code, PATH=path, NAME="/" + name, INIT=how == "identity") as c:
            c.expect("made")
            e = entry(ref, *scope(backend, name, tmp_path))
            assert e is not None and e["state"] == "creating" and e["in_use"] is True
            assert e["evidence"] == how
            rc, orphans = gc(*scope(backend, name, tmp_path))
            assert rc == 0 and [o for o in orphans if o["ref"] == ref] == []
            c.kill()
        e = entry(ref, *scope(backend, name, tmp_path))
        assert e is not None and e["state"] == "unpublished" and e["in_use"] is False
        assert "died before publishing" in e["problems"][0]
        if how == "identity":
            assert e["creator_pid"] == c.pid and e["layout"] == "2.0"
        before = snapshot()
        rc, orphans = gc("--dry-run", *scope(backend, name, tmp_path))
        assert rc == 0 and nothing_removed(before) and exists(backend, name)
        [o] = [o for o in orphans if o["ref"] == ref]
        assert (o["kind"], o["action"]) == ("unpublished", "would-remove")
        rc, orphans = gc(*scope(backend, name, tmp_path))
        [o] = [o for o in orphans if o["ref"] == ref]
        assert rc == 0 and o["action"] == "removed"
        assert not exists(backend, name)
        if backend == "sysv":
            assert sysv_sems(name) == [None, None]
            assert len(o["objects"]) == 3  # the segment and both semaphore sets
    finally:
        with contextlib.suppress(shmchan.ChannelNotFound):
            shmchan.Channel.remove(name if backend != "posix" else "/" + name, backend=backend)


def test_a_dead_creators_blank_file_is_not_provably_shmchans() -> None:
    name = unique_name("posix")
    try:
        with child(MAKE_FILE, PATH=str(DEV_SHM / name), INIT=False) as c:
            c.expect("made")
            e = entry("/" + name, "--backend", "posix")
            assert e is not None and (e["state"], e["evidence"]) == ("creating", "lock")
        assert entry("/" + name, "--backend", "posix") is None  # zeros and no lock: nobody's
        rc, orphans = gc("--backend", "posix")
        assert [o for o in orphans if o["ref"] == "/" + name] == [] and (DEV_SHM / name).exists()
        # An operator who knows the name removes it.
        assert stat_json(name)["channel"]["state"] == "unpublished"
        rc, _out, err = cli("rm", name)
        assert rc == 0, err
        assert not (DEV_SHM / name).exists()
    finally:
        with contextlib.suppress(FileNotFoundError):
            (DEV_SHM / name).unlink()


# -- unnamed queues whose lifetime service was killed -------------------------------------------------

MAKE_QUEUE = """
    import sys
    import shmchan
    q = shmchan.Queue(backend=BACKEND)
    q.put("left behind")
    print("queue", q.name, flush=True)
    sys.stdin.readline()
"""

USE_QUEUE = """
    import sys
    import shmchan
    q = shmchan.Queue.open(NAME, backend=BACKEND)
    print("attached", flush=True)
    sys.stdin.readline()
"""


def _socket_inodes(address: str) -> set[str]:
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    return {row[6] for row in rows if len(row) >= 8 and row[7] == "@" + address}


def kill_service(address: str) -> None:
    """SIGKILL the lifetime service listening on ``address``: the one process holding that
    address's sockets (only the service does: its users' sockets are unbound)."""
    inodes = {f"socket:[{i}]" for i in _socket_inodes(address)}
    assert inodes, f"no socket at @{address}"
    pids: set[int] = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{entry}/fd")):
                pids.add(int(entry))
    assert len(pids) == 1, pids
    (pid,) = pids
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"shmchan._reaper" in f.read()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _socket_inodes(address), 10, "the lifetime service to die")


@pytest.mark.parametrize("backend", ["posix", "sysv", "mmap"])
def test_queue_whose_lifetime_service_died(backend: str) -> None:
    maker = Child(MAKE_QUEUE, BACKEND=backend)
    user: Child | None = None
    name = ""
    try:
        name = maker.expect("queue").split(" ", 1)[1]
        user = Child(USE_QUEUE, NAME=name, BACKEND=backend)
        user.expect("attached")
        # An mmap queue lives in /dev/shm: it is listed as the posix channel of that file.
        listed_as = "posix" if backend == "mmap" else backend
        ref = "/" + os.path.basename(name) if backend != "sysv" else f"key:{sysv_key(name, 'shm'):#010x}"
        e = entry(ref, "--backend", listed_as)
        assert e is not None and e["owner"] and e["owner_alive"] is True and e["attached"] == 2
        # Stopped, the users cannot re-home the queue to a new service (they would at
        # once: docs/layout.md 12), but they are alive and attached.
        for c in (maker, user):
            c.signal(signal.SIGSTOP)
        kill_service(e["owner"])
        e = entry(ref, "--backend", listed_as)
        assert e is not None and e["owner_alive"] is False and e["attached"] == 2
        assert "DEAD" in cli("ls", "--backend", listed_as)[1]
        rc, orphans = gc("--backend", listed_as)
        assert [o for o in orphans if o["ref"] == ref] == [], "removed a queue that live processes use"
        os.kill(maker.pid, signal.SIGKILL)  # where it stands: no chance to re-home
        maker.finish(timeout=10)
        e = entry(ref, "--backend", listed_as)
        assert e is not None and e["attached"] == 1
        assert [o for o in gc("--backend", listed_as)[1] if o["ref"] == ref] == []
        os.kill(user.pid, signal.SIGKILL)
        user.finish(timeout=10)
        e = entry(ref, "--backend", listed_as)
        assert e is not None and (e["attached"], e["in_use"], e["queued_messages"]) == (0, False, 1)
        before = snapshot()
        rc, orphans = gc("--dry-run", "--backend", listed_as)
        [o] = [o for o in orphans if o["ref"] == ref]
        assert rc == 0 and o["kind"] == "abandoned-queue" and nothing_removed(before)
        rc, orphans = gc("--backend", listed_as)
        [o] = [o for o in orphans if o["ref"] == ref]
        assert rc == 0 and o["action"] == "removed"
        assert entry(ref, "--backend", listed_as) is None
        if backend == "sysv":
            assert sysv_sems(name) == [None, None]
    finally:
        for c in (maker, user):
            if c is not None:
                c.kill()
        if name:
            with contextlib.suppress(shmchan.ChannelNotFound):
                shmchan.Channel.remove(name, backend=backend)


# -- side segments and semaphore sets left behind ------------------------------------------------------


def _queue_big(name: str, backend: str) -> None:
    """Make named queue ``name`` holding one message in a side segment (it is larger than
    the 16 KiB ring), and close it."""
    q: shmchan.Queue[bytes] = shmchan.Queue(name=name, backend=backend, capacity=1 << 14)
    q.put(b"s" * 100_000)
    q.close()


def test_side_segments_in_flight_and_orphaned(backend: str, chan_name: str, tmp_path: Path) -> None:
    _queue_big(chan_name, backend)
    ref = ref_of(backend, chan_name)
    doc = stat_json(ref, "--backend", backend)
    [side] = doc["side_entries"]
    assert (side["state"], side["size"]) == ("queued", MIB)
    [obj] = doc["side_objects"]
    assert obj["index"] == side["index"] and obj["size"] == MIB
    e = entry(ref, *scope(backend, chan_name, tmp_path))
    assert e is not None and e["side_objects"] == 1
    # A side object of a live channel is never collected.
    assert [o for o in gc(*scope(backend, chan_name, tmp_path))[1] if chan_name in o["ref"]] == []
    # Its channel goes without it: the side object is an orphan.
    if backend == "sysv":
        sysv_ipc.remove_shared_memory(_cext.shm_lookup(sysv_key("/" + chan_name, "shm")))
    else:
        os.unlink(chan_name if backend == "mmap" else DEV_SHM / chan_name)
    if backend == "sysv":  # its semaphore sets are left as well; only its name ties them to it
        assert all(chan_name not in o["ref"] for o in gc("--dry-run", "--backend", "sysv")[1])
        e = entry(ref, *scope(backend, chan_name))
        assert e is not None and e["state"] == "no-segment" and e["side_objects"] == 1
    before = snapshot()
    rc, orphans = gc("--dry-run", *scope(backend, chan_name, tmp_path))
    mine = [o for o in orphans if chan_name in o["ref"]]
    assert rc == 0 and len(mine) == 1 and nothing_removed(before)
    assert mine[0]["kind"] == ("orphan-sysv" if backend == "sysv" else "orphan-side")
    rc, orphans = gc(*scope(backend, chan_name, tmp_path))
    [o] = [o for o in orphans if chan_name in o["ref"]]
    assert rc == 0 and o["action"] == "removed"
    if backend == "sysv":
        assert len(o["objects"]) == 3 and sysv_sems(chan_name) == [None, None]
        assert _cext.shm_lookup(sysv_key("/" + chan_name, "S00")) is None
    else:
        directory = Path(chan_name).parent if backend == "mmap" else DEV_SHM
        assert [p for p in directory.iterdir() if p.name.startswith(os.path.basename(chan_name))] == []


def test_rm_removes_the_side_segments_with_the_channel(backend: str, chan_name: str) -> None:
    """``rm`` of a channel with a message in a side segment removes the segment, its
    semaphores and the side object, and says so."""
    _queue_big(chan_name, backend)
    ref = ref_of(backend, chan_name)
    [side] = stat_json(ref, "--backend", backend)["side_objects"]
    rc, out, err = cli("rm", ref, "--backend", backend)
    assert rc == 0, err
    assert out.startswith("removed") and ("S00" in out or backend == "sysv")  # says what went
    assert not exists(backend, chan_name)
    if backend == "sysv":
        assert sysv_sems(chan_name) == [None, None]
        assert _cext.shm_lookup(sysv_key("/" + chan_name, L.side_suffix(side["index"])[1:])) is None
    else:
        directory = Path(chan_name).parent if backend == "mmap" else DEV_SHM
        assert [p for p in directory.iterdir() if p.name.startswith(os.path.basename(chan_name))] == []
    rc, _, err = cli("stat", ref, "--backend", backend)
    assert rc == 1 and "no such channel" in err


@pytest.mark.parametrize("backend", ["posix"])
def test_rm_of_several_names_reports_a_partial_failure(chan_name: str) -> None:
    """``rm A B`` where B does not exist removes A and exits 1 (partial), naming B."""
    missing = chan_name + "-missing"
    shmchan.Channel.create(chan_name, capacity=1 << 14, backend="posix").close()
    rc, _, err = cli("rm", "/" + chan_name, "/" + missing, "--backend", "posix")
    assert rc == 1 and missing in err and "no such channel" in err
    assert not exists("posix", chan_name)


@pytest.mark.parametrize("backend", ["posix"])
def test_ls_without_options_looks_at_every_backend(chan_name: str, tmp_path: Path) -> None:
    """Plain ``ls`` scans every installed backend: a posix channel and a sysv channel are
    listed with their backends, and an mmap file in /dev/shm (the default directory) is
    listed too, as posix: the same kind of file in the same place (docs/cli.md)."""
    sysv_name = unique_name("sysv")
    mmap_path = str(DEV_SHM / f"{chan_name}-mmap")
    made = [("posix", chan_name), ("sysv", sysv_name), ("mmap", mmap_path)]
    try:
        for b, n in made:
            shmchan.Channel.create(n, capacity=1 << 14, backend=b).close()
        listed = {(e["backend"], e["ref"]) for e in ls()}
        assert ("posix", "/" + chan_name) in listed
        assert ("posix", "/" + os.path.basename(mmap_path)) in listed
        assert any(b == "sysv" for b, _ in listed)  # by key: its name is a hash
        assert ("sysv", "/" + sysv_name) in {(e["backend"], e["ref"]) for e in ls("--name", sysv_name)}
    finally:
        for b, n in made:
            with contextlib.suppress(shmchan.ChannelNotFound):
                shmchan.Channel.remove(n, backend=b)


@pytest.mark.parametrize("backend", ["posix"])
def test_side_shaped_names_that_are_not_side_objects_stay(chan_name: str) -> None:
    odd = DEV_SHM / f"{chan_name}.S00"
    odd.write_bytes(b"not a side object")  # not whole MiB: not shmchan's
    try:
        assert [o for o in gc("--backend", "posix")[1] if chan_name in o["ref"]] == []
        assert odd.exists()
    finally:
        odd.unlink()


@pytest.mark.parametrize("backend", ["sysv"])
def test_sysv_semaphore_sets_without_their_segment(chan_name: str) -> None:
    shmchan.Channel.create(chan_name, capacity=1 << 14, backend="sysv").close()
    sysv_ipc.remove_shared_memory(_cext.shm_lookup(sysv_key("/" + chan_name, "shm")))
    sems = sysv_sems(chan_name)
    assert all(s is not None for s in sems)
    # Without the name nothing proves whose semaphore sets these are: they are left.
    assert [o for o in gc("--backend", "sysv")[1] if o["kind"] == "orphan-sysv"] == []
    assert sysv_sems(chan_name) == sems
    e = entry("/" + chan_name, "--backend", "sysv", "--name", chan_name)
    assert e is not None and e["state"] == "no-segment"
    assert (e["sysv"]["semid_peers"], e["sysv"]["semid_presence"]) == tuple(sems)
    before = snapshot()
    rc, orphans = gc("--dry-run", "--backend", "sysv", "--name", chan_name)
    assert rc == 0 and [o["kind"] for o in orphans] == ["orphan-sysv"] and nothing_removed(before)
    rc, orphans = gc("--backend", "sysv", "--name", chan_name)
    assert rc == 0 and [o["action"] for o in orphans] == ["removed"]
    assert sysv_sems(chan_name) == [None, None]


@pytest.mark.parametrize("backend", ["sysv"])
def test_rm_removes_what_is_left_of_a_sysv_channel(chan_name: str) -> None:
    shmchan.Channel.create(chan_name, capacity=1 << 14, backend="sysv").close()
    sysv_ipc.remove_shared_memory(_cext.shm_lookup(sysv_key("/" + chan_name, "shm")))
    rc, out, err = cli("rm", chan_name, "--backend", "sysv")
    assert rc == 0, err
    assert "semaphore set" in out and sysv_sems(chan_name) == [None, None]


# -- rm: live processes, other users, symbolic links ----------------------------------------------


def test_rm_refuses_a_channel_live_processes_use(backend: str, chan_name: str) -> None:
    shmchan.Channel.create(chan_name, capacity=1 << 14, backend=backend).close()
    code = """
        import shmchan
        ch = shmchan.Channel.open(NAME, backend=BACKEND, mode="r")
        print("ready", flush=True)
        import sys; sys.stdin.readline()
    """
    with child(code, NAME=chan_name, BACKEND=backend) as c:
        c.expect("ready")
        rc, _, err = cli("rm", chan_name, "--backend", backend)
        assert rc == 1 and "in use" in err and "1 reader" in err
        assert exists(backend, chan_name)
        rc, _, err = cli("gc", *scope(backend, chan_name))
        assert exists(backend, chan_name)
        doc = stat_json(ref_of(backend, chan_name), "--backend", backend)
        [peer] = [p for p in doc["peers"] if p["live"]]
        assert peer["pid"] == c.pid and peer["pid_running"] is True
        if backend != "sysv":  # the kernel tells which process holds which lock
            [proc] = doc["processes"]
            assert (
                proc["pid"] == c.pid and "reader" in proc["roles"] and f"slot {peer['slot']}" in proc["roles"]
            )
        else:
            assert [p["pid"] for p in doc["processes"]] == [c.pid]
        rc, _out, err = cli("rm", "--force", chan_name, "--backend", backend)
        assert rc == 0, err
        assert not exists(backend, chan_name)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's objects")
@pytest.mark.parametrize("backend", ["posix", "sysv"])
def test_other_users_objects_need_root_and_force(backend: str, chan_name: str) -> None:
    shmchan.Channel.create(chan_name, capacity=1 << 14, backend=backend).close()
    if backend == "posix":
        os.chown(DEV_SHM / chan_name, 54321, 54321)
    else:
        seg = sysv_ipc.SharedMemory(sysv_key("/" + chan_name, "shm"))
        seg.uid = 54321
        seg.detach()
    rc, _, err = cli("rm", chan_name, "--backend", backend)
    assert rc == 1 and "owned by uid 54321" in err and exists(backend, chan_name)
    rc, _out, err = cli("rm", "--force", chan_name, "--backend", backend)
    assert rc == 0, err
    assert not exists(backend, chan_name)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's objects")
def test_gc_leaves_other_users_orphans_unless_root_forces() -> None:
    side = DEV_SHM / f"{unique_name('posix')}.S00"
    side.write_bytes(bytes(MIB))  # shaped like a side object; its channel does not exist
    os.chown(side, 54321, 54321)
    try:
        rc, orphans = gc("--backend", "posix")
        [o] = [o for o in orphans if o["ref"] == str(side)]
        assert rc == 0 and o["action"] == "skipped" and "uid 54321" in o["detail"] and side.exists()
        rc, orphans = gc("--backend", "posix", "--force")
        [o] = [o for o in orphans if o["ref"] == str(side)]
        assert rc == 0 and o["action"] == "removed" and not side.exists()
    finally:
        with contextlib.suppress(FileNotFoundError):
            side.unlink()


def test_symbolic_links_are_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    shmchan.Channel.create(str(target), capacity=1 << 14, backend="mmap").close()
    name = unique_name("posix")
    link = DEV_SHM / name
    link.symlink_to(target)
    mlink = tmp_path / "mlink"
    mlink.symlink_to(target)
    dlink = tmp_path / "dlink"
    dlink.symlink_to(tmp_path)
    try:
        assert entry("/" + name, "--backend", "posix") is None
        refs = [e["ref"] for e in ls("--backend", "mmap", "--dir", str(tmp_path))]
        assert refs == [str(target)]
        for argv in (["rm", name, "--backend", "posix"], ["rm", str(mlink)], ["rm", "--force", str(mlink)]):
            rc, _, err = cli(*argv)
            assert rc == 1 and "symbolic link" in err, (argv, err)
        assert target.exists() and link.is_symlink() and mlink.is_symlink()
        rc, _, err = cli("ls", "--backend", "mmap", "--dir", str(dlink))
        assert rc == 1 and "not followed" in err
    finally:
        link.unlink()
        shmchan.Channel.remove(str(target), backend="mmap")


# -- stat ------------------------------------------------------------------------------------------


def test_stat_shows_a_lock_held_by_a_stopped_then_dead_process(backend: str, chan_name: str) -> None:
    code = """
        import os
        os.environ["SHMCHAN_TEST_FAULT"] = "w.locked:stop"   # stop holding the write lock
        import shmchan
        ch = shmchan.Channel.open(NAME, backend=BACKEND, mode="w")
        print("sending", flush=True)
        ch.send_bytes(b"stuck")
    """
    with shmchan.Channel.create(chan_name, capacity=1 << 14, backend=backend):
        ref = ref_of(backend, chan_name)
        with child(code, NAME=chan_name, BACKEND=backend) as c:
            c.expect("sending")
            wait_until(lambda: proc_state(c.pid) == "T", 10, "the child to stop with the write lock")
            doc = stat_json(ref, "--backend", backend)
            holder = doc["locks"]["wlock"]
            assert holder["alive"] is True and holder["pid"] == c.pid and doc["locks"]["rlock"] is None
            assert L.decode_lock(doc["header"]["wlock"]) == (holder["slot"], holder["gen"])
            rc, text, _ = cli("stat", ref, "--backend", backend)
            assert rc == 0 and f"pid {c.pid}): alive" in text and "header:" in text
            os.kill(c.pid, signal.SIGKILL)  # as it is: Child.kill would let it go on first (SIGCONT)
            c.kill()
        doc = stat_json(ref, "--backend", backend)
        holder = doc["locks"]["wlock"]
        assert holder["alive"] is False and holder["pid"] == c.pid
        assert "DEAD" in cli("stat", ref, "--backend", backend)[1]
        for field in (f.name for f in L.FIELDS if f.type != "char"):
            assert field in doc["header"]


def test_stat_and_rm_of_what_does_not_exist() -> None:
    rc, _, err = cli("stat", "no-such-channel-here")
    assert rc == 1 and "no such channel" in err
    rc, _, err = cli("rm", "no-such-channel-here", "--backend", "posix")
    assert rc == 1 and "no such channel" in err
    rc, _, err = cli("stat", "key:0x12345678")
    assert rc == 1


# -- top, bench, usage -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["posix"])
def test_top_once_shows_rates(chan_name: str) -> None:
    with shmchan.Channel.create(chan_name, capacity=1 << 16, backend="posix") as ch:
        stop = time.monotonic() + 3

        def produce() -> None:
            while time.monotonic() < stop:
                with contextlib.suppress(shmchan.Full):
                    ch.send_bytes_nowait(b"m")
                with contextlib.suppress(shmchan.Empty):
                    ch.recv_bytes_nowait()
                time.sleep(0.001)

        import threading

        t = threading.Thread(target=produce)
        t.start()
        try:
            rc, out, _ = cli("top", "--once", "--interval", "0.5", "--backend", "posix")
        finally:
            t.join()
        assert rc == 0
        [row] = [line.split() for line in out.splitlines() if line.startswith("/" + chan_name)]
        header = next(line.split() for line in out.splitlines() if line.startswith("NAME"))
        assert float(row[header.index("PUT/s")]) > 0 and float(row[header.index("GOT/s")]) > 0
        # Depth and waiters: three messages queued, nobody waiting.
        for _ in range(3):
            ch.send_bytes(b"q")
        rc, out, _ = cli("top", "--once", "--interval", "0.1", "--backend", "posix")
        [row] = [line.split() for line in out.splitlines() if line.startswith("/" + chan_name)]
        header = next(line.split() for line in out.splitlines() if line.startswith("NAME"))
        listed = entry("/" + chan_name, "--backend", "posix")
        assert listed is not None and listed["queued_messages"] >= 3
        assert row[header.index("DEPTH")] == str(listed["queued_messages"])
        assert row[header.index("PWAIT")] == "0" and row[header.index("CWAIT")] == "0"
        rc, out, _ = cli("top", "--count", "2", "--interval", "0.1", "--backend", "posix")
        assert rc == 0 and out.count("shmchan top") == 2


@pytest.mark.parametrize("backend", ["posix"])
def test_top_draws_with_curses_on_a_terminal(chan_name: str) -> None:
    """On a terminal, top is a curses screen that redraws until q is pressed."""
    import select

    with shmchan.Channel.create(chan_name, capacity=1 << 14, backend="posix"):
        master, slave = os.openpty()
        env = dict(child_env(), TERM="xterm", LINES="40", COLUMNS="160")
        proc = subprocess.Popen(
            [sys.executable, "-m", "shmchan", "top", "--interval", "0.1"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        screen = b""
        try:
            deadline = time.monotonic() + 20
            while chan_name.encode() not in screen and time.monotonic() < deadline:
                if select.select([master], [], [], 0.5)[0]:
                    screen += os.read(master, 65536)
            assert chan_name.encode() in screen and b"PUT/s" in screen
            os.write(master, b"q")
            while proc.poll() is None and time.monotonic() < deadline:
                if select.select([master], [], [], 0.1)[0]:
                    with contextlib.suppress(OSError):
                        os.read(master, 65536)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            os.close(master)


def documented_fields(heading: str) -> list[str]:
    """The field names of the first table under ``heading`` in docs/cli.md."""
    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    section = text[text.index(heading) :]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    first_table = section[section.index("| field |") :].split("\n\n", 1)[0]
    return [line.split("`")[1] for line in rows if line in first_table]


@pytest.mark.parametrize("backend", ["sysv"])
def test_json_formats_are_the_documented_ones(chan_name: str) -> None:
    q: shmchan.Queue[bytes] = shmchan.Queue(name=chan_name, backend="sysv", capacity=1 << 14)
    try:
        q.put(b"b" * 100_000)  # a side entry and its object
        ref = "/" + chan_name
        e = entry(ref, "--backend", "sysv", "--name", chan_name)
        assert e is not None and list(e) == documented_fields("### `ls --json`")
        doc = stat_json(ref, "--backend", "sysv")
        assert list(doc)[2:] == documented_fields("### `stat --json`")
        assert doc["side_entries"] and doc["side_objects"] and doc["semaphores"] and doc["peers"]
        side = DEV_SHM / f"{unique_name('posix')}.S00"
        side.write_bytes(bytes(MIB))
        try:
            [o] = [o for o in gc("--dry-run", "--backend", "posix")[1] if o["ref"] == str(side)]
            assert list(o) == documented_fields("### `gc --json`")
        finally:
            side.unlink()
    finally:
        q.close()
        shmchan.Channel.remove(chan_name, backend="sysv")


def test_help_on_every_command_and_usage_errors() -> None:
    for command in ("ls", "stat", "rm", "gc", "top"):
        rc, out, _ = cli(command, "--help")
        assert rc == 0 and out.startswith(f"usage: shmchan {command}")
    rc, out, _ = cli("--help")
    assert rc == 0 and all(c in out for c in ("ls", "stat", "rm", "gc", "top", "bench"))
    assert cli()[0] == 2
    assert cli("frobnicate")[0] == 2
    assert cli("rm")[0] == 2
    assert cli("ls", "--backend", "nope")[0] == 2
    assert cli("stat", "bad/name", "--backend", "posix")[0] == 2
    assert cli("top", "--interval", "0", "--once")[0] == 2
    rc, out, _ = cli("bench", "--help")
    assert rc == 0 and "--quick" in out


def test_console_script_is_declared() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["shmchan"] == "shmchan.__main__:main"
    script = Path(sys.executable).parent / "shmchan"
    if script.exists():  # installed (pip install -e .): the same commands
        proc = subprocess.run(
            [str(script), "ls", "--help"], capture_output=True, text=True, timeout=30, check=False
        )
        assert proc.returncode == 0 and "usage: shmchan ls" in proc.stdout


@pytest.mark.parametrize("backend", ["posix"])
def test_file_modes_are_reported_exactly(chan_name: str) -> None:
    shmchan.Channel.create(chan_name, capacity=1 << 14, backend="posix", permissions=0o640).close()
    e = entry("/" + chan_name, "--backend", "posix")
    assert (
        e is not None and e["mode"] == "0640" and stat.S_IMODE(os.stat(DEV_SHM / chan_name).st_mode) == 0o640
    )


@pytest.mark.parametrize("backend", ["posix"])
def test_an_unreadable_mapping_does_not_stop_the_listing(chan_name: str) -> None:
    # A segment too short to map its header must not crash ls (it reads, never maps, the short file).
    (DEV_SHM / chan_name).write_bytes(L.MAGIC.to_bytes(8, "little"))
    try:
        e = entry("/" + chan_name, "--backend", "posix")
        assert e is not None and e["state"] == "corrupt"
    finally:
        (DEV_SHM / chan_name).unlink()
