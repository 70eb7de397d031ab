"""The decision rules, for every database family: what the guard does with a connection
before its first network operation after an idle period.

It reads top to bottom like "How the guard decides" (DESIGN.md):

1. a connection known to be lost is replaced, or raises inside a transaction;
2. past ``CONN_MAX_AGE``: replaced (outside a transaction);
3. a socket readable while no statement is in flight: the server closed or killed the
   session, so it is replaced before anything is sent (inside a transaction: raise);
4. idle past the limit (the server's idle timeout minus the margin): replaced; inside a
   transaction only once the server's own timeout has passed (raise), else kept;
5. idle past ``PING_AFTER``: pinged, and replaced if the ping fails.

Vendor facts (limits, what a readable socket says, the ping) come from the connection's
:class:`~.families.base.Family`: nothing here names a vendor or a driver.
Must never import: a concrete family, the wrappers, or anything above the guard.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ..signals import connection_recycled
from . import fork, sockets
from .causes import Cause, explain, network_evidence
from .disconnects import FORK, Disconnect
from .families import classify
from .families.base import Driver
from .messages import lost_in_transaction
from .state import INF, ConnectionState, now

__all__ = [
    "before",
    "close_connection",
    "connection_failed",
    "cursor_owner",
    "discard",
    "failure_cause",
    "in_transaction",
    "mark_lost",
    "rebind",
    "recycled",
]

logger = logging.getLogger("django_dbkeepalive")

# A server-side close after a pause this long is worth reporting even before the
# guard has learnt the server's idle timeout (a KILL right after a statement is not).
NOTABLE_IDLE = 1.0
_ANY_DRIVER = Driver()
# Losses after which the server may still hold the session (the network went silent).
ZOMBIE_KINDS = ("timeout", "dead_peer")
#: The reasons for closing a live connection whose node refused a statement.
REFUSED = ("read_only", "not_ready")


def in_transaction(db: Any) -> bool:
    """Inside an atomic block, or with autocommit off."""
    return bool(db.in_atomic_block or not db.autocommit)


def ours(db: Any, state: ConnectionState | None) -> bool:
    """``state`` describes ``db``'s current driver connection."""
    return state is not None and db.connection is not None and db.connection is state.conn


def before(db: Any, cursor: Any = None, *, force: bool = False) -> None:
    """The slow path, taken at most every ``PEEK_AFTER`` seconds of activity and before
    the first operation after an idle period, or at once when the connection is lost.

    ``cursor``: the ``CursorWrapper`` about to run a statement (rebound to a new
    connection if the guard replaced it). ``force``: check although the guard is off for
    this wrapper (a check between units of work, which starts no statement).

    ``idle`` below counts from the last time this path ran, so it is an upper bound
    (off by at most ``PEEK_AFTER`` plus the last statement's duration); decisions near
    the limit are refined with the kernel's count of how long the server has been silent.
    """
    state: ConnectionState = db._dbkeepalive
    if cursor is not None:
        state.ended = False  # a statement after COMMIT/ROLLBACK: new transaction work
    guarded = force or state.on
    if db.connection is None:
        if cursor is not None and guarded:
            db.ensure_connection()
            rebind(cursor, db)
        return
    if db.connection is not state.conn or not guarded:
        return  # being opened right now (connect() runs set_autocommit), or not ours
    moment = now()
    idle = moment - state.last
    in_tx = in_transaction(db)
    if state.lost is not None:
        if in_tx:
            raise lost_in_transaction(
                db, state, state.why or explain(state.lost.kind), idle, refused=state.lost.alive
            )
        lost = state.lost
        discard(db, "fork" if lost is FORK else lost.kind if lost.alive else "disconnected", idle)
    else:
        _check(db, state, idle, in_tx)
    current: ConnectionState = db._dbkeepalive
    if not force and ours(db, current) and current.lost is None:
        assert current.cfg is not None
        current.last = moment
        current.due = moment + current.cfg.peek_after if current.on else INF
    if cursor is not None:
        db.ensure_connection()
        rebind(cursor, db)


