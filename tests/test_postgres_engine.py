"""The guarded PostgreSQL ENGINE (``django_dbkeepalive.backends.postgresql``) without
patching (``DBKEEPALIVE["PATCH"] = False``): its own methods guard its connections,
against the private PostgreSQL server, with psycopg 3 or psycopg2 (DBK_PG_DRIVER)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.test import override_settings

from django_dbkeepalive import ConnectionLostInTransaction, guard
from django_dbkeepalive.guard import wrappers
from django_dbkeepalive.testing import record_recycles

from .conftest import close_connections
from .postgres import PostgresServer

pytestmark = pytest.mark.skipif(
    os.environ.get("DBK_BACKEND") == "engine", reason="sets up the mode it tests itself"
)
TABLE = "dbk_pg_engine_rows"


@pytest.fixture
def engine(postgres: PostgresServer, pg_alias: str, pg_driver: str) -> Iterator[Any]:
    """The "pg" alias with the guarded ENGINE, the guard installed without patching
    for the test (then with patching again), and an empty table of unique keys."""
    connections.settings[pg_alias]["ENGINE"] = "django_dbkeepalive.backends.postgresql"
    connections[pg_alias].close()
    del connections[pg_alias]  # made again, of the guarded ENGINE, on first use
    postgres.query(f"CREATE TABLE IF NOT EXISTS {TABLE} (k text PRIMARY KEY)")
    postgres.query(f"TRUNCATE {TABLE}")
    close_connections()
    guard.uninstall()
    guard.install(patch=False)
    try:
        db = connections[pg_alias]
        db.ensure_connection()
        yield db
    finally:
        close_connections()
        guard.uninstall()
        guard.install()


def backend_pid(db: Any) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def insert(db: Any, *keys: str) -> None:
    with db.cursor() as cursor:
        cursor.executemany(f"INSERT INTO {TABLE} (k) VALUES (%s)", [[key] for key in keys])


def keys(postgres: PostgresServer) -> list[str]:
    """The rows, read over the server's own admin connection."""
    return [row[0] for row in postgres.query(f"SELECT k FROM {TABLE} ORDER BY k")]


def test_the_engine_without_patching_replaces_a_terminated_session_before_a_write(
    postgres: PostgresServer, engine: Any
) -> None:
    assert getattr(engine, "dbkeepalive_native", False) and not guard.is_patched()
    assert wrappers.is_djangos_own(CursorWrapper.execute)  # nothing of Django's replaced
    assert BaseDatabaseWrapper.commit.__module__.startswith("django.")
    old = backend_pid(engine)
    assert postgres.terminate(old)
    time.sleep(0.3)  # past PEEK_AFTER: the next statement looks first
    with record_recycles("pg") as log:
        insert(engine, "a", "b")
    assert log.reasons == ["disconnected"]
    assert keys(postgres) == ["a", "b"]
    assert backend_pid(engine) != old


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_the_engine_without_patching_reruns_a_read_sent_on_a_terminated_session(
    postgres: PostgresServer, engine: Any
) -> None:
    old = backend_pid(engine)
    postgres.terminate(old)
    assert backend_pid(engine) != old  # sent on the dead session, run again once


def test_the_engine_without_patching_never_reconnects_inside_a_transaction(
    postgres: PostgresServer, engine: Any
) -> None:
    with pytest.raises(ConnectionLostInTransaction) as caught:
        with transaction.atomic(using="pg"):
            insert(engine, "in-block-1")
            postgres.terminate(backend_pid(engine))
            time.sleep(0.3)
            insert(engine, "in-block-2")
    assert caught.value.alias == "pg" and caught.value.cause == "terminated"
    assert keys(postgres) == []
    with transaction.atomic(using="pg"):  # a new session, a new transaction
        insert(engine, "after-block")
    assert keys(postgres) == ["after-block"]


def test_the_engines_health_check_finds_a_terminated_session_and_a_write_runs_once(
    postgres: PostgresServer, engine: Any
) -> None:
    engine.settings_dict["CONN_HEALTH_CHECKS"] = True
    engine.close()
    old = backend_pid(engine)
    assert engine.is_usable() is True
    postgres.terminate(old)
    engine.close_if_unusable_or_obsolete()  # what a request's start does
    # The first cursor of the "request" runs Django's health check, through the
    # engine's is_usable(): the dead session is closed, and the write runs once.
    insert(engine, "after")
    assert keys(postgres) == ["after"]
    assert backend_pid(engine) != old
