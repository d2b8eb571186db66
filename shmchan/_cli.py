"""The ``shmchan`` command line: see and manage what exists (docs/cli.md).

::

    shmchan ls    [--json] [--backend B] [--dir DIR]... [--name NAME]...
    shmchan stat  NAME [--backend B] [--json]
    shmchan rm    NAME... [--backend B] [--force]
    shmchan gc    [--dry-run] [--json] [--backend B] [--dir DIR]... [--name NAME]... [--force]
    shmchan top   [--once] [--interval S] [--count N] [--backend B] [--dir DIR]... [--name NAME]...
    shmchan bench [the benchmark's options]

``python -m shmchan`` runs the same commands. Exit status: 0 done; 1 not found, refused
or partly done; 2 usage. Everything is read without attaching (:mod:`shmchan._inspect`).

``top`` draws with :mod:`curses` when stdout is a terminal: it redraws in place, follows
the terminal's size and reads ``q`` without Enter, through terminfo, with no escape
codes written here; ``--once`` and a stdout that is not a terminal get plain frames.
Tables are aligned plain text: no table library is needed for fixed columns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TextIO

from . import _inspect as I
from . import _layout as L
from ._backends import BACKENDS, get_backend
from ._backends._filebacked import CREATION_LOCK
from ._errors import ShmchanError

JSON_VERSION: Final = 1
"""The version of every ``--json`` document (docs/cli.md); bumped on incompatible change."""
EXIT_OK: Final = 0
EXIT_PARTIAL: Final = 1
EXIT_USAGE: Final = 2


def _out() -> TextIO:
    return sys.stdout


def _err(msg: str) -> None:
    print(f"shmchan: {msg}", file=sys.stderr)


# -- formatting ----------------------------------------------------------------------------------


def human_bytes(n: int | None) -> str:
    """``n`` bytes as 512, 64K, 1.5M, ... (binary units)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("", "K", "M", "G"):
        if value < 1024:
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.0f}T" if value == int(value) else f"{value:.1f}T"


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _num(value: Any) -> str:
    return "-" if value is None else str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned columns; the columns in ``right`` are right-aligned (numbers)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _owner_cell(entry: dict[str, Any]) -> str:
    if not entry["owner"]:
        return "-"
    return {True: "alive", False: "DEAD", None: "?"}[entry["owner_alive"]]


def _creator_cell(entry: dict[str, Any]) -> str:
    if entry["creator_pid"] is None:
        return "-"
    return f"{entry['creator_pid']}/{entry['creator_uid']}"


LS_HEADERS: Final = (
    "NAME", "BACKEND", "STATE", "LAYOUT", "CAPACITY", "QUEUED", "MSGS", "PUT", "GOT",
    "W", "R", "PWAIT", "CWAIT", "PEERS", "OWNER", "CREATOR", "AGE",
)  # fmt: skip


def ls_rows(entries: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            e["ref"],
            e["backend"],
            e["state"],
            e["layout"] or "-",
            human_bytes(e["capacity"]),
            human_bytes(e["queued_bytes"]),
            _num(e["queued_messages"]),
            _num(e["put"]),
            _num(e["got"]),
            _num(e["writers"]),
            _num(e["readers"]),
            _num(e["producers_waiting"]),
            _num(e["consumers_waiting"]),
            _num(e["attached"]),
            _owner_cell(e),
            _creator_cell(e),
            human_age(e["age"]),
        ]
        for e in entries
    ]


def _dump(doc: dict[str, Any]) -> None:
    json.dump(doc, _out(), indent=2, sort_keys=False)
    _out().write("\n")


# -- ls --------------------------------------------------------------------------------------------


def _scan(args: argparse.Namespace) -> I.Scan:
    backends = [args.backend] if args.backend else None
    return I.scan(backends, args.dir or [I.SHM_DIR], args.name or [])


