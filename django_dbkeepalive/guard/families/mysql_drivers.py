"""The MySQL/MariaDB drivers: one thin adapter each.

Owns: how each driver exposes its socket, pings without reconnecting, and names its
session; and what each adjusts in its ``connect()`` arguments (PyMySQL: the TLS context
of its preferred mode, built once, :mod:`.mysql_tls`); nothing else differs for the guard.
Must never import: the rules, the wrappers, or the MySQL family module.
"""

from __future__ import annotations

from typing import Any

from ...conf import conf
from . import mysql_tls
from .base import Driver
from .mysql_connector import Connector

__all__ = ["DRIVERS", "Mysqlclient", "PyMySQL"]


class Mysqlclient(Driver):
    """mysqlclient (``MySQLdb``), on libmariadb or libmysqlclient."""

    name = "mysqlclient"
    modules = ("MySQLdb",)
    distribution = "mysqlclient"
    # libmariadb says "Lost connection" for a read that waited out read_timeout, as for
    # a close, and closes the socket: only the time the statement took tells them apart.
    timeouts_look_like_closes = True

    def thread_id(self, conn: Any) -> int | None:
        return int(conn.thread_id())

    def client_library(self, module: Any) -> str | None:
        try:
            return str(module._mysql.get_client_info())
        except Exception:
            return None


class PyMySQL(Driver):
    """PyMySQL (also when installed as ``MySQLdb`` with ``install_as_MySQLdb()``, where
    the backend's ``Database`` is the ``pymysql`` module itself)."""

    name = "PyMySQL"
    modules = ("pymysql",)
    distribution = "PyMySQL"

    def fileno(self, conn: Any) -> int | None:
        try:
            sock = conn._sock  # None once PyMySQL closed it itself
            return None if sock is None else int(sock.fileno())
        except Exception:
            return None

    def ping(self, conn: Any) -> None:
        conn.ping(reconnect=False)  # by default PyMySQL reconnects silently

    def thread_id(self, conn: Any) -> int | None:
        return int(conn.thread_id())

    def connection_params(self, params: dict[str, Any], alias: str) -> dict[str, Any]:
        # No TLS option: PyMySQL's preferred mode, whose context is built once per
        # process instead of per connect. ``params`` are passed on unchanged. It replaces
        # one PyMySQL method: not where DBKEEPALIVE["PATCH"] = False forbids patching.
        if conf.patch:
            mysql_tls.arm(params)
        return params


DRIVERS: tuple[Driver, ...] = (Mysqlclient(), PyMySQL(), Connector())
