"""MySQL and MariaDB, with every driver of :mod:`.mysql_drivers`.

Owns: the family's answers to the rules (built on :mod:`.mysql_codes` and
:mod:`.mysql_session`): the session's limits read as a connection opens, what an
unsolicited packet on an idle socket says (error 4031, 1927...), the ping, a node that
refuses statements (read-only, Galera not ready), ending a zombie session, statements
refused for their size, and the two patches of Django's MySQL backend (client timeouts,
a ping that never reconnects).
Must never import: the rules or the wrappers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ...conf import conf
from ..causes import Cause, explain
from ..disconnects import Disconnect
from ..state import INF, ConnectionState
from . import mysql_connector as connector
from .base import Driver, Family, Statement, UnknownDriver, limit_for
from .mysql_codes import CLOSED_BY, DISCONNECT_CODES, classify_code, code_of, refusal_of
from .mysql_drivers import DRIVERS
from .mysql_session import (
    end_zombie,
    new_session,
    node_state,
    read_only_node,
    read_session,
    statement_size,
    too_large_cause,
)

__all__ = ["DISCONNECT_CODES", "MYSQL", "MySQLFamily"]

logger = logging.getLogger("django_dbkeepalive")

# The smallest max_allowed_packet a server accepts: a shorter statement always fits.
_MIN_MAX_ALLOWED_PACKET = 1024


class MySQLFamily(Family):
    """MySQL and MariaDB (Django's ``vendor == "mysql"``)."""

    vendor = "mysql"
    title = "MySQL/MariaDB"
    drivers = DRIVERS
    fallback_driver: Driver = UnknownDriver()
    watches_socket = True
    can_ping = True
    peek_size = 7  # 3-byte length, sequence number, 0xFF, a 2-byte error code
    gone_code = 2006

    def classify(self, exc: BaseException) -> Disconnect | None:
        code = connector.code_of(exc)
        found = connector.classify(exc, code_of(exc) if code is None else code)
        return found if found is not None else classify_code(exc, code)

    # --------------------------------------------------------- server limits

    def opened(self, db: Any, state: ConnectionState) -> None:
        """Read the session's ``wait_timeout`` (and ``max_allowed_packet``, and the
        server instance's id) as the connection opens, one round trip, so the idle
        limit is known before the first pause: after it, a flow a NAT or firewall dropped
        silently would not answer the question, and a server-side close could not be
        told from a KILL."""
        instance = self._read_limits(db, state)
        state.session = new_session(db, state, instance)
        if state.zombie is not None:
            self.end_zombie(db, state)

    def _read_limits(self, db: Any, state: ConnectionState) -> str | None:
        assert state.cfg is not None
        instance = None
        try:
            version = state.driver.server_version(db.connection)
            state.wait, state.max_packet, instance = read_session(db.connection, version)
        except Exception as exc:
            self.limits_unreadable(db, exc)
            state.wait = INF
        state.limit = limit_for(state.wait, state.cfg.margin)
        return instance

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

        if state.driver.reading(db.connection):
            return None  # the rest of a result the driver has not read yet
        return peek_head(state, self.peek_size)

    def closed_cause(self, state: ConnectionState, what: str, head: bytes, idle: float) -> Cause:
        if what == "data" and len(head) >= 7 and head[4] == 0xFF:
            code = int.from_bytes(head[5:7], "little")
            return explain(CLOSED_BY.get(code, "gone"), idle=idle, wait=state.wait)
        return super().closed_cause(state, what, head, idle)

    # ------------------------------------------------------------ the server

    def ping(self, db: Any, state: ConnectionState) -> None:
        state.driver.ping(db.connection)

    def refusal(self, db: Any, state: ConnectionState, exc: BaseException) -> Cause | None:
        """Read-only (1290 ``--read-only``, 1836; 1792 only when the node itself is
        read-only, not when the application asked for a read-only transaction, which the
        server is asked) or a Galera node not ready (1047 "WSREP has not yet prepared
        node"): the statement never ran, and this node cannot run it."""
        found = refusal_of(exc)
        if found is None:
            return None
        code, kind = found
        if kind == "read_only_transaction":
            try:
                version = state.driver.server_version(db.connection)
                if not read_only_node(db.connection, version):
                    return None  # the application's own read-only transaction
            except Exception:
                return None
            kind = "read_only"
        del code  # in the error itself
        return explain(kind)

    def node_state(self, db: Any) -> str:
        return node_state(db.connection) if db.connection is not None else ""

    def end_zombie(self, db: Any, state: ConnectionState) -> None:
        thread_id = state.zombie.thread_id if state.zombie is not None else None
        try:
            why_not = end_zombie(db, state, state.driver.server_version(db.connection))
        except Exception as exc:
            if self.classify_chain(exc) is not None:
                raise  # the new connection is lost too: connect() handles that
            # 1094: it is gone already; 1095: not ours to kill. Nothing to do either way.
            why_not = str(exc)
        if why_not is not None:
            logger.debug("dbkeepalive: previous session %s not killed: %s", thread_id, why_not)
            return
        logger.info(
            "dbkeepalive: killed the %r connection's previous session %d, which the server "
            "still held after the network went silent (its transaction's locks are released)",
            db.alias,
            thread_id,
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
            driver = self.driver_for(getattr(db, "Database", None))
            for name, value in timeouts.items():
                if driver.accepts_option(name):
                    params.setdefault(name, value)  # OPTIONS are already in params
        return super().connection_params(db, params)

    def backend_patches(self) -> list[tuple[type, str, Any]]:
        patches: list[tuple[type, str, Any]] = []
        try:
            from django.db.backends.mysql.base import DatabaseWrapper
        except Exception:  # mysqlclient (or PyMySQL as MySQLdb) is not installed
            pass
        else:
            patches += [
                (DatabaseWrapper, "is_usable", _wrap_is_usable),
                (DatabaseWrapper, "get_connection_params", _wrap_get_connection_params),
            ]
        wrapper = _connector_wrapper()
        if wrapper is not None:  # its is_usable() already pings without reconnecting
            patches.append((wrapper, "get_connection_params", _wrap_get_connection_params))
        return patches

    def guarded_methods(self) -> list[tuple[type, str]]:
        # Connector/Python's cursor() pings first: a closed connection fails there.
        wrapper = _connector_wrapper()
        return [] if wrapper is None else [(wrapper, "create_cursor")]


def _connector_wrapper() -> type | None:
    """Connector/Python's ``DatabaseWrapper`` (``ENGINE = "mysql.connector.django"``),
    when it is installed and loads (its connect, commit, rollback and set_autocommit
    are ``BaseDatabaseWrapper``'s, its cursors Django's ``CursorWrapper``: patched)."""
    try:
        from mysql.connector.django.base import DatabaseWrapper
    except Exception:
        return None
    wrapper: type = DatabaseWrapper
    return wrapper


def _wrap_is_usable(original: Callable[..., Any]) -> Callable[..., Any]:
    def is_usable(self: Any) -> bool:
        return MYSQL.is_usable(self, lambda: bool(original(self)))

    return is_usable


def _wrap_get_connection_params(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_connection_params(self: Any) -> Any:
        return MYSQL.connection_params(self, original(self))

    return get_connection_params


MYSQL = MySQLFamily()
