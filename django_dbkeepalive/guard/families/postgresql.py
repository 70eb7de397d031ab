"""PostgreSQL, with psycopg (3) and psycopg2.

Owns: the SQLSTATEs that end a session, ``idle_session_timeout`` and
``idle_in_transaction_session_timeout`` read as a connection opens (once per pooled
connection), what a readable idle socket means (a FATAL error before the close, or a
LISTEN notification for the driver: the session is fine), and closing the driver's
connection once its socket is detached, so that Django's pool discards it, and a write
refused by a hot standby (25006 where the server reports ``in_hot_standby``: the
endpoint still points at a replica after a failover). No ping: the peek sees every
session the server ended (it sends a FATAL error, then closes), and TCP_KEEPALIVE covers
a flow the network dropped.
Must never import: the rules or the wrappers.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any

from ..causes import Cause, explain
from ..disconnects import Disconnect
from ..state import INF, ConnectionState
from .base import Driver, Family, limit_for

__all__ = ["POSTGRESQL", "PostgreSQLFamily"]

logger = logging.getLogger("django_dbkeepalive")

# SQLSTATEs that end the session. The server sends them as FATAL errors, then closes
# the connection.
_NOT_SENT = {
    "57P05": "idle_timeout",  # idle_session_timeout: sent while idle, before the statement
    "25P03": "idle_timeout",  # idle_in_transaction_session_timeout: likewise
    "57P03": "unreachable",  # cannot_connect_now (the server is starting or stopping)
    "08001": "unreachable",  # sqlclient_unable_to_establish_sqlconnection
    "08004": "unreachable",  # sqlserver_rejected_establishment_of_sqlconnection
    "08003": "closed",  # connection_does_not_exist
}
_AMBIGUOUS = {
    "57P01": "terminated",  # admin_shutdown: pg_terminate_backend(), or a fast shutdown
    "57P02": "shutdown",  # crash_shutdown: another backend crashed
    "08000": "lost",  # connection_exception
    "08006": "lost",  # connection_failure
    "08007": "lost",  # transaction_resolution_unknown
}
_CLOSED_BY = {"57P01": "terminated", "57P02": "shutdown", "57P05": "idle_timeout"}
#: read_only_sql_transaction ("cannot execute INSERT in a read-only transaction"): a
#: refusal before running the statement, from a hot standby or a read-only transaction.
_READ_ONLY = "25006"


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg (3) or psycopg2 error, or of the one Django's error
    wrapper raised it from."""
    current: BaseException | None = exc
    for _ in range(6):
        if current is None:
            return None
        if type(current).__module__.startswith("psycopg"):
            state = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
            return state if isinstance(state, str) and state else None
        current = current.__cause__
    return None


class Psycopg(Driver):
    """psycopg 3."""

    name = "psycopg"
    modules = ("psycopg",)
    distribution = "psycopg"

    def tls_in_use(self, conn: Any) -> bool:
        try:
            return bool(conn.pgconn.ssl_in_use)
        except Exception:  # pragma: no cover - a psycopg without it (the driver's API)
            return False

    def parameter(self, conn: Any, name: str) -> str | None:
        """A parameter the server reports to the client (``in_hot_standby``, 14+):
        known without a round trip, even in a failed transaction."""
        value = conn.info.parameter_status(name)
        return None if value is None else str(value)

    def read_input(self, conn: Any) -> bool:
        """Let the driver read what the server sent unasked (it buffers it, and keeps
        notifications queued); ``False`` once that shows the session closed."""
        try:
            conn.pgconn.consume_input()
            conn.pgconn.is_busy()  # parses what was read
        except Exception:  # pragma: no cover - the driver could not read: taken as closed
            return False
        return not conn.closed


class Psycopg2(Psycopg):
    """psycopg2."""

    name = "psycopg2"
    modules = ("psycopg2",)
    distribution = "psycopg2"

    def tls_in_use(self, conn: Any) -> bool:
        try:
            return bool(conn.info.ssl_in_use)
        except Exception:  # pragma: no cover - a psycopg2 older than 2.8 (no conn.info)
            return False

    def parameter(self, conn: Any, name: str) -> str | None:
        value = conn.get_parameter_status(name)
        return None if value is None else str(value)

    def read_input(self, conn: Any) -> bool:
        try:
            conn.poll()  # notifications go to conn.notifies
        except Exception:  # pragma: no cover - the driver could not read: taken as closed
            return False
        return not conn.closed


