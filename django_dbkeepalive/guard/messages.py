"""What the guard tells the caller: the texts of the errors it raises and of the notes
it adds to driver errors that reach the caller.

Owns: :func:`lost_in_transaction` (a :class:`ConnectionLostInTransaction` that names
the alias, the idle time, the limits and what to do), :func:`note_failure` (why a
statement failed and whether it ran) and :func:`connect_error` (a failed connect).
Never a password, never a statement's parameters.
Must never import: the rules or the wrappers.
"""

from __future__ import annotations

from typing import Any

from django.db import utils as db_utils

from ..errors import ConnectionLostInTransaction
from .causes import Cause, add_note, explain, tls_failure
from .disconnects import Disconnect
from .state import INF, ConnectionState

__all__ = ["RETRY_LATER", "connect_error", "idle_text", "lost_in_transaction", "note_failure"]

RETRY_LATER = "Retry in a moment; the next statement connects again by itself."

_DJANGO_ERROR_NAMES = (
    "DataError",
    "OperationalError",
    "IntegrityError",
    "InternalError",
    "ProgrammingError",
    "NotSupportedError",
    "DatabaseError",
    "InterfaceError",
    "Error",
)


def idle_text(idle: float) -> str:
    if idle == -INF:
        return "it broke while a statement was in flight"
    if idle == INF:
        return "idle time unknown"
    return f"idle {idle:.1f}s"


def lost_in_transaction(
    db: Any,
    state: ConnectionState,
    cause: Cause,
    idle: float,
    code: int | None = None,
    *,
    commit_unknown: bool = False,
    refused: bool = False,
) -> ConnectionLostInTransaction:
    """The error raised when ``db``'s connection was lost inside a transaction, or (with
    ``refused``) points at a node that refused a statement of it."""
    if cause.kind == "fork":
        # The parent process still holds the session and its transaction: it may well
        # commit it. Redoing the work here would write it twice.
        return ConnectionLostInTransaction(
            f"The database connection {db.alias!r} was inherited from the parent process "
            "inside a transaction: this process was forked inside transaction.atomic(). "
            "The transaction belongs to the parent, which can still commit it, so this "
            "process must not redo that work; its own statements cannot join the "
            "transaction. django-dbkeepalive never reconnects inside a transaction: leave "
            "the atomic block here (this process then gets its own connection). "
            f"{cause.advice}",
            alias=db.alias,
            idle=idle,
            limit=state.limit,
            cause=cause.kind,
        )
    if commit_unknown:
        outcome = (
            "The COMMIT was sent but its reply was lost, so whether the transaction was "
            "saved is UNKNOWN: check the data before running the work again."
        )
    else:
        outcome = (
            "The server rolled the transaction back, so nothing this transaction wrote was saved."
        )
    if refused:
        message = (
            f"A statement of a transaction on database {db.alias!r} was refused: "
            f"{cause.what}. The transaction was not committed, and nothing it wrote was "
            "saved. django-dbkeepalive never reconnects inside a transaction: leave the "
            "atomic block (its rollback closes this connection; the next statement uses a "
            f"new one) and run the whole unit of work again. {cause.advice}"
        )
        return ConnectionLostInTransaction(
            message, alias=db.alias, idle=idle, limit=state.limit, code=code, cause=cause.kind
        )
    advice = cause.advice
    if cause.kind == "idle_timeout":
        advice += " Keep slow work (API calls, building files) outside transaction.atomic()."
    message = (
        f"The database connection {db.alias!r} was lost inside a transaction: "
        f"{cause.what} ({idle_text(idle)}; {state.family.limits_text(state)}). {outcome} "
        "django-dbkeepalive never reconnects inside a transaction: leave the atomic block "
        f"(the connection works again after it) and run the whole unit of work again. {advice}"
    )
    return ConnectionLostInTransaction(
        message, alias=db.alias, idle=idle, limit=state.limit, code=code, cause=cause.kind
    )


