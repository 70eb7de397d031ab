"""The guard on a PostgreSQL alias, against the private PostgreSQL server: a terminated
session, idle_session_timeout, idle_in_transaction_session_timeout, a restart, the retry
rules and the messages. The driver is psycopg 3 or psycopg2 (DBK_PG_DRIVER)."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.core import checks
from django.core.management import call_command
from django.db import Error, OperationalError, connections, transaction
from django.test import override_settings

from django_dbkeepalive import ConnectionLostInTransaction, guard
from django_dbkeepalive.checks import configuration_messages
from django_dbkeepalive.guard.families import classify
from django_dbkeepalive.signals import connection_recycled

from .postgres import PostgresServer

TABLE = "dbk_pg_rows"


@pytest.fixture
def pg(postgres: PostgresServer, pg_alias: str, pg_driver: str) -> Iterator[Any]:
    """The "pg" wrapper of this thread, connected, with an empty table of unique keys."""
    postgres.query(f"CREATE TABLE IF NOT EXISTS {TABLE} (k text PRIMARY KEY)")
    postgres.query(f"TRUNCATE {TABLE}")
    db = connections[pg_alias]
    db.ensure_connection()
    yield db
    for name in ("idle_session_timeout", "idle_in_transaction_session_timeout"):
        postgres.reset_system(name)


@pytest.fixture
def recycles() -> Iterator[list[tuple[str, str]]]:
    """Every ``connection_recycled`` signal during the test: (alias, reason)."""
    seen: list[tuple[str, str]] = []

    def receiver(sender: str, reason: str, **kwargs: Any) -> None:
        seen.append((sender, reason))

    connection_recycled.connect(receiver)
    yield seen
    connection_recycled.disconnect(receiver)


@pytest.fixture
def pg_tls(postgres: PostgresServer, pg_alias: str, pg_driver: str) -> Iterator[Any]:
    """Like ``pg``, over TLS (``sslmode=require``)."""
    if not postgres.ssl:
        pytest.skip("openssl is not installed: the private server has no TLS")
    postgres.query(f"CREATE TABLE IF NOT EXISTS {TABLE} (k text PRIMARY KEY)")
    postgres.query(f"TRUNCATE {TABLE}")
    db = connections[pg_alias]
    db.settings_dict["OPTIONS"]["sslmode"] = "require"
    with db.cursor() as cursor:
        cursor.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert cursor.fetchone()[0] is True
    yield db


def notifications(db: Any) -> list[str]:
    """The payloads of the LISTEN notifications the driver has received."""
    conn = db.connection
    if hasattr(conn, "pgconn"):  # psycopg 3
        return [n.payload for n in conn.notifies(timeout=0.5, stop_after=1)]
    conn.poll()
    return [n.payload for n in conn.notifies]


def backend_pid(db: Any) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def insert(db: Any, key: str) -> None:
    with db.cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (k) VALUES (%s)", [key])


def keys(postgres: PostgresServer) -> list[str]:
    """The rows, read over the server's own admin connection."""
    return [row[0] for row in postgres.query(f"SELECT k FROM {TABLE} ORDER BY k")]


def fresh_session(db: Any) -> int:
    """Close ``db`` so the next statement opens a session with the current settings."""
    db.close()
    return backend_pid(db)


def test_a_terminated_idle_session_is_replaced_before_the_next_read_and_write(
    postgres: PostgresServer, pg: Any, recycles: list[tuple[str, str]]
) -> None:
    old = backend_pid(pg)
    assert postgres.terminate(old)
    time.sleep(0.3)  # past PEEK_AFTER: the next statement peeks first

    new = backend_pid(pg)
    assert new != old
    postgres.terminate(new)
    time.sleep(0.3)
    insert(pg, "after-terminate")

    assert keys(postgres) == ["after-terminate"]
    assert recycles == [("pg", "disconnected"), ("pg", "disconnected")]


def test_a_cursor_created_before_the_terminate_works_after_it(
    postgres: PostgresServer, pg: Any
) -> None:
    cursor = pg.cursor()
    try:
        cursor.execute("SELECT pg_backend_pid()")
        old = cursor.fetchone()[0]
        postgres.terminate(old)
        time.sleep(0.3)
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != old
        cursor.execute(f"INSERT INTO {TABLE} (k) VALUES (%s)", ["reused"])
    finally:
        cursor.close()
    assert keys(postgres) == ["reused"]