def _check(db: Any, state: ConnectionState, idle: float, in_tx: bool) -> None:
    family = state.family
    cfg = state.cfg
    assert cfg is not None
    # 2. Too old: CONN_MAX_AGE = 0 means "per request" (Django closes it at the request's
    # end), not "close before every statement".
    if not in_tx and _obsolete(db):
        discard(db, "max_age", idle, graceful=True)
        return
    # 3. Readable while idle: why, without consuming what the driver may need. None: a
    # message for the driver (a PostgreSQL notification); the session is fine.
    closed = family.readable_cause(db, state) if sockets.peek(state) else None
    limit = state.limit
    server_tx = family.tx_timeout(state) if in_tx else None
    ping_after = cfg.ping_after if family.can_ping else None
    kernel = None
    if (
        (closed is not None and closed[0] != "data")
        or limit is None
        or idle > limit
        or (server_tx is not None and idle > server_tx)
        or (ping_after is not None and idle > ping_after)
    ):
        # `idle` counts from the last visit here, so it may include a long statement's
        # own duration; the kernel knows how long the server has been silent (TCP only;
        # not once the server sent something, which resets that count).
        kernel = sockets.kernel_idle(state)
        if kernel is not None:
            idle = min(idle, kernel)
    if closed is not None:
        if idle > (limit if limit is not None else NOTABLE_IDLE):
            _note_idle(state, idle, limit if limit is not None else INF)
        cause = family.closed_cause(state, closed[0], closed[1], idle)
        if in_tx:
            mark_lost(
                db, Disconnect(family.gone_code, "gone", not_sent=True, retryable=True), cause
            )
            raise lost_in_transaction(db, state, cause, idle)
        discard(db, "disconnected", idle, cause=cause)
        return
    pinged = False
    if limit is None and family.may_learn_late(state, in_tx):
        # Opened while nothing guarded it (AUTO_GUARD off, outside any scope): learn the
        # limits now, on a session that just answered the peek (a round trip, so no
        # ping is needed after it).
        try:
            family.learn_late(db, state)
        except Exception as exc:
            connection_failed(db, idle, in_tx, exc)
            return
        limit, pinged = state.limit, True
    if limit is not None and idle > limit and kernel is None and family.can_ping and not pinged:
        # No TCP (a local socket, where nothing drops a flow silently): ask the server
        # rather than drop a session that a long statement may have kept busy.
        _ping(db, state, idle, in_tx)
        return
    if limit is not None and idle > limit:
        _note_idle(state, idle, limit)
        if not in_tx:
            discard(db, "idle", idle)
            return
    if in_tx:
        server_tx = family.tx_timeout(state)
        if server_tx is not None and idle >= server_tx:
            # The server has closed it, or a network device dropped it silently: either
            # way the transaction is gone; do not wait on the socket.
            cause = explain(
                "idle_timeout", idle=idle, wait=server_tx, setting=family.tx_timeout_setting
            )
            mark_lost(db, Disconnect(2013, "idle_timeout", False, True), cause)
            raise lost_in_transaction(db, state, cause, idle)
        if limit is not None and idle > limit:
            return  # still inside the server's timeout: the session is alive, go on
    if not pinged and ping_after is not None and idle > ping_after:
        _ping(db, state, idle, in_tx)
    elif not pinged and state.sock is None and family.watches_socket and family.can_ping:
        # No socket to peek at (Connector/Python's C extension keeps it inside
        # libmysqlclient): after a pause, the ping is the peek. Otherwise a session the
        # server closed while idle would show only when a statement fails, too late to
        # reconnect if that statement opens a transaction.
        _ping(db, state, idle, in_tx, reason="disconnected")


def _obsolete(db: Any) -> bool:
    return bool(
        db.settings_dict.get("CONN_MAX_AGE") and db.close_at is not None and now() >= db.close_at
    )


def _note_idle(state: ConnectionState, idle: float, limit: float) -> None:
    over = state.over
    if over is None or idle > over[0]:
        state.over = (idle, limit)


def _ping(
    db: Any, state: ConnectionState, idle: float, in_tx: bool, reason: str = "ping_failed"
) -> None:
    try:
        state.family.ping(db, state)
    except Exception as exc:
        connection_failed(db, idle, in_tx, exc, reason)


def connection_failed(
    db: Any, idle: float, in_tx: bool, exc: BaseException, reason: str = "ping_failed"
) -> None:
    """A ping (or a read of the server's limits) failed: the connection is lost.
    ``reason``: the ``connection_recycled`` reason."""
    state: ConnectionState = db._dbkeepalive
    found = classify(exc) or Disconnect(2013, "lost", False, True)
    cause = failure_cause(db, state, found, exc)
    if cause.kind in ("gone", "lost"):
        # Without a socket to peek (Connector/Python's C extension) the ping is what
        # finds the close: the idle time against the server's limit narrows it down.
        family = state.family
        cause = explain(cause.kind, idle=idle, wait=state.wait, setting=family.timeout_setting)
    if in_tx:
        mark_lost(db, Disconnect(2013, "lost", False, True), cause)
        raise lost_in_transaction(db, state, cause, idle, code_of(exc)) from exc
    discard(db, reason, idle, cause=cause)


