"""MySQL and MariaDB, with every driver of :mod:`.mysql_drivers`.

Owns: the error codes that mean a lost connection (never the text: libmariadb says
"Server has gone away" where libmysqlclient and PyMySQL say "MySQL server has gone
away"), the session's ``wait_timeout`` and ``max_allowed_packet`` read as a connection
opens, what an unsolicited packet on an idle socket says (error 4031, 1927...), the
ping, ending a zombie session, statements refused for their size, and the two patches
of Django's MySQL backend (client timeouts, a ping that never reconnects).
Must never import: the rules or the wrappers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ...conf import conf
from ..causes import Cause, explain
from ..disconnects import Disconnect
from ..state import INF, ConnectionState, Session, now
from .base import Driver, Family, Statement, limit_for
from .mysql_drivers import DRIVERS

__all__ = ["DISCONNECT_CODES", "MYSQL", "MySQLFamily"]

logger = logging.getLogger("django_dbkeepalive")

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

# A lost session the server may still hold open: the network went silent (a read
# timeout, a flow a NAT or firewall dropped, keepalive probes unanswered), so the server
# saw no close. Its transaction keeps its row locks until the server's wait_timeout
# (8 hours by default), and other statements wait on them.
ZOMBIE_KINDS = ("timeout", "dead_peer")
# The smallest max_allowed_packet a server accepts: a shorter statement always fits.
_MIN_MAX_ALLOWED_PACKET = 1024


def _code_of(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def _read_session(conn: Any) -> tuple[float, int | None, int | None]:
    """``wait_timeout``, ``max_allowed_packet`` and ``server_id``, in one round trip."""
    cursor = conn.cursor()
    try:
        cursor.execute(
            "SELECT @@SESSION.wait_timeout, @@SESSION.max_allowed_packet, @@GLOBAL.server_id"
        )
        row = cursor.fetchone()
    finally:
        cursor.close()
    return (
        float(row[0]),
        None if row[1] is None else int(row[1]),
        None if row[2] is None else int(row[2]),
    )


def read_max_allowed_packet(conn: Any) -> int:
    """The session's ``max_allowed_packet`` (one round trip)."""
    cursor = conn.cursor()
    try:
        cursor.execute("SELECT @@SESSION.max_allowed_packet")
        row = cursor.fetchone()
    finally:
        cursor.close()
    return int(row[0])


def statement_size(statement: Statement | None) -> int | None:
    """At least how many bytes the statement took on the wire (SQL plus the parameters'
    text; escaping only adds to it), or ``None``. Only sizes, never the values."""
    if statement is None:
        return None
    sql, params, many = statement
    try:
        size = len(sql.encode("utf-8") if isinstance(sql, str) else sql)
        rows = params if many else [params]
        if not isinstance(rows, (list, tuple)):
            return None  # an iterator the driver has consumed
        for row in rows:
            if row is None:
                continue
            values = row.values() if isinstance(row, Mapping) else row
            for value in values:
                if isinstance(value, (bytes, bytearray, memoryview)):
                    size += len(value)
                else:
                    size += len(str(value).encode("utf-8"))
        return size - (2 * sql.count("%s") if isinstance(sql, str) else 0)
    except Exception:
        return None


def too_large_cause(size: int | None, limit: int | None) -> Cause:
    sizes = f"{size:,} bytes or more" if size is not None else "size not known"
    limit_text = f"{limit:,} bytes" if limit is not None else "not known here"
    return Cause(
        "too_large",
        f"the statement ({sizes}) is larger than the server's max_allowed_packet "
        f"({limit_text}). This is not a lost connection: the server refused the statement "
        "for its size (it was not applied) and then closed the connection",
        "Raise max_allowed_packet on the server (SET GLOBAL max_allowed_packet = ..., and "
        "in its configuration file), or send smaller statements (bulk_create(..., "
        "batch_size=...), smaller blobs).",
    )


