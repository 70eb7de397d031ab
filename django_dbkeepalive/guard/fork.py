"""Fork safety: a forked child never uses, nor says goodbye on, a connection it
inherited from its parent.

Owns: the registry of wrappers with an open connection (every thread's, since a child
has only the forking thread) and what the child does with each right after ``fork()``:
its socket is pointed at ``/dev/null`` (so the parent's session is untouched), and the
connection is dropped, or marked lost when the fork happened inside a transaction. A
connection whose socket the guard cannot reach is never closed nor freed in the child.
Must never import: the rules or the wrappers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from typing import Any

from ..signals import connection_recycled
from . import sockets
from .causes import explain
from .disconnects import FORK
from .state import INF, state_of

__all__ = ["register", "track", "untrack"]

logger = logging.getLogger("django_dbkeepalive")

# Every wrapper with an open connection, in every thread, so a forked child can detach
# sockets it inherited from threads it no longer has.
_open: weakref.WeakSet[Any] = weakref.WeakSet()
# Driver connections a forked child inherited from other threads. They are kept alive
# (their sockets already point at /dev/null) because freeing one could wait forever on a
# lock that a thread of the parent held at fork time.
_inherited: list[Any] = []
_active = False
_registered = False
_lock = threading.Lock()


def track(db: Any) -> None:
    """``db`` has an open connection of the guard's."""
    _open.add(db)


def untrack(db: Any) -> None:
    """``db``'s connection was closed or dropped."""
    _open.discard(db)


def set_active(active: bool) -> None:
    """Detach inherited connections in forked children (while the guard is installed)."""
    global _active
    _active = active


def _after_fork_in_child() -> None:
    """Drop every connection inherited from the parent without touching its socket."""
    if not _active:
        return
    me = threading.get_ident()
    for db in list(_open):
        try:
            _release(db, own=getattr(db, "_thread_ident", None) == me)
        except Exception:  # never break the child over a connection it won't use
            logger.debug("dbkeepalive: could not detach a connection after fork", exc_info=True)


def _release(db: Any, *, own: bool) -> None:
    conn = db.connection
    state = state_of(db)
    if conn is None or state is None:
        return
    detached = sockets.detach(state)
    state.family.dropped(db, fork=True)
    if db.in_atomic_block and own:
        # Forked inside a transaction: the child cannot continue it. The next statement
        # raises ConnectionLostInTransaction; after the block, it reconnects.
        state.lost = FORK
        state.why = explain(FORK.kind)
        state.due = -INF
        state.on = True
        return
    db.connection = None
    state.conn = None
    state.due = -INF
    untrack(db)
    if not detached:
        _keep_forever(conn)
    elif own:
        with contextlib.suppress(Exception):
            conn.close()  # its socket is /dev/null now: frees the descriptor only
    else:
        _inherited.append(conn)
    if own:
        connection_recycled.send(sender=db.alias, reason="fork", idle=0.0)


def _keep_forever(conn: Any) -> None:
    """A connection whose socket the guard cannot reach (Connector/Python's C extension
    keeps it inside libmysqlclient): closing or freeing it, even at the child's exit,
    would send the server a goodbye on the socket the parent still uses. It is never
    freed: one more reference that nothing drops."""
    _inherited.append(conn)
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))
    except Exception:  # not CPython: the list keeps it until the interpreter's end
        logger.debug("dbkeepalive: could not pin an inherited connection", exc_info=True)


def register() -> None:
    """Register the child handler with the interpreter (once per process)."""
    global _registered
    with _lock:
        if not _registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
        _registered = True
