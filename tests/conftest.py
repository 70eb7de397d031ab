"""Fixtures: one private MariaDB server per session, wired into Django's settings.

Use pytest-django's ``transactional_db`` (not ``db``): ``db`` wraps each test in a
transaction, and connection loss inside a transaction is a different code path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import Error, connections

from .mariadb import MariaDBServer
from .proxy import HOST as PROXY_HOST
from .proxy import FaultProxy

MYSQL_ENGINES = ("django.db.backends.mysql",)


def close_connections() -> None:
    """Close this thread's Django connections, ignoring errors from dead ones."""
    for conn in connections.all(initialized_only=True):
        try:
            conn.close()
        except Error:
            # A killed or restarted server's socket is dead; dropping it is all we want.
            conn.connection = None


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDBServer]:
    """The session's MariaDB server (private, or ``DBKEEPALIVE_TEST_SERVER``)."""
    server = MariaDBServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    mariadb: MariaDBServer, django_db_modify_db_settings_parallel_suffix: None
) -> None:
    """Point every MySQL alias at the session server, before pytest-django creates test DBs."""
    from django.conf import settings

    for alias, conf in settings.DATABASES.items():
        if conf.get("ENGINE") not in MYSQL_ENGINES:
            continue
        # In place: django.db.connections holds these same dicts.
        conf.update(
            HOST=mariadb.host,
            PORT=mariadb.port,
            USER=mariadb.user,
            PASSWORD=mariadb.password,
        )
        if alias == "reader":  # the same database through a second, read-only user
            conf.update(USER=mariadb.reader_user, PASSWORD=mariadb.reader_password)
        if alias == "default":
            test_name = (conf.get("TEST") or {}).get("NAME") or f"test_{conf['NAME']}"
            # Subprocesses (testproject/manage.py, servers) inherit these and use the test DB.
            os.environ.update(
                DBK_DB_HOST=mariadb.host,
                DBK_DB_PORT=str(mariadb.port),
                DBK_DB_USER=mariadb.user,
                DBK_DB_PASSWORD=mariadb.password,
                DBK_DB_READER_USER=mariadb.reader_user,
                DBK_DB_READER_PASSWORD=mariadb.reader_password,
                DBK_DB_NAME=test_name,
            )


@pytest.fixture
def server(mariadb: MariaDBServer) -> Iterator[MariaDBServer]:
    """The session server; after the test it is running again and stale connections are dropped."""
    restarts = mariadb.restarts
    yield mariadb
    if not mariadb.running:
        mariadb.start_again()
    if mariadb.restarts != restarts:
        close_connections()


@pytest.fixture
def raw(mariadb: MariaDBServer, django_db_setup: None) -> Callable[..., list[tuple[Any, ...]]]:
    """``raw(sql, args=None)``: run SQL as admin on a separate connection in the test database."""
    db = connections["default"].settings_dict["NAME"]

    def run(sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        return mariadb.query(sql, args, db=db)

    return run


@pytest.fixture
def set_wait_timeout(mariadb: MariaDBServer) -> Iterator[Callable[[int], None]]:
    """``set_wait_timeout(seconds)``: GLOBAL wait_timeout and interactive_timeout,
    for new connections.

    Closes Django's connections so the next query opens one that gets the new value;
    restores the old values (and closes again) after the test.
    """
    saved: dict[str, Any] = {}

    def set_(seconds: int) -> None:
        for name in ("wait_timeout", "interactive_timeout"):
            saved.setdefault(name, mariadb.get_global(name))
            mariadb.set_global(name, int(seconds))
        close_connections()

    yield set_
    for name, value in saved.items():
        mariadb.set_global(name, value)
    if saved:
        close_connections()


@pytest.fixture(scope="session")
def driver() -> str:
    """``"mysqlclient"`` or ``"pymysql"`` (from DBK_DRIVER), checked against what Django
    really uses."""
    name = os.environ.get("DBK_DRIVER", "mysqlclient")
    from django.db.backends.mysql import base

    # pymysql.install_as_MySQLdb() puts the pymysql module itself in sys.modules["MySQLdb"].
    module = getattr(base, "Database").__name__  # noqa: B009 (not in django-stubs)
    actual = "pymysql" if module == "pymysql" else "mysqlclient"
    assert actual == name, f"DBK_DRIVER={name} but Django's MySQL backend uses {module}"
    return name


@pytest.fixture
def conn_max_age() -> Iterator[Callable[[int | None], None]]:
    """``conn_max_age(seconds_or_None)``: the default alias's CONN_MAX_AGE, in every thread.

    Django's wrappers of all threads share one settings dict, so this reaches pool
    threads too. Closes this thread's connections so the next one gets the new value;
    restores the old value (and closes again) after the test.
    """
    settings_dict = connections["default"].settings_dict
    saved = settings_dict.get("CONN_MAX_AGE", 0)

    def set_(value: int | None) -> None:
        settings_dict["CONN_MAX_AGE"] = value
        close_connections()

    yield set_
    settings_dict["CONN_MAX_AGE"] = saved
    close_connections()


@pytest.fixture
def proxy(mariadb: MariaDBServer) -> Iterator[FaultProxy]:
    """A :class:`~tests.proxy.FaultProxy` on 127.0.0.1 in front of the session server."""
    started = FaultProxy(mariadb.port).start()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def via_proxy(proxy: FaultProxy, django_db_setup: None) -> Iterator[FaultProxy]:
    """The default alias connects through ``proxy`` for this test, in every thread.

    Rewrites HOST/PORT in the alias's settings dict (shared by the wrappers of all
    threads) and closes this thread's connections, so the next query opens a flow
    through the proxy; restores both (and closes again) after the test.
    """
    settings_dict = connections["default"].settings_dict
    saved = settings_dict["HOST"], settings_dict["PORT"]
    close_connections()
    settings_dict.update(HOST=PROXY_HOST, PORT=proxy.port)
    try:
        yield proxy
    finally:
        settings_dict.update(HOST=saved[0], PORT=saved[1])
        close_connections()


@pytest.fixture
def db_options() -> Iterator[Callable[..., None]]:
    """``db_options(read_timeout=2, connect_timeout=None)``: change the default alias's
    OPTIONS for this test (``None`` removes a key), in every thread.

    Closes this thread's connections so the next one uses them; restores the old
    OPTIONS (and closes again) after the test.
    """
    options = connections["default"].settings_dict.setdefault("OPTIONS", {})
    saved = dict(options)

    def set_(**changes: Any) -> None:
        for name, value in changes.items():
            if value is None:
                options.pop(name, None)
            else:
                options[name] = value
        close_connections()

    yield set_
    options.clear()
    options.update(saved)
    close_connections()
