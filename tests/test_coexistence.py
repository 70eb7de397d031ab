"""The guard under the instrumentation Django projects run: Sentry, OpenTelemetry,
django-debug-toolbar's SQL panel, django-prometheus's ENGINE, Django's own query capture
and ``execute_wrapper``.

Each tool's data with the app must equal its data without it (the same statements in a
fresh process with ``DBK_APP=0``: tests/coexistence_probe.py), in both installation
orders where they can differ (the tool set up before ``django.setup()``, as in
``settings.py``, or after the guard's ``ready()``), and the guard must still recover a
KILLed connection underneath the tool, which keeps the statement it re-ran.
"""

from __future__ import annotations

import functools
import os
import select
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings

from django_dbkeepalive import guard

from .conftest import json_from

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        os.environ.get("DBK_BACKEND") == "engine", reason="run in the patching sessions"
    ),
]
ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ["SELECT 1", "SELECT 2", "SELECT %s"]  # executemany: its SQL once
# The guard's one statement when a connection opens (mysql_session.read_session).
GUARD_READ = "SELECT @@SESSION.wait_timeout"
SET_ISOLATION = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"
#: The guard's name of each DBK_DRIVER's adapter.
DRIVER_NAMES = {"mysqlclient": "mysqlclient", "pymysql": "PyMySQL"}


@functools.cache
def _probe(tool: str, order: str, app: bool) -> dict[str, Any]:
    env = {
        **os.environ,
        "DBK_APP": "1" if app else "0",
        "DBK_BACKEND": "patch",
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
    }
    result = json_from(["-m", "tests.coexistence_probe", tool, order], env)
    # Each run is what it claims to be: the guard installed (and guarding) or absent.
    assert result["guard"]["installed"] is app
    assert (result["guard"]["wait"] is not None) is app
    return result


@pytest.fixture
def probe(django_db_setup: None) -> Any:
    """``probe(tool, order="before", app=True)``: the probe's JSON (run once per session),
    against the test database (DBK_DB_* are set by the session's fixtures)."""
    return lambda tool, order="before", app=True: _probe(tool, order, app)


def opened_then_ran(sql: list[str]) -> bool:
    """Django's session setup on the new connection (its first in the process also reads
    the server's version and modes), then the workload."""
    return SET_ISOLATION in sql and sql[-3:] == WORKLOAD


def plain_and_guarded(probe: Any, tool: str, order: str) -> tuple[dict[str, Any], ...]:
    """The runs without and with the app; the run without it failed the read after the
    KILL (so the run with it recovered something real)."""
    plain, guarded = probe(tool, order, app=False), probe(tool, order, app=True)
    assert plain["error"] == "OperationalError" and plain["value"] is None
    assert guarded["error"] is None and guarded["value"] == 3
    assert guarded["after"] != guarded["victim"]  # a new connection
    return plain, guarded


# -- Sentry ------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["before", "after"])
def test_sentry_records_the_same_db_spans_with_the_app_in_either_installation_order(probe, order):
    plain, guarded = plain_and_guarded(probe, "sentry", order)
    assert [s["description"] for s in plain["workload"]] == WORKLOAD
    assert guarded["workload"] == plain["workload"]
    # On a new connection too: Sentry's "connect" span and Django's session setup; the
    # guard's own read of wait_timeout goes through the driver's cursor, not Django's.
    assert opened_then_ran([s["description"] for s in plain["opening"]])
    assert plain["opening"][0]["description"] == "connect"
    assert guarded["opening"] == plain["opening"]


@pytest.mark.parametrize("order", ["before", "after"])
def test_sentry_keeps_the_span_of_a_read_the_guard_reran_after_a_kill(probe, order):
    plain, guarded = plain_and_guarded(probe, "sentry", order)
    [failed] = plain["after_kill"]
    assert (failed["description"], failed["status"]) == ("SELECT 3", "internal_error")
    spans = guarded["after_kill"]
    reads = [s for s in spans if s["description"] == "SELECT 3"]
    if order == "before":
        # Sentry's wrapper is under the guard's: it sees the attempt on the dead
        # connection (as plain Django's) and the re-run on the new one.
        assert reads == [failed, {**failed, "status": None}]
    else:
        # Sentry's wrapper is over the guard's: one statement, which succeeded.
        assert reads == [{**failed, "status": None}]
    descriptions = [s["description"] for s in spans if s["description"] != "SELECT 3"]
    assert descriptions == ["connect", SET_ISOLATION, "SELECT CONNECTION_ID()"]


