"""The PostgreSQL test infrastructure: the private server, ``pg_alias`` and ``pg_driver``.

The guard is off here (``AUTO_GUARD=False``): these tests are about what the server and
the drivers do, and the guard would recover from the errors they look at.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db import OperationalError, connections
from django.test import override_settings

from . import postgres as postgres_module
from .conftest import PG_ALIAS, wait_for
from .postgres import PostgresServer, PostgresUnavailable


@pytest.fixture(autouse=True)
def unguarded() -> Iterator[None]:
    with override_settings(DBKEEPALIVE={"AUTO_GUARD": False}):
        yield


def backend_pid(alias: str = PG_ALIAS) -> int:
    with connections[alias].cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


def assert_lost(exc: BaseException, pg_driver: str, sqlstate: str) -> None:
    """What each driver raises on the first query on a connection the server ended."""
    cause: Any = exc.__cause__
    raw: Any = connections[PG_ALIAS].connection
    assert connections[PG_ALIAS].is_usable() is False
    if pg_driver == "psycopg":
        import psycopg

        assert isinstance(cause, psycopg.OperationalError)
        # psycopg 3 reads the server's FATAL message: AdminShutdown (57P01) or
        # IdleSessionTimeout (57P05); the connection is then closed and broken.
        assert cause.sqlstate == sqlstate, repr(cause)
        assert raw.closed is True and raw.broken is True
    else:
        import psycopg2

        # psycopg2 never shows the FATAL message: no pgcode, libpq's own text.
        assert isinstance(cause, psycopg2.OperationalError)
        assert cause.pgcode is None, repr(cause)
        assert str(cause).startswith("server closed the connection unexpectedly")
        assert raw.closed == 2  # 2: broken


def test_the_server_answers(postgres: PostgresServer, pg_alias: str) -> None:
    assert pg_alias == PG_ALIAS
    with connections[pg_alias].cursor() as cur:
        cur.execute("SELECT current_setting('port')::int, current_user, current_database()")
        assert cur.fetchone() == (postgres.port, "postgres", "postgres")
    assert postgres.port != 5432  # never the system's cluster
    assert postgres.query("SELECT %s::int + 1", (1,)) == [(2,)]
    assert postgres.query("SET application_name = 'x'") == []  # no result set
    assert postgres.show("fsync") == "off"


def test_pg_alias_is_a_complete_alias(postgres: PostgresServer, pg_alias: str) -> None:
    wrapper = connections[pg_alias]
    assert wrapper.vendor == "postgresql"
    assert connections.settings[pg_alias] is wrapper.settings_dict
    assert settings.DATABASES[pg_alias] is wrapper.settings_dict
    conf = wrapper.settings_dict
    assert conf["PORT"] == postgres.port and conf["CONN_MAX_AGE"] is None
    assert conf["OPTIONS"] == {"connect_timeout": 5, "sslmode": "disable"}
    for key in ("AUTOCOMMIT", "ATOMIC_REQUESTS", "CONN_HEALTH_CHECKS", "TIME_ZONE", "TEST"):
        assert key in conf


def test_no_test_database_on_the_server(postgres: PostgresServer, pg_alias: str) -> None:
    names = {row[0] for row in postgres.query("SELECT datname FROM pg_database")}
    assert names == {"postgres", "template0", "template1"}


def test_the_default_alias_works_beside_pg(pg_alias: str) -> None:
    from testproject.testapp.models import Item

    Item.objects.create(key="pg-infra", value=1)
    assert Item.objects.count() == 1
    assert backend_pid() > 0


def test_pg_in_another_thread(postgres: PostgresServer, pg_alias: str) -> None:
    found: list[Any] = []

    def run() -> None:
        try:
            found.append(backend_pid())
        except Exception as exc:
            found.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(found) == 1 and isinstance(found[0], int), found


def test_backends_and_application_name(postgres: PostgresServer, pg_alias: str) -> None:
    pid = backend_pid()
    assert pid in postgres.backends()
    conn = postgres.connect(application_name="dbk_infra_test")
    try:
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()")
        other = cur.fetchone()[0]
        assert postgres.backends("dbk_infra_test") == [other]
        assert other in postgres.backends()
    finally:
        conn.close()


def test_terminate_ends_a_django_connection(
    postgres: PostgresServer, pg_alias: str, pg_driver: str
) -> None:
    pid = backend_pid()
    assert postgres.terminate(pid) is True
    assert pid not in postgres.backends()
    with pytest.raises(OperationalError) as info:
        backend_pid()
    assert_lost(info.value, pg_driver, "57P01")
    connections[pg_alias].close()
    assert backend_pid() != pid  # a new connection


def test_restart(postgres: PostgresServer, pg_alias: str, pg_driver: str) -> None:
    port, restarts = postgres.port, postgres.restarts
    pid = backend_pid()
    postgres.restart()
    assert postgres.running and postgres.port == port and postgres.restarts == restarts + 1
    with pytest.raises(OperationalError) as info:
        backend_pid()
    assert_lost(info.value, pg_driver, "57P01")  # the fast shutdown's "administrator command"
    connections[pg_alias].close()
    assert backend_pid() != pid
    assert postgres.query("SELECT 1") == [(1,)]


def test_idle_session_timeout_for_new_connections(
    postgres: PostgresServer, pg_alias: str, pg_driver: str
) -> None:
    assert postgres.show("idle_session_timeout") == "0"
    postgres.set_system("idle_session_timeout", "1s")
    try:
        assert postgres.show("idle_session_timeout") == "1s"
        connections[pg_alias].close()
        pid = backend_pid()
        time.sleep(1.5)
        assert wait_for(lambda: pid not in postgres.backends(), timeout=2)
        with pytest.raises(OperationalError) as info:
            backend_pid()
        assert_lost(info.value, pg_driver, "57P05")
    finally:
        postgres.reset_system("idle_session_timeout")
    assert postgres.show("idle_session_timeout") == "0"


def test_pg_driver_matches_the_environment(
    postgres: PostgresServer, pg_alias: str, pg_driver: str
) -> None:
    assert pg_driver == (os.environ.get("DBK_PG_DRIVER") or "psycopg")
    connections[pg_alias].ensure_connection()
    assert type(connections[pg_alias].connection).__module__.split(".")[0] == pg_driver
    if pg_driver == "psycopg2":
        assert sys.modules["psycopg"] is None  # hidden, so Django falls back to psycopg2
        with pytest.raises(ImportError):
            import psycopg  # noqa: F401


def test_missing_binaries_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres_module.glob, "glob", lambda pattern: [])
    with pytest.raises(PostgresUnavailable, match="make deps"):
        postgres_module.find_binaries()


def test_no_pg_alias_is_left_behind() -> None:
    # Run after the tests above (or before: then there is nothing to leave).
    assert PG_ALIAS not in connections.settings and PG_ALIAS not in settings.DATABASES