class MySQLFamily(Family):
    """MySQL and MariaDB (Django's ``vendor == "mysql"``)."""

    vendor = "mysql"
    title = "MySQL/MariaDB"
    drivers = DRIVERS
    fallback_driver: Driver = Driver()
    watches_socket = True
    can_ping = True
    peek_size = 7  # 3-byte length, sequence number, 0xFF, a 2-byte error code
    retries_lost_setup = True
    gone_code = 2006

    def classify(self, exc: BaseException) -> Disconnect | None:
        code = _code_of(exc)
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

    # --------------------------------------------------------- server limits

    def opened(self, db: Any, state: ConnectionState) -> None:
        """Read the session's ``wait_timeout`` (and ``max_allowed_packet``) as the
        connection opens, one round trip, so the idle limit is known before the first
        pause: after it, a flow a NAT or firewall dropped silently would not answer the
        question, and a server-side close could not be told from a KILL."""
        server_id = self._read_limits(db, state)
        with contextlib.suppress(Exception):
            thread_id = state.driver.thread_id(db.connection)
            if thread_id is not None:
                state.session = Session(thread_id, server_id, now())
        if state.zombie is not None:
            self.end_zombie(db, state)

    def _read_limits(self, db: Any, state: ConnectionState) -> int | None:
        assert state.cfg is not None
        server_id = None
        try:
            state.wait, state.max_packet, server_id = _read_session(db.connection)
        except Exception as exc:
            self.limits_unreadable(db, exc)
            state.wait = INF
        state.limit = limit_for(state.wait, state.cfg.margin)
        return server_id

    def may_learn_late(self, state: ConnectionState, in_transaction: bool) -> bool:
        return True

    def learn_late(self, db: Any, state: ConnectionState) -> None:
        self._read_limits(db, state)

    def tx_timeout(self, state: ConnectionState) -> float | None:
        return state.wait  # wait_timeout applies inside a transaction too

    def limits_text(self, state: ConnectionState) -> str:
        if state.limit is not None and state.wait is not None and state.wait < INF:
            return (
                f"the guard's idle limit is {state.limit:.1f}s, the server's wait_timeout "
                f"{state.wait:g}s"
            )
        return "the server's wait_timeout is not known yet"

    # ------------------------------------------------------- the idle socket

    def readable_cause(self, db: Any, state: ConnectionState) -> tuple[str, bytes] | None:
        from ..sockets import peek_head

        return peek_head(state, self.peek_size)

    def closed_cause(self, state: ConnectionState, what: str, head: bytes, idle: float) -> Cause:
        if what == "data" and len(head) >= 7 and head[4] == 0xFF:
            code = int.from_bytes(head[5:7], "little")
            return explain(_CLOSED_BY.get(code, "gone"), idle=idle, wait=state.wait)
        return super().closed_cause(state, what, head, idle)

    # ------------------------------------------------------------ the server

    def ping(self, db: Any, state: ConnectionState) -> None:
        state.driver.ping(db.connection)

    def end_zombie(self, db: Any, state: ConnectionState) -> None:
        """KILL the previous session of this wrapper from its new connection, when it is
        provably the same server instance (same ``server_id``, up since before that
        session opened): a thread id is only unique within one server's lifetime."""
        zombie, state.zombie = state.zombie, None
        current = state.session
        if zombie is None or current is None:
            return
        if current.server_id is None or zombie.server_id != current.server_id:
            return
        try:
            cursor = db.connection.cursor()
            try:
                cursor.execute(
                    "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
                    "WHERE VARIABLE_NAME = 'UPTIME'"
                )
                row = cursor.fetchone()
                # Uptime is whole seconds, rounded down: up at least as long as the old
                # session has existed proves no restart since it opened.
                if row is None or float(row[0]) < now() - zombie.opened + 0.1:
                    logger.debug(
                        "dbkeepalive: previous session %d not killed: the server restarted since",
                        zombie.thread_id,
                    )
                    return  # restarted since: that id may be someone else's now
                cursor.execute(f"KILL {int(zombie.thread_id):d}")
            finally:
                cursor.close()
        except Exception as exc:
            if self.classify_chain(exc) is not None:
                raise  # the new connection is lost too: connect() handles that
            # 1094: it is gone already; 1095: not ours to kill. Nothing to do either way.
            logger.debug("dbkeepalive: previous session %d not killed (%s)", zombie.thread_id, exc)
            return
        logger.info(
            "dbkeepalive: killed the %r connection's previous session %d, which the server "
            "still held after the network went silent (its transaction's locks are released)",
            db.alias,
            zombie.thread_id,
        )

    def size_refusal(
        self,
        db: Any,
        state: ConnectionState,
        found: Disconnect,
        statement: Statement | None,
        in_transaction: bool,
        read_limit: Callable[[], int | None] | None = None,
    ) -> Cause | None:
        """PyMySQL gets 1153 from the server; mysqlclient on libmariadb reports the
        server's close as 2006, so there the statement's size is compared with the
        server's limit, read on a new connection (``read_limit``) if it was not known."""
        size = statement_size(statement)
        known = state.max_packet
        if in_transaction:
            if found.kind == "too_large" or (
                size is not None and known is not None and size > known
            ):
                return too_large_cause(size, known)
            return None
        if found.kind == "too_large":
            limit = known if known is not None or read_limit is None else read_limit()
            return too_large_cause(size, limit)
        # 2006 only: the send failed because the server had closed the connection. (A
        # timeout or an outage is never 2006 on send, so this never waits on a dead network.)
        if size is None or size < _MIN_MAX_ALLOWED_PACKET or found.code != 2006:
            return None
        limit = known if known is not None or read_limit is None else read_limit()
        if limit is not None and size > limit:
            return too_large_cause(size, limit)
        return None

    # ------------------------------------------------------ backend methods

    def is_usable(self, db: Any, original: Callable[[], bool]) -> bool:
        """Django's ``is_usable()`` pings; PyMySQL's ping reconnects silently by default,
        skipping Django's session setup: ping through the driver adapter instead."""
        driver = self.driver_for(getattr(db, "Database", None))
        if db.connection is not None and driver.name == "PyMySQL":
            try:
                driver.ping(db.connection)
            except Exception:
                return False
            return True
        return original()

    def connection_params(self, db: Any, params: dict[str, Any]) -> dict[str, Any]:
        """``CLIENT_TIMEOUTS`` where ``OPTIONS`` has none (an option file,
        ``read_default_file``, may set them: the user's choice wins)."""
        timeouts = conf.for_alias(db.alias).client_timeouts
        if timeouts and "read_default_file" not in params:
            for name, value in timeouts.items():
                params.setdefault(name, value)  # OPTIONS are already in params
        return super().connection_params(db, params)

    def backend_patches(self) -> list[tuple[type, str, Any]]:
        try:
            from django.db.backends.mysql.base import DatabaseWrapper
        except Exception:  # no MySQL driver installed: nothing of MySQL to patch
            return []
        return [
            (DatabaseWrapper, "is_usable", _wrap_is_usable),
            (DatabaseWrapper, "get_connection_params", _wrap_get_connection_params),
        ]


def _wrap_is_usable(original: Callable[..., Any]) -> Callable[..., Any]:
    def is_usable(self: Any) -> bool:
        return MYSQL.is_usable(self, lambda: bool(original(self)))

    return is_usable


def _wrap_get_connection_params(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_connection_params(self: Any) -> Any:
        return MYSQL.connection_params(self, original(self))

    return get_connection_params


MYSQL = MySQLFamily()