def cmd_ls(args: argparse.Namespace) -> int:
    found = _scan(args)
    now = time.time()
    entries = [f.summary(now) for f in found.channels]
    if args.json:
        _dump({"format": "shmchan.ls", "version": JSON_VERSION, "channels": entries, "errors": found.errors})
    else:
        out = _out()
        if entries:
            for line in table(LS_HEADERS, ls_rows(entries), right=set(range(4, 14))):
                print(line, file=out)
            notes = [(e["ref"], p) for e in entries for p in e["problems"]]
            if notes:
                print(file=out)
                for ref, problem in notes:
                    print(f"{ref}: {problem}", file=out)
        else:
            print("no shmchan channels found", file=out)
    for error in found.errors:
        _err(error)
    return EXIT_PARTIAL if found.errors else EXIT_OK


# -- stat ----------------------------------------------------------------------------------------


def _lock_meaning(start: int, end: int) -> str:
    if (start, end) == (CREATION_LOCK[0], CREATION_LOCK[0] + CREATION_LOCK[1] - 1):
        return "creating"
    if start == end == L.OFD_WRITERS_BYTE:
        return "writer"
    if start == end == L.OFD_READERS_BYTE:
        return "reader"
    if (
        start == end
        and start >= L.PEER_TABLE_OFFSET
        and (start - L.PEER_TABLE_OFFSET) % L.PEER_ENTRY_SIZE == 0
    ):
        return f"slot {(start - L.PEER_TABLE_OFFSET) // L.PEER_ENTRY_SIZE}"
    return f"bytes {start}-{end}"


def stat_doc(f: I.Found) -> dict[str, Any]:
    """The ``shmchan stat --json`` document of ``f`` (docs/cli.md)."""
    processes = [
        {
            "pid": pid,
            "roles": [_lock_meaning(start, end) for _, start, end in locks],
            "locks": [{"type": kind, "start": start, "end": end} for kind, start, end in locks],
        }
        for pid, locks in sorted(I.holders(f).items())
    ]
    peers = I.peers(f)
    for peer in peers:
        peer["pid_running"] = I.pid_running(peer["pid"]) if peer["live"] else None
    return {
        "format": "shmchan.stat",
        "version": JSON_VERSION,
        "channel": f.summary(),
        "header": None if f.header is None else dict(f.header),
        "locks": {"wlock": I.lock_holder(f, "wlock"), "rlock": I.lock_holder(f, "rlock")},
        "peers": peers,
        "side_entries": I.side_entries(f),
        "side_objects": [s.summary() for s in f.sides],
        "semaphores": [dict(s.summary(), values=s.values if s.role == "presence" else None) for s in f.sems],
        "processes": processes,
    }


_HEX_FIELDS: Final = {
    "magic", "nonce", "tail", "head", "wlock", "rlock", "header_crc", "computed_crc",
    "side_journal", "side_journal_tail", "features_incompat", "features_compat",
}  # fmt: skip


def _header_lines(h: dict[str, Any]) -> list[str]:
    width = max(len(k) for k in h)
    lines = []
    for key, value in h.items():
        if key in _HEX_FIELDS and isinstance(value, int):
            shown = f"{value:#x}"
        elif key == "created_unix_ns" and value:
            shown = f"{value} ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(value / 1e9))})"
        else:
            shown = repr(value) if isinstance(value, str) else str(value)
        lines.append(f"    {key.ljust(width)}  {shown}")
    return lines


