"""Read-only inspection of shmchan objects: what exists, who is attached, what leaked.

``shmchan ls``, ``stat``, ``rm``, ``gc`` and ``top`` (:mod:`shmchan._cli`) are built on
this module. Nothing here attaches to a channel or claims a peer slot:

* headers are read with ``pread`` (files) or through a read-only SysV attach, and
  validated by the C library's own ``check_header`` over a read-only mapping;
* liveness is asked of the kernel: ``F_OFD_GETLK`` on an open file of our own that locks
  nothing (liveness kind 1: posix, mmap), SysV semaphore values and ``shm_nattch``
  (kind 2: sysv);
* the lifetime service of an unnamed queue is looked up in ``/proc/net/unix`` (its
  abstract address is the header's ``owner``), never contacted;
* files are opened ``O_NOFOLLOW``, directories too: a symbolic link is never followed.

What counts as shmchan's (a file or SysV segment is listed, and may be collected, only
with one of these): the magic ``SHMCHAN\\0`` (a published segment, valid or not); a
written identity block (layout major set and ``header_crc`` matching: a creator that
died between ``init_header`` and ``publish``); the name of an unnamed queue
(``shmchan-q-`` and 24 hex digits); or, for listing only, a creator at work (its
creation lock held). Side objects are ``<name>.Sxx`` (whole MiB in size); SysV
semaphore sets and side segments are tied to a channel by the keys of its name, or by
the ids in its header together with their size, owner and creation time.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from . import _cext
from . import _layout as L
from ._backends import available_backends
from ._backends._base import SIDE_GRANULE, check_ipc_name
from ._backends._filebacked import CREATION_LOCK

SHM_DIR: Final = "/dev/shm"
"""Where POSIX shared memory lives on Linux (the posix backend's files)."""
UNNAMED_QUEUE: Final = re.compile(r"shmchan-q-[0-9a-f]{24}")
"""The name of an unnamed queue (shmchan/_queue.py ``_unnamed``), without a leading slash."""
MAX_HEADER: Final = L.header_size(L.MAX_PEERS_LIMIT)
"""The largest header (control block, side table and the largest peer table)."""
EMPTY_FILE_GRACE: Final = 10.0
"""Seconds an empty, unlocked segment file is presumed to be in the making: its creator
takes the creation lock just after creating it, and only sizes it after that."""
SEM_CTIME_SLACK: Final = 60.0
"""A SysV semaphore set named by a header's id (when the channel's name is unknown) must
have been created within this many seconds of the header, or it is not the channel's."""

# What ``Found.state`` says.
OK: Final = "ok"
CORRUPT: Final = "corrupt"
INCOMPATIBLE: Final = "incompatible"
REMOVED: Final = "removed"
CREATING: Final = "creating"
UNPUBLISHED: Final = "unpublished"
NO_SEGMENT: Final = "no-segment"
UNREADABLE: Final = "unreadable"
FOREIGN: Final = "not-shmchan"
STATES: Final = (OK, CORRUPT, INCOMPATIBLE, REMOVED, CREATING, UNPUBLISHED, NO_SEGMENT, UNREADABLE, FOREIGN)

_O_PROBE: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_O_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SYSV_KEYED: Final = re.compile(r"(key|shmid):(0x[0-9a-fA-F]+|[0-9]+)")


@dataclass
class SemSet:
    """A SysV semaphore set of a channel (``peers`` or ``presence``)."""

    role: str
    semid: int
    nsems: int
    uid: int
    mode: int
    ctime: int
    values: list[int]

    def summary(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "semid": self.semid,
            "nsems": self.nsems,
            "uid": self.uid,
            "mode": f"{self.mode:04o}",
        }


@dataclass
class SideObject:
    """The backing object of a side entry: a file ``<name>.Sxx`` or a SysV segment."""

    backend: str
    channel: str
    index: int
    size: int
    uid: int
    path: str | None = None
    key: int | None = None
    shmid: int | None = None
    nattch: int | None = None
    ident: tuple[int, int] | None = None

    @property
    def ref(self) -> str:
        if self.path is not None:
            return self.path
        return f"{self.channel}{L.side_suffix(self.index)} (key {self.key:#010x}, shmid {self.shmid})"

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": self.path,
            "key": self.key,
            "shmid": self.shmid,
            "size": self.size,
            "uid": self.uid,
        }