# PEEK_AFTER = 1000: every statement takes the hot path, as one sent right after the
# previous statement: on PostgreSQL nothing peeks at the socket there.
@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_a_read_right_after_a_terminate_is_run_again_on_a_new_session(
    postgres: PostgresServer, pg: Any, recycles: list[tuple[str, str]]
) -> None:
    old = backend_pid(pg)
    postgres.terminate(old)
    # No peek: the read is sent on the dead session, fails, and runs again once on a
    # new one.
    assert backend_pid(pg) != old
    assert recycles == [("pg", "disconnected")]


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_a_write_right_after_a_terminate_runs_once_on_a_new_session(
    postgres: PostgresServer, pg: Any, recycles: list[tuple[str, str]]
) -> None:
    old = backend_pid(pg)
    postgres.terminate(old)
    insert(pg, "right-after")  # the poll before a write sees the closed session
    assert keys(postgres) == ["right-after"]
    assert recycles == [("pg", "disconnected")]
    assert backend_pid(pg) != old


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_sql_objects_of_the_driver_work_and_are_peeked_at_too(
    postgres: PostgresServer, pg: Any
) -> None:
    from django.db.backends.postgresql.psycopg_any import sql

    statement = sql.SQL("INSERT INTO {} (k) VALUES (%s)").format(sql.Identifier(TABLE))
    with pg.cursor() as cursor:
        cursor.execute(statement, ["composed-1"])
    postgres.terminate(backend_pid(pg))
    with pg.cursor() as cursor:
        cursor.execute(statement, ["composed-2"])  # no [0] to look at: peeked anyway
    assert keys(postgres) == ["composed-1", "composed-2"]


def test_a_write_in_flight_when_its_session_is_terminated_is_not_run_again(
    postgres: PostgresServer, pg: Any
) -> None:
    pid = backend_pid(pg)
    killer = threading.Timer(0.5, postgres.terminate, [pid])
    killer.start()
    try:
        with pytest.raises(OperationalError) as info:
            with pg.cursor() as cursor:
                # Inserts, then waits: the terminate lands while it is in flight.
                cursor.execute(
                    f"WITH ins AS (INSERT INTO {TABLE} (k) VALUES (%s) RETURNING k) "
                    "SELECT pg_sleep(3) FROM ins",
                    ["in-flight"],
                )
    finally:
        killer.join()
    assert classify(info.value) is not None
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "'pg'" in notes and "It was not run again" in notes
    # The server rolled the statement back; run again, it would have left one row.
    assert keys(postgres) == []
    insert(pg, "next")  # the next statement works, on a new session
    assert keys(postgres) == ["next"]
    assert backend_pid(pg) != pid


def test_a_listen_notification_waiting_on_the_socket_is_not_taken_for_a_close(
    postgres: PostgresServer, pg: Any, recycles: list[tuple[str, str]]
) -> None:
    pid = backend_pid(pg)
    with pg.cursor() as cursor:
        cursor.execute("LISTEN dbk_channel")
    postgres.query("NOTIFY dbk_channel, 'hello'")
    time.sleep(0.3)  # the notification sits unread in the socket: it is readable

    insert(pg, "after-notify")
    assert backend_pid(pg) == pid
    assert recycles == []
    assert keys(postgres) == ["after-notify"]
    assert notifications(pg) == ["hello"]  # still delivered to the code


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_over_tls_a_write_right_after_a_terminate_runs_once_on_a_new_session(
    postgres: PostgresServer, pg_tls: Any, recycles: list[tuple[str, str]]
) -> None:
    old = backend_pid(pg_tls)
    postgres.terminate(old)
    insert(pg_tls, "tls-right-after")  # TLS records: the driver reads them, sees the close
    assert keys(postgres) == ["tls-right-after"]
    assert recycles == [("pg", "disconnected")]
    assert backend_pid(pg_tls) != old


def test_over_tls_a_listen_notification_is_kept_and_still_delivered(
    postgres: PostgresServer, pg_tls: Any, recycles: list[tuple[str, str]]
) -> None:
    pid = backend_pid(pg_tls)
    with pg_tls.cursor() as cursor:
        cursor.execute("LISTEN dbk_channel")
    postgres.query("NOTIFY dbk_channel, 'over-tls'")
    time.sleep(0.3)

    insert(pg_tls, "after-notify")
    assert backend_pid(pg_tls) == pid
    assert recycles == []
    assert notifications(pg_tls) == ["over-tls"]


