"""What counts as a lost connection, and the error raised when one is lost in a transaction.

:func:`classify` is the one place that decides "is this a disconnect" for every driver:
it looks at the MySQL error code (never at the text: libmariadb says "Server has gone
away" where libmysqlclient and PyMySQL say "MySQL server has gone away"), at the driver's
exception class, and down the ``__cause__`` chain that Django's error wrapper builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.db import OperationalError

__all__ = [
    "ConnectionLostInTransaction",
    "Disconnect",
    "classify",
    "is_disconnect",
    "is_retryable_read",
]

# Codes whose statement cannot have been executed: the client failed to send it, the
# connection was already closed on this side, or the server told us it had closed the
# session before reading it.
_NOT_SENT = {
    0: "closed",  # InterfaceError(0, ''): the driver's connection is already closed
    2002: "unreachable",  # CR_CONNECTION_ERROR (socket)
    2003: "unreachable",  # CR_CONN_HOST_ERROR
    2006: "gone",  # CR_SERVER_GONE_ERROR: the write failed or the link is closed
    3032: "offline",  # ER_SERVER_OFFLINE_MODE
    4031: "idle_timeout",  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8.0.24+)
}
# Codes after which the connection is dead but the statement may have run.
_AMBIGUOUS = {
    1053: "shutdown",  # ER_SERVER_SHUTDOWN
    1152: "aborted",  # ER_ABORTING_CONNECTION
    1158: "network",  # ER_NET_READ_ERROR
    1159: "network",  # ER_NET_READ_INTERRUPTED (net_read_timeout)
    1160: "network",  # ER_NET_ERROR_ON_WRITE
    1161: "network",  # ER_NET_WRITE_INTERRUPTED (net_write_timeout)
    1184: "aborted",  # ER_NEW_ABORTING_CONNECTION
    1927: "killed",  # ER_CONNECTION_KILLED (MariaDB)
    2013: "lost",  # CR_SERVER_LOST
    2055: "lost",  # CR_SERVER_LOST_EXTENDED
    3169: "killed",  # ER_SESSION_WAS_KILLED (MySQL 8)
}
# The server closes the connection after a packet over max_allowed_packet. The statement
# did not run, but running it again would fail the same way.
_TOO_LARGE = {1153: "too_large", 2020: "too_large"}

#: Every error code treated as a lost connection.
DISCONNECT_CODES = frozenset({*_NOT_SENT, *_AMBIGUOUS, *_TOO_LARGE} - {0})


@dataclass(frozen=True)
class Disconnect:
    """Why a connection is gone: ``code``, ``kind`` and whether the statement ran.

    ``not_sent`` is true when the statement provably never reached the server, so it is
    safe to run it again on a new connection whatever it was.
    """

    code: int
    kind: str
    not_sent: bool
    retryable: bool


def _code_of(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def classify(exc: BaseException) -> Disconnect | None:
    """Return a :class:`Disconnect` when ``exc`` means the connection is lost.

    Example::

        try:
            cursor.execute("SELECT 1")
        except Exception as exc:
            if classify(exc):
                ...  # the connection is gone; reconnect before the next statement
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 6:
        seen += 1
        code = _code_of(current)
        name = type(current).__name__
        if code == 0 and name == "InterfaceError":
            return Disconnect(0, "closed", not_sent=True, retryable=True)
        if code in _NOT_SENT and code != 0:
            return Disconnect(code, _NOT_SENT[code], not_sent=True, retryable=True)
        if code in _AMBIGUOUS:
            return Disconnect(code, _AMBIGUOUS[code], not_sent=False, retryable=True)
        if code in _TOO_LARGE:
            return Disconnect(code, _TOO_LARGE[code], not_sent=True, retryable=False)
        if isinstance(current, ConnectionError):
            # A socket error that a driver let through unwrapped.
            return Disconnect(-1, "network", not_sent=False, retryable=True)
        current = current.__cause__
    return None


def is_disconnect(exc: BaseException) -> bool:
    """``True`` when ``exc`` (or its ``__cause__``) means the connection is lost."""
    return classify(exc) is not None


_LEADING_NOISE = r"(?:\s+|/\*.*?\*/|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)|\()*"
_READ_START = re.compile(
    _LEADING_NOISE + r"(SELECT|SHOW|DESCRIBE|DESC|EXPLAIN|WITH|VALUES|TABLE|CHECKSUM)\b",
    re.IGNORECASE | re.DOTALL,
)
# A read that changes something, or whose answer depends on the session it runs in,
# would give a different (wrong) answer on a new connection.
_NOT_IDEMPOTENT = re.compile(
    r"\b(INTO|FOR\s+UPDATE|LOCK\s+IN\s+SHARE\s+MODE|INSERT|UPDATE|DELETE|REPLACE"
    r"|GET_LOCK|RELEASE_LOCK|RELEASE_ALL_LOCKS|IS_USED_LOCK|IS_FREE_LOCK"
    r"|LAST_INSERT_ID|FOUND_ROWS|ROW_COUNT|CONNECTION_ID|NEXTVAL|SETVAL|LASTVAL"
    r"|NEXT\s+VALUE|PREVIOUS\s+VALUE)\b|@[A-Za-z_`'\"]",
    re.IGNORECASE,
)


def is_retryable_read(sql: object) -> bool:
    """``True`` for a statement that only reads and whose answer is session-independent.

    Example::

        is_retryable_read("SELECT * FROM app_item WHERE id = %s")  # True
        is_retryable_read("SELECT LAST_INSERT_ID()")  # False: depends on the session
    """
    if isinstance(sql, bytes):
        sql = sql.decode("utf-8", "replace")
    if not isinstance(sql, str):
        return False
    return bool(_READ_START.match(sql)) and not _NOT_IDEMPOTENT.search(sql)


class ConnectionLostInTransaction(OperationalError):
    """The connection was lost (or idled out) inside a transaction.

    The server has rolled the transaction back, so nothing the block wrote since it
    began is saved. The guard never reconnects inside a transaction, because the rest
    of the block would then silently run outside it. Leave the atomic block (the
    connection works again after it) and run the whole unit of work again.

    Example::

        from django.db import transaction
        from django_dbkeepalive import ConnectionLostInTransaction

        try:
            with transaction.atomic():
                order.save()
                slow_call()  # longer than the server's wait_timeout
                order.lines.create(...)
        except ConnectionLostInTransaction:
            ...  # nothing was committed: retry the whole block, or report it
    """

    def __init__(
        self,
        message: str,
        *,
        alias: str = "default",
        idle: float | None = None,
        limit: float | None = None,
        code: int | None = None,
    ) -> None:
        super().__init__(code if code is not None else 2013, message)
        self.alias = alias
        self.idle = idle
        self.limit = limit
        self.message = message

    def __str__(self) -> str:
        return self.message
