"""The shmchan binary layout, version 2: every offset, size and constant, and nothing else.

This module is the Python owner of the byte layout that ``docs/layout.md`` specifies for
C, Go and Rust peers; ``shmchan/_native/shmchan.h`` is the C owner, and
``tests/test_layout.py`` checks that the three agree. No other Python module hard-codes
an offset. It does no I/O: :func:`decode_header` turns the bytes of a header into a
dict (the command line and the tests read segments through it).

A segment is one contiguous mapping::

    0              2048         4096                 header_size            + capacity
    +--------------+------------+--------------------+----------------------+
    | control      | side table | peer table         | data ring (2^n bytes) |
    | (blocks A-I) | 64 x 32 B  | max_peers x 32 B   |                      |
    +--------------+------------+--------------------+----------------------+

A record in the ring starts at a 16-byte aligned index and never straddles the end::

    0       4       6       8                      16
    +-------+-------+-------+----------------------+-----------------------+
    |length | type  | flags |  reserved (zero)     | payload: length bytes | pad to 16
    +-------+-------+-------+----------------------+-----------------------+

All integers are little-endian. ``tail`` and ``head`` are *commit words*: the top 27
bits count records, the low 37 bits are a position in 16-byte units, both modulo their
width (see :func:`split_word`).
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from typing import Any, Final, NamedTuple

if sys.byteorder != "little":  # pragma: no cover - the layout is little-endian only
    raise ImportError("shmchan supports little-endian hosts only")

MAGIC: Final = 0x004E4148434D4853
"""``b"SHMCHAN\\0"`` read as a little-endian u64; stored last, it means "ready"."""
LAYOUT_MAJOR: Final = 2
LAYOUT_MINOR: Final = 0
RECORD_HEADER_SIZE: Final = 16
RECORD_HEADER: Final = struct.Struct("<IHHQ")
"""A record header: u32 payload length, u16 type, u16 flags (0), u64 reserved (0)."""
RECORD_ALIGN: Final = 16
MIN_CAPACITY: Final = 4096
MAX_CAPACITY: Final = 1 << 40
MAX_RECORD_LIMIT: Final = 1 << 31
"""Upper bound of ``max_record`` (it must also be at most capacity / 2)."""

# Commit words.
UNIT_BITS: Final = 37
COUNT_BITS: Final = 27
UNIT_MASK: Final = (1 << UNIT_BITS) - 1
COUNT_MASK: Final = (1 << COUNT_BITS) - 1
MAX_RECORDS_IN_RING: Final = COUNT_MASK - 1

# Record types (u16 at record offset +4).
RT_PADDING: Final = 0
RT_BYTES: Final = 1
RT_PICKLE: Final = 2
"""A Python pickle (protocol <= 5) with no out-of-band buffers."""
RT_PICKLE_OOB: Final = 3
"""A pickle-5 stream plus out-of-band buffers, framed as OOB_HEADER describes."""
RT_SIDE: Final = 4
"""A reference to a side-segment pool entry holding the payload of an inner record."""
SIDE_REF: Final = struct.Struct("<IIQIHH")
"""RT_SIDE payload: u32 entry index, u32 ticket, u64 payload size, u32 file generation,
u16 inner record type, u16 reserved."""
OOB_HEADER: Final = struct.Struct("<IIQ")
"""RT_PICKLE_OOB payload starts with u32 buffer count, u32 reserved, u64 pickle length,
then one u64 length per buffer; the pickle starts at align16 of that, and each buffer
at the next 16-aligned offset after the previous part."""

# liveness_kind: what tells a live peer from a dead one.
LIVENESS_OFD: Final = 1
"""OFD locks on the segment file (posix, mmap backends)."""
LIVENESS_SYSV: Final = 2
"""A SysV semaphore set operated with SEM_UNDO (sysv backend)."""
WAKEUP_FUTEX: Final = 1
"""wakeup_kind 1: futex event counters in the header (the only kind)."""

STATE_NORMAL: Final = 0
STATE_CORRUPT: Final = 1
STATE_REMOVED: Final = 2
"""sysv only: the channel's objects were removed; every operation fails."""

SIDE_FREE: Final = 0
SIDE_WRITING: Final = 1
SIDE_QUEUED: Final = 2
SIDE_READING: Final = 3
SIDE_STATES: Final = ("free", "writing", "queued", "reading")

OWNER_SIZE: Final = 256
HEADER_BASE: Final = 4096
SIDE_TABLE_OFFSET: Final = 2048
SIDE_ENTRY_SIZE: Final = 32
SIDE_SLOTS_MAX: Final = 64
DEFAULT_SIDE_SLOTS: Final = 64
DEFAULT_SIDE_RETAINED: Final = 4
PEER_TABLE_OFFSET: Final = 4096
PEER_ENTRY_SIZE: Final = 32
MAX_PEERS_LIMIT: Final = 1024
DEFAULT_MAX_PEERS: Final = 1024
WAITER_BITMAP_BYTES: Final = 128