def note_failure(
    exc: BaseException, alias: str, cause: Cause, *, rerun: str, first: Cause | None = None
) -> None:
    """Add what happened and what to do to a driver error that reaches the caller.
    ``rerun``: ``"never"`` (refused for its size), ``"reconnect_failed"``,
    ``"failed_again"`` (with the ``first`` cause), ``"read"`` (a read not run again) or
    ``"unknown"`` (a write whose fate is unknown)."""
    if cause.kind == "too_large":
        text = (
            f"django-dbkeepalive: database {alias!r}: {cause.what}. It was not sent again "
            f"(it would fail the same way). {cause.advice} The next statement uses a new "
            "connection."
        )
    elif rerun == "reconnect_failed":
        text = (
            f"django-dbkeepalive: the connection to database {alias!r} was lost "
            f"({cause.what}), and connecting again to re-run the statement failed. It "
            f"was not applied. {explain('unreachable').advice}"
        )
    elif rerun == "failed_again" and first is not None:
        text = (
            f"django-dbkeepalive: the connection to database {alias!r} was lost "
            f"({first.what}); the statement was run again once on a new connection, "
            f"which was lost too: {cause.what}. {cause.advice}"
        )
    elif rerun == "read":
        text = (
            f"django-dbkeepalive: the connection to database {alias!r} was lost while "
            f"this statement was in flight: {cause.what}. This read was not run again: "
            "RETRY_READS is off, or its result depends on the lost session "
            f"(LAST_INSERT_ID(), user variables, locks). {cause.advice} The next "
            "statement uses a new connection."
        )
    else:
        text = (
            f"django-dbkeepalive: the connection to database {alias!r} was lost while "
            f"this statement was in flight: {cause.what}. It was not run again, because "
            "the server may have applied it: check whether it took effect before "
            f"retrying it. {cause.advice} The next statement uses a new connection."
        )
    add_note(exc, text)


def as_django_error(db: Any, exc: Exception) -> Exception | None:
    """``exc`` as the Django error Django's wrapper around ``connect()`` would raise
    (which would replace the driver's exception by a new one, dropping a note), or
    ``None`` when it is no DB-API error of the backend."""
    if isinstance(exc, db_utils.Error):
        return exc  # raised by Django's own error wrapper during setup
    for name in _DJANGO_ERROR_NAMES:
        driver_type = getattr(db.Database, name, None)
        if driver_type is not None and isinstance(exc, driver_type):
            error: Exception = getattr(db_utils, name)(*exc.args)
            return error
    return None


def connect_error(
    db: Any,
    exc: Exception,
    found: Disconnect,
    previous: Cause | None,
    lost_cause: Cause,
    *,
    attempts: int,
    waited: float,
) -> Exception | None:
    """``exc`` as the Django error the caller will see, with a note; ``None`` when it
    is not one that can be converted. ``previous``: why the wrapper's last connection
    was lost; ``lost_cause``: why this one was; ``attempts``: how many connects were
    tried, over ``waited`` seconds (``DBKEEPALIVE["RETRY_CONNECT_FOR"]``)."""
    error = as_django_error(db, exc)
    if error is None:
        return None
    db.errors_occurred = True
    before = "" if previous is None else f" Its previous connection was lost: {previous.what}."
    tried = (
        f" (tried {attempts} times over {waited:.1f}s: DBKEEPALIVE['RETRY_CONNECT_FOR'])"
        if attempts > 1
        else ""
    )
    if found.kind == "unreachable" and tls_failure(exc):
        text = (
            f"django-dbkeepalive: could not connect to database {db.alias!r}: the TLS "
            "handshake failed. The server answered, so this is a certificate or TLS "
            "setting problem (OPTIONS['ssl'], the server's certificate), not an outage: "
            "retrying will not help. Nothing was sent."
        )
    elif found.kind == "unreachable":
        unreachable = explain("unreachable")
        text = (
            f"django-dbkeepalive: could not connect to database {db.alias!r}{tried}: "
            f"{unreachable.what}.{before} Nothing was sent. {unreachable.advice}"
        )
    elif attempts == 1:
        # Not tried again: it took too long, so the server (or something in front of
        # it) accepted the connection but did not answer.
        text = (
            f"django-dbkeepalive: a new connection to database {db.alias!r} was accepted "
            "but the server did not complete the login in time (a server that is "
            "overloaded, starting, or stalled; a proxy or load balancer with no healthy "
            f"server behind it).{before} Nothing was sent. Check the server; the "
            "client's connect_timeout and read_timeout bound this wait."
        )
    else:
        times = "twice" if attempts == 2 else f"{attempts} times"
        text = (
            f"django-dbkeepalive: a new connection to database {db.alias!r} was lost {times} "
            f"while it was being opened and set up{tried if attempts > 2 else ''}, before "
            f"any statement of yours was sent: {lost_cause.what} (behind a proxy or load "
            "balancer, a server that is down or restarting looks like this too)."
            f"{before} Nothing was sent. {RETRY_LATER}"
        )
    add_note(error, text)
    return error
