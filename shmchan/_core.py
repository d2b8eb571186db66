"""The Python half of the compiled core: attaching, side segments, hooks and fork.

Every put and get of every face is one call into :class:`shmchan._cext.Core` (the C
library in ``shmchan/_native``), which does the encoding of exact ``bytes`` and plain
pickles, the locking, placement, copies, commits, waits and wakeups itself. It calls
back into this module only for what needs Python or the OS beyond the segment:

* :func:`_encode_slow`: objects with out-of-band pickle buffers (NumPy arrays,
  large ``bytearray``/``memoryview``), which are framed so that each buffer is copied
  once, straight into shared memory;
* :func:`_side_prepare` and :func:`_side_read`: messages too large for the ring, which
  travel through the channel's side-segment pool (docs/layout.md 2.5);
* :func:`_decode_slow`: records of types the fast path does not decode.

A :class:`Ctx` per handle carries what those hooks need (the backend, the name, whose
side objects to trust, the mapped side objects), so the hooks stay stateless.
"""

from __future__ import annotations

import os
import pickle
import weakref
from collections.abc import Iterable
from typing import Any, Final

from . import _cext, _codec
from . import _errors as E
from . import _layout as L
from ._backends import get_backend
from ._backends._base import SIDE_GRANULE, Backend, CreateParams, SideMap

__all__ = ("BUSY", "NOTHING", "WAIT_SLICE", "Ctx", "attach", "create")

NOTHING: Final = _cext.NOTHING
"""What a non-blocking or timed-out get returns when there was nothing to take."""
BUSY: Final = _cext.BUSY
"""What an F_NOGRACE call returns when a lock was held (the async face then waits)."""
WAIT_SLICE: Final = float(_cext.WAIT_SLICE)
"""Longest single sleep: bounds how late a sleeper notices a wakeup lost to a peer's
death, a closed handle, or a channel marked corrupt."""
LOCK_GRACE: Final = float(_cext.LOCK_GRACE)

EV_NOT_EMPTY: Final = int(_cext.EV_NOT_EMPTY)
EV_NOT_FULL: Final = int(_cext.EV_NOT_FULL)
EV_JOINED: Final = int(_cext.EV_JOINED)
F_EOF: Final = int(_cext.F_EOF)
F_BROKEN: Final = int(_cext.F_BROKEN)
F_RAW: Final = int(_cext.F_RAW)
F_NOGRACE: Final = int(_cext.F_NOGRACE)
WRITER: Final = int(_cext.WRITER)
READER: Final = int(_cext.READER)

SIDE_SHRINK_ABOVE: Final = 16 << 20
"""A side object more than 4 times larger than the message it carries, and larger than
this, is re-created at the message's size: the pool keeps at most a few times the
largest recent message."""


class Ctx:
    """What one handle's hooks need: its backend and name, whose side objects it trusts,
    and the side objects it has mapped (each reused while it is the same object)."""

    __slots__ = ("__weakref__", "backend", "name", "permissions", "sides", "trust")

    def __init__(self, backend: Backend, name: str, permissions: int, trust: tuple[int, int] | None) -> None:
        self.backend = backend
        self.name = name
        self.permissions = permissions
        self.trust = trust
        self.sides: dict[int, SideMap] = {}


_live: weakref.WeakSet[_cext.Core] = weakref.WeakSet()


def create(backend_name: str, name: str, params: CreateParams) -> _cext.Core:
    """Create channel ``name`` and attach to it (the creator trusts what it made)."""
    backend = get_backend(backend_name)
    name = backend.normalize_name(name)
    ctx = Ctx(backend, name, params.permissions, (os.geteuid(), params.permissions))
    core = backend.create(name, params, ctx)
    _live.add(core)
    return core


def attach(backend_name: str, name: str, timeout: float, allow_foreign: bool = False) -> _cext.Core:
    """Open channel ``name`` after the trust checks (docs/security.md) and attach."""
    backend = get_backend(backend_name)
    name = backend.normalize_name(name)
    uid, mode = backend.owner_of(name)
    ctx = Ctx(backend, name, mode, None if allow_foreign else (uid, mode))
    core = backend.open(name, timeout, allow_foreign, ctx)
    _live.add(core)
    return core


def _after_fork_in_child() -> None:
    # Each handle gets its own open file, peer slot and presence: the parent's lock
    # token, liveness locks and registrations stay the parent's (docs/layout.md 6).
    for core in list(_live):
        core.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- hooks called by the compiled core --------------------------------------------------


def _encode_slow(obj: Any, raw: bool, data: bytes | None, buffers: list[Any] | None) -> tuple[int, int, Any]:
    """Encode what the fast path could not: ``(rtype, n, payload)``, payload being one
    bytes-like object or a list of ``(offset, buffer)`` parts."""
    if raw:
        view = memoryview(obj)  # TypeError for objects without the buffer protocol
        data = view.tobytes()
        return L.RT_BYTES, len(data), data
    enc = _codec.encode(obj, data, buffers)
    if enc.payload is not None:
        return enc.rtype, enc.n, enc.payload
    return enc.rtype, enc.n, list(enc.parts)


