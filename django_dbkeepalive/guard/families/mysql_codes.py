"""MySQL and MariaDB error codes: which mean a lost connection, and which a node that
refuses to serve (read-only after a failover, a Galera node outside the primary component).

Never the text for a loss: libmariadb says "Server has gone away" where libmysqlclient and
PyMySQL say "MySQL server has gone away". Two refusal codes are shared with unrelated
errors, so for those the server's fixed wording decides (1290 is also ``--secure-file-priv``;
1047 is also "Unknown command").
Must never import: the rules, the wrappers, the other MySQL modules.
"""

from __future__ import annotations

from ..disconnects import Disconnect

__all__ = ["CLOSED_BY", "DISCONNECT_CODES", "classify_code", "code_of", "refusal_of"]

# Codes whose statement cannot have been executed: the client failed to send it, the
# connection was already closed on this side, or the server told us it had closed the
# session before reading it.
_NOT_SENT = {
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
# An unsolicited error packet on an idle socket: the server's reason for closing.
_CLOSED_BY = {1927: "killed", 3169: "killed", 1053: "shutdown", 4031: "idle_timeout"}

#: Every MySQL error code treated as a lost connection.
DISCONNECT_CODES = frozenset({*_NOT_SENT, *_AMBIGUOUS, *_TOO_LARGE})
CLOSED_BY = _CLOSED_BY

# The server refused the statement before running it, because of what this node is now.
_REFUSED = {
    1290: ("read_only", "read-only"),  # ER_OPTION_PREVENTS_STATEMENT: --(super-)read-only
    1836: ("read_only", ""),  # ER_READ_ONLY_MODE
    1792: ("read_only_transaction", ""),  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
    1047: ("not_ready", "wsrep"),  # Galera: "WSREP has not yet prepared node ..."
}


def code_of(exc: BaseException) -> int | None:
    """The MySQL error code of a driver exception (its first argument), or ``None``."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def classify_code(exc: BaseException, code: int | None = None) -> Disconnect | None:
    """A :class:`Disconnect` when this exception (not its causes) is a lost connection;
    ``code``: its code when the driver keeps it elsewhere than in ``args[0]``."""
    if code is None:
        code = code_of(exc)
    if code is None:
        return None
    if code == 0:
        # PyMySQL's InterfaceError(0, ''): its connection is already closed.
        if type(exc).__name__ == "InterfaceError":
            return Disconnect(0, "closed", not_sent=True, retryable=True)
        return None
    if code in _NOT_SENT:
        return Disconnect(code, _NOT_SENT[code], not_sent=True, retryable=True)
    if code in _AMBIGUOUS:
        return Disconnect(code, _AMBIGUOUS[code], not_sent=False, retryable=True)
    if code in _TOO_LARGE:
        return Disconnect(code, _TOO_LARGE[code], not_sent=True, retryable=False)
    return None


def refusal_of(exc: BaseException) -> tuple[int, str] | None:
    """``(code, kind)`` when ``exc`` (or its ``__cause__``) is a node refusing a
    statement before running it: ``"read_only"``, ``"read_only_transaction"`` (1792:
    a node-wide read-only setting, or the application's own read-only transaction: the
    caller asks the server which) or ``"not_ready"``."""
    current: BaseException | None = exc
    for _ in range(6):
        if current is None:
            return None
        code = code_of(current)
        if code in _REFUSED:
            kind, word = _REFUSED[code]
            text = " ".join(str(a) for a in getattr(current, "args", ())[1:]).lower()
            if not word or word in text.replace("_", "-") or word in text:
                return code, kind
            return None
        current = current.__cause__
    return None