@dataclass
class Found:
    """One shmchan object as the kernel and its header describe it, read without attaching."""

    backend: str
    ref: str
    """What ``shmchan stat``/``rm`` accept for it: the name, the path, or ``key:0x...``."""
    name: str | None
    state: str
    size: int = 0
    uid: int = -1
    mode: int = 0
    path: str | None = None
    problems: list[str] = field(default_factory=list)
    valid: bool = False
    """The header passed the C library's validation (it may still be marked corrupt)."""
    evidence: str = "magic"
    """Why it is shmchan's: magic, identity, name, lock (being created), key, or none."""
    head: bytes = b""
    header: dict[str, Any] | None = None
    in_use: bool = False
    """The kernel says a process is attached (or creating it): a lock on the file, a
    SysV attach, or a semaphore held."""
    live_slots: list[int] = field(default_factory=list)
    slots_known: bool = False
    """Whether ``live_slots`` is known (kind 1: read; kind 2: the peers set was found)."""
    writers: int | None = None
    readers: int | None = None
    owner: str | None = None
    owner_alive: bool | None = None
    mtime: float | None = None
    ident: tuple[int, int] | None = None
    key: int | None = None
    shmid: int | None = None
    nattch: int | None = None
    sems: list[SemSet] = field(default_factory=list)
    sides: list[SideObject] = field(default_factory=list)

    # -- derived figures ------------------------------------------------------------

    @property
    def published(self) -> bool:
        return self.state in (OK, CORRUPT, INCOMPATIBLE, REMOVED) and self.evidence == "magic"

    def _counted(self) -> bool:
        """Whether the ring counters mean something (a header the C library accepts)."""
        return self.header is not None and self.valid

    def waiting(self, role: str) -> int | None:
        """Live peer slots with a sleeper of ``role`` (consumers, producers, joiners)."""
        if not self._counted():
            return None
        assert self.header is not None
        live = set(self.live_slots)
        return sum(1 for slot in self.header[f"waiting_{role}"] if slot in live)

    @property
    def created(self) -> float | None:
        """Creation time (unix seconds): the header's, else the object's mtime."""
        if (
            self.header is not None
            and self.header["created_unix_ns"]
            and self.evidence in ("magic", "identity")
        ):
            created: float = self.header["created_unix_ns"] / 1e9
            return created
        return self.mtime

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """This object as one ``shmchan ls --json`` entry (docs/cli.md)."""
        h = self.header
        counted = self._counted()
        created = self.created
        now = time.time() if now is None else now
        layout = None
        if h is not None and self.evidence in ("magic", "identity"):
            layout = f"{h['layout_major']}.{h['layout_minor']}"
        return {
            "ref": self.ref,
            "name": self.name,
            "backend": self.backend,
            "state": self.state,
            "problems": list(self.problems),
            "evidence": self.evidence,
            "path": self.path,
            "sysv": None
            if self.backend != "sysv"
            else {
                "key": self.key,
                "shmid": self.shmid,
                "nattch": self.nattch,
                "semid_peers": _semid(self, "peers"),
                "semid_presence": _semid(self, "presence"),
            },
            "layout": layout,
            "size": self.size,
            "uid": self.uid,
            "mode": f"{self.mode & 0o7777:04o}",
            "capacity": h["capacity"] if counted and h else None,
            "max_items": h["max_items"] if counted and h else None,
            "max_peers": h["max_peers"] if counted and h else None,
            "queued_bytes": h["used_bytes"] if counted and h else None,
            "queued_messages": h["records"] if counted and h else None,
            "put": h["put_total"] if counted and h else None,
            "got": h["got_total"] if counted and h else None,
            "writers": self.writers,
            "readers": self.readers,
            "producers_waiting": self.waiting("producers"),
            "consumers_waiting": self.waiting("consumers"),
            "attached": len(self.live_slots) if self.slots_known else None,
            "in_use": self.in_use,
            "owner": self.owner,
            "owner_alive": self.owner_alive,
            "creator_pid": h["creator_pid"] if h and self.evidence in ("magic", "identity") else None,
            "creator_uid": h["creator_uid"] if h and self.evidence in ("magic", "identity") else None,
            "created": created,
            "age": None if created is None else max(0.0, now - created),
            "side_objects": len(self.sides),
        }


def _semid(f: Found, role: str) -> int | None:
    if f.header is not None and f.state != NO_SEGMENT:
        semid: int = f.header[f"semid_{role}"]
        return semid
    return next((s.semid for s in f.sems if s.role == role), None)


@dataclass
class Scan:
    """Everything ``shmchan ls`` found, plus side objects whose channel is missing."""

    channels: list[Found] = field(default_factory=list)
    orphan_sides: list[SideObject] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    owners: set[str] | None = None


# -- the kernel's view ----------------------------------------------------------------------


def live_addresses() -> set[str] | None:
    """Abstract unix-socket addresses bound in this network namespace (``@`` dropped), or
    None when /proc/net/unix cannot be read (then no owner is known to be dead)."""
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    out = set()
    for line in lines:
        parts = line.split(None, 7)
        if len(parts) == 8 and parts[7].startswith("@"):
            out.add(parts[7][1:])
    return out


def proc_locks() -> dict[tuple[int, int, int], list[tuple[str, int, int]]]:
    """Locks in /proc/locks by ``(major, minor, inode)``: ``(READ|WRITE, start, end)``."""
    out: dict[tuple[int, int, int], list[tuple[str, int, int]]] = {}
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parsed = _parse_lock(line)
        if parsed is not None:
            key, lock = parsed
            out.setdefault(key, []).append(lock)
    return out


def _parse_lock(line: str) -> tuple[tuple[int, int, int], tuple[str, int, int]] | None:
    # "1: OFDLCK ADVISORY  READ -1 00:2d:2643 1024 1024" (a "->" marks a blocked waiter)
    parts = line.split()
    if "->" in parts or len(parts) < 8:
        return None
    try:
        major, minor, inode = parts[5].split(":")
        key = (int(major, 16), int(minor, 16), int(inode))
        end = -1 if parts[7] == "EOF" else int(parts[7])
        return key, (parts[3], int(parts[6]), end)
    except ValueError:
        return None


def _file_key(ident: tuple[int, int]) -> tuple[int, int, int]:
    dev, ino = ident
    return os.major(dev), os.minor(dev), ino


def _count_shared(locks: list[tuple[str, int, int]], byte: int) -> int:
    return sum(1 for kind, start, end in locks if kind == "READ" and start == byte == end)


