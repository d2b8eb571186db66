"""shmchan: multiprocessing-style channels over shared-memory ring buffers.

The byte layout is specified in docs/layout.md so that C, Go or Rust programs can
share a channel with Python.
"""

from __future__ import annotations

from ._backends import BACKENDS, DEFAULT_BACKEND, available_backends
from ._channel import DEFAULT_CAPACITY, Channel
from ._errors import (
    AccessDenied,
    BackendUnavailable,
    BadURL,
    BrokenChannel,
    ChannelExists,
    ChannelNotFound,
    ClosedChannel,
    CorruptChannel,
    Empty,
    EndOfChannel,
    Full,
    IncompatibleLayout,
    InitializationTimeout,
    LayoutError,
    MessageTooLarge,
    NoSpace,
    NotAShmchanSegment,
    RemoteAuthFailed,
    RemoteError,
    RemoteTimeout,
    RemoteUnavailable,
    ShmchanError,
    TooManyPeers,
    UndecodableBatch,
    UndecodableMessage,
    UntrustedChannel,
    WrongMode,
)
from ._layout import LAYOUT_MAJOR as _MAJOR
from ._layout import LAYOUT_MINOR as _MINOR
from ._queue import DEFAULT_QUEUE_CAPACITY, JoinableQueue, Queue, SimpleQueue
from ._select import aselect, select
from ._version import __version__

LAYOUT_VERSION = (_MAJOR, _MINOR)
"""The docs/layout.md version this build reads and writes: (major, minor)."""

__all__ = (
    "BACKENDS",
    "DEFAULT_BACKEND",
    "DEFAULT_CAPACITY",
    "DEFAULT_QUEUE_CAPACITY",
    "LAYOUT_VERSION",
    "AccessDenied",
    "BackendUnavailable",
    "BadURL",
    "BrokenChannel",
    "Channel",
    "ChannelExists",
    "ChannelNotFound",
    "ClosedChannel",
    "CorruptChannel",
    "Empty",
    "EndOfChannel",
    "Full",
    "IncompatibleLayout",
    "InitializationTimeout",
    "JoinableQueue",
    "LayoutError",
    "MessageTooLarge",
    "NoSpace",
    "NotAShmchanSegment",
    "Queue",
    "RemoteAuthFailed",
    "RemoteError",
    "RemoteTimeout",
    "RemoteUnavailable",
    "ShmchanError",
    "SimpleQueue",
    "TooManyPeers",
    "UndecodableBatch",
    "UndecodableMessage",
    "UntrustedChannel",
    "WrongMode",
    "__version__",
    "aselect",
    "available_backends",
    "select",
)