class Field(NamedTuple):
    """One header field: where it is, how wide, what type (as docs/layout.md names it)."""

    name: str
    offset: int
    size: int
    type: str


def _fields() -> tuple[Field, ...]:
    # Offsets are built as a running sum (Agrona's descriptor style), so two fields
    # cannot overlap by accident. Hot words get their own 128-byte block: two cache
    # lines, which defeats false sharing and adjacent-line prefetch.
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
    add("liveness_kind", 2, "u16")
    add("wakeup_kind", 2, "u16")
    add("creator_pid", 4, "u32")
    add("created_unix_ns", 8, "u64")
    add("semid_peers", 4, "i32")
    add("semid_presence", 4, "i32")
    add("max_peers", 4, "u32")
    add("peer_table_offset", 4, "u32")
    add("max_items", 8, "u64")
    add("side_slots", 4, "u32")
    add("side_table_offset", 4, "u32")
    add("creator_uid", 4, "u32")
    add("side_retained", 4, "u32")
    off = 120
    add("header_crc", 4, "u32")
    off = 128
    # Block B, producers (written under the write lock).
    add("tail", 8, "u64")
    add("wlock", 8, "u64")
    add("msgs_put", 8, "u64")
    add("side_journal", 8, "u64")
    add("side_journal_tail", 8, "u64")
    off = 256
    # Block C, consumers (written under the read lock; tasks_done by CAS).
    add("head", 8, "u64")
    add("rlock", 8, "u64")
    add("msgs_got", 8, "u64")
    add("tasks_done", 8, "u64")
    off = 384
    # Blocks D and E: the event counters sleepers wait on (futex words).
    add("ne_seq", 4, "u32")
    off = 512
    add("nf_seq", 4, "u32")
    off = 640
    # Block F, status.
    add("state", 4, "u32")
    add("jn_seq", 4, "u32")
    add("recoveries", 8, "u64")
    off = 768
    # Block G, the lifetime service of an unnamed queue (Python's).
    add("owner", OWNER_SIZE, "char")
    # Block H, presence hints (and, for liveness kind 1, the presence lock bytes).
    add("writers_open", 4, "u32")
    add("writers_seen", 4, "u32")
    add("readers_open", 4, "u32")
    add("readers_seen", 4, "u32")
    off = 1152
    # Block I, waiter bitmaps: bit i set while peer slot i has a sleeper.
    add("waiting_consumers", WAITER_BITMAP_BYTES, "u64x16")
    add("waiting_producers", WAITER_BITMAP_BYTES, "u64x16")
    add("waiting_joiners", WAITER_BITMAP_BYTES, "u64x16")
    return tuple(out)


FIELDS: Final = _fields()
OFF: Final = {f.name: f.offset for f in FIELDS}

SIDE_FIELDS: Final = (
    Field("state", 0, 8, "u64"),
    Field("size", 8, 8, "u64"),
    Field("file_gen", 16, 4, "u32"),
)
PEER_FIELDS: Final = (
    Field("gen", 0, 4, "u32"),
    Field("pid", 4, 4, "u32"),
    Field("flags", 8, 4, "u32"),
    Field("attached_unix_ns", 16, 8, "u64"),
)

# Presence lock bytes (liveness kind 1): a *shared* OFD lock on this byte while a handle
# holds the role. A peer slot's liveness lock is an exclusive OFD lock on its first byte.
OFD_WRITERS_BYTE: Final = OFF["writers_open"]
OFD_READERS_BYTE: Final = OFF["readers_open"]

CRC_START: Final = 8
CRC_END: Final = OFF["header_crc"]
"""``header_crc`` is CRC-32 (IEEE, as zlib.crc32) of header bytes [8, 120)."""


def header_size(max_peers: int) -> int:
    """Bytes before the ring, for a segment with ``max_peers`` peer slots."""
    return (PEER_TABLE_OFFSET + PEER_ENTRY_SIZE * max_peers + 4095) & ~4095


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
    """Return why ``capacity``/``max_record`` are not a valid geometry, or None."""
    if not is_power_of_two(capacity) or not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        return f"capacity {capacity} is not a power of two in [{MIN_CAPACITY}, 2**40]"
    if max_record % RECORD_ALIGN or max_record < RECORD_HEADER_SIZE:
        return f"max_record {max_record} is not a multiple of 16 of at least 16"
    if max_record > capacity // 2 or max_record > MAX_RECORD_LIMIT:
        return f"max_record {max_record} exceeds capacity/2 ({capacity // 2}) or 2**31"
    return None