def read_timeout(db: Any, state: ConnectionState) -> float | None:
    """The client read_timeout this connection was opened with, if any (seconds)."""
    options = db.settings_dict.get("OPTIONS") or {}
    value = options.get("read_timeout")
    if value is None and state.cfg is not None and state.cfg.client_timeouts:
        value = state.cfg.client_timeouts.get("read_timeout")
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def failure_cause(
    db: Any, state: ConnectionState, found: Disconnect, exc: BaseException | None
) -> Cause:
    """Why a statement (or ping) failed with a disconnect, as far as can be told."""
    kind = found.kind
    if kind == "timeout":  # the driver's own timeout class (Connector/Python's)
        return explain(kind, read_timeout=read_timeout(db, state))
    if exc is not None and kind in ("lost", "network", "gone", "closed"):
        evidence = network_evidence(exc)
        timeout = read_timeout(db, state)
        # Some drivers say the same for a timeout as for a close (Connector/Python's
        # cursor() even pings and then says "not available"); the time since the slow
        # path last ran (at most PEEK_AFTER before the statement started) tells a read
        # that waited out read_timeout.
        if (
            evidence is None
            and state.driver.timeouts_look_like_closes
            and kind in ("lost", "closed")
            and timeout
            and now() - state.last >= timeout * 0.95
        ):
            evidence = "timeout"
        if evidence is not None:
            return explain(evidence, read_timeout=timeout)
    return state.family.failure_cause(state, found)


def code_of(exc: BaseException | None) -> int | None:
    """The MySQL error code of a lost connection, for ``ConnectionLostInTransaction``."""
    found = None if exc is None else classify(exc)
    return found.code if found is not None and found.code > 0 else None


def recycled(db: Any, reason: str, idle: float, cause: Cause | None = None) -> None:
    """Log and signal (``connection_recycled``) that the guard replaced a connection."""
    if not 0.0 <= idle < INF:
        idle = 0.0  # no idle period (a statement was in flight)
    logger.info(
        "dbkeepalive: recycled the %r connection (reason: %s, idle %.1fs%s)",
        db.alias,
        reason,
        idle,
        "" if cause is None else f"; {cause.what}",
    )
    connection_recycled.send(sender=db.alias, reason=reason, idle=idle)


def discard(
    db: Any, reason: str, idle: float, *, graceful: bool = False, cause: Cause | None = None
) -> None:
    """Close the connection outside a transaction; the next statement reconnects.
    ``graceful``: the session is alive (``CONN_MAX_AGE``), say goodbye to it."""
    state: ConnectionState = db._dbkeepalive
    graceful = graceful or (state.lost is not None and state.lost.alive)
    if not graceful and sockets.detach(state):
        state.family.dropped(db, fork=False)
    elif reason in REFUSED:
        # Alive, on a node that cannot serve it: closed properly, never pooled again.
        state.family.dropped(db, fork=False)
    if not db.autocommit and not db.in_atomic_block:
        state.manual = True
    with contextlib.suppress(Exception):  # the driver's close of a dead link
        db.close()
    if not db.in_atomic_block:
        db.connection = None
    state.conn = None
    sockets.forget(state)
    state.lost = None
    state.due = -INF  # a cursor still bound to the old connection takes the slow path
    state.why = cause if cause is not None else state.why
    fork.untrack(db)
    recycled(db, reason, idle, cause)


def mark_lost(db: Any, disconnect: Disconnect, cause: Cause | None = None) -> None:
    """The connection is dead: later operations fail at once instead of hanging, and
    the next statement replaces it (or raises, inside a transaction)."""
    state: ConnectionState = db._dbkeepalive
    if not disconnect.alive and sockets.detach(state):
        state.family.dropped(db, fork=False)
    state.lost = disconnect
    state.why = cause if cause is not None else explain(disconnect.kind)
    state.due = -INF
    if state.why.kind in ZOMBIE_KINDS and state.session is not None:
        state.zombie = state.session  # the next connection ends it


def _driver_cursor(cursor: Any) -> Any:
    inner = cursor.cursor
    return getattr(inner, "cursor", inner)  # Django's MySQL backend wraps the driver's


def _driver(db: Any) -> Driver:
    state: ConnectionState | None = getattr(db, "_dbkeepalive", None)
    return _ANY_DRIVER if state is None else state.driver


def cursor_owner(cursor: Any, db: Any) -> Any:
    """The driver connection a ``CursorWrapper``'s driver cursor belongs to, or ``None``."""
    try:
        return _driver(db).cursor_owner(_driver_cursor(cursor))
    except Exception:
        return None


def orphan(cursor: Any, db: Any = None) -> None:
    """Unbind a driver cursor from its dead connection, so closing it later is a no-op
    (the MySQL drivers' ``close()`` would otherwise talk to the closed connection and
    raise a raw driver error from the caller's cleanup code)."""
    with contextlib.suppress(Exception):
        _driver(db).orphan_cursor(_driver_cursor(cursor))


def rebind(cursor: Any, db: Any) -> None:
    """Point a cursor object created before a reconnect at the new connection."""
    if cursor_owner(cursor, db) is db.connection:
        return
    orphan(cursor, db)
    cursor.cursor = db.create_cursor()


def close_connection(db: Any) -> None:
    """Close ``db``'s connection; a dead one without waiting on its socket."""
    if db.connection is None:
        return
    state: ConnectionState | None = getattr(db, "_dbkeepalive", None)
    if state is not None and (state.lost is not None or sockets.peek(state)):
        sockets.detach(state)
    try:
        db.close()
    except Exception:  # closing a dead link: nothing to save
        if not db.in_atomic_block:
            db.connection = None
