"""A statement failed: re-raise it, raise ``ConnectionLostInTransaction``, or run it
once more on a new connection.

Owns: when a failed statement may run again (never inside a transaction; always when
it provably never reached the server; a session-independent read when ``RETRY_READS``
allows), re-running it, and the note that tells the caller what happened otherwise.
Vendor facts (which error is a loss, a statement refused for its size) come from the
connection's family.
Must never import: a concrete family, the wrappers, or anything above the guard.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from .disconnects import UNKNOWN_STATE
from .families import classify
from .families.base import Statement
from .messages import lost_in_transaction, note_failure
from .refusals import statement_refused
from .rules import (
    close_connection,
    code_of,
    discard,
    failure_cause,
    in_transaction,
    mark_lost,
    orphan,
    ours,
    rebind,
)
from .state import INF, ConnectionState
from .statements import is_read, is_retryable_read

__all__ = ["statement_failed"]

logger = logging.getLogger("django_dbkeepalive")


def may_rerun(db: Any, exc: BaseException, sql: Any, read_ok: bool) -> bool:
    """Whether a failed statement may run again: never in a transaction; always when it
    provably never reached the server; a session-independent read when allowed."""
    if in_transaction(db):
        return False
    found = classify(exc)
    if found is None:
        return False
    if found.not_sent:
        return True
    cfg = db._dbkeepalive.cfg
    return read_ok and cfg is not None and cfg.retry_reads and is_retryable_read(sql)


def statement_failed(
    db: Any, cursor: Any, exc: BaseException, run: Callable[[], Any], statement: Statement
) -> Any:
    """``execute()``/``executemany()`` failed with ``exc``; ``run`` runs it again.
    Called inside the ``except`` block of the wrapper (so a bare ``raise`` re-raises)."""
    sql, params, many = statement
    # An iterator of parameter rows was consumed by the first attempt: never re-run it.
    rerunnable = not many or isinstance(params, (list, tuple))
    retry = run if rerunnable and may_rerun(db, exc, sql, read_ok=not many) else None
    return failed(db, cursor, exc, retry, statement, run if rerunnable else None)


def _read_limit(db: Any) -> int | None:
    """The server's ``max_allowed_packet``, read on a new connection (outside a
    transaction only: the next statement would open one anyway). ``None`` if unknown."""
    if in_transaction(db):
        return None
    try:
        db.ensure_connection()
        state: ConnectionState = db._dbkeepalive
        cursor = db.connection.cursor()
        try:
            cursor.execute("SELECT @@SESSION.max_allowed_packet")
            row = cursor.fetchone()
        finally:
            cursor.close()
    except Exception:  # the server is gone too: the sizes stay unknown
        with contextlib.suppress(Exception):
            close_connection(db)
        return None
    state.max_packet = int(row[0])
    return state.max_packet


def failed(
    db: Any,
    cursor: Any,
    exc: BaseException,
    retry: Callable[[], Any] | None,
    statement: Statement | None = None,
    run: Callable[[], Any] | None = None,
) -> Any:
    """A statement failed. Re-raise, raise ``ConnectionLostInTransaction``, or re-run it.

    ``retry`` re-runs the statement; it is given only when running it again could not
    write anything twice. ``run`` runs it again whatever it is, for a statement a node
    refused before running it (:mod:`.refusals`). ``statement`` is ``(sql, params,
    many)`` when known, for the message only.
    """
    state: ConnectionState | None = getattr(db, "_dbkeepalive", None)
    if state is None or not state.on or not ours(db, state):
        raise exc  # not ours, or being set up right now (connect() handles that)
    if not isinstance(exc, Exception):
        # Interrupted mid-statement (Ctrl-C): the protocol state is unknown.
        if state.family.watches_socket:
            mark_lost(db, UNKNOWN_STATE)
        raise exc
    refused = state.family.refusal(db, state, exc)
    if refused is not None:
        return statement_refused(db, state, cursor, exc, refused, run)
    found = classify(exc)
    if found is None:
        raise exc
    idle = -INF  # the statement was in flight: there was no idle period to report
    if cursor is not None:
        orphan(cursor, db)
    family = state.family
    cause = failure_cause(db, state, found, exc)
    if in_transaction(db):
        refusal = family.size_refusal(db, state, found, statement, True)
        mark_lost(db, found, refusal or cause)
        raise lost_in_transaction(db, state, refusal or cause, idle, code_of(exc)) from exc
    mark_lost(db, found, cause)
    discard(db, "disconnected", idle, cause=cause)
    refusal = family.size_refusal(db, state, found, statement, False, lambda: _read_limit(db))
    if refusal is not None:
        note_failure(exc, db.alias, refusal, rerun="never")
        raise exc
    if retry is None or not found.retryable:
        sql = statement[0] if statement is not None else None
        note_failure(exc, db.alias, cause, rerun="read" if is_read(sql) else "unknown")
        raise exc
    try:
        db.ensure_connection()
    except Exception as again:
        note_failure(again, db.alias, cause, rerun="reconnect_failed")
        raise
    if cursor is not None:
        rebind(cursor, db)
    logger.info(
        "dbkeepalive: re-running a statement on a new %r connection after error %s (%s)",
        db.alias,
        found.label,
        cause.what,
    )
    try:
        return retry()
    except Exception as again:
        again_found = classify(again)
        if again_found is not None:
            again_cause = failure_cause(db, db._dbkeepalive, again_found, again)
            mark_lost(db, again_found, again_cause)
            discard(db, "disconnected", 0.0, cause=again_cause)
            note_failure(again, db.alias, again_cause, rerun="failed_again", first=cause)
        raise