def error_state(data: bytes) -> str | None:
    """The SQLSTATE of a PostgreSQL ErrorResponse message at the start of ``data``:
    ``E``, a 4-byte length, then fields of a type byte and a NUL-terminated string;
    ``C`` is the code."""
    if len(data) < 6 or data[0:1] != b"E":
        return None
    pos = 5
    while pos < len(data) and data[pos] != 0:
        end = data.find(b"\0", pos + 1)
        if end < 0:
            return None
        if data[pos : pos + 1] == b"C":
            return data[pos + 1 : end].decode("ascii", "replace")
        pos = end + 1
    return None


def _read_timeouts(conn: Any) -> tuple[float | None, float | None]:
    """``idle_session_timeout`` (14+) and ``idle_in_transaction_session_timeout`` for
    this session, in seconds (``None``: off or unknown to this server)."""
    cursor = conn.cursor()
    try:
        cursor.execute(
            "SELECT (SELECT setting FROM pg_settings WHERE name = 'idle_session_timeout'), "
            "(SELECT setting FROM pg_settings "
            "WHERE name = 'idle_in_transaction_session_timeout')"
        )
        row = cursor.fetchone()
    finally:
        cursor.close()
    # pg_settings gives both in milliseconds; 0 turns the timeout off.
    found = [None if v is None or int(v) <= 0 else int(v) / 1000.0 for v in row]
    return found[0], found[1]


def _in_recovery(conn: Any) -> bool:  # pragma: no cover - PostgreSQL 13 and older only
    """``pg_is_in_recovery()``, for a server that does not report ``in_hot_standby``
    (before 14). Fails in an aborted transaction: the refusal is then raised as it is."""
    try:
        cursor = conn.cursor()
        try:
            cursor.execute("SELECT pg_is_in_recovery()")
            row = cursor.fetchone()
        finally:
            cursor.close()
    except Exception:
        return False
    return bool(row and row[0])


# The idle timeouts read per driver connection, for pooled ones.
_known: weakref.WeakKeyDictionary[Any, tuple[float, float | None]] = weakref.WeakKeyDictionary()


