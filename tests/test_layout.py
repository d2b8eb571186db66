"""docs/layout.md, shmchan/_layout.py and the C library must describe the same bytes."""

from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path

import pytest

from shmchan import _cext
from shmchan import _layout as L
from shmchan._backends.sysv import sysv_key

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "layout.md"
HEADER_H = ROOT / "shmchan" / "_native" / "shmchan.h"
ROW = re.compile(r"^\|\s*(\+?\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*`(\w+)`\s*\|")


def doc_rows(after: str) -> list[tuple[int, int, str, str]]:
    """The (offset, size, type, field) rows of the first table after the text ``after``."""
    text = DOC.read_text()
    start = text.index(after)
    rows: list[tuple[int, int, str, str]] = []
    for line in text[start:].splitlines()[1:]:
        m = ROW.match(line)
        if m:
            rows.append((int(m[1].lstrip("+")), int(m[2]), m[3], m[4]))
        elif rows and not line.startswith("|"):
            break
    return rows


def c_defines() -> dict[str, int]:
    out = {}
    for m in re.finditer(
        r"^#define (SHMCHAN_\w+) \(?(0x[0-9A-Fa-f]+|\d+)", HEADER_H.read_text(), re.MULTILINE
    ):
        out[m[1]] = int(m[2], 0)
    return out


def test_header_table_matches_module() -> None:
    documented = doc_rows("### 2.1 Header fields")
    in_code = [(f.offset, f.size, f.type, f.name) for f in L.FIELDS]
    assert documented == in_code


def test_side_and_peer_tables_match_module() -> None:
    assert doc_rows("**Side table**") == [(f.offset, f.size, f.type, f.name) for f in L.SIDE_FIELDS]
    assert doc_rows("**Peer table**") == [(f.offset, f.size, f.type, f.name) for f in L.PEER_FIELDS]


def test_record_table_matches_module() -> None:
    assert doc_rows("### 2.2 Record format") == [
        (0, 4, "u32", "length"),
        (4, 2, "u16", "type"),
        (6, 2, "u16", "flags"),
        (8, 8, "u64", "reserved"),
    ]
    assert L.RECORD_HEADER_SIZE == 16 == L.RECORD_ALIGN == L.RECORD_HEADER.size


def test_c_header_and_extension_agree_with_module() -> None:
    """Every SHMCHAN_OFF_* of shmchan.h, and the offsets the compiled module was built
    with, equal shmchan/_layout.py's."""
    defines = c_defines()
    offsets = {
        k.removeprefix("SHMCHAN_OFF_").lower(): v for k, v in defines.items() if k.startswith("SHMCHAN_OFF_")
    }
    assert offsets == {f.name: f.offset for f in L.FIELDS}
    assert _cext.OFFSETS == offsets
    assert defines["SHMCHAN_MAGIC"] == L.MAGIC
    assert (defines["SHMCHAN_LAYOUT_MAJOR"], defines["SHMCHAN_LAYOUT_MINOR"]) == (
        L.LAYOUT_MAJOR,
        L.LAYOUT_MINOR,
    )
    assert (_cext.LAYOUT_MAJOR, _cext.LAYOUT_MINOR) == (L.LAYOUT_MAJOR, L.LAYOUT_MINOR)
    assert defines["SHMCHAN_SIDE_TABLE_OFFSET"] == L.SIDE_TABLE_OFFSET
    assert defines["SHMCHAN_PEER_TABLE_OFFSET"] == L.PEER_TABLE_OFFSET
    assert defines["SHMCHAN_SIDE_ENTRY_SIZE"] == L.SIDE_ENTRY_SIZE
    assert defines["SHMCHAN_PEER_ENTRY_SIZE"] == L.PEER_ENTRY_SIZE
    assert defines["SHMCHAN_MAX_PEERS_LIMIT"] == L.MAX_PEERS_LIMIT
    assert defines["SHMCHAN_SIDE_SLOTS_MAX"] == L.SIDE_SLOTS_MAX
    assert defines["SHMCHAN_UNIT_BITS"] == L.UNIT_BITS and defines["SHMCHAN_COUNT_BITS"] == L.COUNT_BITS
    for name in ("PADDING", "BYTES", "PICKLE", "PICKLE_OOB", "SIDE"):
        assert defines[f"SHMCHAN_RT_{name}"] == getattr(L, f"RT_{name}")
    assert defines["SHMCHAN_SIDE_REF_SIZE"] == L.SIDE_REF.size == 24
    for name in ("NORMAL", "CORRUPT", "REMOVED"):
        assert defines[f"SHMCHAN_STATE_{name}"] == getattr(L, f"STATE_{name}")
    sides = {f.name: f.offset for f in L.SIDE_FIELDS}
    assert (
        defines["SHMCHAN_SIDE_STATE"],
        defines["SHMCHAN_SIDE_SIZE"],
        defines["SHMCHAN_SIDE_FILE_GEN"],
    ) == (
        sides["state"],
        sides["size"],
        sides["file_gen"],
    )
    peers = {f.name: f.offset for f in L.PEER_FIELDS}
    assert defines["SHMCHAN_PEER_GEN"] == peers["gen"]
    assert defines["SHMCHAN_PEER_PID"] == peers["pid"]
    assert defines["SHMCHAN_PEER_FLAGS"] == peers["flags"]
    assert defines["SHMCHAN_PEER_ATTACHED_UNIX_NS"] == peers["attached_unix_ns"]


