"""The rules at a transaction's edges: entering it, committing, rolling back, leaving it.

Owns: never reconnecting inside a transaction; a ``COMMIT`` whose reply was lost
reported as such (its outcome is unknown), one lost before it was sent reported as
rolled back; and leaving manual mode (the end of an atomic block) on a connection the
server closed without ever leaving it lost with autocommit off, without reporting a
committed transaction as lost, and without dropping its ``on_commit`` hooks.
Must never import: a concrete family, the wrappers, or anything above the guard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import ConnectionLostInTransaction
from .causes import explain
from .disconnects import Disconnect
from .failures import failed
from .families import classify
from .messages import lost_in_transaction
from .rules import before, code_of, discard, failure_cause, in_transaction, mark_lost, ours
from .state import INF, ConnectionState, now

__all__ = [
    "before_commit",
    "commit_failed",
    "leaving_manual",
    "rollback_failed",
    "rolling_back",
    "set_autocommit",
]

SetAutocommit = Callable[..., Any]


def leaving_manual(db: Any, state: ConnectionState) -> bool:
    """Whether ``set_autocommit(True)`` now ends a manual-mode stretch on a connection of
    ours (the end of an atomic block, after its COMMIT or ROLLBACK, or the code's own)."""
    return bool(not db.in_atomic_block and not db.autocommit and ours(db, state) and state.on)


def set_autocommit(db: Any, original: SetAutocommit, autocommit: bool, force: bool) -> Any:
    """``set_autocommit()`` with the guard's checks around it."""
    state: ConnectionState = db._dbkeepalive
    if autocommit and state.manual and db.connection is state.conn:
        # Back to autocommit (the end of an atomic block, or the code's own call): a
        # connection lost in the manual transaction must not reopen in manual mode, even
        # if this call fails to reconnect. (Django's connect() calls this too, on a
        # connection not ours yet: that one is left alone.)
        state.manual = False
    ended = state.ended
    state.ended = False
    if autocommit and leaving_manual(db, state):
        return _leave_manual(db, state, original, force, ended)
    if now() > state.due:
        before(db)
    entering = not autocommit and not in_transaction(db)
    try:
        result = original(db, autocommit, force)
        _confirm(db, state, autocommit)
        return result
    except BaseException as exc:
        retry = None
        found = classify(exc)
        if entering and found is not None and found.retryable:
            # "SET autocommit=0" on a lost connection: nothing was written yet.
            def retry() -> Any:
                return original(db, autocommit, force)

        return failed(db, None, exc, retry)


def _confirm(db: Any, state: ConnectionState, autocommit: bool) -> None:
    """A driver that may ignore the error of ``SET autocommit`` (Connector/Python's C
    extension) raises it now, with the wrapper's mode as it was (as if the call had
    raised it)."""
    if ours(db, state) and state.on:
        try:
            state.driver.confirm_autocommit(db.connection)
        except Exception:
            db.autocommit = not autocommit
            raise


def _left_lost(
    db: Any, state: ConnectionState, found: Disconnect, exc: BaseException | None, ended: bool
) -> None:
    """The connection is lost as the code leaves manual mode. Replace it, in autocommit
    mode (never leave it lost with autocommit off: every later statement would raise).
    ``ended``: COMMIT or ROLLBACK ended the transaction and nothing ran since, so nothing
    is lost and this is quiet; otherwise work since then was rolled back: raise."""
    if exc is not None:
        cause = failure_cause(db, state, found, exc)
    else:
        cause = state.why or explain(found.kind)
    # MySQL's "SET autocommit=1" commits the open transaction: sent, with its reply
    # lost, the work may be saved (never tell the code to run it again as if rolled back).
    unknown = exc is not None and not found.not_sent
    error = (
        None
        if ended
        else lost_in_transaction(db, state, cause, -INF, code_of(exc), commit_unknown=unknown)
    )
    mark_lost(db, found, cause)
    discard(db, "disconnected", -INF, cause=cause)
    db._dbkeepalive.manual = False
    if error is not None:
        if exc is not None:
            raise error from exc
        raise error


def _replace_if_lost(db: Any, state: ConnectionState, ended: bool) -> bool:
    """Before ``set_autocommit(True)`` ends manual mode: replace a connection the server
    closed (or known lost), see :func:`_left_lost`. ``True`` when it was replaced."""
    lost = state.lost
    if lost is None:
        try:
            if ended:  # the transaction is over: a peek is all it takes
                poll = state.poll
                if poll is None or not poll(0):
                    return False
                readable = state.family.readable_cause(db, state)
                if readable is None:
                    return False  # a message for the driver: the session is fine
                lost = Disconnect(state.family.gone_code, "gone", not_sent=True, retryable=True)
                state.why = state.family.closed_cause(
                    state, readable[0], readable[1], now() - state.last
                )
            else:
                before(db)
                return False
        except ConnectionLostInTransaction:
            lost = state.lost or Disconnect(2013, "lost", False, True)
    _left_lost(db, state, lost, None, ended)
    return True


def _leave_manual(
    db: Any, state: ConnectionState, original: SetAutocommit, force: bool, ended: bool
) -> Any:
    """``set_autocommit(True)`` that ends manual mode (the end of an atomic block, after
    its COMMIT or ROLLBACK, or the code's own call), never leaving a lost connection
    behind with autocommit off. After COMMIT/ROLLBACK (``ended``), a lost connection is
    replaced quietly and the transaction's on_commit hooks, which Django drops with the
    old connection, still run: the work was committed."""
    hooks = list(db.run_on_commit) if ended else []
    if not _replace_if_lost(db, state, ended):
        assert state.cfg is not None
        state.due = state.last + state.cfg.peek_after  # the hot path again
        try:
            result = original(db, True, force)
            if not db.run_on_commit:
                hooks = []  # Django ran them: the confirmation below must not run them again
            _confirm(db, state, True)
            return result
        except Exception as exc:
            found = classify(exc)
            if found is None or not leaving_manual(db, state):
                raise
            _left_lost(db, state, found, exc, ended)  # raises unless the transaction had ended
    try:
        original(db, True, force)  # reconnects, in autocommit mode
    except Exception as again:
        if classify(again) is None:
            raise
        # The server is unreachable now. An error here would read as a failed atomic
        # block and get committed work run again: leave the connection closed (the next
        # statement reports the outage itself).
        db.autocommit = True
    db.run_commit_hooks_on_set_autocommit_on = False
    if hooks:
        db.run_on_commit = hooks
        db.run_and_clear_commit_hooks()
    return None


def transaction_ended(db: Any, state: ConnectionState) -> None:
    """COMMIT or ROLLBACK returned: nothing of that transaction can be lost any more.
    Until the next statement (which takes the slow path once to clear the mark), leaving
    manual mode on a connection the server has closed just replaces it, quietly: at the
    end of an atomic block a lost ``SET autocommit=1`` must not look like a lost
    transaction, or the code would run the committed work again."""
    if state.on and db.connection is not None and not db.in_atomic_block:
        state.ended = True
        state.due = -INF


def before_commit(db: Any, state: ConnectionState) -> None:
    """Peeked every time: a COMMIT on a session the server closed would leave its
    outcome unknown, while before sending it the transaction is known rolled back."""
    if now() > state.due or ((poll := state.poll) is not None and poll(0)):
        before(db)


def commit_failed(db: Any, exc: Exception) -> NoReturn:
    """``COMMIT`` failed: a lost connection raises ``ConnectionLostInTransaction`` saying
    whether it is known rolled back (never sent) or unknown (the reply was lost)."""
    state: ConnectionState = db._dbkeepalive
    refused = state.family.refusal(db, state, exc) if state.on else None
    if refused is not None:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        mark_lost(db, Disconnect(code, refused.kind, True, True, alive=True), refused)
        raise lost_in_transaction(db, state, refused, -INF, code, refused=True) from exc
    found = classify(exc)
    if found is None or not state.on or db.connection is None:
        raise exc
    cause = failure_cause(db, state, found, exc)
    mark_lost(db, found, cause)
    raise lost_in_transaction(
        db, state, cause, -INF, code_of(exc), commit_unknown=not found.not_sent
    ) from exc


def rolling_back(db: Any, state: ConnectionState) -> None:
    """Before ``ROLLBACK``: a connection known lost is dropped, not waited on (the server
    rolled back when it died); one on a node that refused a statement is closed
    properly (the server rolls back as it closes)."""
    if state.lost is not None and not db.in_atomic_block and state.on:
        discard(db, state.lost.kind if state.lost.alive else "disconnected", 0.0)
    elif now() > state.due and not db.in_atomic_block:
        try:
            before(db)
        except ConnectionLostInTransaction:
            discard(db, "disconnected", 0.0)


def rollback_failed(db: Any, exc: Exception) -> None:
    """``ROLLBACK`` failed. A node that refuses it (a Galera node outside the primary
    component refuses even that) still rolls back when the connection closes: close it
    properly, quietly. A connection lost under it (a KILL the guard could not see
    coming: no socket to peek, or a race) took the transaction with it, as when the
    guard knows it lost beforehand: dropped quietly. Either way the next statement gets
    a new connection. Anything else raises. A connection the guard found lost in a scope
    that has ended since (AUTO_GUARD off) is dropped quietly too: that loss was reported."""
    state = db._dbkeepalive
    if db.in_atomic_block or not (state.on or state.lost is not None):
        raise exc
    refused = state.family.refusal(db, state, exc)
    if refused is not None:
        discard(db, refused.kind, 0.0, graceful=True, cause=refused)
        return
    found = classify(exc)
    if found is None:
        raise exc
    mark_lost(db, found)
    discard(db, "disconnected", 0.0)