def test_idle_session_timeout_is_read_and_an_idle_connection_is_replaced_before_it(
    postgres: PostgresServer, pg: Any, recycles: list[tuple[str, str]]
) -> None:
    postgres.set_system("idle_session_timeout", "3s")
    old = fresh_session(pg)
    assert guard.state_of(pg).wait == 3.0
    assert guard.state_of(pg).limit == 1.5  # 3 s - min(MARGIN, half of it)

    time.sleep(2.0)  # past the limit, not past the server's timeout: it is still open
    assert old in postgres.backends()
    new = backend_pid(pg)

    assert new != old
    assert recycles == [("pg", "idle")]
    # Closed by the guard, not by the server, and without a COM_QUIT-like wait.
    assert old not in postgres.backends()


def test_a_session_closed_by_idle_session_timeout_is_replaced_and_named(
    postgres: PostgresServer,
    pg: Any,
    recycles: list[tuple[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    postgres.set_system("idle_session_timeout", "1s")
    old = fresh_session(pg)
    time.sleep(1.6)
    assert old not in postgres.backends()  # the server ended it

    with caplog.at_level("INFO", logger="django_dbkeepalive"):
        insert(pg, "after-idle-timeout")

    assert keys(postgres) == ["after-idle-timeout"]
    assert recycles == [("pg", "disconnected")]
    assert "idle_session_timeout (1s)" in caplog.text


def test_a_terminate_inside_atomic_raises_and_nothing_of_the_block_is_committed(
    postgres: PostgresServer, pg: Any
) -> None:
    with pytest.raises(ConnectionLostInTransaction) as info:
        with transaction.atomic(using="pg"):
            insert(pg, "in-block-1")
            postgres.terminate(backend_pid(pg))
            time.sleep(0.3)
            insert(pg, "in-block-2")
    message = str(info.value)
    assert "'pg'" in message and "pg_terminate_backend()" in message
    assert info.value.cause == "terminated"
    assert keys(postgres) == []

    insert(pg, "after-block")  # the connection works again after the block
    assert keys(postgres) == ["after-block"]


def test_idle_in_transaction_timeout_raises_before_sending_and_commits_nothing(
    postgres: PostgresServer, pg: Any
) -> None:
    postgres.set_system("idle_in_transaction_session_timeout", "1s")
    fresh_session(pg)
    assert guard.state_of(pg).tx_wait == 1.0

    with pytest.raises(ConnectionLostInTransaction) as info:
        with transaction.atomic(using="pg"):
            insert(pg, "in-block")
            time.sleep(1.3)
            insert(pg, "too-late")
    assert "idle_in_transaction_session_timeout (1s)" in str(info.value)
    assert info.value.cause == "idle_timeout"
    assert keys(postgres) == []
    insert(pg, "after-block")
    assert keys(postgres) == ["after-block"]


def test_a_restarted_server_is_survived_by_the_next_read_and_write(
    postgres: PostgresServer, pg: Any
) -> None:
    old = backend_pid(pg)
    postgres.restart()
    time.sleep(0.2)
    assert backend_pid(pg) != old
    insert(pg, "after-restart")
    assert keys(postgres) == ["after-restart"]


def test_conn_max_age_closes_an_old_connection_before_its_next_statement(
    postgres: PostgresServer, pg: Any, recycles: list[tuple[str, str]]
) -> None:
    pg.settings_dict["CONN_MAX_AGE"] = 1
    old = fresh_session(pg)
    time.sleep(1.2)
    assert backend_pid(pg) != old
    assert recycles == [("pg", "max_age")]


def test_a_postgresql_alias_gets_the_info_that_names_what_is_not_covered(pg: Any) -> None:
    found = configuration_messages("pg")
    assert [m.id for m in found] == ["dbkeepalive.I002"]
    assert found[0].level == checks.INFO
    assert "'pg'" in found[0].msg and "not pinged" in found[0].msg


def test_the_drivers_disconnect_errors_are_classified_by_sqlstate(
    postgres: PostgresServer, pg: Any
) -> None:
    # A statement error of the server (not a lost connection) is not a disconnect.
    with pytest.raises(Error) as info:
        with pg.cursor() as cursor:
            cursor.execute("SELECT 1/0")
    assert classify(info.value) is None
    assert backend_pid(pg)  # the session is still fine

    postgres.terminate(backend_pid(pg))
    time.sleep(0.3)
    raw = pg.connection.cursor()  # the driver's own cursor: the guard is not in the way
    with pytest.raises(Exception) as lost:
        raw.execute("SELECT 1")
    found = classify(lost.value)
    assert found is not None
    assert found.kind in ("terminated", "lost")  # psycopg reads the FATAL, psycopg2 not
    pg.close()


def test_the_diagnose_command_lists_a_postgresql_alias_with_what_is_guarded(pg: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    pg.settings_dict["PASSWORD"] = "pg-Secret-42"  # trust auth ignores it; never printed
    try:
        call_command("dbkeepalive", "--database", "pg", "--json", stdout=out, stderr=err)
    except SystemExit as exc:  # 0 unless a problem is found
        assert not exc.code, out.getvalue() + err.getvalue()
    report = json.loads(out.getvalue())
    (alias,) = report["databases"]
    assert alias["vendor"] == "postgresql"
    assert alias["note"].startswith("PostgreSQL: guarded")
    assert [issue["id"] for issue in alias["issues"]] == ["dbkeepalive.I002"]
    assert "pg-Secret-42" not in out.getvalue() + err.getvalue()


def test_a_pooled_connection_the_server_terminated_is_never_handed_out_again(
    postgres: PostgresServer, pg_alias: str, pg_driver: str
) -> None:
    if pg_driver != "psycopg" or django.VERSION < (5, 1):
        pytest.skip("Django's connection pool needs Django 5.1+ and psycopg 3")
    pytest.importorskip("psycopg_pool")
    postgres.query(f"CREATE TABLE IF NOT EXISTS {TABLE} (k text PRIMARY KEY)")
    postgres.query(f"TRUNCATE {TABLE}")
    db = connections[pg_alias]
    db.settings_dict["OPTIONS"]["pool"] = {"min_size": 2, "max_size": 2}
    db.settings_dict["CONN_MAX_AGE"] = 0  # the pool refuses persistent connections
    try:
        for turn in range(4):  # more turns than the pool has connections
            old = backend_pid(db)
            postgres.terminate(old)
            time.sleep(0.3)
            assert backend_pid(db) != old  # replaced at once
            db.close()  # back to the pool, as at the end of a request
            db.ensure_connection()  # the next checkout: a live socket, not a dropped one
            assert stat.S_ISSOCK(os.fstat(db.connection.fileno()).st_mode)
            insert(db, f"turn-{turn}")
            db.close()
    finally:
        db.close_pool()
    assert keys(postgres) == [f"turn-{turn}" for turn in range(4)]


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_a_read_sent_past_idle_in_transaction_timeout_raises_naming_that_timeout(
    postgres: PostgresServer, pg: Any, pg_driver: str
) -> None:
    # No look before the read (PEEK_AFTER): it is sent, and the server's error says why.
    postgres.set_system("idle_in_transaction_session_timeout", "500ms")
    fresh_session(pg)
    with pytest.raises(ConnectionLostInTransaction) as info:
        with transaction.atomic(using="pg"):
            insert(pg, "in-block")
            time.sleep(0.8)
            with pg.cursor() as cursor:
                cursor.execute("SELECT 1")
    message = str(info.value)
    if pg_driver == "psycopg":  # psycopg2 reports the close without the server's SQLSTATE
        assert "closed it for inactivity (its idle_in_transaction_session_timeout)" in message
        assert info.value.cause == "idle_timeout"
    assert keys(postgres) == []
    insert(pg, "after-block")
    assert keys(postgres) == ["after-block"]


def test_without_autocommit_reading_the_limits_leaves_no_transaction_open(
    postgres: PostgresServer, pg: Any
) -> None:
    postgres.set_system("idle_session_timeout", "30s")
    pg.close()
    pg.settings_dict["AUTOCOMMIT"] = False
    try:
        pg.ensure_connection()
        assert guard.idle_limits(pg)[1] == 30.0  # read as it opened
        conn = pg.connection
        pid = conn.info.backend_pid if hasattr(conn, "info") else conn.get_backend_pid()
        # The read opened a transaction (autocommit off) and ended it: the session is idle.
        [(state,)] = postgres.query(f"SELECT state FROM pg_stat_activity WHERE pid = {pid:d}")
        assert state == "idle"
    finally:
        pg.close()
        pg.settings_dict["AUTOCOMMIT"] = True


def test_a_connection_opened_unguarded_learns_its_limits_when_asked(
    postgres: PostgresServer, pg: Any
) -> None:
    postgres.set_system("idle_session_timeout", "20s")
    pg.close()
    with override_settings(DBKEEPALIVE={"AUTO_GUARD": False}):
        pg.ensure_connection()
        state = guard.state_of(pg)
        assert state is None or state.wait is None  # nothing was read as it opened
        limit, wait = guard.idle_limits(pg)
    assert wait == 20.0 and limit is not None and limit < 20.0
    pg.close()