class PostgreSQLFamily(Family):
    """PostgreSQL (Django's ``vendor == "postgresql"``)."""

    vendor = "postgresql"
    title = "PostgreSQL"
    drivers = (Psycopg(), Psycopg2())
    fallback_driver: Driver = Psycopg()
    timeout_setting = "idle_session_timeout"
    tx_timeout_setting = "idle_in_transaction_session_timeout"
    watches_socket = True
    peek_size = 512

    def classify(self, exc: BaseException) -> Disconnect | None:
        """A psycopg (3) or psycopg2 error: by SQLSTATE; without one, by class (the
        drivers raise ``OperationalError`` with no SQLSTATE only for connection failures,
        and psycopg2 ``InterfaceError`` for a connection already closed)."""
        if not type(exc).__module__.startswith("psycopg"):
            return None
        state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if isinstance(state, str) and state:
            if state in _NOT_SENT:
                return Disconnect(-1, _NOT_SENT[state], True, True, sqlstate=state)
            if state in _AMBIGUOUS or state.startswith("08"):
                return Disconnect(-1, _AMBIGUOUS.get(state, "lost"), False, True, sqlstate=state)
            return None
        # The class itself, not its bases: a subclass names one SQLSTATE (psycopg2's
        # SerializationFailure is an OperationalError too), which is not a lost session.
        name = type(exc).__name__
        if name == "InterfaceError":
            return Disconnect(0, "closed", not_sent=True, retryable=True)
        if name in ("OperationalError", "ConnectionTimeout"):
            return Disconnect(-1, "lost", not_sent=False, retryable=True)
        return None

    def failure_cause(self, state: ConnectionState, found: Disconnect) -> Cause:
        if found.sqlstate == "25P03":
            return explain(found.kind, wait=state.tx_wait, setting=self.tx_timeout_setting)
        return super().failure_cause(state, found)

    # --------------------------------------------------------- server limits

    def opened(self, db: Any, state: ConnectionState) -> None:
        """Read the idle timeouts as the connection opens (one round trip). With none
        set the server never closes an idle session itself; the peek still sees a
        session it terminated."""
        assert state.cfg is not None
        conn = db.connection
        known = _known.get(conn)
        if known is None:
            # A connection from Django's pool (OPTIONS["pool"]) is checked out again with
            # connect() and this signal; its session is the same: read only once.
            known = self._read(db, conn)
            with contextlib.suppress(TypeError):  # a connection that takes no weak ref
                _known[conn] = known
        state.wait, state.tx_wait = known
        state.limit = limit_for(state.wait, state.cfg.margin)

    def _read(self, db: Any, conn: Any) -> tuple[float, float | None]:
        try:
            session, in_tx = _read_timeouts(conn)
        except Exception as exc:
            self.limits_unreadable(db, exc)
            session, in_tx = None, None
        finally:
            if not db.autocommit:
                # Without autocommit the read opened a transaction: end it, as new.
                with contextlib.suppress(Exception):
                    conn.rollback()
        return (INF if session is None else session), in_tx

    def may_learn_late(self, state: ConnectionState, in_transaction: bool) -> bool:
        # Inside a transaction the read would be part of it.
        return not in_transaction and state.wait is None

    def learn_late(self, db: Any, state: ConnectionState) -> None:
        self.opened(db, state)

    def tx_timeout(self, state: ConnectionState) -> float | None:
        return state.tx_wait

    def limits_text(self, state: ConnectionState) -> str:
        if state.tx_wait is not None:
            return f"the server's idle_in_transaction_session_timeout is {state.tx_wait:g}s"
        return "the server's idle_in_transaction_session_timeout is off"

    # ------------------------------------------------------- the idle socket

    def readable_cause(self, db: Any, state: ConnectionState) -> tuple[str, bytes] | None:
        from ..sockets import peek, peek_head

        what, head = peek_head(state, self.peek_size)
        if what != "data" or error_state(head) is not None:
            return what, head
        # Another message (a LISTEN notification, a notice) is no sign of a close.
        driver = state.driver
        if not isinstance(driver, Psycopg) or not driver.tls_in_use(db.connection):
            return None  # plain protocol, and not an error: a notification, a notice
        # Over TLS the bytes are records that only the driver can read: let it read them
        # (it keeps notifications for the code), then see whether the session is still open.
        if driver.read_input(db.connection) and not peek(state):
            return None
        return peek_head(state, self.peek_size)

    def closed_cause(self, state: ConnectionState, what: str, head: bytes, idle: float) -> Cause:
        sqlstate = error_state(head) if what == "data" else None
        if sqlstate == "25P03":
            return explain(
                "idle_timeout", idle=idle, wait=state.tx_wait, setting=self.tx_timeout_setting
            )
        if sqlstate is not None:
            kind = _CLOSED_BY.get(sqlstate, "gone")
            return explain(kind, idle=idle, wait=state.wait, setting=self.timeout_setting)
        return super().closed_cause(state, what, head, idle)

    # ------------------------------------------------------------ the server

    def refusal(self, db: Any, state: ConnectionState, exc: BaseException) -> Cause | None:
        """25006 from a hot standby (the endpoint still points at a replica after a
        failover): it never ran, a primary can run it. Not the application's own
        read-only transaction (``SET TRANSACTION READ ONLY``,
        ``default_transaction_read_only``) on a primary, which reconnecting cannot help."""
        if sqlstate_of(exc) != _READ_ONLY or not self._hot_standby(db, state):
            return None
        return explain("hot_standby")

    def _hot_standby(self, db: Any, state: ConnectionState) -> bool:
        reported = self._reported(db, state.driver, "in_hot_standby")
        if reported is not None:
            return reported == "on"
        return _in_recovery(db.connection)

    def _reported(self, db: Any, driver: Driver | None, name: str) -> str | None:
        if not isinstance(driver, Psycopg):
            return None
        try:
            return driver.parameter(db.connection, name)
        except Exception:  # no connection, or a driver without it
            return None

    def node_state(self, db: Any) -> str:
        state: ConnectionState | None = getattr(db, "_dbkeepalive", None)
        value = self._reported(db, state.driver if state is not None else None, "in_hot_standby")
        return "" if value is None else f"in_hot_standby={value}"

    def dropped(self, db: Any, *, fork: bool) -> None:
        # Closed by its driver too (its goodbye goes to /dev/null once detached; to the
        # server for a node that refused a statement), so that Django's pool
        # (OPTIONS["pool"]) sees it closed and discards it instead of handing it out
        # again. Not in a forked child, where another thread may have held its lock.
        if not fork and db.connection is not None:
            with contextlib.suppress(Exception):
                db.connection.close()


POSTGRESQL = PostgreSQLFamily()
