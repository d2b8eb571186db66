"""Objects over a core: what queues and channels share, for both faces.

A send is split so that the async face can retry without pickling again:
:func:`prepare` encodes the object once (and, for a message the ring can never hold,
writes it to a side segment, docs/layout.md 2.5); :func:`attempt` tries to queue it
until a deadline (the async face passes "now" and waits between attempts); if the
send is finally abandoned, :func:`discard` removes the side segment.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Iterable
from typing import Any

from . import _layout as L
from ._backends._base import Backend
from ._codec import Encoded, UnknownRecordType, decode, encode, pickled_in_band, write_into
from ._core import ChannelCore
from ._errors import UndecodableBatch, UndecodableMessage
from ._ring import OutRecord


class Outgoing:
    """A message ready to be queued: its record, and its side segment if any."""

    __slots__ = ("enc", "side")

    def __init__(self, enc: Encoded, side: int | None) -> None:
        self.enc = enc
        self.side = side


def prepare(core: ChannelCore, impl: Backend, name: str, obj: Any, raw: bool = False) -> Outgoing:
    """Encode ``obj`` (``raw``: a bytes-like object, sent as BYTES without pickling).

    Raises whatever pickling raises; nothing has been sent then.
    """
    if raw:
        view = memoryview(obj)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        elif view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        enc = Encoded(L.RT_BYTES, view.nbytes, view)
    else:
        enc = encode(obj)
    if enc.n <= core.max_payload:
        return Outgoing(enc, None)
    seq = core.reserve_large_seq()
    view, close = impl.create_side(name, seq, enc.n, core.seg.permissions)
    try:
        write_into(enc, view)
    except BaseException:
        close()
        impl.remove_side(name, seq)
        raise
    close()
    ref = memoryview(L.LARGE_REF.pack(seq, enc.n, enc.rtype, 0, 0))
    return Outgoing(Encoded(L.RT_LARGE, ref.nbytes, ref), seq)


def attempt(
    core: ChannelCore,
    out: Outgoing,
    deadline: float | None,
    broken: Callable[[], bool] | None = None,
) -> bool:
    """Queue a prepared message before ``deadline``; False if there was no room."""
    enc = out.enc
    return (
        core.send(core.ring.try_write_record, (enc.rtype, enc.n, enc.payload, enc.parts), deadline, broken)
        > 0
    )


def discard(impl: Backend, name: str, out: Outgoing) -> None:
    """Drop a prepared message that will not be sent (its side segment, if any)."""
    if out.side is not None:
        impl.remove_side(name, out.side)


def send(
    core: ChannelCore,
    impl: Backend,
    name: str,
    obj: Any,
    deadline: float | None,
    raw: bool = False,
    broken: Callable[[], bool] | None = None,
) -> bool:
    """prepare + attempt + discard on failure: the whole blocking send."""
    out = prepare(core, impl, name, obj, raw)
    try:
        sent = attempt(core, out, deadline, broken)
    except BaseException:
        discard(impl, name, out)
        raise
    if not sent:
        discard(impl, name, out)
    return sent


class Batch:
    """Messages ready to be queued together: their records, the side segments of the
    ones that needed one, and how many have been queued so far (``done``)."""

    __slots__ = ("done", "records", "spilled", "write")

    def __init__(self, core: ChannelCore, records: list[OutRecord], spilled: list[tuple[int, Outgoing]]):
        self.records = records
        self.spilled = spilled  # (index, message) of side-segment messages
        self.done = 0
        self.write = functools.partial(core.ring.try_write_many, records)

    def __len__(self) -> int:
        return len(self.records)


def prepare_many(
    core: ChannelCore, impl: Backend, name: str, objs: Iterable[Any], raw: bool = False
) -> Batch:
    """Encode every object of ``objs`` (as :func:`prepare` does each); raises whatever
    pickling raises, and nothing has been sent then."""
    records: list[OutRecord] = []
    spilled: list[tuple[int, Outgoing]] = []
    max_payload = core.max_payload
    try:
        for obj in objs:
            if not raw:  # the common cases, inline: bytes, and pickles without buffers
                if type(obj) is bytes:
                    if len(obj) <= max_payload:
                        records.append((L.RT_BYTES, len(obj), obj, ()))
                        continue
                else:
                    data = pickled_in_band(obj)
                    if data is not None and len(data) <= max_payload:
                        records.append((L.RT_PICKLE, len(data), data, ()))
                        continue
            out = prepare(core, impl, name, obj, raw)
            if out.side is not None:
                spilled.append((len(records), out))
            enc = out.enc
            records.append((enc.rtype, enc.n, enc.payload, enc.parts))
    except BaseException:
        for _, out in spilled:
            discard(impl, name, out)
        raise
    return Batch(core, records, spilled)


def attempt_many(
    core: ChannelCore, batch: Batch, deadline: float | None, broken: Callable[[], bool] | None = None
) -> int:
    """Queue the next messages of ``batch`` (as many as fit, under one lock) before
    ``deadline``; return how many (0 if there was no room)."""
    sent = core.send(batch.write, batch.done, deadline, broken)
    batch.done += sent
    return sent


def discard_rest(impl: Backend, name: str, batch: Batch) -> None:
    """Drop the side segments of the messages of ``batch`` that were not queued."""
    for i, out in batch.spilled:
        if i >= batch.done:
            discard(impl, name, out)


def send_many(
    core: ChannelCore,
    impl: Backend,
    name: str,
    objs: Iterable[Any],
    deadline: float | None,
    raw: bool = False,
    broken: Callable[[], bool] | None = None,
) -> tuple[int, int]:
    """Send every object of ``objs`` in order, as many per lock as fit, each batch
    published with one commit. Everything is encoded first, so an object that
    cannot be pickled raises before anything is sent. Return ``(sent, total)``:
    ``sent < total`` when ``deadline`` passed first (the first ``sent`` went in)."""
    batch = prepare_many(core, impl, name, objs, raw)
    try:
        while batch.done < len(batch) and attempt_many(core, batch, deadline, broken):
            pass
    finally:
        discard_rest(impl, name, batch)
    return batch.done, len(batch)


NOTHING: Any = object()
"""What :func:`receive` returns when the deadline passed with nothing to receive."""


def receive(
    core: ChannelCore,
    impl: Backend,
    name: str,
    deadline: float | None,
    eof: Callable[[], bool] | None = None,
    raw: bool = False,
) -> Any:
    """Take the oldest record and decode it; :data:`NOTHING` if the deadline passed.

    ``raw``: return the payload of a BYTES record (or of a side segment holding one)
    as ``bytes``, and refuse anything else with UndecodableMessage (consumed).
    """
    got = core.recv(deadline, eof)
    if got is None:
        return NOTHING
    rtype, payload = got
    if not raw:  # the common cases, inline
        if rtype == L.RT_BYTES:
            return payload
        if rtype == L.RT_PICKLE:
            return pickle.loads(payload)
    return _decode(impl, name, rtype, payload, raw)


def receive_many(
    core: ChannelCore,
    impl: Backend,
    name: str,
    max_items: int,
    deadline: float | None,
    eof: Callable[[], bool] | None = None,
    raw: bool = False,
) -> list[Any]:
    """Take up to ``max_items`` records at once (waiting only while there are none)
    and decode them; an empty list if the deadline passed.

    Every record taken is decoded, even after one fails; if any failed, raises
    UndecodableBatch holding the items that did decode (nothing taken is lost).
    Raises TypeError or ValueError for a ``max_items`` that is not an int >= 1.
    """
    if isinstance(max_items, bool) or not isinstance(max_items, int):
        raise TypeError(f"max_items must be an int, not {type(max_items).__name__}")
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, not {max_items}")
    got = core.recv_many(max_items, deadline, eof)
    if got is None:
        return []
    items: list[Any] = []
    errors: list[tuple[int, BaseException]] = []
    for i, (rtype, payload) in enumerate(got):
        try:
            if rtype == L.RT_BYTES and not raw:
                items.append(payload)  # already a private bytes object
            elif rtype == L.RT_PICKLE and not raw:
                items.append(pickle.loads(payload))
            else:
                items.append(_decode(impl, name, rtype, payload, raw))
        except Exception as exc:  # noqa: BLE001 - whatever unpickling raises, kept for the caller
            errors.append((i, exc))
    if errors:
        raise UndecodableBatch(items, errors) from errors[0][1]
    return items


def _decode(impl: Backend, name: str, rtype: int, payload: bytes | bytearray, raw: bool) -> Any:
    def open_side(seq: int) -> memoryview:
        return impl.open_side(name, seq)

    try:
        if raw:
            inner = rtype
            if rtype == L.RT_LARGE:
                inner = L.LARGE_REF.unpack_from(payload, 0)[2]
            if inner != L.RT_BYTES:
                raise UnknownRecordType(rtype, "not a byte message")
        return decode(rtype, payload, open_side)
    except UnknownRecordType as exc:
        if rtype == L.RT_LARGE and len(payload) >= L.LARGE_REF.size:
            # The consumer of a LARGE record owns its side segment, read or not.
            impl.remove_side(name, L.LARGE_REF.unpack_from(payload, 0)[0])
        raise UndecodableMessage(str(exc), record_type=exc.rtype, payload=bytes(payload)) from None
