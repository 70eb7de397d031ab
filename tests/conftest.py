"""Fixtures: one private MariaDB server per session, wired into Django's settings.

Use pytest-django's ``transactional_db`` (not ``db``): ``db`` wraps each test in a
transaction, and connection loss inside a transaction is a different code path.

PostgreSQL: ``postgres`` is a private server of the session, ``pg_alias`` the Django
alias ``"pg"`` on it for one test, ``pg_driver`` the driver Django uses (DBK_PG_DRIVER).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import Error, connections
from django.db.backends.base.base import BaseDatabaseWrapper

from .mariadb import MariaDBServer
from .postgres import PostgresServer, PostgresUnavailable, requested_driver
from .proxy import HOST as PROXY_HOST
from .proxy import FaultProxy

MYSQL_ENGINES = (
    "django.db.backends.mysql",
    "django_dbkeepalive.backends.mysql",
    "mysql.connector.django",
)
#: The DB-API module of each DBK_DRIVER, as the backend's ``Database`` names it.
DRIVER_MODULES = {
    "mysqlclient": "MySQLdb",
    "pymysql": "pymysql",
    "connector": "mysql.connector",
    "connector-cext": "mysql.connector",
}
PG_ALIAS = "pg"


def _select_pg_driver() -> str:
    """DBK_PG_DRIVER=psycopg2 hides psycopg 3, so Django's postgresql backend falls back
    to psycopg2 (it tries ``import psycopg`` first). Must run before anything imports
    that backend: conftest modules load after django.setup(), which imports no backend
    of an alias that is not configured (and "pg" is only ever added by pg_alias)."""
    try:
        name = requested_driver()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if name == "psycopg2":
        if "django.db.backends.postgresql.base" in sys.modules:
            raise pytest.UsageError(
                "DBK_PG_DRIVER=psycopg2 came too late: Django's postgresql backend is"
                " already imported (with psycopg 3)"
            )
        sys.modules["psycopg"] = None  # type: ignore[assignment]  # import psycopg -> ImportError
    return name


PG_DRIVER = _select_pg_driver()


def _connector_thread_id() -> None:
    """The tests ask a connection for its server thread id with ``thread_id()``, as
    mysqlclient and PyMySQL name it; Connector/Python calls it ``connection_id``. Test
    code only: the package asks the driver adapter (``Connector.thread_id``)."""
    if not os.environ.get("DBK_DRIVER", "").startswith("connector"):
        return
    from mysql.connector import connection

    classes: list[Any] = [connection.MySQLConnection]
    try:
        from mysql.connector import connection_cext

        classes.append(connection_cext.CMySQLConnection)
    except ImportError:
        pass
    for cls in classes:
        if not hasattr(cls, "thread_id"):
            cls.thread_id = lambda self: self.connection_id


_connector_thread_id()


@pytest.hookimpl(tryfirst=True)  # before pytest-django's, which sorts by these names too
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Name ``transactional_db`` among the fixtures of the tests that use ``pg_alias``.

    pytest-django creates the test databases for the tests that look like they use the
    database (a django_db mark, db or transactional_db among their fixtures). pg_alias
    requests transactional_db only while it runs (after "pg" exists): without this a
    run of such tests alone would create no test database and use (and flush!) the
    real "default" database. Appended, so it still comes after pg_alias.
    """
    for item in items:
        names = getattr(item, "fixturenames", None)
        if names is not None and "pg_alias" in names and "transactional_db" not in names:
            names.append("transactional_db")


def close_connections() -> None:
    """Close this thread's Django connections, ignoring errors from dead ones."""
    for conn in connections.all(initialized_only=True):
        try:
            conn.close()
        except Error:
            # A killed or restarted server's socket is dead; dropping it is all we want.
            conn.connection = None


def _ensure_connection(self: Any) -> None:
    """``BaseDatabaseWrapper.ensure_connection`` without the test case's alias guard."""
    if self.connection is None:
        with self.wrap_database_errors:
            self.connect()


@contextlib.contextmanager
def allowed_alias(alias: str) -> Iterator[None]:
    """Let this test connect to ``alias``, which it adds while it runs.

    Django's test case (and pytest-django's blocker) let a test use only the aliases it
    declared when it started, by patching ``BaseDatabaseWrapper.ensure_connection``.
    The checks connect through wrappers of their own (one per check), so the patched
    method gets Django's plain behaviour back for ``alias`` for the block.
    """
    guarded = BaseDatabaseWrapper.ensure_connection

    def ensure_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.alias == alias:
            return _ensure_connection(self)
        return guarded(self, *args, **kwargs)

    BaseDatabaseWrapper.ensure_connection = ensure_connection  # type: ignore[method-assign]
    try:
        yield
    finally:
        BaseDatabaseWrapper.ensure_connection = guarded  # type: ignore[method-assign]