def _sysv_rows() -> list[dict[str, int]]:
    """Every SysV shm segment of this IPC namespace (/proc/sysvipc/shm)."""
    try:
        with open("/proc/sysvipc/shm", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    if not lines:
        return []
    cols = lines[0].split()
    rows = []
    for line in lines[1:]:
        values = line.split()
        if len(values) < len(cols):
            continue
        raw = dict(zip(cols, values, strict=False))
        try:
            rows.append(
                {
                    "key": int(raw["key"]) & 0xFFFFFFFF,
                    "shmid": int(raw["shmid"]),
                    "mode": int(raw["perms"], 8),
                    "size": int(raw["size"]),
                    "nattch": int(raw["nattch"]),
                    "uid": int(raw["uid"]),
                    "ctime": int(raw["ctime"]),
                }
            )
        except (KeyError, ValueError):
            continue
    return rows


def _sysv_row(shmid: int) -> dict[str, int] | None:
    try:
        uid, mode, size, nattch, _cpid, _lpid, ctime = _cext.shm_info(shmid)
    except OSError:
        return None
    key = next((r["key"] for r in _sysv_rows() if r["shmid"] == shmid), 0)
    return {
        "key": key,
        "shmid": shmid,
        "mode": mode,
        "size": size,
        "nattch": nattch,
        "uid": uid,
        "ctime": ctime,
    }


# -- reading headers ----------------------------------------------------------------------


def _u64(buf: bytes, off: int = 0) -> int:
    return int.from_bytes(buf[off : off + 8], "little") if len(buf) >= off + 8 else 0


def identity_written(head: bytes) -> bool:
    """Whether a creator wrote the identity block (the header CRC matches, layout major
    set): proof of a shmchan segment even before its magic is stored."""
    if len(head) < L.CRC_END + 4:
        return False
    stored = struct.unpack_from("<I", head, L.CRC_END)[0]
    return L.read_field(head, "layout_major") != 0 and stored == L.header_crc(head)


def _check_file(fd: int, size: int) -> tuple[int, str]:
    """The C library's validation of a published segment file, over a read-only mapping."""
    if size < L.HEADER_BASE:
        return _cext.E_CORRUPT, f"segment is {size} bytes, shorter than a header"
    try:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError, OverflowError) as exc:
        return _cext.E_CORRUPT, f"cannot map it read-only: {exc}"
    with mm:
        code, why = _cext.check_header(mm, L.LIVENESS_OFD)
    return code, why


def _state_of(code: int, why: str, header: dict[str, Any] | None) -> tuple[str, str | None]:
    if code == _cext.OK and header is not None:
        st = header["state"]
        if st == L.STATE_CORRUPT:
            return CORRUPT, "marked corrupt by a peer (an impossible record or position was found)"
        if st == L.STATE_REMOVED:
            return REMOVED, "removed: every handle stops"
        if st != L.STATE_NORMAL:
            return CORRUPT, f"unknown state {st}"
        return OK, None
    if code == _cext.E_INCOMPAT:
        return INCOMPATIBLE, why
    return CORRUPT, why