def test_fields_do_not_overlap_and_fit() -> None:
    end = 0
    for f in sorted(L.FIELDS, key=lambda f: f.offset):
        assert f.offset >= end, f
        width = 8 if f.type == "u64x16" else f.size if f.type != "char" else 1
        assert f.offset % width == 0, f"{f.name} is not naturally aligned"
        end = f.offset + f.size
    assert end <= L.SIDE_TABLE_OFFSET
    assert L.SIDE_TABLE_OFFSET + L.SIDE_SLOTS_MAX * L.SIDE_ENTRY_SIZE <= L.PEER_TABLE_OFFSET
    assert L.MAX_PEERS_LIMIT <= L.WAITER_BITMAP_BYTES * 8


@pytest.mark.parametrize("max_peers", [1, 64, 127, 128, 1024])
def test_header_size_rule(max_peers: int) -> None:
    expected = -(-(4096 + 32 * max_peers) // 4096) * 4096
    assert L.header_size(max_peers) == _cext.header_size(max_peers) == expected
    assert "`align4096(4096 + 32 \u00d7 max_peers)`" in DOC.read_text()


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("`0x004E4148434D4853`", L.MAGIC),
        ("on byte `peer_table_offset + 32 \u00d7 slot`", L.PEER_TABLE_OFFSET),
        ("on byte 1024 of the", L.OFF["writers_open"]),
        ("byte 1032 for read rights", L.OFF["readers_open"]),
        ("exclusive OFD lock on bytes [0, 8)", 0),
    ],
)
def test_constants_in_prose(text: str, value: int) -> None:
    assert text in DOC.read_text()
    assert str(value) in text or f"{value:#018X}".replace("0X", "0x") in text or "peer_table_offset" in text


def test_magic_spells_shmchan() -> None:
    assert L.MAGIC.to_bytes(8, "little") == b"SHMCHAN\0"


def test_commit_words() -> None:
    word = L.make_word(5, 4096 + 48)
    assert L.split_word(word) == (5, 4096 + 48)
    assert L.split_word(L.make_word(L.COUNT_MASK + 3, (1 << 41) + 32)) == (2, 32)
    # The extension of a trailing total by a newer commit word is exact across wraps.
    total = (1 << 27) * 3 + 17
    assert L.extend_total(total - 5, L.make_word(total, 0)) == total
    assert "word = (count mod 2^27) << 37 | (position_bytes / 16 mod 2^37)" in DOC.read_text()


def test_crc_is_zlib_crc32() -> None:
    data = bytes(range(112))
    assert _cext.crc32(data) == zlib.crc32(data)


def test_side_names_follow_doc() -> None:
    assert L.side_suffix(0) == ".S00" and L.side_suffix(63) == ".S3f"
    assert L.SIDE_SUFFIX.fullmatch(".S3f") and not L.SIDE_SUFFIX.fullmatch(".S3F")
    assert "`<name>.S<index as 2 lowercase hex digits>`" in DOC.read_text()


def test_sysv_key_follows_doc() -> None:
    digest = hashlib.sha256(b"shmchan\0peers\0/jobs").digest()
    assert sysv_key("/jobs", "peers") == int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
    text = DOC.read_text()
    assert 'key(role) = le_u32(SHA-256("shmchan\\0" + role + "\\0" + name)[0:4]) & 0x7FFFFFFF' in text


def test_decode_header_of_a_fresh_segment() -> None:
    buf = bytearray(L.header_size(8) + 4096)
    _cext.init_header(
        buf,
        capacity=4096,
        max_record=2048,
        max_items=3,
        max_peers=8,
        side_slots=2,
        nonce=0xABC,
        liveness=L.LIVENESS_OFD,
        semid_peers=-1,
        semid_presence=-1,
        creator_pid=123,
        creator_uid=456,
        created_unix_ns=789,
    )
    _cext.publish(buf)
    assert _cext.check_header(bytes(buf), L.LIVENESS_OFD) == (_cext.OK, "")
    h = L.decode_header(buf)
    assert h["magic"] == L.MAGIC and h["layout_major"] == 2 and h["header_size"] == 8192
    assert (h["capacity"], h["max_record"], h["max_items"], h["max_peers"], h["side_slots"]) == (
        4096,
        2048,
        3,
        8,
        2,
    )
    assert (h["nonce"], h["creator_pid"], h["creator_uid"], h["created_unix_ns"]) == (0xABC, 123, 456, 789)
    assert h["header_crc"] == h["computed_crc"]
    assert h["records"] == h["used_bytes"] == h["put_total"] == 0
    assert h["semid_peers"] == h["semid_presence"] == -1


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("magic", 0x1234, "E_NOTSHM"),
        ("layout_major", 1, "E_INCOMPAT"),
        ("features_incompat", 1, "E_INCOMPAT"),
        ("capacity", 3000, "E_CORRUPT"),
    ],
)
def test_validation_order_of_the_doc(field: str, value: int, code: str) -> None:
    buf = bytearray(L.header_size(8) + 4096)
    _cext.init_header(buf, 4096, 2048, 0, 8, 2, 1, L.LIVENESS_OFD, -1, -1, 1, 1, 1)
    _cext.publish(buf)
    f = next(f for f in L.FIELDS if f.name == field)
    buf[f.offset : f.offset + f.size] = value.to_bytes(f.size, "little")
    got, why = _cext.check_header(bytes(buf), L.LIVENESS_OFD)
    assert got == getattr(_cext, code), why
    if field == "layout_major":
        assert "layout 1.0" in why and "layout 2.x" in why
