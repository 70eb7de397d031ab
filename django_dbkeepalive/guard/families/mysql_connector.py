"""MySQL Connector/Python (``ENGINE = "mysql.connector.django"``): the driver adapter.

Owns: how Oracle's driver exposes its socket (the pure-Python connection only: the C
extension keeps its socket inside libmysqlclient, so the guard has no peek there and
relies on the idle limit, the ping and the errors), pings without reconnecting, names its
session and reads the server's version; which of its client timeouts the installed
version accepts; and its own errors that mean a lost connection (:func:`classify`):
``-1`` "MySQL Connection not available" (its ``cursor()`` pings first: the statement was
never sent), its ``ReadTimeoutError``/``WriteTimeoutError`` (code 3024/3025, which the
server also uses for ``max_execution_time``: only the class tells them apart) and the C
extension's raw ``MySQLInterfaceError``, whose code is in ``errno``, not ``args``.
Must never import: the rules, the wrappers, or the MySQL family module.
"""

from __future__ import annotations

from typing import Any

from ..disconnects import Disconnect
from .base import Driver

__all__ = ["Connector", "classify", "code_of", "is_connector_error"]

_MODULE = "mysql.connector"
#: Its client-side timeouts: the statement may have run, the connection is closed.
_TIMEOUT_CLASSES = ("ReadTimeoutError", "WriteTimeoutError")
#: Its "not available" errors (code -1): raised before anything is sent.
_NOT_AVAILABLE_CLASSES = ("OperationalError", "InterfaceError")


def is_connector_error(exc: BaseException) -> bool:
    """An exception class of Connector/Python (``mysql.connector.errors`` or its C
    extension, ``_mysql_connector``)."""
    module = type(exc).__module__ or ""
    return module.startswith(_MODULE) or module == "_mysql_connector"


def code_of(exc: BaseException) -> int | None:
    """The error code of the C extension's raw ``MySQLInterfaceError`` (``errno``:
    its ``args`` hold only the text), or ``None``."""
    cext = type(exc).__name__ == "MySQLInterfaceError" and is_connector_error(exc)
    if cext:
        errno = getattr(exc, "errno", None)
        return errno if isinstance(errno, int) and not isinstance(errno, bool) else None
    return None


def classify(exc: BaseException, code: int | None) -> Disconnect | None:
    """A :class:`Disconnect` for the errors only Connector/Python raises (``code``: the
    error's code as the MySQL table reads it), else ``None``."""
    if not is_connector_error(exc):
        return None
    name = type(exc).__name__
    if name in _TIMEOUT_CLASSES:
        return Disconnect(2013, "timeout", not_sent=False, retryable=True)
    if code == -1 and name in _NOT_AVAILABLE_CLASSES:
        # Its fixed wording for a connection it found closed (cursor(), ping(),
        # commit() on a closed connection); -1 is also its code for many usage errors.
        text = " ".join(str(a) for a in exc.args[1:2]).lower()
        if "not available" in text:
            return Disconnect(-1, "closed", not_sent=True, retryable=True)
    return None


class Connector(Driver):
    """MySQL Connector/Python, pure Python (``use_pure=True``) or its C extension."""

    name = "MySQL Connector/Python"
    modules = (_MODULE,)
    distribution = "mysql-connector-python"
    #: The oldest release whose Django backend supports Django 4.2+.
    minimum_version = (8, 3)
    #: Its C extension reports a read that waited out read_timeout as 2013, like a close
    #: (pure Python raises its own ReadTimeoutError, told apart by its class first).
    timeouts_look_like_closes = True

    def fileno(self, conn: Any) -> int | None:
        # Pure Python: conn._socket is its MySQLTCPSocket/MySQLUnixSocket, .sock the
        # socket (None once closed). The C extension has no socket object: None.
        try:
            sock = getattr(getattr(conn, "_socket", None), "sock", None)
            return None if sock is None else int(sock.fileno())
        except Exception:
            return None

    def cursor_owner(self, cursor: Any) -> Any:
        # Its cursors hold a weakref.proxy of the connection; get_self() is the object.
        proxy = getattr(cursor, "_connection", None)
        try:
            return None if proxy is None else proxy.get_self()
        except ReferenceError:  # that connection is gone already
            return None

    def orphan_cursor(self, cursor: Any) -> None:
        cursor._connection = None  # close() returns at once without one

    def reading(self, conn: Any) -> bool:
        # Its cursors are unbuffered by default: rows not fetched yet wait on the socket
        # (it reads them to their end before the next statement, consume_results).
        try:
            return bool(conn.unread_result)
        except Exception:
            return False

    def ping(self, conn: Any) -> None:
        # The C extension's ping() returns False for a dead session (its connection's
        # ping() then returns quietly too): say it the way a lost connection says it.
        if not _checked_natively(conn, 2006, "MySQL server has gone away (ping)"):
            conn.ping(reconnect=False)

    def confirm_autocommit(self, conn: Any) -> None:
        # The C extension ignores the error of its mysql_autocommit() call: on a killed
        # or cut session, SET autocommit "succeeds". Whether it reached the server is
        # unknown (=1 commits), so it is reported as lost in flight (2013).
        _checked_natively(conn, 2013, "Lost connection to MySQL server (SET autocommit)")

    def thread_id(self, conn: Any) -> int | None:
        value = conn.connection_id
        return None if value is None else int(value)

    def server_version(self, conn: Any) -> str:
        try:
            return str(conn.server_info or "")  # get_server_info() is deprecated
        except Exception:
            return ""

    def accepts_option(self, name: str) -> bool:
        # read_timeout/write_timeout are recent options (9.x): an older release refuses
        # arguments it does not know, so CLIENT_TIMEOUTS leaves those out. (Every
        # supported release, 8.3 on, has this table.)
        from mysql.connector.constants import DEFAULT_CONFIGURATION

        return name in DEFAULT_CONFIGURATION

    def client_library(self, module: Any) -> str | None:
        if not getattr(module, "HAVE_CEXT", False):
            return "pure Python (its C extension is not loadable here)"
        return "pure Python or its C extension (OPTIONS use_pure)"


def _checked_natively(conn: Any, errno: int, msg: str) -> bool:
    """A connection of the C extension: ping its native object, raise the driver's
    ``OperationalError(errno)`` if the session is dead, ``True`` if it is alive.
    ``False`` for a pure-Python connection (nothing was asked)."""
    native = getattr(conn, "_cmysql", None)
    if native is None:
        return False
    if not native.ping():
        from mysql.connector import errors

        raise errors.OperationalError(msg=msg, errno=errno)
    return True
