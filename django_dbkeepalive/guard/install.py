"""Installing the guard in a process, and removing it.

Owns: replacing the methods of :data:`~.wrappers.CLASS_PATCHES` and the families'
backend patches (each replacement calls through what it replaced), the receivers of
``connection_created`` and ``setting_changed``, and fork handling. Removing it restores
a method only where the guard's replacement is still the one in place: a library that
wrapped it since keeps its wrapper, and the guard's, under it, only passes through.
Must never import: anything above the guard.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

from django.core.signals import setting_changed
from django.db import connections
from django.db.backends import utils as backend_utils
from django.db.backends.signals import connection_created

from ..conf import conf
from . import fork
from .connect import KNOWN, arm, connection_opened
from .families import FAMILIES
from .families.base import limit_for
from .state import ATTRIBUTE, state_of
from .wrappers import ACTIVE, BACKEND_WRAPS, CLASS_PATCHES, PATCHED, cursor_close

__all__ = ["install", "is_installed", "is_patched", "uninstall"]

_lock = threading.Lock()
# (class, name, original, replacement) of every method replaced.
_replaced: list[tuple[type, str, Any, Any]] = []


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    cls: type = getattr(importlib.import_module(module), name)
    return cls


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    connection_opened(connection)


def _on_setting_changed(setting: str, **kwargs: Any) -> None:
    if setting != "DBKEEPALIVE":
        return
    db: Any
    for db in connections.all(initialized_only=True):
        state = state_of(db)
        if state is not None and db.connection is not None and db.connection is state.conn:
            cfg = conf.for_alias(db.alias)
            state.cfg = cfg
            if cfg.wait_timeout is not None:
                state.wait = cfg.wait_timeout
            state.limit = None if state.wait is None else limit_for(state.wait, cfg.margin)
            arm(db, state)


def _replace(
    cls: type, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> None:
    if any(c is cls and n == name for c, n, _, _ in _replaced):
        return  # kept since an uninstall, under another library's wrapper: live again
    original = cls.__dict__[name]
    replacement = wrap(original)
    replacement.__wrapped__ = original  # type: ignore[attr-defined]
    replacement.__doc__ = getattr(original, "__doc__", None)
    setattr(cls, name, replacement)
    _replaced.append((cls, name, original, replacement))


def install(*, patch: bool = True) -> None:
    """Install the guard in this process (idempotent). Called by the app's ``ready()``.

    ``patch=False`` (``DBKEEPALIVE["PATCH"] = False``) replaces nothing of Django's: only
    connections of a backend built on :class:`~.native.GuardedWrapperMixin` (the
    ``django_dbkeepalive.backends`` ENGINEs) are guarded, by its own methods."""
    with _lock:
        if ACTIVE[0]:
            return
        if patch:
            for path, name, wrap in CLASS_PATCHES:
                _replace(_class(path), name, wrap)
            for family in FAMILIES:
                for cls, name, wrap in family.backend_patches():
                    _replace(cls, name, wrap)
                for cls, name in family.guarded_methods():
                    _replace(cls, name, BACKEND_WRAPS[name])
            if "close" not in backend_utils.CursorWrapper.__dict__:
                backend_utils.CursorWrapper.close = cursor_close  # type: ignore[attr-defined]
                _replaced.append((backend_utils.CursorWrapper, "close", None, cursor_close))
            # (A close already there is Django's own, or the guard's kept one.)
        PATCHED[0] = patch
        connection_created.connect(_on_connection_created, dispatch_uid="dbkeepalive-guard")
        setting_changed.connect(_on_setting_changed, dispatch_uid="dbkeepalive-settings")
        fork.set_active(True)
        fork.register()
        ACTIVE[0] = True
        # Existing connections (opened before the app was ready) get their state now.
        for db in connections.all(initialized_only=True):
            if db.connection is not None:
                _on_connection_created(type(db), db)


def uninstall() -> None:
    """Remove the guard (for tests and benchmarks that compare with plain Django)."""
    with _lock:
        if not ACTIVE[0]:
            return
        ACTIVE[0] = False
        PATCHED[0] = False
        kept = []
        for cls, name, original, replacement in reversed(_replaced):
            if cls.__dict__.get(name) is not replacement:
                # Wrapped since by another library: ours stays under it, passing through
                # (it guards only wrappers with a state), and is reused by install().
                kept.append((cls, name, original, replacement))
            elif original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
        _replaced[:] = kept
        connection_created.disconnect(dispatch_uid="dbkeepalive-guard")
        setting_changed.disconnect(dispatch_uid="dbkeepalive-settings")
        fork.set_active(False)
        for db in list(KNOWN):
            if ATTRIBUTE in vars(db):
                delattr(db, ATTRIBUTE)
        KNOWN.clear()


def is_installed() -> bool:
    """Whether the guard is installed in this process."""
    return ACTIVE[0]


def is_patched() -> bool:
    """Whether it is installed by patching Django's classes (``DBKEEPALIVE["PATCH"]``)."""
    return PATCHED[0]
