"""The checks' own connection to a server: short-lived, with capped client timeouts.

Owns: :func:`diagnostic_connection` (a new ``DatabaseWrapper`` made with a copy of the
alias's settings whose timeouts are at most :data:`~.registry.DIAGNOSTIC_TIMEOUT`, so a
server that accepts connections but never answers cannot hang ``check --database`` or
``manage.py dbkeepalive``) and :func:`read_server_variables`.
Must never import: :mod:`.server`, :mod:`.configuration`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db import connections

from .. import guard
from ..conf import TIMEOUT_NAMES, conf
from .aliases import is_real, options_of, settings_dict_of
from .registry import DIAGNOSTIC_TIMEOUT


def _capped(value: Any, cap: int) -> Any:
    """``value`` as a timeout of at most ``cap`` seconds: kept when it is a number in
    ``(0, cap]``; ``cap`` when it is missing, ``None``, ``0`` (no timeout), negative or
    larger (a float stays a float, so mysqlclient still rejects it as it would in
    production); anything else is kept for the driver to reject."""
    if value is None:
        return cap
    if not is_real(value):
        return value
    if 0 < value <= cap:
        return value
    return float(cap) if isinstance(value, float) else cap


def diagnostic_settings(
    settings_dict: Mapping[str, Any],
    extra: Mapping[str, int] | None = None,
    cap: int | None = None,
) -> dict[str, Any]:
    """A copy of ``settings_dict`` whose ``OPTIONS`` ``connect_timeout``,
    ``read_timeout`` and ``write_timeout`` are at most ``cap`` seconds (default
    :data:`DIAGNOSTIC_TIMEOUT`); the alias's smaller values (from ``OPTIONS``, else from
    ``extra``, its ``CLIENT_TIMEOUTS``) are kept. ``settings_dict`` is not changed."""
    cap = DIAGNOSTIC_TIMEOUT if cap is None else cap
    options = dict(options_of(settings_dict))
    extra = {} if "read_default_file" in options else (extra or {})
    for name in TIMEOUT_NAMES:
        options[name] = _capped(options[name] if name in options else extra.get(name), cap)
    return {**settings_dict, "OPTIONS": options}


@contextlib.contextmanager
def diagnostic_connection(alias: str) -> Iterator[Any]:
    """A new ``DatabaseWrapper`` for ``alias`` (not connected yet) made with
    :func:`diagnostic_settings`, closed again when the block ends. The connections of
    ``django.db.connections`` (this thread's and the others') are left alone."""
    wrapper_class = type(connections[alias])
    bounded = diagnostic_settings(settings_dict_of(alias), conf.client_timeouts_for(alias))
    db = wrapper_class(bounded, alias)
    if guard.is_installed():
        guard.connect_without_retry(db)
    try:
        yield db
    finally:
        if guard.is_installed():
            guard.close_connection(db)
        else:
            with contextlib.suppress(Exception):
                db.close()


@dataclass(frozen=True)
class ServerVariables:
    """What the server says about one connection (timeouts in seconds, sizes in bytes)."""

    version: str
    wait_timeout: float  # @@SESSION.wait_timeout: what applies to this connection
    global_wait_timeout: float
    interactive_timeout: float  # @@GLOBAL.interactive_timeout
    net_read_timeout: float
    net_write_timeout: float
    max_allowed_packet: int  # @@SESSION.max_allowed_packet
    global_max_allowed_packet: int
    #: The node's role: @@GLOBAL.read_only (a replica, or a demoted primary).
    read_only: bool = False
    #: A Galera node's state: wsrep_ready, wsrep_cluster_status, wsrep_local_state_comment
    #: (empty where the server is no Galera node).
    wsrep: Mapping[str, str] = field(default_factory=dict)


_VARIABLES_SQL = (
    "SELECT VERSION(), @@SESSION.wait_timeout, @@GLOBAL.wait_timeout, "
    "@@GLOBAL.interactive_timeout, @@SESSION.net_read_timeout, @@SESSION.net_write_timeout, "
    "@@SESSION.max_allowed_packet, @@GLOBAL.max_allowed_packet, @@GLOBAL.read_only"
)
_WSREP_SQL = (
    "SHOW GLOBAL STATUS WHERE Variable_name IN "
    "('wsrep_ready', 'wsrep_cluster_status', 'wsrep_local_state_comment')"
)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: Any) -> float:
    # int from both drivers, Decimal or str through some proxies; ints stay ints.
    if isinstance(value, bytes):
        value = value.decode()
    number = float(value)
    return int(number) if number.is_integer() else number


def read_server_variables(alias: str) -> ServerVariables:
    """Read the server's timeouts for ``alias`` over a :func:`diagnostic_connection`:
    what a new connection of the alias gets (after ``init_command``), bounded in time,
    without touching the alias's connections. Raises whatever connecting or querying
    raised."""
    with diagnostic_connection(alias) as db, db.cursor() as cursor:
        cursor.execute(_VARIABLES_SQL)
        row = cursor.fetchone()
        cursor.execute("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
        galera = [_str(value) for _name, value in cursor.fetchall()] == ["ON"]
        wsrep: dict[str, str] = {}
        if galera:  # (a MariaDB built with wsrep shows its status even when it is off)
            cursor.execute(_WSREP_SQL)
            wsrep = {_str(name): _str(value) for name, value in cursor.fetchall()}
    version = _str(row[0])
    return ServerVariables(
        version=version,
        wait_timeout=_number(row[1]),
        global_wait_timeout=_number(row[2]),
        interactive_timeout=_number(row[3]),
        net_read_timeout=_number(row[4]),
        net_write_timeout=_number(row[5]),
        max_allowed_packet=int(_number(row[6])),
        global_max_allowed_packet=int(_number(row[7])),
        read_only=_str(row[8]) in ("1", "ON"),
        wsrep=wsrep,
    )