@contextlib.contextmanager
def extra_alias(alias: str, **changes: Any) -> Iterator[str]:
    """Add a database alias (a copy of ``default`` with ``changes``) for the block.

    ``connections.settings`` is ``settings.DATABASES`` itself, so the alias exists for
    Django and for the checks (in this thread); afterwards its connection is closed and
    it is removed before the test case's teardown looks at the aliases again.
    """
    assert alias not in connections.settings
    new = copy.deepcopy(connections["default"].settings_dict)
    new.update(changes)
    connections.settings[alias] = new
    try:
        with allowed_alias(alias):
            yield alias
    finally:
        for db in connections.all(initialized_only=True):
            if db.alias == alias:
                with contextlib.suppress(Exception):
                    db.close()
        with contextlib.suppress(AttributeError):
            del connections[alias]
        del connections.settings[alias]


def json_from(args: list[str], env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    """Run ``python *args`` from the repository root; its last stdout line, as JSON."""
    import json
    import subprocess

    done = subprocess.run(
        [sys.executable, *args],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


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


def read_timeout_refused() -> bool:
    """Whether the driver of DBK_DRIVER refuses a ``read_timeout`` option (Connector/Python
    before 9.x does not know it, nor its ``ReadTimeoutError``)."""
    if not os.environ.get("DBK_DRIVER", "").startswith("connector"):
        return False
    from mysql.connector.constants import DEFAULT_CONFIGURATION

    return "read_timeout" not in DEFAULT_CONFIGURATION


#: For a test of the client's read_timeout.
needs_read_timeout = pytest.mark.skipif(
    read_timeout_refused(), reason="this Connector/Python has no read_timeout (9.x has)"
)


@pytest.fixture(scope="session")
def driver() -> str:
    """``"mysqlclient"``, ``"pymysql"``, ``"connector"`` or ``"connector-cext"`` (from
    DBK_DRIVER), checked against what the default alias's backend really uses."""
    name = os.environ.get("DBK_DRIVER", "mysqlclient")
    # pymysql.install_as_MySQLdb() puts the pymysql module itself in sys.modules["MySQLdb"].
    module = connections["default"].Database.__name__
    assert module == DRIVER_MODULES[name], f"DBK_DRIVER={name} but the backend uses {module}"
    if name.startswith("connector"):
        import mysql.connector

        want_cext = name == "connector-cext"
        assert mysql.connector.HAVE_CEXT or not want_cext, (
            "DBK_DRIVER=connector-cext but Connector/Python's C extension does not load"
            " (imported after the ssl module, on a system OpenSSL older than its own?)"
        )
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


# -- PostgreSQL ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's private PostgreSQL server (see tests/postgres.py).

    Skips when PostgreSQL or a driver is not installed, unless DBK_REQUIRE_POSTGRES is
    set (``make test`` sets it): then the test fails.
    """
    server = PostgresServer()
    try:
        try:
            server.start()
        except PostgresUnavailable as exc:
            if os.environ.get("DBK_REQUIRE_POSTGRES"):
                pytest.fail(f"{exc} (DBK_REQUIRE_POSTGRES is set)", pytrace=False)
            pytest.skip(str(exc))
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def pg_driver() -> str:
    """``"psycopg"`` or ``"psycopg2"`` (from DBK_PG_DRIVER), checked against what Django's
    postgresql backend really uses."""
    from django.db.backends.postgresql import base, psycopg_any

    actual = "psycopg" if psycopg_any.is_psycopg3 else "psycopg2"
    module = getattr(base, "Database").__name__  # noqa: B009 (not in django-stubs)
    assert actual == module == PG_DRIVER, (
        f"DBK_PG_DRIVER={PG_DRIVER} but Django's postgresql backend uses {module}"
    )
    return actual


def _close_quietly(alias: str) -> None:
    """Close this thread's connection of ``alias``, if any, ignoring errors."""
    for conn in connections.all(initialized_only=True):
        if conn.alias != alias:
            continue
        try:
            conn.close()
        except Exception:  # a terminated backend or a restarted server: nothing to close
            conn.connection = None


@pytest.fixture
def _pg_alias_settings(postgres: PostgresServer, django_db_setup: None) -> Iterator[str]:
    """Register the ``"pg"`` alias (then remove it again, after pytest-django's test
    case has flushed it: pg_alias's teardown runs before that, this one after).

    After django_db_setup: else pytest-django, setting up the test databases for the
    first test that uses pg_alias, would see "pg" (and the test's mark naming it) and
    create a test database ``test_postgres`` on the server.
    """
    from django.conf import settings

    cfg = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "postgres",
        "USER": postgres.user,
        "PASSWORD": postgres.password,
        "HOST": postgres.host,
        "PORT": postgres.port,
        "CONN_MAX_AGE": None,
        "OPTIONS": {"connect_timeout": 5, "sslmode": "disable"},  # TLS: tests ask for it
    }
    # The defaults (AUTOCOMMIT, TIME_ZONE, TEST, ...) a configured alias gets.
    settings_dict = connections.configure_settings({"default": cfg})["default"]
    connections.settings[PG_ALIAS] = settings_dict
    settings.DATABASES[PG_ALIAS] = settings_dict
    try:
        yield PG_ALIAS
    finally:
        _close_quietly(PG_ALIAS)
        # A pool (OPTIONS["pool"], Django 5.1+) lives in a class attribute of the
        # backend, by alias: one that the test case's flush opened would outlive "pg".
        from django.db.backends.postgresql.base import DatabaseWrapper

        pools = getattr(DatabaseWrapper, "_connection_pools", {})
        with contextlib.suppress(Exception):
            pools.pop(PG_ALIAS).close()
        connections.settings.pop(PG_ALIAS, None)
        settings.DATABASES.pop(PG_ALIAS, None)
        with contextlib.suppress(Exception):
            del connections[PG_ALIAS]


@pytest.fixture
def pg_alias(
    request: pytest.FixtureRequest, postgres: PostgresServer, _pg_alias_settings: str
) -> Iterator[str]:
    """The Django alias ``"pg"`` (``connections["pg"]``) on the ``postgres`` server, for
    this test; yields ``"pg"``. ``CONN_MAX_AGE=None``, database ``postgres``.

    It makes the test transactional and allows ``"pg"`` in it (in every thread) by itself:
    it marks the test ``django_db(transaction=True, databases=[..., "pg"])`` and then
    requests ``transactional_db``. So write::

        def test_x(postgres, pg_alias):              # or (postgres, pg_alias, transactional_db)
            with connections["pg"].cursor() as c:
                c.execute("SELECT pg_backend_pid()")

    and do NOT mark the test (nor its module) ``django_db``, nor request
    ``transactional_db``/``db`` before ``pg_alias``: those set up pytest-django's test
    case before "pg" exists, and then
    - ``@pytest.mark.django_db(transaction=True, databases=["default", "pg"])`` fails
      with ImproperlyConfigured ("...databases refers to 'pg' which is not defined in
      settings.DATABASES"), the mark being handled before any fixture of the test;
    - ``@pytest.mark.django_db(transaction=True)``, or ``transactional_db`` first, leaves
      "pg" undeclared, and Django refuses to connect it ("Database queries to 'pg' are
      not allowed in this test"); pg_alias fails early with a message saying so.
    No test database is created on the server (the alias is added after django_db_setup):
    tests run in the ``postgres`` database itself. After the test this thread's "pg"
    connection is closed (errors ignored), the server started again if a test stopped
    it, and the alias removed.
    """
    node = request.node
    # A Django test case already set up: Django >= 5.1's patches ensure_connection
    # while it runs (refusing the aliases the test did not declare).
    patched = getattr(BaseDatabaseWrapper.ensure_connection, "__name__", "")
    if node.get_closest_marker("django_db") is not None or patched == "patched_ensure_connection":
        pytest.fail(
            "pg_alias must set up the test's database access itself: drop the django_db"
            " mark (of the test or module) and request pg_alias before transactional_db",
            pytrace=False,
        )
    default_name = connections["default"].settings_dict["NAME"]
    if not str(default_name).startswith("test_"):  # the flush after the test would hit it
        pytest.fail(
            f"no test database for 'default' ({default_name!r}): see pytest_collection_modifyitems"
        )
    node.add_marker(pytest.mark.django_db(transaction=True, databases=["default", PG_ALIAS]))
    request.getfixturevalue("transactional_db")
    try:
        yield PG_ALIAS
    finally:
        # Before the test case's teardown, which flushes "pg" on a new connection.
        _close_quietly(PG_ALIAS)
        if not postgres.running:
            postgres.start()