# -- OpenTelemetry -----------------------------------------------------------------------


def statements(spans: list[dict[str, Any]]) -> list[str]:
    return [span["statement"] for span in spans]


@pytest.mark.parametrize("order", ["before", "after"])
def test_opentelemetry_records_the_same_spans_with_the_app_in_either_installation_order(
    probe, driver, order
):
    plain, guarded = plain_and_guarded(probe, "otel", order)
    # The DB-API instrumentation wrapped the driver's connection in a proxy object, and
    # the guard still found the driver (from the backend's module, not the object).
    assert plain["proxied"] and guarded["proxied"]
    assert guarded["guard"]["driver"] == DRIVER_NAMES[driver]
    assert statements(plain["workload"]) == WORKLOAD
    assert guarded["workload"] == plain["workload"]
    # It traces the driver's connection, so it also sees the guard's one statement when a
    # connection opens; nothing else differs.
    assert opened_then_ran(statements(plain["opening"]))
    ours = [s for s in guarded["opening"] if s["statement"].startswith(GUARD_READ)]
    assert len(ours) == 1 and ours[0]["status"] == "UNSET"
    assert [s for s in guarded["opening"] if s not in ours] == plain["opening"]


@pytest.mark.parametrize("order", ["before", "after"])
def test_opentelemetry_keeps_the_span_of_a_read_the_guard_reran_after_a_kill(probe, order):
    plain, guarded = plain_and_guarded(probe, "otel", order)
    [failed] = plain["after_kill"]
    assert (failed["statement"], failed["status"]) == ("SELECT 3", "ERROR")
    spans = guarded["after_kill"]
    # Under the driver's proxy, in either order: the attempt on the dead connection (as
    # plain Django's), the new connection's setup, the re-run, the next statement.
    assert spans[0] == failed
    assert statements(spans[1:3]) == [SET_ISOLATION, spans[2]["statement"]]
    assert spans[2]["statement"].startswith(GUARD_READ)
    assert spans[3] == {**failed, "status": "UNSET"}
    assert statements(spans[4:]) == ["SELECT CONNECTION_ID()"]


# -- django-debug-toolbar ----------------------------------------------------------------
# The SQL panel wraps each connection's cursor() while it records: no installation order.


def test_debug_toolbar_sql_panel_lists_the_same_queries_with_the_app(probe):
    plain, guarded = plain_and_guarded(probe, "toolbar", "before")
    assert [q["raw_sql"] for q in plain["workload"]] == WORKLOAD
    assert [q["params"] for q in plain["workload"]] == [None, None, [[1], [2]]]
    assert guarded["workload"] == plain["workload"]
    assert opened_then_ran([q["raw_sql"] for q in plain["opening"]])
    assert guarded["opening"] == plain["opening"]


def test_debug_toolbar_lists_a_read_the_guard_reran_after_a_kill_once(probe):
    plain, guarded = plain_and_guarded(probe, "toolbar", "before")
    assert [q["raw_sql"] for q in plain["after_kill"]] == ["SELECT 3"]
    # The panel's cursor is over the guard's execute: the re-run is inside its one
    # record, the new connection's session setup (through Django's cursor) is its own.
    assert [(q["raw_sql"], q["sql"]) for q in guarded["after_kill"]] == [
        (SET_ISOLATION, SET_ISOLATION),
        ("SELECT 3", "SELECT 3"),
        ("SELECT CONNECTION_ID()", "SELECT CONNECTION_ID()"),
    ]


# -- django-prometheus -------------------------------------------------------------------
# Its ENGINE subclasses Django's MySQL backend: no installation order either.


def test_django_prometheus_engine_counts_the_same_queries_with_the_app(probe):
    plain, guarded = plain_and_guarded(probe, "prometheus", "before")
    assert plain["engine"] == guarded["engine"] == "django_prometheus.db.backends.mysql.base"
    # 2 execute() + executemany() of 2 rows (which it counts as 2 executes, 2 many).
    assert plain["workload"]["django_db_execute_total"] == 4
    assert plain["workload"]["django_db_execute_many_total"] == 2
    assert guarded["workload"] == plain["workload"]
    assert plain["opening"]["django_db_new_connections_total"] == 1
    assert guarded["opening"] == plain["opening"]


