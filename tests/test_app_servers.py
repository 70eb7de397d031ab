"""Real application servers under load, with the app installed: gunicorn (sync, gthread
and gevent workers), uvicorn (the ASGI app, async views) and uWSGI, each a subprocess serving
``benchmarks.loadapp`` on the session's private MariaDB, with the session's driver.

Each test is one short :func:`benchmarks.load.run`: 6 client threads write uniquely keyed
rows and read them back over keep-alive HTTP while every app connection is KILLed twice,
the clients go quiet for longer than ``wait_timeout`` (2 s) and the server restarts once.
Then the rows are counted per key over a separate connection. Nothing may be written
twice or lost, and the only failed requests allowed are writes that were in flight at
the instant of a KILL or of the server's shutdown (the app reports them as possibly
applied; at most one per connection killed). Control assertions prove the faults
happened (connections killed, idle connections closed by the server, new connections
opened, requests served after each fault), and plain Django with persistent connections,
under one KILL, fails requests (so the same checks can fail).

Not in the Connector/Python session (``tests/sessions.py`` runs only the guard's core
there): the servers are tested with mysqlclient and PyMySQL. ``make bench`` runs the
same load longer, against plain Django too (``benchmarks/load_bench.py``).
"""

from __future__ import annotations

import os

import pytest

from benchmarks.appservers import missing
from benchmarks.load import Result, Scenario, run

from .mariadb import MariaDBServer

DRIVER = os.environ.get("DBK_DRIVER", "mysqlclient")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.restart,
    pytest.mark.skipif(
        DRIVER not in ("mysqlclient", "pymysql"),
        reason="the application servers are tested with mysqlclient and PyMySQL",
    ),
]


def load(server: MariaDBServer, kind: str, mode: str = "app", **changes: object) -> Result:
    """One short load run; skips when the application server is not installed."""
    why = missing(kind)
    if why is not None:
        pytest.skip(why)
    if server.external:
        pytest.skip("the load run restarts the server: unset DBKEEPALIVE_TEST_SERVER")
    # A think time of 5 ms per client keeps the CPU for the sessions beside this one.
    scenario = Scenario(kind, mode, DRIVER, clients=6, phase=0.8, think=0.005)
    for name, value in changes.items():
        setattr(scenario, name, value)
    return run(server, scenario)


def assert_nothing_lost_and_only_in_flight_writes_failed(result: Result) -> None:
    context = result.as_dict()
    assert result.duplicates == 0, context
    assert result.missing == 0, context
    assert result.strays == 0, context
    assert result.unexpected == [], context
    assert result.in_flight <= result.allowed, context
    # Each allowed failure is a write the app reported as possibly applied.
    assert set(result.failures) <= {"write write_unknown"}, context


def assert_the_faults_happened(result: Result) -> None:
    context = result.as_dict()
    assert len(result.killed) == 2 and all(result.killed), context
    assert result.open_before_quiet > 0 and result.open_after_quiet == 0, context
    assert result.open_at_restart > 0, context
    # Every killed or idle-expired connection was replaced by a new one.
    assert result.connects >= sum(result.killed) + result.open_before_quiet, context
    assert result.ok_after_quiet > 0 and result.ok_after_restart > 0, context
    assert result.ok > 200, context


def test_gunicorn_sync_workers_lose_no_request_to_killed_idle_or_restarted_connections(
    server: MariaDBServer,
) -> None:
    result = load(server, "sync")
    assert_nothing_lost_and_only_in_flight_writes_failed(result)
    assert_the_faults_happened(result)


def test_gunicorn_gthread_workers_lose_no_request_to_killed_idle_or_restarted_connections(
    server: MariaDBServer,
) -> None:
    result = load(server, "gthread")
    assert_nothing_lost_and_only_in_flight_writes_failed(result)
    assert_the_faults_happened(result)


def test_gunicorn_gevent_workers_lose_no_request_with_either_driver(
    server: MariaDBServer,
) -> None:
    """PyMySQL is cooperative under gevent; mysqlclient blocks the hub during each
    statement, which makes the worker slower but must not make it wrong."""
    result = load(server, "gevent")
    assert_nothing_lost_and_only_in_flight_writes_failed(result)
    assert_the_faults_happened(result)


def test_uvicorn_serving_the_asgi_app_loses_no_request(server: MariaDBServer) -> None:
    """Async views and the async ORM. Django runs each ASGI request's database work in
    a thread of its own, so connections last one request whatever CONN_MAX_AGE: the
    KILLs reach connections that are in use or left behind by finished requests."""
    result = load(server, "uvicorn")
    assert_nothing_lost_and_only_in_flight_writes_failed(result)
    assert_the_faults_happened(result)


def test_daphne_serving_the_asgi_app_loses_no_request(server: MariaDBServer) -> None:
    """The other ASGI server Django documents: one Twisted process, async views."""
    result = load(server, "daphne")
    assert_nothing_lost_and_only_in_flight_writes_failed(result)
    assert_the_faults_happened(result)


def test_uwsgi_threaded_workers_lose_no_request(server: MariaDBServer) -> None:
    result = load(server, "uwsgi")
    assert_nothing_lost_and_only_in_flight_writes_failed(result)
    assert_the_faults_happened(result)


def test_plain_django_with_persistent_connections_fails_requests_after_a_kill(
    server: MariaDBServer,
) -> None:
    """The control: the same load and checks, without the app and with one KILL only,
    fail (each killed connection fails the next request it serves), yet lose no
    acknowledged row."""
    result = load(server, "gthread", "persistent", kills=1, idle=False, restart=False)
    assert result.killed and result.killed[0] > 0, result.as_dict()
    assert result.failed > 0, result.as_dict()
    assert result.unexpected, result.as_dict()
    assert any(kind.endswith(" lost") for kind in result.failures), result.as_dict()
    assert result.duplicates == 0 and result.missing == 0, result.as_dict()
