"""The connection guard: checks a connection before its first network operation after
an idle period, replaces one the server closed, and never reconnects inside a
transaction.

This module is the guard's small internal API, used by the rest of the app
(``fresh_connection``, the middleware, Celery, the testing toolkit, the checks and the
diagnose command); none of them reads the guard's state directly. The package:

- :mod:`.rules` — the decision rules, vendor-neutral; :mod:`.failures` — a failed
  statement; :mod:`.transactions` — a transaction's edges; :mod:`.connect` — opening;
- :mod:`.wrappers` — where Django's code calls in; :mod:`.install` — putting them in place;
- :mod:`.families` — one module per database family behind one interface, with a
  thin adapter per driver; :mod:`.sockets` — socket primitives; :mod:`.fork` — forks;
- :mod:`.state` — the per-connection state; :mod:`.causes`, :mod:`.messages` — words.

Must never import: anything above the guard (fresh, middleware, checks, diagnose,
testing, contrib, backends).
"""

from __future__ import annotations

from typing import Any

from . import sockets
from .connect import arm, state_for
from .families import classify, driver_of, family_of
from .families.base import limit_for
from .install import install, is_installed, is_patched, uninstall
from .rules import before, close_connection, in_transaction, recycled
from .state import INF, ConnectionState, now, state_of

__all__ = [
    "check_idle",
    "classify",
    "close_connection",
    "connect_without_retry",
    "disable",
    "driver_of",
    "enable",
    "family_of",
    "idle_limits",
    "in_transaction",
    "install",
    "is_guarded",
    "is_installed",
    "is_patched",
    "limit_for",
    "notice_at_next_statement",
    "notify_closed",
    "pretend_idle",
    "socket_family",
    "state_of",
    "take_idle_report",
    "unguarded",
    "uninstall",
    "unwatch_until_reconnect",
]


def unguarded(db: Any) -> str | None:
    """Why the guard cannot protect ``db``'s connections (a MySQL or PostgreSQL backend
    whose driver it does not know, or a driver older than it supports), or ``None``."""
    return family_of(db).unguarded(db)


def check_idle(db: Any) -> None:
    """Close ``db``'s connection if it is dead, idle past its limit or obsolete (outside a
    transaction only), whether or not the automatic guard is on. Used at the edges of a
    unit of work; costs a round trip only when a ping is due."""
    state = state_of(db)
    if db.connection is None or state is None or state.unguarded or in_transaction(db):
        return
    before(db, force=True)


def connect_without_retry(db: Any) -> None:
    """``db`` connects at once, never riding through an outage (``RETRY_CONNECT_FOR``):
    the diagnostic connections of the checks and ``manage.py dbkeepalive``, which report
    an unreachable server rather than wait for it."""
    state_for(db).no_connect_retry = True


def enable(db: Any) -> None:
    """Guard ``db`` even when ``AUTO_GUARD`` is off, until the matching :func:`disable`."""
    state = state_for(db)
    state.forced += 1
    arm(db, state)


def disable(db: Any) -> None:
    """End one :func:`enable` scope."""
    state = state_for(db)
    state.forced = max(0, state.forced - 1)
    arm(db, state)


def is_guarded(db: Any) -> bool:
    """Whether the guard is on for ``db``'s current connection."""
    state = state_of(db)
    return state is not None and state.on and db.connection is state.conn


def take_idle_report(db: Any) -> tuple[float, float] | None:
    """``(idle, limit)`` of the longest idle past the limit since the last call, or None.

    ``limit`` is ``inf`` when the server closed the connection before the guard had read
    its idle timeout."""
    state = state_of(db)
    if state is None:
        return None
    report, state.over = state.over, None
    return report


def notify_closed(db: Any, reason: str) -> None:
    """Report a connection that Django's own checks closed on the guard's behalf."""
    state = state_of(db)
    last = state.last if state is not None else INF
    idle = now() - last if last not in (INF, -INF) else 0.0
    recycled(db, reason, idle)


# ------------------------------------------------------------- testing toolkit


def notice_at_next_statement(db: Any) -> None:
    """The next statement takes the slow path, as after a pause (it sees a KILL)."""
    state = state_of(db)
    if state is not None and state.on:
        state.due = -INF


def unwatch_until_reconnect(db: Any) -> None:
    """As if the last statement had just run, and without the peek before statements
    that would not be re-run, until the next connection: the next statement is sent on
    the connection as it is (the KILL "arrives while it is on its way")."""
    state = state_of(db)
    if state is not None and state.on and state.cfg is not None:
        state.due = now() + state.cfg.peek_after
        state.poll = None


def idle_limits(db: Any) -> tuple[float | None, float | None]:
    """``(limit, wait)`` of ``db``'s connection, read from the server first if the guard
    has not done so yet (a connection opened while nothing guarded it)."""
    state = state_of(db)
    if state is None or state.conn is not db.connection or state.cfg is None:
        raise LookupError("the connection is not known to the guard")
    if state.limit is None and state.family.may_learn_late(state, in_transaction(db)):
        state.family.learn_late(db, state)
    return state.limit, state.wait


def pretend_idle(db: Any, idle: float) -> None:
    """Make ``db``'s connection look idle for ``idle`` seconds at its next check, to the
    guard's clock and to the kernel's count it trusts over it (TCP_INFO)."""
    state = state_of(db)
    if state is None:
        raise LookupError("the connection is not known to the guard")
    state.last = now() - idle
    state.idle_shift = idle
    if state.on and state.cfg is not None:
        state.due = state.last + state.cfg.peek_after


def socket_family(db: Any) -> int | None:
    """The address family of ``db``'s socket (``socket.AF_INET``, ``AF_UNIX``...)."""
    state = state_of(db)
    return None if state is None else sockets.socket_family(state)


__all__ += ["ConnectionState"]