def test_the_guard_recovers_a_kill_under_the_django_prometheus_engine(probe, driver):
    plain, guarded = plain_and_guarded(probe, "prometheus", "before")
    # Recognized as MySQL (vendor "mysql"), its driver from the backend's module, the
    # server's wait_timeout read when the connection opened.
    assert guarded["guard"]["driver"] == DRIVER_NAMES[driver]
    assert guarded["guard"]["wait"] > 0
    assert plain["after_kill"] == {
        "django_db_new_connections_total": 0,
        "django_db_execute_total": 1,
        "django_db_execute_many_total": 0,
        "django_db_errors_total": 1,
    }
    # Its cursor is the driver's, under Django's: it counts both attempts of the read,
    # the failed one as an error, the new connection and its session setup.
    assert guarded["after_kill"] == {
        "django_db_new_connections_total": 1,
        "django_db_execute_total": 1 + 1 + 1 + 1,  # SELECT 3, SET, SELECT 3, CONNECTION_ID
        "django_db_execute_many_total": 0,
        "django_db_errors_total": 1,
    }


# -- Django's own ------------------------------------------------------------------------


def run_workload() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.execute("SELECT 2")
        cursor.executemany("SELECT %s", [(1,), (2,)])


class Spy:
    """An ``execute_wrapper``: every statement it sees, and how it ended."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool, str]] = []

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        try:
            result = execute(sql, params, many, context)
        except Exception as exc:
            self.seen.append((sql, many, type(exc).__name__))
            raise
        self.seen.append((sql, many, "ok"))
        return result


def capture() -> tuple[list[str], list[tuple[str, bool, str]]]:
    """The workload on the open connection: what Django logged, what a wrapper saw."""
    connection.ensure_connection()
    spy = Spy()
    with CaptureQueriesContext(connection) as queries, connection.execute_wrapper(spy):
        run_workload()
    return [q["sql"] for q in queries.captured_queries], spy.seen


def test_django_query_capture_and_another_execute_wrapper_see_the_same_with_the_app(
    django_assert_num_queries,
):
    assert guard.is_installed()
    with django_assert_num_queries(3):
        run_workload()
    guarded = capture()
    guard.uninstall()
    try:
        connection.close()  # reopened without the guard: plain Django's connection
        plain = capture()
    finally:
        guard.install()
        connection.close()
    assert plain[0] == ["SELECT 1", "SELECT 2", "2 times: SELECT %s"]  # as Django logs it
    assert plain[1] == [
        ("SELECT 1", False, "ok"),
        ("SELECT 2", False, "ok"),
        ("SELECT %s", True, "ok"),
    ]
    assert guarded == plain


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})  # the read is sent on the dead connection
def test_django_counts_a_read_the_guard_reran_after_a_kill_once(server, django_assert_num_queries):
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        [victim] = cursor.fetchone()
    conn = connection.connection
    server.kill(victim)
    sock = getattr(conn, "_sock", None)
    poller = select.poll()
    poller.register(sock.fileno() if sock is not None else conn.fileno(), select.POLLIN)
    assert poller.poll(5000), "the KILL did not reach the client"
    spy = Spy()
    with CaptureQueriesContext(connection) as queries, connection.execute_wrapper(spy):
        with connection.cursor() as cursor:
            cursor.execute("SELECT 3")
            assert cursor.fetchone() == (3,)
            cursor.execute("SELECT CONNECTION_ID()")
            [after] = cursor.fetchone()
    assert after != victim
    # Django logs the read once (its debug cursor is over the guard's execute), and the
    # new connection's session setup, which runs through Django's cursor.
    assert [q["sql"] for q in queries.captured_queries] == [
        SET_ISOLATION,
        "SELECT 3",
        "SELECT CONNECTION_ID()",
    ]
    # A wrapper is inside Django's execute: it sees each attempt, the one on the dead
    # connection failing. (execute_wrappers belong to Django's DatabaseWrapper, which
    # outlives the reconnect: the wrapper stays on for the new connection.)
    assert spy.seen == [
        ("SELECT 3", False, "OperationalError"),
        (SET_ISOLATION, False, "ok"),
        ("SELECT 3", False, "ok"),
        ("SELECT CONNECTION_ID()", False, "ok"),
    ]