def _peer_slots(head: bytes, header: dict[str, Any]) -> range:
    """The peer slots whose table entries were read (all of them when the header is sane)."""
    n = header["max_peers"]
    if not 1 <= n <= L.MAX_PEERS_LIMIT:
        n = L.MAX_PEERS_LIMIT
    return range(min(n, max(0, (len(head) - L.PEER_TABLE_OFFSET) // L.PEER_ENTRY_SIZE)))


def _flagged(head: bytes, slot: int) -> bool:
    off = L.PEER_TABLE_OFFSET + L.PEER_ENTRY_SIZE * slot + 8
    return bool(struct.unpack_from("<I", head, off)[0])


# -- files (posix, mmap) ----------------------------------------------------------------------


def _probe_fd(
    fd: int,
    f: Found,
    base: str,
    owners: set[str] | None,
    locks: dict[tuple[int, int, int], list[tuple[str, int, int]]] | None,
    direct: bool,
) -> Found | None:
    """Fill ``f`` from the open file ``fd`` (ours, read-only, locking nothing); None when
    it is not shmchan's (unless ``direct``: asked for by name)."""
    st = os.fstat(fd)
    f.uid, f.mode, f.size, f.mtime = st.st_uid, st.st_mode, st.st_size, st.st_mtime
    f.ident = (st.st_dev, st.st_ino)
    if not stat.S_ISREG(st.st_mode):
        if not direct:
            return None
        f.state, f.evidence = FOREIGN, "none"
        f.problems.append("not a regular file")
        return f
    try:
        head = os.pread(fd, min(st.st_size, MAX_HEADER), 0)
    except OSError as exc:
        f.state, f.evidence = UNREADABLE, "none"
        f.problems.append(f"cannot read it: {exc.strerror}")
        return f
    f.head = head
    magic = _u64(head)
    creating = _cext.ofd_held(fd, *CREATION_LOCK)
    if magic == L.MAGIC:
        code, why = _check_file(fd, st.st_size)
        f.header = L.decode_header(head) if len(head) >= L.HEADER_BASE else None
        f.valid = code == _cext.OK and f.header is not None
        f.state, problem = _state_of(code, why, f.header)
        if problem:
            f.problems.append(problem)
    elif magic == 0:
        if identity_written(head):
            f.evidence = "identity"
        elif UNNAMED_QUEUE.fullmatch(base):
            f.evidence = "name"
        elif creating:
            f.evidence = "lock"
        elif direct:
            f.evidence = "none"
            f.problems.append("nothing written yet: nothing tells whose it is")
        else:
            return None
        young = st.st_size == 0 and time.time() - st.st_mtime < EMPTY_FILE_GRACE
        f.state = CREATING if creating or young else UNPUBLISHED
        f.problems.append(
            "its creator is still making it"
            if f.state == CREATING
            else "its creator died before publishing it"
        )
        if len(head) >= L.HEADER_BASE:
            f.header = L.decode_header(head)
    else:
        if not direct:
            return None
        f.state, f.evidence = FOREIGN, "none"
        f.problems.append(f"not a shmchan segment (magic {magic:#018x})")
        return f
    # Liveness: F_OFD_GETLK on our own open file, which holds no lock, sees every other.
    f.in_use = _cext.ofd_held(fd, 0, 0)
    if f.header is not None:
        f.owner = f.header["owner"] or None
        if f.owner is not None and owners is not None:
            f.owner_alive = f.owner in owners
        f.slots_known = True
        f.live_slots = [
            slot
            for slot in _peer_slots(head, f.header)
            if _flagged(head, slot) and _cext.ofd_held(fd, L.PEER_TABLE_OFFSET + L.PEER_ENTRY_SIZE * slot, 1)
        ]
    held = locks.get(_file_key(f.ident), []) if locks is not None else []
    for role, byte in (("writers", L.OFD_WRITERS_BYTE), ("readers", L.OFD_READERS_BYTE)):
        present = _cext.ofd_held(fd, byte, 1)
        setattr(f, role, max(_count_shared(held, byte), 1) if present else 0)
    return f


def _side_of(name: str) -> tuple[str, int] | None:
    """``(channel file name, index)`` if ``name`` is shaped like a side object's."""
    if len(name) > 4 and L.SIDE_SUFFIX.fullmatch(name[-4:]):
        return name[:-4], int(name[-2:], 16)
    return None


def _side_file(
    dfd: int, directory: str, entry: str, backend: str, channel: str, index: int
) -> SideObject | None:
    try:
        st = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return SideObject(
        backend,
        channel,
        index,
        st.st_size,
        st.st_uid,
        path=os.path.join(directory, entry),
        ident=(st.st_dev, st.st_ino),
    )


def _file_ref(backend: str, directory: str, base: str) -> tuple[str, str]:
    """``(ref, name)`` of a channel file: ``/name`` for posix, the path for mmap."""
    if backend == "posix":
        return "/" + base, "/" + base
    path = os.path.join(directory, base)
    return path, path


def _scan_dir(
    directory: str,
    backend: str,
    scan: Scan,
    locks: dict[tuple[int, int, int], list[tuple[str, int, int]]],
    seen: set[tuple[int, int]],
) -> list[str]:
    """Probe every regular file of ``directory``; return the channel file names seen."""
    try:
        dfd = os.open(directory, _O_DIR)
    except OSError as exc:
        link = exc.errno == errno.ELOOP or os.path.islink(directory)
        scan.errors.append(
            f"{directory}: " + ("a symbolic link: not followed" if link else str(exc.strerror))
        )
        return []
    bases = []
    try:
        with os.scandir(dfd) as it:
            every = [(e.name, e.is_file(follow_symlinks=False)) for e in it]
        names = {n for n, _ in every}  # a side object's channel exists if anything has its name
        entries = sorted(n for n, regular in every if regular)
        sides: dict[str, list[SideObject]] = {}
        for entry in entries:
            side = _side_of(entry)
            if side is None:
                continue
            channel_base, index = side
            ref, _ = _file_ref(backend, directory, channel_base)
            obj = _side_file(dfd, directory, entry, backend, ref, index)
            if obj is None:
                continue
            if channel_base in names:
                sides.setdefault(channel_base, []).append(obj)
            else:
                scan.orphan_sides.append(obj)
        for entry in entries:
            if _side_of(entry) is not None:
                continue
            bases.append(entry)
            ref, name = _file_ref(backend, directory, entry)
            f = Found(backend, ref, name, UNREADABLE, path=os.path.join(directory, entry))
            try:
                fd = os.open(entry, _O_PROBE, dir_fd=dfd)
            except OSError as exc:
                if UNNAMED_QUEUE.fullmatch(entry):  # shmchan's by its name, but unreadable here
                    f.evidence = "name"
                    f.problems.append(f"cannot open it: {exc.strerror}")
                    scan.channels.append(f)
                continue
            try:
                found = _probe_fd(fd, f, entry, scan.owners, locks, direct=False)
            finally:
                os.close(fd)
            if found is None or found.ident in seen:
                continue
            assert found.ident is not None
            seen.add(found.ident)
            found.sides = sorted(sides.get(entry, []), key=lambda s: s.index)
            scan.channels.append(found)
    finally:
        os.close(dfd)
    return bases


# -- SysV --------------------------------------------------------------------------------


def _sysv_sem(role: str, semid: int, f: Found, expect: int, name: str | None) -> SemSet | None:
    """The semaphore set ``semid`` that the header names, if it is this channel's: found by
    the key of its name, or (name unknown) of the right size, owner and creation time."""
    from ._backends.sysv import sysv_key

    if semid < 0:
        f.problems.append(f"no {role} semaphore set in its header")
        return None
    if name is not None:
        by_key = _cext.sem_lookup(sysv_key(name, role))
        if by_key != semid:
            f.problems.append(f"its {role} semaphore set {semid} is not the one its name gives ({by_key})")
            return None
    try:
        uid, mode, nsems, _cuid, _otime, ctime = _cext.sem_info(semid)
        values = _cext.sem_values(semid)
    except OSError as exc:
        f.problems.append(f"its {role} semaphore set {semid}: {exc.strerror or exc}")
        return None
    created = f.header["created_unix_ns"] / 1e9 if f.header else 0.0
    if nsems != expect or uid != f.uid or (name is None and abs(ctime - created) > SEM_CTIME_SLACK):
        f.problems.append(f"semaphore set {semid} ({nsems} semaphores, uid {uid}) is not its {role} set")
        return None
    return SemSet(role, semid, nsems, uid, mode, ctime, values)


def _sysv_sides(name: str) -> list[SideObject]:
    from ._backends.sysv import sysv_key

    out = []
    for index in range(L.SIDE_SLOTS_MAX):
        key = sysv_key(name, L.side_suffix(index)[1:])
        shmid = _cext.shm_lookup(key)
        if shmid is None:
            continue
        try:
            uid, _mode, size, nattch, *_ = _cext.shm_info(shmid)
        except OSError:
            continue
        out.append(SideObject("sysv", name, index, size, uid, key=key, shmid=shmid, nattch=nattch))
    return out


def _probe_sysv(row: dict[str, int], name: str | None, owners: set[str] | None, direct: bool) -> Found | None:
    """A SysV segment (a /proc/sysvipc/shm row), attached read-only for as long as it
    takes to copy its header; None when it is not shmchan's (unless ``direct``)."""
    import sysv_ipc

    key, shmid = row["key"], row["shmid"]
    ref = name if name is not None else (f"key:{key:#010x}" if key else f"shmid:{shmid}")
    f = Found("sysv", ref, name, UNREADABLE, size=row["size"], uid=row["uid"], mode=row["mode"])
    f.key, f.shmid, f.nattch, f.mtime = key or None, shmid, row["nattch"], float(row["ctime"])
    try:
        seg = sysv_ipc.attach(shmid, None, sysv_ipc.SHM_RDONLY)
    except (sysv_ipc.Error, OSError, ValueError) as exc:
        if not (direct or name):
            return None
        f.evidence = "key" if name else "none"
        f.problems.append(f"cannot attach it read-only: {exc}")
        return f
    try:
        head = seg.read(min(row["size"], MAX_HEADER), 0)
        magic = _u64(head)
        code, why = _cext.E_NOTSHM, ""
        if magic == L.MAGIC:
            with memoryview(seg) as buf:  # never written: the attach is read-only
                code, why = _cext.check_header(buf, L.LIVENESS_SYSV)
    finally:
        with contextlib.suppress(sysv_ipc.Error):
            seg.detach()
    f.head = head
    if len(head) >= L.HEADER_BASE:
        f.header = L.decode_header(head)
    if magic == L.MAGIC:
        f.valid = code == _cext.OK and f.header is not None
        f.state, problem = _state_of(code, why, f.header)
        if problem:
            f.problems.append(problem)
    elif magic == 0 and identity_written(head):
        f.evidence, f.state = "identity", UNPUBLISHED
    elif direct or name:
        f.state, f.evidence = FOREIGN, "key" if name else "none"
        f.problems.append(f"not a shmchan segment (magic {magic:#018x})")
        f.in_use = row["nattch"] > 0
        return f
    else:
        return None
    f.in_use = row["nattch"] > 0
    if f.header is None:
        return f
    f.owner = f.header["owner"] or None
    if f.owner is not None and owners is not None:
        f.owner_alive = f.owner in owners
    max_peers = f.header["max_peers"]
    peers = _sysv_sem("peers", f.header["semid_peers"], f, max_peers, name)
    presence = _sysv_sem("presence", f.header["semid_presence"], f, 2, name)
    f.sems = [s for s in (peers, presence) if s is not None]
    if peers is not None:
        f.live_slots = [slot for slot, v in enumerate(peers.values) if v > 0]
        f.slots_known = True
        f.in_use = f.in_use or bool(f.live_slots)
    if presence is not None:
        f.writers, f.readers = presence.values[0], presence.values[1]
        f.in_use = f.in_use or any(presence.values)
    if f.state == UNPUBLISHED:
        # The creator keeps the segment attached, and holds semaphore 0 of the peers set,
        # until it has published it.
        if f.in_use:
            f.state = CREATING
        f.problems.append(
            "its creator is still making it"
            if f.state == CREATING
            else "its creator died before publishing it"
        )
    if name is not None:
        f.sides = _sysv_sides(name)
    return f


def _sysv_no_segment(name: str) -> Found | None:
    """The semaphore sets and side segments of sysv channel ``name`` whose segment is gone."""
    from ._backends.sysv import sysv_key

    f = Found("sysv", name, name, NO_SEGMENT, evidence="key")
    f.key = sysv_key(name, "shm")
    if _cext.shm_lookup(f.key) is not None:
        return None
    for role in ("peers", "presence"):
        semid = _cext.sem_lookup(sysv_key(name, role))
        if semid is None:
            continue
        try:
            uid, mode, nsems, _cuid, _otime, ctime = _cext.sem_info(semid)
            values = _cext.sem_values(semid)
        except OSError:
            continue
        f.sems.append(SemSet(role, semid, nsems, uid, mode, ctime, values))
        f.uid = uid
        f.in_use = f.in_use or any(values)
    f.sides = _sysv_sides(name)
    if not f.sems and not f.sides:
        return None
    if f.uid < 0:
        f.uid = f.sides[0].uid
    f.problems.append("its segment is gone; semaphore sets or side segments are left")
    return f


def _scan_sysv(scan: Scan, candidates: Iterable[str]) -> None:
    from ._backends.sysv import sysv_key

    names = {}
    for n in candidates:
        with contextlib.suppress(ValueError, TypeError):
            n = check_ipc_name(n)
            names[sysv_key(n, "shm")] = n
    side_keys = {sysv_key(n, L.side_suffix(i)[1:]) for n in names.values() for i in range(L.SIDE_SLOTS_MAX)}
    present = set()
    for row in _sysv_rows():
        if row["size"] < L.HEADER_BASE or (row["key"] and row["key"] in side_keys):
            continue
        name = names.get(row["key"]) if row["key"] else None
        f = _probe_sysv(row, name, scan.owners, direct=False)
        if f is not None:
            scan.channels.append(f)
            if name is not None:
                present.add(name)
    for name in sorted(set(names.values()) - present):
        f = _sysv_no_segment(name)
        if f is not None:
            scan.channels.append(f)


# -- the whole machine ------------------------------------------------------------------------


def scan(
    backends: Iterable[str] | None = None, dirs: Iterable[str] = (SHM_DIR,), names: Iterable[str] = ()
) -> Scan:
    """Every shmchan object on this machine, on every installed backend (or ``backends``).

    A file in /dev/shm is both the posix channel ``/name`` and the mmap channel
    ``/dev/shm/name``: it is listed once, as posix (as mmap when only mmap is installed).
    ``dirs`` are where mmap channels are looked for. SysV segments are identified by their
    content; their name is recovered when it is among ``names`` or the posix names seen.
    """
    installed = available_backends()
    wanted = [b for b in (backends or installed) if b in installed]
    result = Scan(owners=live_addresses())
    locks = proc_locks()
    seen: set[tuple[int, int]] = set()
    posix_names: list[str] = []
    if "posix" in wanted:
        posix_names = _scan_dir(SHM_DIR, "posix", result, locks, seen)
    if "mmap" in wanted:
        for directory in dict.fromkeys(os.path.abspath(d) for d in dirs):
            if directory == SHM_DIR and "posix" in installed:
                continue  # its files are listed as posix channels
            _scan_dir(directory, "mmap", result, locks, seen)
    if "sysv" in wanted:
        _scan_sysv(result, [*names, *posix_names])
    return result


def find(ref: str, backend: str | None = None) -> list[Found]:
    """The object ``ref`` names (``shmchan stat``/``rm``), on ``backend`` or on each
    backend it can name; also objects that are not (or not provably) shmchan's."""
    installed = available_backends()
    keyed = _SYSV_KEYED.fullmatch(ref)
    if keyed:
        if backend not in (None, "sysv") or "sysv" not in installed:
            raise ValueError(f"{ref!r} names a sysv segment")
        return _find_sysv_keyed(keyed.group(1), int(keyed.group(2), 0))
    if backend is None:
        looks_like_path = "/" in ref.lstrip("/") or ref.startswith(".")
        candidates = ["mmap"] if looks_like_path else ["posix", "sysv"]
        backends = [b for b in candidates if b in installed]
    else:
        if backend not in installed:
            raise ValueError(f"backend {backend!r} is not installed")
        backends = [backend]
    owners = live_addresses()
    locks = proc_locks()
    out: list[Found] = []
    for b in backends:
        if b == "sysv":
            out.extend(_find_sysv_name(check_ipc_name(ref), owners))
        elif b == "posix":
            found = _find_file(SHM_DIR, check_ipc_name(ref)[1:], "posix", owners, locks)
            out.extend([found] if found else [])
        else:
            directory, base = os.path.split(os.path.abspath(ref))
            found = _find_file(directory, base, "mmap", owners, locks)
            out.extend([found] if found else [])
    return out


def _find_file(
    directory: str,
    base: str,
    backend: str,
    owners: set[str] | None,
    locks: dict[tuple[int, int, int], list[tuple[str, int, int]]],
) -> Found | None:
    ref, name = _file_ref(backend, directory, base)
    f = Found(backend, ref, name, UNREADABLE, path=os.path.join(directory, base))
    try:
        fd = os.open(f.path or "", _O_PROBE)
    except FileNotFoundError:
        return None
    except OSError as exc:
        f.evidence = "none"
        link = exc.errno == errno.ELOOP
        f.problems.append(
            f"cannot open it: {exc.strerror}" + (" (a symbolic link: not followed)" if link else "")
        )
        with contextlib.suppress(OSError):
            st = os.lstat(f.path or "")
            f.uid, f.mode, f.size, f.mtime = st.st_uid, st.st_mode, st.st_size, st.st_mtime
            f.ident = (st.st_dev, st.st_ino)
            if link:
                f.state = FOREIGN
        return f
    try:
        _probe_fd(fd, f, base, owners, locks, direct=True)
    finally:
        os.close(fd)
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return f
    try:
        with os.scandir(dfd) as it:
            entries = sorted(e.name for e in it)
        for entry in entries:
            side = _side_of(entry)
            if side is not None and side[0] == base:
                obj = _side_file(dfd, directory, entry, backend, ref, side[1])
                if obj is not None:
                    f.sides.append(obj)
    finally:
        os.close(dfd)
    return f


def _find_sysv_name(name: str, owners: set[str] | None) -> list[Found]:
    from ._backends.sysv import sysv_key

    shmid = _cext.shm_lookup(sysv_key(name, "shm"))
    if shmid is None:
        f = _sysv_no_segment(name)
        return [f] if f else []
    row = _sysv_row(shmid)
    if row is None:
        return []
    f = _probe_sysv(row, name, owners, direct=True)
    return [f] if f else []


def _find_sysv_keyed(kind: str, number: int) -> list[Found]:
    if kind == "key":
        shmid = _cext.shm_lookup(number)
        if shmid is None:
            return []
    else:
        shmid = number
    row = _sysv_row(shmid)
    if row is None:
        return []
    f = _probe_sysv(row, None, live_addresses(), direct=True)
    return [f] if f else []


# -- who exactly (shmchan stat) -----------------------------------------------------------------


def holders(f: Found) -> dict[int, list[tuple[str, int, int]]]:
    """Processes (visible in this pid namespace) that have the object open or mapped:
    pid -> their locks on it (``(READ|WRITE, start, end)``; empty for SysV maps)."""
    out: dict[int, list[tuple[str, int, int]]] = {}
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        if pid == me:
            continue
        if f.backend == "sysv":
            if f.shmid is not None and _maps_shm(pid, f.shmid):
                out[pid] = []
        elif f.ident is not None:
            locks = _fd_locks(pid, f.ident)
            if locks is not None:
                out[pid] = locks
    return out


def _maps_shm(pid: int, shmid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as m:
            for line in m:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/SYSV") and parts[4] == str(shmid):
                    return True
    except OSError:
        pass
    return False


def _fd_locks(pid: int, ident: tuple[int, int]) -> list[tuple[str, int, int]] | None:
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return None
    found: list[tuple[str, int, int]] | None = None
    for fd in fds:
        try:
            st = os.stat(f"{base}/{fd}")  # the magic link names the open file itself
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != ident:
            continue
        found = found if found is not None else []
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
                for line in info:
                    if line.startswith("lock:"):
                        parsed = _parse_lock(line.split(None, 1)[1])
                        if parsed is not None and parsed[1] not in found:
                            found.append(parsed[1])
        except OSError:
            continue
    return found


def pid_running(pid: int) -> bool | None:
    """Whether ``pid`` names a process here (None: cannot tell). Only a hint: the pid of
    a peer table entry may belong to another pid namespace, or have been reused."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def lock_holder(f: Found, word: str) -> dict[str, Any] | None:
    """Who holds lock ``word`` (wlock, rlock), as far as the header and kernel tell."""
    if f.header is None or not f.header[word]:
        return None
    token = f.header[word]
    decoded = L.decode_lock(token)
    assert decoded is not None
    slot, gen = decoded
    out: dict[str, Any] = {"token": token, "slot": slot, "gen": gen, "pid": None, "alive": False}
    if 0 <= slot < len(_peer_slots(f.head, f.header)):
        peer = L.decode_peer(f.head, slot)
        out["pid"] = peer["pid"]
        out["alive"] = slot in f.live_slots and peer["gen"] == gen & 0xFFFFFFFF
    return out


def peers(f: Found) -> list[dict[str, Any]]:
    """Peer table entries that are live or flagged in use (a dead owner's flag stays)."""
    if f.header is None:
        return []
    live = set(f.live_slots)
    out = []
    for slot in _peer_slots(f.head, f.header):
        if slot not in live and not _flagged(f.head, slot):
            continue
        peer: dict[str, Any] = dict(L.decode_peer(f.head, slot))
        peer["live"] = slot in live
        peer["waiting"] = [
            r for r in ("consumers", "producers", "joiners") if slot in f.header[f"waiting_{r}"]
        ]
        out.append(peer)
    return out


def side_entries(f: Found) -> list[dict[str, Any]]:
    """The side table's entries in use (not free), decoded."""
    if f.header is None:
        return []
    n = min(f.header["side_slots"], L.SIDE_SLOTS_MAX)
    entries = [L.decode_side_entry(f.head, i) for i in range(n)]
    return [dict(e) for e in entries if e["state"] != "free"]


# -- removal ---------------------------------------------------------------------------------


def may_remove(f: Found, force: bool) -> str | None:
    """Why this process must not remove ``f`` (another user's objects: only root, with
    ``force``), or None."""
    me = os.geteuid()
    uids = {f.uid} | {s.uid for s in f.sems} | {s.uid for s in f.sides}
    uids.discard(-1)
    foreign = sorted(uid for uid in uids if uid != me)
    if foreign and not (me == 0 and force):
        who = ", ".join(str(u) for u in foreign)
        hint = " (root may, with --force)" if me != 0 else " (add --force to remove it as root)"
        return f"owned by uid {who}, not by uid {me}{hint}"
    return None


def remove_sysv_nameless(f: Found) -> list[str]:
    """Remove a sysv channel known only by its segment: the segment, and the semaphore
    sets its header names (checked as in :func:`_sysv_sem`). Its side segments cannot be
    found without its name. Returns what was removed."""
    import sysv_ipc

    assert f.shmid is not None
    done = []
    if f.published and f.in_use:
        # Like SysVBackend.remove: tell live handles, which then stop.
        with contextlib.suppress(sysv_ipc.Error, OSError, ValueError, TypeError):
            seg = sysv_ipc.attach(f.shmid)
            try:
                with memoryview(seg) as buf:
                    _cext.mark_removed(buf)
            finally:
                seg.detach()
    with contextlib.suppress(sysv_ipc.ExistentialError):
        sysv_ipc.remove_shared_memory(f.shmid)
        done.append(f"segment {f.shmid}")
    for s in f.sems:
        _cext.sem_remove(s.semid)
        done.append(f"{s.role} semaphore set {s.semid}")
    return done


def remove_sysv_parts(f: Found) -> list[str]:
    """Remove what is left of a sysv channel whose segment is gone (:data:`NO_SEGMENT`)."""
    import sysv_ipc

    done = []
    for s in f.sems:
        _cext.sem_remove(s.semid)
        done.append(f"{s.role} semaphore set {s.semid}")
    for side in f.sides:
        if side.shmid is not None:
            with contextlib.suppress(sysv_ipc.ExistentialError):
                sysv_ipc.remove_shared_memory(side.shmid)
                done.append(f"side segment {side.shmid}")
    return done


def unlink_file_channel(f: Found, still: Callable[[Found], bool]) -> list[str]:
    """Unlink channel file ``f`` and its side files if the file at its path is still the
    one probed and ``still(fresh)`` holds for a fresh probe of it; nothing is followed."""
    assert f.path is not None and f.ident is not None
    directory, base = os.path.split(f.path)
    dfd = os.open(directory, _O_DIR)
    try:
        fd = os.open(base, _O_PROBE, dir_fd=dfd)
        try:
            fresh = Found(f.backend, f.ref, f.name, UNREADABLE, path=f.path)
            if _probe_fd(fd, fresh, base, live_addresses(), None, direct=True) is None:
                return []
            if fresh.ident != f.ident or not still(fresh):
                return []
        finally:
            os.close(fd)
        done = []
        with os.scandir(dfd) as it:
            entries = sorted(e.name for e in it)
        for entry in entries:
            side = _side_of(entry)
            if side is not None and side[0] == base:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=dfd)
                    done.append(os.path.join(directory, entry))
        os.unlink(base, dir_fd=dfd)
        done.insert(0, f.path)
        return done
    finally:
        os.close(dfd)


def unlink_side_file(side: SideObject) -> bool:
    """Unlink an orphaned side file if it is still the one seen and its channel still
    does not exist."""
    assert side.path is not None
    directory, entry = os.path.split(side.path)
    parsed = _side_of(entry)
    assert parsed is not None
    dfd = os.open(directory, _O_DIR)
    try:
        try:
            st = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != side.ident:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.stat(parsed[0], dir_fd=dfd, follow_symlinks=False)
            return False  # its channel appeared meanwhile
        os.unlink(entry, dir_fd=dfd)
        return True
    finally:
        os.close(dfd)


def side_shaped(side: SideObject) -> bool:
    """Whether a side object has the size shmchan gives them (whole MiB, never empty)."""
    return side.size > 0 and side.size % SIDE_GRANULE == 0


# -- orphans (shmchan gc) ------------------------------------------------------------------------

UNPUBLISHED_SEGMENT: Final = "unpublished"
ABANDONED_QUEUE: Final = "abandoned-queue"
ORPHAN_SIDE: Final = "orphan-side"
ORPHAN_SYSV: Final = "orphan-sysv"


@dataclass
class Orphan:
    """Something ``shmchan gc`` can prove is shmchan's and abandoned."""

    kind: str
    backend: str
    ref: str
    reason: str
    objects: list[str]
    found: Found | None = None
    side: SideObject | None = None

    @property
    def uid(self) -> int:
        if self.side is not None:
            return self.side.uid
        assert self.found is not None
        return self.found.uid


def _objects(f: Found) -> list[str]:
    if f.backend != "sysv":
        return [f.path or f.ref, *(s.ref for s in f.sides)]
    out = [] if f.shmid is None else [f"segment {f.shmid}"]
    out += [f"{s.role} semaphore set {s.semid}" for s in f.sems]
    out += [f"side segment {s.shmid}" for s in f.sides]
    return out


def orphan_of(f: Found) -> Orphan | None:
    """What makes ``f`` collectable, or None. Nothing in use is: no lock on its file, no
    SysV attach, no semaphore held."""
    if f.in_use:
        return None
    if f.state == UNPUBLISHED and f.evidence in ("identity", "name"):
        if f.backend == "sysv":
            if f.nattch:
                return None
            why = "its creator died before publishing it (magic 0, nobody attached, creation semaphore free)"
        else:
            why = "its creator died before publishing it (magic 0, creation lock free)"
        return Orphan(UNPUBLISHED_SEGMENT, f.backend, f.ref, why, _objects(f), found=f)
    if f.published and f.owner and f.owner_alive is False:
        file_queue = f.backend != "sysv" and UNNAMED_QUEUE.fullmatch(os.path.basename(f.path or ""))
        if f.state == OK or (f.state == CORRUPT and file_queue):
            if f.backend == "sysv" and f.nattch:
                return None
            why = f"unnamed queue whose lifetime service ({f.owner}) is gone, and no process is attached"
            if f.backend == "sysv" and f.name is None:
                why += "; its side segments, if any, cannot be found without its name"
            return Orphan(ABANDONED_QUEUE, f.backend, f.ref, why, _objects(f), found=f)
    if f.state == NO_SEGMENT:
        shaped = all(
            (s.role == "presence" and s.nsems == 2)
            or (s.role == "peers" and 1 <= s.nsems <= L.MAX_PEERS_LIMIT)
            for s in f.sems
        )
        if shaped and not any(s.nattch for s in f.sides):
            why = "sysv channel whose segment is gone: its semaphore sets and side segments are left"
            return Orphan(ORPHAN_SYSV, f.backend, f.ref, why, _objects(f), found=f)
    return None


def orphans(found: Scan) -> list[Orphan]:
    """Everything in ``found`` that ``shmchan gc`` may remove."""
    out = [o for o in map(orphan_of, found.channels) if o is not None]
    for side in found.orphan_sides:
        if side_shaped(side):
            why = f"side object of {side.channel}, which does not exist"
            out.append(Orphan(ORPHAN_SIDE, side.backend, side.ref, why, [side.ref], side=side))
    return out


def collect(o: Orphan) -> list[str]:
    """Remove an orphan after proving again that it is one (it may have changed since it
    was found); returns what was removed (empty: it changed, and was left)."""
    if o.side is not None:
        return [o.ref] if unlink_side_file(o.side) else []
    f = o.found
    assert f is not None

    def still(fresh: Found) -> bool:
        again = orphan_of(fresh)
        return again is not None and again.kind == o.kind

    if f.backend != "sysv":
        return unlink_file_channel(f, still)
    if f.state == NO_SEGMENT:
        assert f.name is not None
        fresh = _sysv_no_segment(f.name)
        return remove_sysv_parts(fresh) if fresh is not None and still(fresh) else []
    assert f.shmid is not None
    row = _sysv_row(f.shmid)
    if row is None:
        return []
    fresh_seg = _probe_sysv(row, f.name, live_addresses(), direct=True)
    if fresh_seg is None or not still(fresh_seg):
        return []
    done = remove_sysv_nameless(fresh_seg)
    if fresh_seg.name is not None:
        leftovers = Found(
            "sysv", fresh_seg.ref, fresh_seg.name, NO_SEGMENT, sides=_sysv_sides(fresh_seg.name)
        )
        done += remove_sysv_parts(leftovers)
    return done
