"""Backend registry: a name ("posix", "sysv", "mmap") to a backend instance.

Each backend lives in its own module that ends with ``backend_class = ...``; the
module is imported on first use and cached, so a missing optional dependency only
matters to the backend that needs it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Final

from .._errors import BackendUnavailable
from ._base import Backend

BACKENDS: Final = ("posix", "sysv", "mmap")
DEFAULT_BACKEND: Final = "posix"
_MODULES: Final = {"posix": "posix", "sysv": "sysv", "mmap": "mmapfile"}
_loaded: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """Return the backend called ``name``; raise BackendUnavailable if it can't load."""
    try:
        return _loaded[name]
    except KeyError:
        pass
    if name not in _MODULES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        module = import_module(f"{__name__}.{_MODULES[name]}")
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} cannot be loaded: {exc}") from exc
    backend: Backend = module.backend_class()
    _loaded[name] = backend
    return backend


def available_backends() -> tuple[str, ...]:
    """The backends that load on this machine."""
    out = []
    for name in BACKENDS:
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        out.append(name)
    return tuple(out)