def _holder_text(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "free"
    state = "alive" if holder["alive"] else "DEAD (the next taker recovers it)"
    return f"held by slot {holder['slot']} (gen {holder['gen']}, pid {holder['pid']}): {state}"


def print_stat(doc: dict[str, Any]) -> None:
    out = _out()
    c = doc["channel"]

    def p(line: str = "") -> None:
        print(line, file=out)

    where = c["path"] or (f"key {c['sysv']['key']:#010x} shmid {c['sysv']['shmid']}" if c["sysv"] else "")
    p(f"{c['ref']} ({c['backend']}): {c['state']}  {where}")
    for problem in c["problems"]:
        p(f"  problem: {problem}")
    p(
        f"  size {c['size']}  uid {c['uid']}  mode {c['mode']}  layout {c['layout'] or '-'}  age {human_age(c['age'])}"
    )
    if c["creator_pid"] is not None:
        p(f"  created by pid {c['creator_pid']} (uid {c['creator_uid']})")
    if c["capacity"] is not None:
        p(
            f"  capacity {c['capacity']}  queued {c['queued_messages']} messages ({c['queued_bytes']} bytes)"
            f"  put {c['put']}  got {c['got']}"
        )
    p(
        f"  writers {_num(c['writers'])}  readers {_num(c['readers'])}  attached peers {_num(c['attached'])}"
        f"  producers waiting {_num(c['producers_waiting'])}  consumers waiting {_num(c['consumers_waiting'])}"
    )
    if c["owner"]:
        p(f"  lifetime owner {c['owner']}: {_owner_cell(c)}")
    if doc["header"] is not None and c["evidence"] in ("magic", "identity"):
        p(f"  write lock: {_holder_text(doc['locks']['wlock'])}")
        p(f"  read lock: {_holder_text(doc['locks']['rlock'])}")
    if doc["processes"]:
        p("  processes with it open or mapped:")
        for proc in doc["processes"]:
            roles = ", ".join(proc["roles"]) or "-"
            p(f"    pid {proc['pid']}: {roles}")
    if doc["peers"]:
        p("  peer table (live slots, and slots a dead owner left flagged):")
        rows = [
            [
                str(peer["slot"]),
                str(peer["gen"]),
                str(peer["pid"]),
                "live" if peer["live"] else "dead",
                time.strftime("%H:%M:%S", time.localtime(peer["attached_unix_ns"] / 1e9)),
                ",".join(peer["waiting"]) or "-",
            ]
            for peer in doc["peers"]
        ]
        for line in table(("SLOT", "GEN", "PID", "STATE", "ATTACHED", "WAITING"), rows, right={0, 1, 2}):
            p("    " + line)
    if doc["side_entries"]:
        p("  side entries in flight:")
        for e in doc["side_entries"]:
            p(
                f"    entry {e['index']}: {e['state']} ticket {e['ticket']} owner slot {e['owner_slot']}"
                f"  size {e['size']}  file_gen {e['file_gen']}"
            )
    if doc["side_objects"]:
        p("  side objects:")
        for s in doc["side_objects"]:
            what = s["path"] or f"key {s['key']:#010x} shmid {s['shmid']}"
            p(f"    {L.side_suffix(s['index'])[1:]}: {what}  {s['size']} bytes  uid {s['uid']}")
    if doc["semaphores"]:
        p("  semaphore sets:")
        for s in doc["semaphores"]:
            values = f"  values {s['values']}" if s["values"] is not None else ""
            p(
                f"    {s['role']}: semid {s['semid']}  {s['nsems']} semaphores  uid {s['uid']}  mode {s['mode']}{values}"
            )
    if doc["header"] is not None:
        p("  header:")
        for line in _header_lines(doc["header"]):
            p(line)


def _resolve(ref: str, backend: str | None) -> tuple[list[I.Found], int]:
    """The object ``ref`` names; prints why not and returns an exit status otherwise."""
    try:
        found = I.find(ref, backend)
    except ValueError as exc:
        _err(str(exc))
        return [], EXIT_USAGE
    if not found:
        where = f" ({backend})" if backend else ""
        _err(f"{ref}: no such channel{where}")
        return [], EXIT_PARTIAL
    if len(found) > 1:
        backends = ", ".join(f.backend for f in found)
        _err(f"{ref}: exists on several backends ({backends}); choose one with --backend")
        return [], EXIT_USAGE
    return found, EXIT_OK


def cmd_stat(args: argparse.Namespace) -> int:
    found, status = _resolve(args.name, args.backend)
    if not found:
        return status
    doc = stat_doc(found[0])
    if args.json:
        _dump(doc)
    else:
        print_stat(doc)
    return EXIT_OK


# -- rm --------------------------------------------------------------------------------------------


def _in_use_text(f: I.Found) -> str:
    parts = []
    if f.live_slots:
        slots = ", ".join(map(str, f.live_slots[:8])) + (", ..." if len(f.live_slots) > 8 else "")
        parts.append(f"{len(f.live_slots)} live peer(s) (slots {slots})")
    if f.writers:
        parts.append(f"{f.writers} writer(s)")
    if f.readers:
        parts.append(f"{f.readers} reader(s)")
    if f.state == I.CREATING:
        parts.append("its creator at work")
    if f.nattch:
        parts.append(f"{f.nattch} process(es) attached")
    return ", ".join(parts) or "a process holds a lock on it"


def remove_one(f: I.Found, force: bool) -> tuple[list[str], str | None]:
    """Remove ``f`` with everything it uses: ``(what was removed, why not)``."""
    why = I.may_remove(f, force)
    if why:
        return [], why
    if f.in_use and not force:
        return [], f"in use: {_in_use_text(f)} (--force removes it anyway)"
    if f.state == I.FOREIGN and not force:
        problem = f.problems[0] if f.problems else "not a shmchan segment"
        return [], f"{problem}: not removed (--force removes it anyway)"
    if f.backend == "sysv" and f.name is None:
        return I.remove_sysv_nameless(f), None
    objects = [] if f.state == I.NO_SEGMENT else [f.path or "segment"]
    objects += [s.ref for s in f.sides]
    objects += [f"{s.role} semaphore set {s.semid}" for s in f.sems]
    target = f.path if f.backend == "mmap" else f.name
    assert target is not None
    get_backend(f.backend).remove(target, force=force)
    return objects, None


def cmd_rm(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for ref in args.names:
        found, why = _resolve(ref, args.backend)
        if not found:
            status = max(status, why)
            continue
        f = found[0]
        try:
            removed, refused = remove_one(f, args.force)
        except (ShmchanError, OSError) as exc:
            removed, refused = [], str(exc)
        if refused:
            _err(f"{f.ref} ({f.backend}): {refused}")
            status = max(status, EXIT_PARTIAL)
            continue
        print(f"removed {f.ref} ({f.backend}): {', '.join(removed)}", file=_out())
        if f.backend == "sysv" and f.name is None and f.header is not None and I.side_entries(f):
            _err(
                f"{f.ref}: its side segments cannot be found without its name (shmchan rm NAME --backend sysv)"
            )
    return status


# -- gc --------------------------------------------------------------------------------------------


def cmd_gc(args: argparse.Namespace) -> int:
    found = _scan(args)
    results = []
    status = EXIT_OK
    me = os.geteuid()
    for o in I.orphans(found):
        entry: dict[str, Any] = {
            "kind": o.kind,
            "backend": o.backend,
            "ref": o.ref,
            "reason": o.reason,
            "objects": o.objects,
            "uid": o.uid,
            "action": "would-remove",
            "detail": None,
        }
        refused = I.may_remove(o.found, args.force) if o.found is not None else None
        if o.side is not None and o.side.uid != me and not (me == 0 and args.force):
            refused = f"owned by uid {o.side.uid}, not by uid {me}"
        if refused:
            entry["action"], entry["detail"] = "skipped", refused
        elif not args.dry_run:
            try:
                removed = I.collect(o)
            except (ShmchanError, OSError) as exc:
                entry["action"], entry["detail"] = "failed", str(exc)
                status = EXIT_PARTIAL
            else:
                if removed:
                    entry["action"], entry["objects"] = "removed", removed
                else:
                    entry["action"], entry["detail"] = "skipped", "it changed since it was found"
        results.append(entry)
    if args.json:
        _dump(
            {
                "format": "shmchan.gc",
                "version": JSON_VERSION,
                "dry_run": args.dry_run,
                "orphans": results,
                "errors": found.errors,
            }
        )
    else:
        out = _out()
        verbs = {"would-remove": "would remove", "removed": "removed", "skipped": "left", "failed": "FAILED"}
        for e in results:
            detail = f" ({e['detail']})" if e["detail"] else ""
            print(
                f"{verbs[e['action']]} {e['kind']} {e['ref']} ({e['backend']}){detail}: {e['reason']}",
                file=out,
            )
            for obj in e["objects"]:
                print(f"    {obj}", file=out)
        if not results:
            print("nothing to collect", file=out)
    for error in found.errors:
        _err(error)
    return EXIT_PARTIAL if found.errors else status


# -- top ---------------------------------------------------------------------------------------------


TOP_HEADERS: Final = (
    "NAME",
    "BACKEND",
    "STATE",
    "DEPTH",
    "QUEUED",
    "PUT/s",
    "GOT/s",
    "W",
    "R",
    "PWAIT",
    "CWAIT",
)
Sample = tuple[float, dict[tuple[str, str, int], dict[str, Any]]]


def _sample(args: argparse.Namespace) -> Sample:
    found = _scan(args)
    entries = {}
    for f in found.channels:
        nonce = f.header["nonce"] if f.header is not None else 0
        entries[(f.backend, f.ref, nonce)] = f.summary()
    return time.monotonic(), entries


def _rate(key: tuple[str, str, int], field: str, prev: Sample | None, cur: Sample) -> str:
    if prev is None or key not in prev[1]:
        return "-"
    before, after = prev[1][key][field], cur[1][key][field]
    dt = cur[0] - prev[0]
    if before is None or after is None or dt <= 0:
        return "-"
    return f"{(after - before) / dt:.0f}"


def top_frame(prev: Sample | None, cur: Sample, interval: float) -> list[str]:
    """One frame of ``shmchan top``: a title line and the table (rates since ``prev``)."""
    rows = [
        [
            e["ref"],
            e["backend"],
            e["state"],
            _num(e["queued_messages"]),
            human_bytes(e["queued_bytes"]),
            _rate(key, "put", prev, cur),
            _rate(key, "got", prev, cur),
            _num(e["writers"]),
            _num(e["readers"]),
            _num(e["producers_waiting"]),
            _num(e["consumers_waiting"]),
        ]
        for key, e in sorted(cur[1].items(), key=lambda kv: kv[0][1])
    ]
    title = f"shmchan top  {time.strftime('%H:%M:%S')}  {len(rows)} channel(s)  every {interval:g} s"
    return [title, "", *table(TOP_HEADERS, rows, right=set(range(3, 11)))]


def _top_curses(args: argparse.Namespace) -> int:
    import curses

    def run(screen: Any) -> None:
        with contextlib.suppress(curses.error):  # a terminal without an invisible cursor
            curses.curs_set(0)
        screen.timeout(int(args.interval * 1000))
        prev: Sample | None = None
        frames = 0
        while True:
            cur = _sample(args)
            lines = [*top_frame(prev, cur, args.interval), "", "q: quit"]
            prev = cur
            screen.erase()
            height, width = screen.getmaxyx()
            for y, line in enumerate(lines[: max(0, height - 1)]):
                with contextlib.suppress(curses.error):  # past the edge: a small screen shows less
                    screen.addnstr(y, 0, line, max(0, width - 1))
            screen.refresh()
            frames += 1
            if args.count and frames >= args.count:
                return
            if screen.getch() in (ord("q"), ord("Q")):
                return

    curses.wrapper(run)
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        _err("--interval must be positive")
        return EXIT_USAGE
    out = _out()
    try:
        if args.once:
            first = _sample(args)
            time.sleep(args.interval)
            for line in top_frame(first, _sample(args), args.interval):
                print(line, file=out)
            return EXIT_OK
        if out.isatty() and sys.stdin.isatty():
            return _top_curses(args)
        prev: Sample | None = None
        frames = 0
        while True:
            cur = _sample(args)
            if frames:
                print(file=out)
            for line in top_frame(prev, cur, args.interval):
                print(line, file=out)
            out.flush()
            prev = cur
            frames += 1
            if args.count and frames >= args.count:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


# -- the parser ------------------------------------------------------------------------------------


def _add_scope(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, help="only this backend (default: every installed one)")
    p.add_argument(
        "--dir",
        action="append",
        metavar="DIR",
        help=f"look for mmap channels in DIR (repeatable; default {I.SHM_DIR}, whose files are listed as posix)",
    )
    p.add_argument(
        "--name",
        action="append",
        metavar="NAME",
        help="a sysv channel name to look for: recovers its name, and finds its semaphore sets and side "
        "segments even when its segment is gone (repeatable; posix names seen are tried too)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmchan",
        description="See and manage shmchan channels and queues on this machine (docs/cli.md).",
        epilog="Exit status: 0 done, 1 not found, refused or partly done, 2 usage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("ls", help="list every channel and queue", description="List every channel and queue.")
    _add_scope(p)
    p.add_argument("--json", action="store_true", help="print JSON (format shmchan.ls, docs/cli.md)")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "stat",
        help="show one channel in detail",
        description="Every header field, decoded, and who holds what.",
    )
    p.add_argument(
        "name", metavar="NAME", help="a name (posix, sysv), a path (mmap), or key:0x... / shmid:N (sysv)"
    )
    p.add_argument(
        "--backend", choices=BACKENDS, help="the channel's backend (needed when NAME exists on two)"
    )
    p.add_argument("--json", action="store_true", help="print JSON (format shmchan.stat, docs/cli.md)")
    p.set_defaults(func=cmd_stat)

    p = sub.add_parser(
        "rm",
        help="remove channels with everything they use",
        description="Remove channels with their segment, semaphore sets and side segments, also when the "
        "header is corrupt, truncated or never published. A channel that live processes are attached to is "
        "refused unless --force.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="as for stat")
    p.add_argument("--backend", choices=BACKENDS, help="the channels' backend")
    p.add_argument(
        "--force",
        action="store_true",
        help="remove even if processes are attached, or if it does not look like shmchan's; as root, "
        "also other users' objects",
    )
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser(
        "gc",
        help="remove what is provably orphaned",
        description="Remove what is provably shmchan's and abandoned: segments whose creator died before "
        "publishing them, unnamed queues whose lifetime service is gone with no process attached, side "
        "segments whose channel does not exist, and SysV semaphore sets whose segment is gone.",
    )
    _add_scope(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    p.add_argument("--json", action="store_true", help="print JSON (format shmchan.gc, docs/cli.md)")
    p.add_argument("--force", action="store_true", help="as root: also other users' orphans")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "top",
        help="a live view of rates, depth and waiters",
        description="Refresh a table of every channel: puts and gets per second, queue depth and waiters. "
        "Press q to quit.",
    )
    _add_scope(p)
    p.add_argument("--once", action="store_true", help="print one frame (rates over one interval) and exit")
    p.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between frames (default 1)"
    )
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N frames (default: never)")
    p.set_defaults(func=cmd_top)

    sub.add_parser(
        "bench",
        help="run the benchmark (shmchan bench --help)",
        add_help=False,
        description="The benchmark; its options are its own (shmchan bench --help).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``shmchan`` command; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench"]:
        from ._bench import main as bench

        try:
            return bench(args_list[1:])
        except SystemExit as exc:  # its own argparse: --help, usage errors
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:  # `shmchan ls | head`: the reader has gone, nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit-time flush is quiet
        return EXIT_OK
