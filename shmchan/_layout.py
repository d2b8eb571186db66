"""The shmchan v1 binary layout: every offset, size and constant, and nothing else.

This module is the single owner of the byte layout that ``docs/layout.md`` specifies
for C, Go and Rust peers; ``tests/test_layout.py`` checks that the two agree. No other
module of shmchan hard-codes an offset. It does no I/O.

A segment is one contiguous mapping::

    0                      HEADER_SIZE (4096)                HEADER_SIZE + capacity
    +----------------------+---------------------------------+
    | header (see FIELDS)  | data ring: capacity bytes (2^n) |
    +----------------------+---------------------------------+

A record in the ring starts at a 16-byte aligned index and never straddles the end::

    0       4       6       8                      16
    +-------+-------+-------+----------------------+-----------------------+
    |length | type  | flags |  reserved (zero)     | payload: length bytes | pad to 16
    +-------+-------+-------+----------------------+-----------------------+

All integers are little-endian. Positions (``head``, ``tail``) are free-running u64 byte
counters; ring index = position & (capacity - 1).
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from typing import Final, NamedTuple

if sys.byteorder != "little":  # pragma: no cover - the layout is little-endian only (v1)
    raise ImportError("shmchan v1 supports little-endian hosts only")

MAGIC: Final = 0x004E4148434D4853
"""``b"SHMCHAN\\0"`` read as a little-endian u64; stored last, it means "ready"."""
LAYOUT_MAJOR: Final = 1
LAYOUT_MINOR: Final = 0
HEADER_SIZE: Final = 4096
RECORD_HEADER_SIZE: Final = 16
RECORD_HEADER: Final = struct.Struct("<IHHQ")
"""A record header: u32 payload length, u16 type, u16 flags (0), u64 reserved (0)."""
RECORD_ALIGN: Final = 16
MIN_CAPACITY: Final = 4096
MAX_CAPACITY: Final = 1 << 40
MAX_RECORD_LIMIT: Final = 1 << 31
"""Upper bound of ``max_record`` (it must also be at most capacity / 2)."""

# Record types (u16 at record offset +4).
RT_PADDING: Final = 0
RT_BYTES: Final = 1
RT_PICKLE: Final = 2
"""A Python pickle (protocol <= 5) with no out-of-band buffers."""
RT_PICKLE_OOB: Final = 3
"""A pickle-5 stream plus out-of-band buffers, framed as OOB_HEADER describes."""
RT_LARGE: Final = 4
"""A reference to a one-shot side segment holding the payload of an inner record."""
LARGE_REF: Final = struct.Struct("<QQHHI")
"""RT_LARGE payload: u64 side-segment sequence number, u64 payload size, u16 inner
record type, u16 reserved, u32 reserved."""
OOB_HEADER: Final = struct.Struct("<IIQ")
"""RT_PICKLE_OOB payload starts with u32 buffer count, u32 reserved, u64 pickle length,
then one u64 length per buffer; the pickle starts at align16 of that, and each buffer
at the next 16-aligned offset after the previous part."""

# lock_kind: how producers (and consumers) exclude each other.
LOCK_OFD: Final = 1
"""Open-file-description byte-range locks on the segment file (posix, mmap backends)."""
LOCK_SYSV: Final = 2
"""SysV semaphores operated with SEM_UNDO (sysv backend)."""

# wakeup_kind: which semaphores sleepers wait on.
WAKEUP_POSIX: Final = 1
"""POSIX named semaphores ``/shmchan.<nonce as 16 hex digits>.ne`` and ``.nf``."""
WAKEUP_SYSV: Final = 2
"""SysV semaphores whose ids are in the header (``semid_ne``, ``semid_nf``)."""

# state (u32): monotonic, never returns to NORMAL.
STATE_NORMAL: Final = 0
STATE_CORRUPT: Final = 1


OWNER_SIZE: Final = 256


class Field(NamedTuple):
    """One header field: where it is, how wide, what type (as docs/layout.md names it)."""

    name: str
    offset: int
    size: int
    type: str


def _fields() -> tuple[Field, ...]:
    # Offsets are built as a running sum (Agrona's descriptor style), so two fields
    # cannot overlap by accident. Hot words each get their own 128-byte block:
    # two cache lines, which defeats false sharing and adjacent-line prefetch.
    out: list[Field] = []
    off = 0

    def add(name: str, size: int, type_: str) -> None:
        nonlocal off
        out.append(Field(name, off, size, type_))
        off += size

    # Block A, identity: written by the creator before `magic`, read-only afterwards.
    add("magic", 8, "u64")
    add("layout_major", 2, "u16")
    add("layout_minor", 2, "u16")
    add("header_size", 4, "u32")
    add("capacity", 8, "u64")
    add("max_record", 4, "u32")
    add("record_header_size", 2, "u16")
    add("record_align", 2, "u16")
    add("features_incompat", 4, "u32")
    add("features_compat", 4, "u32")
    add("nonce", 8, "u64")
    add("lock_kind", 2, "u16")
    add("wakeup_kind", 2, "u16")
    add("creator_pid", 4, "u32")
    add("created_unix_ns", 8, "u64")
    add("semid_wlock", 4, "i32")
    add("semid_rlock", 4, "i32")
    add("semid_ne", 4, "i32")
    add("semid_nf", 4, "i32")
    add("max_items", 8, "u64")
    add("semid_jn", 4, "i32")
    add("semid_wp", 4, "i32")
    add("semid_rp", 4, "i32")
    off = 120
    add("header_crc", 4, "u32")
    off = 128
    # Block B, producers.
    add("tail", 8, "u64")
    add("msgs_put", 8, "u64")
    add("large_seq", 8, "u64")
    off = 256
    # Block C, consumers.
    add("head", 8, "u64")
    add("msgs_got", 8, "u64")
    add("tasks_done", 8, "u64")
    off = 384
    # Block D and E, waiter counters (each written by one side, read by the other).
    add("consumers_waiting", 4, "u32")
    off = 512
    add("producers_waiting", 4, "u32")
    off = 640
    # Block F, status.
    add("state", 4, "u32")
    add("joiners_waiting", 4, "u32")
    off = 768
    # Block G, the lifetime service of an unnamed queue (Python's reaper).
    add("owner", OWNER_SIZE, "char")
    # Block H, presence of handles with write and read rights (end of stream).
    add("writers_open", 4, "u32")
    add("writers_seen", 4, "u32")
    add("readers_open", 4, "u32")
    add("readers_seen", 4, "u32")
    return tuple(out)


FIELDS: Final = _fields()
OFF: Final = {f.name: f.offset for f in FIELDS}

OFF_MAGIC: Final = OFF["magic"]
OFF_TAIL: Final = OFF["tail"]
OFF_HEAD: Final = OFF["head"]
OFF_CONSUMERS_WAITING: Final = OFF["consumers_waiting"]
OFF_PRODUCERS_WAITING: Final = OFF["producers_waiting"]
OFF_STATE: Final = OFF["state"]
OFF_OWNER: Final = OFF["owner"]

# Word indexes for ``memoryview.cast("Q")`` / ``cast("I")`` access to the hot words.
# An aligned 8-byte (4-byte) store through such a view is one store instruction.
Q_MAGIC: Final = OFF_MAGIC // 8
Q_TAIL: Final = OFF_TAIL // 8
Q_HEAD: Final = OFF_HEAD // 8
Q_MSGS_PUT: Final = OFF["msgs_put"] // 8
Q_LARGE_SEQ: Final = OFF["large_seq"] // 8
Q_MSGS_GOT: Final = OFF["msgs_got"] // 8
Q_TASKS_DONE: Final = OFF["tasks_done"] // 8
I_JOINERS_WAITING: Final = OFF["joiners_waiting"] // 4
I_CONSUMERS_WAITING: Final = OFF_CONSUMERS_WAITING // 4
I_PRODUCERS_WAITING: Final = OFF_PRODUCERS_WAITING // 4
I_STATE: Final = OFF_STATE // 4

# Byte offsets locked (l_start, l_len = 1) for lock_kind 1 (OFD locks): the lock bytes
# are the first byte of each side's block. Locks are advisory: they never touch memory.
OFD_WRITE_LOCK_BYTE: Final = OFF_TAIL
OFD_READ_LOCK_BYTE: Final = OFF_HEAD
# Presence (lock_kind 1): every handle with write (read) rights holds a *shared* OFD
# lock on this byte for as long as it has them.
OFD_WRITERS_BYTE: Final = OFF["writers_open"]
OFD_READERS_BYTE: Final = OFF["readers_open"]
I_WRITERS_OPEN: Final = OFF["writers_open"] // 4
I_WRITERS_SEEN: Final = OFF["writers_seen"] // 4
I_READERS_OPEN: Final = OFF["readers_open"] // 4
I_READERS_SEEN: Final = OFF["readers_seen"] // 4

CRC_START: Final = 8
CRC_END: Final = OFF["header_crc"]
"""``header_crc`` is CRC-32 (IEEE, as zlib.crc32) of header bytes [8, 120)."""

_IDENTITY = struct.Struct("<QHHIQIHHIIQHHIQiiiiQiii")
assert _IDENTITY.size == OFF["semid_rp"] + 4


class HeaderInfo(NamedTuple):
    """The identity block of a header, as written at creation."""

    capacity: int
    max_record: int
    nonce: int
    lock_kind: int
    wakeup_kind: int
    creator_pid: int = 0
    created_unix_ns: int = 0
    semid_wlock: int = -1
    semid_rlock: int = -1
    semid_ne: int = -1
    semid_nf: int = -1
    max_items: int = 0
    semid_jn: int = -1
    semid_wp: int = -1
    semid_rp: int = -1
    layout_major: int = LAYOUT_MAJOR
    layout_minor: int = LAYOUT_MINOR
    header_size: int = HEADER_SIZE
    record_header_size: int = RECORD_HEADER_SIZE
    record_align: int = RECORD_ALIGN
    features_incompat: int = 0
    features_compat: int = 0


def align16(n: int) -> int:
    """Round ``n`` up to the record alignment."""
    return (n + 15) & ~15


def record_size(payload_len: int) -> int:
    """Bytes a record with ``payload_len`` payload bytes occupies in the ring."""
    return (payload_len + RECORD_HEADER_SIZE + 15) & ~15


def max_payload(max_record: int) -> int:
    """Largest payload accepted by a ring whose ``max_record`` is given."""
    return max_record - RECORD_HEADER_SIZE


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_geometry(capacity: int, max_record: int) -> str | None:
    """Return why ``capacity``/``max_record`` are not a valid v1 geometry, or None."""
    if not is_power_of_two(capacity) or not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        return f"capacity {capacity} is not a power of two in [{MIN_CAPACITY}, 2**40]"
    if max_record % RECORD_ALIGN or max_record < RECORD_HEADER_SIZE:
        return f"max_record {max_record} is not a multiple of 16 of at least 16"
    if max_record > capacity // 2 or max_record > MAX_RECORD_LIMIT:
        return f"max_record {max_record} exceeds capacity/2 ({capacity // 2}) or 2**31"
    return None


def header_crc(buf: memoryview) -> int:
    """CRC-32 of the identity bytes that ``header_crc`` covers."""
    return zlib.crc32(buf[CRC_START:CRC_END]) & 0xFFFFFFFF


def write_identity(buf: memoryview, info: HeaderInfo) -> None:
    """Write block A except ``magic`` (left 0) and set ``header_crc``.

    The caller publishes the segment afterwards with :func:`publish`.
    """
    _IDENTITY.pack_into(
        buf,
        0,
        0,
        info.layout_major,
        info.layout_minor,
        info.header_size,
        info.capacity,
        info.max_record,
        info.record_header_size,
        info.record_align,
        info.features_incompat,
        info.features_compat,
        info.nonce,
        info.lock_kind,
        info.wakeup_kind,
        info.creator_pid,
        info.created_unix_ns,
        info.semid_wlock,
        info.semid_rlock,
        info.semid_ne,
        info.semid_nf,
        info.max_items,
        info.semid_jn,
        info.semid_wp,
        info.semid_rp,
    )
    struct.pack_into("<I", buf, CRC_END, header_crc(buf))


def read_identity(buf: memoryview) -> tuple[int, HeaderInfo, int]:
    """Return ``(magic, info, stored_crc)`` without validating anything."""
    (
        magic,
        major,
        minor,
        header_size,
        capacity,
        max_record,
        rhs,
        ralign,
        incompat,
        compat,
        nonce,
        lock_kind,
        wakeup_kind,
        pid,
        created,
        s_w,
        s_r,
        s_ne,
        s_nf,
        max_items,
        s_jn,
        s_wp,
        s_rp,
    ) = _IDENTITY.unpack_from(buf, 0)
    info = HeaderInfo(
        capacity=capacity,
        max_record=max_record,
        nonce=nonce,
        lock_kind=lock_kind,
        wakeup_kind=wakeup_kind,
        creator_pid=pid,
        created_unix_ns=created,
        semid_wlock=s_w,
        semid_rlock=s_r,
        semid_ne=s_ne,
        semid_nf=s_nf,
        max_items=max_items,
        semid_jn=s_jn,
        semid_wp=s_wp,
        semid_rp=s_rp,
        layout_major=major,
        layout_minor=minor,
        header_size=header_size,
        record_header_size=rhs,
        record_align=ralign,
        features_incompat=incompat,
        features_compat=compat,
    )
    (crc,) = struct.unpack_from("<I", buf, CRC_END)
    return magic, info, crc


SUPPORTED_FEATURES_INCOMPAT: Final = 0
"""Incompat feature bits this implementation understands (none in v1.0)."""


def posix_semaphore_names(nonce: int) -> tuple[str, str, str]:
    """Names of the not-empty, not-full and joined POSIX semaphores (wakeup_kind 1)."""
    return f"/shmchan.{nonce:016x}.ne", f"/shmchan.{nonce:016x}.nf", f"/shmchan.{nonce:016x}.jn"


SIDE_SUFFIX: Final = re.compile(r"\.L[0-9a-f]{16}")
"""What follows a channel's name in the name of one of its side segments."""


def side_segment_suffix(seq: int) -> str:
    """Suffix appended to a channel's name for the side segment of RT_LARGE ``seq``."""
    return f".L{seq:016x}"


def oob_layout(pickle_len: int, buffer_lens: list[int]) -> tuple[int, list[int], int]:
    """Offsets in an RT_PICKLE_OOB payload: ``(pickle_offset, buffer_offsets, total)``."""
    off = align16(OOB_HEADER.size + 8 * len(buffer_lens))
    pickle_off = off
    off = align16(off + pickle_len)
    offsets = []
    for n in buffer_lens:
        offsets.append(off)
        off = align16(off + n)
    return pickle_off, offsets, off
