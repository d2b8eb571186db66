"""Objects to records and back: pickle protocol 5 with out-of-band buffers.

* An exact ``bytes`` object is sent as a BYTES record: no pickling at all.
* Anything else is pickled in the caller (so an unpicklable object raises in ``put``
  and leaves the queue unchanged) with protocol 5. Buffers that pickle hands out of
  band are not copied into the pickle: the record lists them and the ring writer
  copies each one once, straight into shared memory (docs/layout.md 2.4). They are:
  NumPy arrays anywhere in the object; a ``bytearray`` of 4 KiB or more or any
  ``memoryview`` as the object itself; and memoryviews nested anywhere (which
  multiprocessing cannot pickle at all). ``bytes`` and ``bytearray`` nested inside
  other objects are pickled in-band: CPython's pickler saves them natively.
* The receiver copies a record out of the ring (or out of a side segment) once;
  out-of-band buffers then live in that private copy (writable, so received NumPy
  arrays are writable).

The compiled core handles exact ``bytes`` and in-band pickles itself; this module is
what it calls for everything else (:func:`encode`, :func:`decode`).
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Sequence
from typing import Any

from . import _layout as L

OOB_MIN = 4096
"""bytearrays at least this large travel out of band (smaller ones are cheaper in-band)."""

Parts = Sequence[tuple[int, memoryview]]


class Encoded:
    """One object as a record: type, size, and either one payload view or parts."""

    __slots__ = ("n", "parts", "payload", "rtype")

    def __init__(self, rtype: int, n: int, payload: memoryview | None, parts: Parts = ()) -> None:
        self.rtype = rtype
        self.n = n
        self.payload = payload
        self.parts = parts


def _rebuild_memoryview(buf: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(buf)
    if (fmt, shape) == ("B", (view.nbytes,)):
        return view
    out: memoryview = view.cast("B").cast(fmt, shape)  # type: ignore[call-overload]
    return out


def _reduce_memoryview(obj: memoryview) -> tuple[Any, ...]:
    view = obj if obj.c_contiguous else memoryview(obj.tobytes()).cast(obj.format, obj.shape)  # type: ignore[call-overload]
    return _rebuild_memoryview, (pickle.PickleBuffer(view), view.format, view.shape)


class _OutOfBand:
    """Wraps a top-level bytearray or memoryview so that the fast C pickler sends its
    memory out of band; the wrapper itself never appears in the pickle."""

    __slots__ = ("obj",)

    def __init__(self, obj: bytearray | memoryview) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if type(self.obj) is bytearray:
            return bytearray, (pickle.PickleBuffer(self.obj),)
        return _reduce_memoryview(self.obj)  # type: ignore[arg-type]


class _Pickler(pickle.Pickler):
    """Pickles memoryview objects (out of band) wherever they are nested."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is memoryview:
            return _reduce_memoryview(obj)
        return NotImplemented


def _dumps_slow(obj: Any, buffers: list[pickle.PickleBuffer]) -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffers.append).dump(obj)
    return out.getvalue()


def pickled_in_band(obj: Any) -> bytes | None:
    """The pickle of ``obj`` if it has no out-of-band buffers, else None (then use
    :func:`encode`). The fast path of batch sends: no :class:`Encoded` is made.
    Raises whatever pickling raises, except the TypeError that :func:`encode` handles
    with the slow pickler (None then too)."""
    t = type(obj)
    if t is bytearray or t is memoryview:
        return None
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except TypeError:
        return None
    return None if buffers else data


def encode(obj: Any, data: bytes | None = None, buffers: list[pickle.PickleBuffer] | None = None) -> Encoded:
    """Encode ``obj``; raises whatever pickling raises (nothing has been sent).

    ``data`` and ``buffers``: a pickle of ``obj`` the caller already made with protocol 5
    and a buffer callback (the compiled core's first attempt), reused as it is.
    """
    t = type(obj)
    if t is bytes:
        return Encoded(L.RT_BYTES, len(obj), memoryview(obj))
    if data is None or buffers is None:
        buffers = []
        if (t is bytearray and len(obj) >= OOB_MIN) or t is memoryview:
            data = pickle.dumps(_OutOfBand(obj), protocol=5, buffer_callback=buffers.append)
        else:
            try:
                data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
            except TypeError:
                # e.g. a memoryview nested in a container: the slow pickler can send it.
                buffers.clear()
                try:
                    data = _dumps_slow(obj, buffers)
                except Exception:
                    buffers.clear()
                    raise
    if not buffers:
        return Encoded(L.RT_PICKLE, len(data), memoryview(data))
    raws = [b.raw() for b in buffers]
    lens = [r.nbytes for r in raws]
    pickle_off, offsets, total = L.oob_layout(len(data), lens)
    head = bytearray(pickle_off)
    L.OOB_HEADER.pack_into(head, 0, len(raws), 0, len(data))
    for i, n in enumerate(lens):
        head[L.OOB_HEADER.size + 8 * i : L.OOB_HEADER.size + 8 * i + 8] = n.to_bytes(8, "little")
    parts = [(0, memoryview(head)), (pickle_off, memoryview(data))]
    parts += zip(offsets, raws, strict=True)
    return Encoded(L.RT_PICKLE_OOB, total, None, parts)


def write_into(enc: Encoded, dest: memoryview) -> None:
    """Copy an encoded payload into ``dest`` (a side segment): one copy per part."""
    if enc.payload is not None:
        dest[: enc.n] = enc.payload
        return
    for off, view in enc.parts:
        dest[off : off + view.nbytes] = view


def decode(rtype: int, payload: bytes | bytearray | memoryview) -> Any:
    """Turn a received record back into an object.

    Raises UnknownRecordType for a type this codec does not know or a malformed frame,
    and whatever unpickling raises for a payload that cannot be unpickled here (as
    multiprocessing would).
    """
    if rtype == L.RT_BYTES:
        return payload if type(payload) is bytes else bytes(payload)
    if rtype == L.RT_PICKLE:
        return pickle.loads(payload)
    if rtype == L.RT_PICKLE_OOB:
        pickled, buffers = _oob_frame(payload)
        return pickle.loads(pickled, buffers=buffers)
    raise UnknownRecordType(rtype, "not a record type this version of shmchan decodes")


def _oob_frame(payload: bytes | bytearray | memoryview) -> tuple[memoryview, list[memoryview]]:
    """Split a PICKLE_OOB payload into the pickle and its buffers (docs/layout.md 2.4)."""
    view = memoryview(payload)
    try:
        count, _, pickle_len = L.OOB_HEADER.unpack_from(view, 0)
        if L.OOB_HEADER.size + 8 * count > view.nbytes:
            raise ValueError("buffer table does not fit")
        lens = [int.from_bytes(view[16 + 8 * i : 24 + 8 * i], "little") for i in range(count)]
    except (struct.error, ValueError) as exc:
        raise UnknownRecordType(L.RT_PICKLE_OOB, f"malformed out-of-band frame: {exc}") from exc
    pickle_off, offsets, total = L.oob_layout(pickle_len, lens)
    if total > view.nbytes:
        raise UnknownRecordType(L.RT_PICKLE_OOB, "out-of-band framing does not fit the record")
    buffers = [view[o : o + n] for o, n in zip(offsets, lens, strict=True)]
    return view[pickle_off : pickle_off + pickle_len], buffers


class UnknownRecordType(Exception):
    """Internal: a record this codec cannot decode (the faces turn it into
    UndecodableMessage)."""

    def __init__(self, rtype: int, why: str) -> None:
        super().__init__(f"record of type {rtype}: {why}")
        self.rtype = rtype