def split_word(word: int) -> tuple[int, int]:
    """A commit word as ``(count, position in bytes)`` (both modulo their width)."""
    return word >> UNIT_BITS, (word & UNIT_MASK) << 4


def make_word(count: int, position: int) -> int:
    """The commit word for ``count`` records and byte ``position`` (a multiple of 16)."""
    return ((count & COUNT_MASK) << UNIT_BITS) | ((position >> 4) & UNIT_MASK)


def extend_total(trailing: int, word: int) -> int:
    """The exact full-width total from a trailing total and a newer commit word."""
    return trailing + (((word >> UNIT_BITS) - trailing) & COUNT_MASK)


def header_crc(buf: bytes | bytearray | memoryview) -> int:
    """CRC-32 of the identity bytes that ``header_crc`` covers."""
    return zlib.crc32(bytes(buf[CRC_START:CRC_END])) & 0xFFFFFFFF


_FMT = {"u64": "<Q", "u32": "<I", "u16": "<H", "i32": "<i"}


def read_field(buf: bytes | bytearray | memoryview, name: str) -> int:
    """One integer field of a header."""
    f = next(f for f in FIELDS if f.name == name)
    value: int = struct.unpack_from(_FMT[f.type], buf, f.offset)[0]
    return value


def decode_header(buf: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Every integer field of a header (at least 4096 bytes) by name, plus the owner
    string, the stored and computed CRCs, and the commit words split into counts and
    positions. No validation: callers decide what is plausible."""
    out: dict[str, Any] = {}
    for f in FIELDS:
        if f.type in _FMT:
            out[f.name] = struct.unpack_from(_FMT[f.type], buf, f.offset)[0]
    out["owner"] = (
        bytes(buf[OFF["owner"] : OFF["owner"] + OWNER_SIZE]).split(b"\0", 1)[0].decode("ascii", "replace")
    )
    out["computed_crc"] = header_crc(buf)
    for side in ("tail", "head"):
        count, pos = split_word(out[side])
        out[f"{side}_count"], out[f"{side}_position"] = count, pos
    out["records"] = (out["tail_count"] - out["head_count"]) & COUNT_MASK
    out["used_bytes"] = ((out["tail"] & UNIT_MASK) - (out["head"] & UNIT_MASK) & UNIT_MASK) << 4
    out["put_total"] = extend_total(out["msgs_put"], out["tail"])
    out["got_total"] = extend_total(out["msgs_got"], out["head"])
    for role in ("consumers", "producers", "joiners"):
        off = OFF[f"waiting_{role}"]
        words = struct.unpack_from("<16Q", buf, off)
        out[f"waiting_{role}"] = [
            w * 64 + b for w, bits in enumerate(words) for b in range(64) if bits >> b & 1
        ]
    return out


def decode_lock(token: int) -> tuple[int, int] | None:
    """A lock word as ``(peer slot, generation)``, or None when the lock is free."""
    if not token:
        return None
    return (token & 0xFFFF) - 1, token >> 16


def decode_side_entry(buf: bytes | bytearray | memoryview, index: int) -> dict[str, int | str]:
    """One side-table entry: state name, ticket, owner slot/generation, size, file_gen."""
    off = SIDE_TABLE_OFFSET + SIDE_ENTRY_SIZE * index
    state, size, file_gen = struct.unpack_from("<QQI", buf, off)
    owner = state >> 32
    return {
        "index": index,
        "state": SIDE_STATES[state & 3],
        "ticket": (state >> 2) & 0x3FFFFFFF,
        "owner_slot": (owner & 0xFFFF) - 1,
        "owner_gen16": owner >> 16,
        "size": size,
        "file_gen": file_gen,
    }


def decode_peer(buf: bytes | bytearray | memoryview, slot: int) -> dict[str, int]:
    """One peer slot: generation, pid (diagnostic), flags, attach time."""
    off = PEER_TABLE_OFFSET + PEER_ENTRY_SIZE * slot
    gen, pid, flags = struct.unpack_from("<III", buf, off)
    (attached,) = struct.unpack_from("<Q", buf, off + 16)
    return {"slot": slot, "gen": gen, "pid": pid, "flags": flags, "attached_unix_ns": attached}


SIDE_SUFFIX: Final = re.compile(r"\.S[0-9a-f]{2}")
"""What follows a channel's name in the name of one of its side segments."""


def side_suffix(index: int) -> str:
    """Suffix appended to a channel's name for the backing object of side entry ``index``
    (the entry's ``file_gen`` tells a reader whether the object was re-created)."""
    return f".S{index:02x}"


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
