"""The server session behind a MySQL/MariaDB connection: what it is allowed (its
``wait_timeout``, its ``max_allowed_packet``), who it is (its thread id on which server
instance), what the node it runs on is (read-only, a Galera node not ready), and
ending it from a new connection when the network lost it silently.

Owns: the one round trip as a connection opens, the proof that a ``KILL`` reaches the
very session the guard lost and never a stranger's, and the statement-size rules.
Must never import: the rules, the wrappers, :mod:`.mysql`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..causes import Cause
from ..state import ConnectionState, Session, now
from .base import Statement

__all__ = [
    "end_zombie",
    "node_state",
    "read_only_node",
    "read_session",
    "statement_size",
    "too_large_cause",
]

logger = logging.getLogger("django_dbkeepalive")


def _one(conn: Any, sql: str, params: Any = None) -> tuple[Any, ...] | None:
    cursor = conn.cursor()
    try:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    finally:
        cursor.close()
    return None if row is None else tuple(row)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def instance_variable(version: str) -> str:
    """The variable that names the server instance: MariaDB's ``server_uid`` (a hash of
    its host's MAC address and port), MySQL's ``server_uuid`` (made at first start)."""
    return "server_uid" if "mariadb" in version.lower() else "server_uuid"


def read_session(conn: Any, version: str) -> tuple[float, int | None, str | None]:
    """``wait_timeout``, ``max_allowed_packet`` and the server instance's id, in one
    round trip (the instance is ``None`` where the server has no such variable)."""
    variable = instance_variable(version)
    sql = "SELECT @@SESSION.wait_timeout, @@SESSION.max_allowed_packet"
    try:
        row = _one(conn, f"{sql}, @@GLOBAL.{variable}")
    except Exception as exc:  # pragma: no cover - a server without it (MariaDB < 10.3)
        if getattr(exc, "args", (None,))[0] != 1193:  # ER_UNKNOWN_SYSTEM_VARIABLE
            raise
        row = (*(_one(conn, sql) or (None, None)), None)
    assert row is not None
    return (
        float(row[0]),
        None if row[1] is None else int(row[1]),
        _text(row[2]) or None,
    )


def end_zombie(db: Any, state: ConnectionState, version: str) -> str | None:
    """``KILL`` the wrapper's previous session from its new connection, if it is proven to
    be that very session; returns why not (``None`` when it was killed).

    The proof: the same server instance (its ``server_uid``/``server_uuid``, never the
    ``server_id``, which most servers leave at 1 and Galera nodes share), up since before
    that session opened (a thread id is unique only within one instance's lifetime), and
    the process list's row for that id showing the same user at the lost socket's own
    address (so the server saw the client itself: behind a proxy or a load balancer it
    sees the proxy, and nothing proves which session is ours)."""
    zombie, current = state.zombie, state.session
    state.zombie = None
    if zombie is None or current is None:
        return "no session recorded"
    if zombie.instance is None or zombie.instance != current.instance:
        return "not provably the same server instance (another node behind the endpoint?)"
    if zombie.local is None:
        return "not a TCP connection"
    conn = db.connection
    status = (
        "information_schema.GLOBAL_STATUS"
        if "mariadb" in version.lower()
        else "performance_schema.global_status"
    )
    row = _one(
        conn,
        f"SELECT (SELECT VARIABLE_VALUE FROM {status} WHERE VARIABLE_NAME = 'UPTIME'), "
        "USER, HOST, SUBSTRING_INDEX(USER(), '@', 1) "
        "FROM information_schema.PROCESSLIST WHERE ID = %s",
        (int(zombie.thread_id),),
    )
    if row is None:
        return "it is gone already"
    uptime, user, host, login_user = row[0], _text(row[1]), _text(row[2]), _text(row[3])
    # Uptime is whole seconds, rounded down: up at least as long as the old session has
    # existed proves no restart since it opened. (NULL on MySQL 8: not proven.)
    if uptime is None or float(uptime) < now() - zombie.opened + 0.1:
        return "the server restarted since (or its uptime is unknown)"
    if login_user is None or user != login_user:
        return f"it belongs to another user ({user!r})"
    if host != f"{zombie.local[0]}:{zombie.local[1]}":
        return (
            f"the server sees it at {host!r}, not at the lost socket's address: a proxy "
            "or load balancer sits in between, so it cannot be proven to be ours"
        )
    cursor = conn.cursor()
    try:
        cursor.execute(f"KILL {int(zombie.thread_id):d}")
    finally:
        cursor.close()
    return None


def read_only_node(conn: Any, version: str) -> bool:
    """Whether the node is read-only as a whole (``read_only``, or a global read-only
    transaction default), as opposed to the application having asked for a read-only
    transaction: both give error 1792."""
    tx = "tx_read_only" if "mariadb" in version.lower() else "transaction_read_only"
    row = _one(conn, f"SELECT @@GLOBAL.read_only, @@GLOBAL.{tx}")
    return row is not None and any(str(v) in ("1", "ON") for v in row)


def node_state(conn: Any) -> str:
    """What the node says about its role, for a message: ``read_only=ON``,
    ``wsrep_ready=OFF, wsrep_cluster_status=non-Primary``; ``""`` if it cannot say."""
    parts = []
    try:
        row = _one(conn, "SELECT @@GLOBAL.read_only")
        if row is not None:
            parts.append(f"read_only={'ON' if str(row[0]) in ('1', 'ON') else 'OFF'}")
        cursor = conn.cursor()
        try:
            cursor.execute("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
            if [_text(value) for _name, value in cursor.fetchall()] == ["ON"]:
                cursor.execute(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN "
                    "('wsrep_ready', 'wsrep_cluster_status', 'wsrep_local_state_comment')"
                )
                parts += [f"{_text(name)}={_text(value)}" for name, value in cursor.fetchall()]
        finally:
            cursor.close()
    except Exception:  # a node that refuses even this: say what was learnt
        pass
    return ", ".join(parts)


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


def new_session(db: Any, state: ConnectionState, instance: str | None) -> Session | None:
    """The :class:`~..state.Session` of ``db``'s connection just opened."""
    from ..sockets import local_address

    try:
        thread_id = state.driver.thread_id(db.connection)
    except Exception:
        return None
    if thread_id is None:
        return None
    return Session(int(thread_id), instance, local_address(state), now())
