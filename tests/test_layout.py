"""docs/layout.md and shmchan._layout must describe the same bytes."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import pytest

from shmchan import _layout as L

DOC = Path(__file__).resolve().parents[1] / "docs" / "layout.md"
ROW = re.compile(r"^\|\s*(\+?\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*`(\w+)`\s*\|")


def doc_rows(section: str) -> list[tuple[int, int, str, str]]:
    """The (offset, size, type, field) rows of the table under heading ``section``."""
    text = DOC.read_text()
    start = text.index(section)
    end = text.index("\n#", start + len(section))
    rows = []
    for line in text[start:end].splitlines():
        m = ROW.match(line)
        if m:
            rows.append((int(m[1].lstrip("+")), int(m[2]), m[3], m[4]))
    return rows


def test_header_table_matches_module() -> None:
    documented = doc_rows("### 2.1 Header fields")
    in_code = [(f.offset, f.size, f.type, f.name) for f in L.FIELDS]
    assert documented == in_code


def test_record_table_matches_module() -> None:
    documented = doc_rows("### 2.2 Record format")
    assert documented == [
        (0, 4, "u32", "length"),
        (4, 2, "u16", "type"),
        (6, 2, "u16", "flags"),
        (8, 8, "u64", "reserved"),
    ]
    assert L.RECORD_HEADER_SIZE == 16 == L.RECORD_ALIGN


def test_fields_do_not_overlap_and_fit() -> None:
    end = 0
    for f in sorted(L.FIELDS, key=lambda f: f.offset):
        assert f.offset >= end, f
        assert f.offset % f.size == 0, f"{f.name} is not naturally aligned"
        end = f.offset + f.size
    assert end <= L.HEADER_SIZE


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("`0x004E4148434D4853`", L.MAGIC),
        ("byte 128 of the", L.OFD_WRITE_LOCK_BYTE),
        ("the read lock on byte 256", L.OFD_READ_LOCK_BYTE),
    ],
)
def test_constants_in_prose(text: str, value: int) -> None:
    assert text in DOC.read_text()
    assert str(value) in text or f"{value:#018X}".replace("0X", "0x") in text


def test_magic_spells_shmchan() -> None:
    assert L.MAGIC.to_bytes(8, "little") == b"SHMCHAN\0"


def test_semaphore_names_follow_doc() -> None:
    assert L.posix_semaphore_names(0xABC) == (
        "/shmchan.0000000000000abc.ne",
        "/shmchan.0000000000000abc.nf",
        "/shmchan.0000000000000abc.jn",
    )
    assert "`/shmchan.<nonce>.ne`, `/shmchan.<nonce>.nf` and `/shmchan.<nonce>.jn`" in DOC.read_text()


def test_record_types_and_side_names_follow_doc() -> None:
    doc = DOC.read_text()
    assert (
        "0 = PADDING, 1 = BYTES (raw bytes; what non-Python peers exchange), 2 = PICKLE, 3 = PICKLE_OOB, 4 = LARGE"
        in doc
    )
    assert (L.RT_PADDING, L.RT_BYTES, L.RT_PICKLE, L.RT_PICKLE_OOB, L.RT_LARGE) == (0, 1, 2, 3, 4)
    assert L.LARGE_REF.size == 24 and "LARGE record of 24 bytes" in doc
    assert (
        L.side_segment_suffix(255) == ".L00000000000000ff"
        and "`<channel name>.L<seq as 16 lowercase hex digits>`" in doc
    )
    # RT_PICKLE_OOB framing: 16-byte head, u64 per buffer, parts 16-aligned.
    assert L.oob_layout(5, [3, 40]) == (32, [48, 64], 112)


def test_golden_header() -> None:
    """A header written by the module, byte for byte, as docs/layout.md describes it."""
    buf = bytearray(L.HEADER_SIZE)
    info = L.HeaderInfo(
        capacity=65536,
        max_record=32768,
        nonce=0x1122334455667788,
        lock_kind=L.LOCK_OFD,
        wakeup_kind=L.WAKEUP_POSIX,
        creator_pid=4242,
        created_unix_ns=1_700_000_000_000_000_000,
    )
    L.write_identity(memoryview(buf), info)
    expected = bytes.fromhex(
        "0000000000000000"  # magic (0 until published)
        "0100"
        "0000"
        "00100000"  # major 1, minor 0, header_size 4096
        "0000010000000000"  # capacity 65536
        "00800000"
        "1000"
        "1000"  # max_record 32768, record header 16, align 16
        "00000000"
        "00000000"  # features incompat, compat
        "8877665544332211"  # nonce
        "0100"
        "0100"
        "92100000"  # lock_kind 1, wakeup_kind 1, creator_pid 4242
        "00002a36fe9c9717"  # created_unix_ns
        "ffffffff"
        "ffffffff"
        "ffffffff"
        "ffffffff"  # semids (-1)
        "0000000000000000"  # max_items (0: no item limit)
        "ffffffff"  # semid_jn (-1)
        "ffffffff"  # semid_wp (-1)
        "ffffffff"  # semid_rp (-1)
    )
    assert bytes(buf[:100]) == expected
    assert bytes(buf[100:120]) == bytes(20)
    crc = int.from_bytes(buf[120:124], "little")
    assert crc == zlib.crc32(bytes(buf[8:120]))
    assert bytes(buf[124:]) == bytes(L.HEADER_SIZE - 124)
    magic, back, stored = L.read_identity(memoryview(buf))
    assert (magic, back, stored) == (0, info, crc)


@pytest.mark.parametrize(
    ("capacity", "max_record", "ok"),
    [
        (4096, 2048, True),
        (4096, 2064, False),  # > capacity / 2
        (4096, 2040, False),  # not a multiple of 16
        (6144, 2048, False),  # not a power of two
        (2048, 1024, False),  # below the minimum
        (1 << 40, 1 << 31, True),
        (1 << 41, 1 << 20, False),
        (1 << 33, (1 << 31) + 16, False),  # above 2**31
    ],
)
def test_geometry_rules(capacity: int, max_record: int, ok: bool) -> None:
    assert (L.check_geometry(capacity, max_record) is None) is ok
