"""A node that refuses a statement before running it: the connection is alive but
points at the wrong node (read-only after a failover, a cluster node not ready).

Owns: the rules for such a refusal, for every family. Outside a transaction the
connection is closed properly, a new one is opened through the alias's HOST as
configured (so a moved endpoint is followed) and the statement, which never ran, runs
once more; a node that refuses it again gets the original error with a note naming its
state. Inside a transaction the guard raises ``ConnectionLostInTransaction`` (nothing of
the transaction was committed) and the first statement after the block gets a new
connection. Never reconnects inside a transaction.
Must never import: a concrete family, the wrappers, or anything above the guard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .causes import Cause, add_note
from .disconnects import Disconnect
from .messages import lost_in_transaction
from .rules import code_of, discard, in_transaction, mark_lost, orphan, rebind
from .state import INF, ConnectionState

__all__ = ["statement_refused"]

logger = logging.getLogger("django_dbkeepalive")


def _note(exc: BaseException, db: Any, cause: Cause, text: str) -> None:
    add_note(exc, f"django-dbkeepalive: database {db.alias!r}: {cause.what}. {text} {cause.advice}")


def statement_refused(
    db: Any,
    state: ConnectionState,
    cursor: Any,
    exc: BaseException,
    cause: Cause,
    run: Callable[[], Any] | None,
) -> Any:
    """The node refused the statement (``cause``, from the family); ``run`` runs it
    again (``None``: it cannot be, e.g. its parameter rows were an iterator). Called
    inside the wrapper's ``except`` block."""
    code = code_of(exc) or (exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0)
    refused = Disconnect(code, cause.kind, not_sent=True, retryable=True, alive=True)
    if cursor is not None:
        orphan(cursor, db)
    if in_transaction(db):
        # The transaction stays open on that node until it ends: the block's rollback
        # closes the connection properly, and the next statement gets a new one.
        mark_lost(db, refused, cause)
        raise lost_in_transaction(db, state, cause, -INF, code, refused=True) from exc
    node = state.family.node_state(db)
    discard(db, cause.kind, -INF, graceful=True, cause=cause)
    if run is None:
        _note(
            exc,
            db,
            cause,
            "It never ran; it was not run again (its parameters were "
            "consumed). The next statement uses a new connection.",
        )
        raise exc
    try:
        db.ensure_connection()
    except Exception as again:
        _note(again, db, cause, "It never ran, and connecting again to run it failed.")
        raise
    if cursor is not None:
        rebind(cursor, db)
    logger.info(
        "dbkeepalive: re-running a statement on a new %r connection: the previous node "
        "refused it (%s%s)",
        db.alias,
        cause.kind,
        f"; {node}" if node else "",
    )
    try:
        return run()
    except Exception as again:
        new_state: ConnectionState = db._dbkeepalive
        if new_state.family.refusal(db, new_state, again) is None:
            raise
        node = new_state.family.node_state(db) or "state unknown"
        discard(db, cause.kind, 0.0, graceful=True, cause=cause)
        _note(
            exc,
            db,
            cause,
            "It never ran. It was sent again once on a new connection, which reached a "
            f"node that refused it too ({node}), so the endpoint still points at a node that "
            "cannot serve it. The next statement connects again.",
        )
        raise exc from again