def _decode_slow(core: _cext.Core, rtype: int, payload: bytes | bytearray, raw: bool) -> Any:
    """Decode a record the fast path left: out-of-band pickles, unknown types (consumed,
    reported as UndecodableMessage), and anything but bytes in raw mode."""
    if raw and rtype != L.RT_BYTES:
        raise E.UndecodableMessage(
            f"record of type {rtype} is not a byte message", record_type=rtype, payload=bytes(payload)
        )
    try:
        return _codec.decode(rtype, payload)
    except _codec.UnknownRecordType as exc:
        raise E.UndecodableMessage(str(exc), record_type=rtype, payload=bytes(payload)) from None


def _side_prepare(
    core: _cext.Core,
    n: int,
    parts: list[tuple[int, memoryview]],
    claim: tuple[int, int, int, int],
    dead: tuple[int, ...],
) -> tuple[int, int, int, int]:
    """Put a message of ``n`` bytes (the ``parts``) into side entry ``claim`` =
    ``(index, ticket, size, file_gen)``, which the core claimed for it: make sure the
    entry's object is large enough, and copy the message in. Returns the claim with the
    object's size and generation. The core releases the entry if this raises (whatever
    the exception, a Ctrl-C included), so nothing here needs to.

    ``dead``: transient entries whose reader died holding them, which the core took over
    so that their objects go now (it frees them afterwards, whatever happens here)."""
    ctx: Ctx = core.ctx
    for gone in dead:
        ctx.sides.pop(gone, None)
        ctx.backend.side_remove(ctx.name, gone)
    index, ticket, size, file_gen = claim
    side = ctx.backend.side_open(ctx.name, index, ctx.trust, ctx.sides.get(index)) if size else None
    if side is None or side.size < n or (side.size > 4 * n and side.size > SIDE_SHRINK_ABOVE):
        ctx.sides.pop(index, None)
        file_gen = (file_gen + 1) & 0xFFFFFFFF
        core.side_set_file(index, ticket, 0, file_gen)  # no object while we replace it
        want = max(SIDE_GRANULE, -(-n // SIDE_GRANULE) * SIDE_GRANULE)
        side = ctx.backend.side_create(ctx.name, index, want, ctx.permissions)
    if side.size != size:
        core.side_set_file(index, ticket, side.size, file_gen)
    if index < core.side_retained:
        ctx.sides[index] = side  # kept and reused; a transient object is read once
    view = side.view
    for off, part in parts:
        view[off : off + part.nbytes] = part
    return index, ticket, side.size, file_gen


def _side_read(
    core: _cext.Core, index: int, ticket: int, size: int, file_gen: int, inner: int, raw: bool
) -> Any:
    """Copy a message out of side entry ``index`` (which this handle took from the ring)
    and decode the copy; a transient entry's object is removed once read. The core frees
    the entry after this returns or raises (a Ctrl-C included): the message belongs to
    this receiver once its record was taken."""
    ctx: Ctx = core.ctx
    transient = index >= core.side_retained
    try:
        side = ctx.backend.side_open(ctx.name, index, ctx.trust, ctx.sides.get(index))
        if side is None or side.size < size:
            raise E.CorruptChannel(f"channel {ctx.name!r}: side segment {index} is missing or too short")
        if inner == L.RT_PICKLE_OOB:
            payload: bytes | bytearray = bytearray(side.view[:size])
        else:
            payload = side.view[:size].tobytes()
        if transient:
            ctx.sides.pop(index, None)
        else:
            ctx.sides[index] = side
    finally:
        if transient:
            # A transient entry's object goes as soon as it is read (docs/layout.md 2.5);
            # if this is cut short, the next writer of the entry replaces the object.
            ctx.backend.side_remove(ctx.name, index)
    if inner == L.RT_BYTES:
        return payload
    if inner == L.RT_PICKLE and not raw:
        return pickle.loads(payload)
    return _decode_slow(core, inner, payload, raw)


_cext.configure(
    {
        "ShmchanError": E.ShmchanError,
        "ClosedChannel": E.ClosedChannel,
        "CorruptChannel": E.CorruptChannel,
        "NotAShmchanSegment": E.NotAShmchanSegment,
        "IncompatibleLayout": E.IncompatibleLayout,
        "EndOfChannel": E.EndOfChannel,
        "BrokenChannel": E.BrokenChannel,
        "MessageTooLarge": E.MessageTooLarge,
        "UndecodableMessage": E.UndecodableMessage,
        "UndecodableBatch": E.UndecodableBatch,
        "TooManyPeers": E.TooManyPeers,
        "ChannelNotFound": E.ChannelNotFound,
    },
    {
        "encode_slow": _encode_slow,
        "decode_slow": _decode_slow,
        "side_prepare": _side_prepare,
        "side_read": _side_read,
    },
)


def deadline_after(timeout: float | None) -> float | None:
    """Turn a ``timeout`` in seconds into an absolute monotonic deadline (None: none)."""
    if timeout is None:
        return None
    now: float = _cext.now()
    return now + max(0.0, timeout)


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative), or None for no deadline."""
    if deadline is None:
        return None
    now: float = _cext.now()
    return max(0.0, deadline - now)


def live_cores() -> Iterable[_cext.Core]:
    """The attached handles of this process (for diagnostics and tests)."""
    return list(_live)
