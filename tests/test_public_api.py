"""The public surface: __all__ is exact, and every error is also the stdlib type."""

from __future__ import annotations

import errno
import io
import queue

import pytest

import shmchan


def test_all_is_a_sorted_tuple_of_every_public_name() -> None:
    assert isinstance(shmchan.__all__, tuple)
    future = {"annotations"}  # `from __future__ import annotations` leaves this name behind
    public = {n for n in vars(shmchan) if not n.startswith("_") and n not in future} | {"__version__"}
    assert set(shmchan.__all__) == public

    # ruff's RUF022 order: CONSTANTS, then Classes, then everything else, each sorted.
    def group(n: str) -> tuple[int, str]:
        return (0 if n.isupper() else 1 if n[:1].isupper() else 2, n)

    assert list(shmchan.__all__) == sorted(shmchan.__all__, key=group)


@pytest.mark.parametrize(
    ("cls", "stdlib"),
    [
        (shmchan.Empty, queue.Empty),
        (shmchan.Full, queue.Full),
        (shmchan.MessageTooLarge, ValueError),
        (shmchan.ClosedChannel, ValueError),
        (shmchan.EndOfChannel, EOFError),
        (shmchan.BrokenChannel, BrokenPipeError),
        (shmchan.WrongMode, io.UnsupportedOperation),
        (shmchan.UndecodableBatch, ValueError),
        (shmchan.UndecodableMessage, ValueError),
        (shmchan.LayoutError, ValueError),
        (shmchan.NotAShmchanSegment, shmchan.LayoutError),
        (shmchan.IncompatibleLayout, shmchan.LayoutError),
        (shmchan.CorruptChannel, shmchan.LayoutError),
        (shmchan.InitializationTimeout, TimeoutError),
        (shmchan.ChannelExists, FileExistsError),
        (shmchan.ChannelNotFound, FileNotFoundError),
        (shmchan.AccessDenied, PermissionError),
        (shmchan.UntrustedChannel, shmchan.AccessDenied),
        (shmchan.TooManyPeers, OSError),
        (shmchan.NoSpace, OSError),
        (shmchan.BackendUnavailable, ImportError),
        (shmchan.BadURL, ValueError),
        (shmchan.RemoteError, OSError),
        (shmchan.RemoteUnavailable, ConnectionError),
        (shmchan.RemoteTimeout, TimeoutError),
        (shmchan.RemoteTimeout, ConnectionError),
        (shmchan.RemoteAuthFailed, PermissionError),
        (shmchan.RemoteAuthFailed, ConnectionError),
    ],
)
def test_errors_subclass_the_stdlib_type(cls: type, stdlib: type) -> None:
    assert issubclass(cls, shmchan.ShmchanError)
    assert issubclass(cls, stdlib)
    assert cls.__doc__


def test_no_space_carries_enospc() -> None:
    err = shmchan.NoSpace("tmpfs full")
    assert err.errno == errno.ENOSPC and "tmpfs full" in str(err)


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (shmchan.TooManyPeers, errno.EUSERS),
        (shmchan.AccessDenied, errno.EACCES),
        (shmchan.UntrustedChannel, errno.EACCES),
        (shmchan.ChannelExists, errno.EEXIST),
        (shmchan.ChannelNotFound, errno.ENOENT),
    ],
)
def test_os_errors_carry_their_errno(cls: type[OSError], code: int) -> None:
    err = cls("what happened")
    assert err.errno == code and "what happened" in str(err)


def test_layout_version() -> None:
    assert shmchan.LAYOUT_VERSION == (2, 0)


def test_backends() -> None:
    assert shmchan.BACKENDS == ("posix", "sysv", "mmap")
    assert shmchan.DEFAULT_BACKEND == "posix"
    assert set(shmchan.available_backends()) <= set(shmchan.BACKENDS)


def test_every_package_is_in_the_distribution() -> None:
    """pyproject.toml lists the packages a wheel carries: every directory of shmchan/
    with an ``__init__.py`` must be there (a missing one works in an editable install
    and is absent from a user's)."""
    import tomllib
    from pathlib import Path

    root = Path(shmchan.__file__).resolve().parent
    with open(root.parent / "pyproject.toml", "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(root.parent).parts)
        for p in root.rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found == listed
