"""A node that refuses a statement before running it (read-only after a failover): outside
a transaction the statement runs once more on a new connection through the endpoint;
inside one the transaction's loss is raised and the next statement reconnects.

The application connects as a user without ``SUPER`` or ``READ_ONLY ADMIN`` (as in
production: such a user bypasses ``read_only``), through a proxy that the tests move
to a second private server (the endpoint of a failover). The full topologies
(replication, HAProxy, Galera) are in ``test_failover.py`` (``make ha``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError, connections, transaction
from django.test import override_settings

from django_dbkeepalive import ConnectionLostInTransaction
from django_dbkeepalive.testing import record_recycles

from .conftest import extra_alias, wait_for
from .mariadb import MariaDBServer
from .proxy import FaultProxy
from .servers import _free_port as free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

APP_USER, APP_PASSWORD = "app_writer", "app-writer-pw"
DB = "test_dbkeepalive"
TABLE = "refusal_rows"


def _prepare(server: MariaDBServer) -> None:
    """The application's user (writes to the test database only) and its table."""
    for host in ("%", "localhost"):
        server.query(
            "CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (APP_USER, host, APP_PASSWORD)
        )
    server.query(f"CREATE DATABASE IF NOT EXISTS {DB}")
    for host in ("%", "localhost"):
        server.query(f"GRANT ALL PRIVILEGES ON {DB}.* TO %s@%s", (APP_USER, host))
    server.query(f"CREATE TABLE IF NOT EXISTS {DB}.{TABLE} (k VARCHAR(40) NOT NULL)")
    server.query(f"DELETE FROM {DB}.{TABLE}")


@pytest.fixture(scope="module")
def standby(mariadb: MariaDBServer) -> Iterator[MariaDBServer]:
    """A second private server: where the endpoint points after a failover."""
    other = MariaDBServer()
    other.start()
    try:
        yield other
    finally:
        other.close()


@pytest.fixture
def endpoint(server: MariaDBServer, standby: MariaDBServer) -> Iterator[FaultProxy]:
    """The alias ``app`` as the application's user through a proxy to ``server``."""
    for node in (server, standby):
        _prepare(node)
        node.set_global("read_only", 0)
    proxy = FaultProxy(server.port).start()
    try:
        with extra_alias(
            "app", HOST="127.0.0.1", PORT=proxy.port, USER=APP_USER, PASSWORD=APP_PASSWORD
        ):
            yield proxy
    finally:
        for node in (server, standby):
            node.set_global("read_only", 0)
        proxy.close()


def write(key: str) -> None:
    with connections["app"].cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (k) VALUES (%s)", [key])


def rows(node: MariaDBServer) -> list[str]:
    return [row[0] for row in node.query(f"SELECT k FROM {DB}.{TABLE} ORDER BY k")]


def thread_id() -> int:
    with connections["app"].cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


def connections_seen(node: MariaDBServer) -> int:
    """Connections the server accepted, not counting this query's own."""
    return int(node.query("SHOW GLOBAL STATUS LIKE 'Connections'")[0][1]) - 1


def test_a_write_refused_by_a_demoted_node_runs_once_on_the_node_the_endpoint_reaches(
    server, standby, endpoint
):
    before = thread_id()  # a persistent connection to the old primary
    server.set_global("read_only", 1)  # the failover: demoted ...
    endpoint.retarget(standby.port)  # ... and the endpoint moved
    with record_recycles("app") as recycles:
        write("after-failover")  # no error reaches the caller
    assert rows(server) == [] and rows(standby) == ["after-failover"]
    assert [r.reason for r in recycles] == ["read_only"]
    assert thread_id() != before
    assert wait_for(lambda: before not in [int(p["id"]) for p in server.processlist()])  # closed


def test_a_node_that_refuses_again_gets_the_original_error_naming_its_state(server, endpoint):
    thread_id()
    server.set_global("read_only", 1)  # demoted, but the endpoint did not move
    seen = connections_seen(server)
    with pytest.raises(OperationalError) as caught:
        write("refused-twice")
    assert caught.value.args[0] == 1290
    assert "--read-only" in str(caught.value)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "It was sent again once on a new connection" in notes
    assert "read_only=ON" in notes
    # One new connection for the one re-run (the first call's own query counts too).
    assert connections_seen(server) == seen + 2
    assert rows(server) == []
    server.set_global("read_only", 0)
    write("later")  # the next statement connects again and succeeds
    assert rows(server) == ["later"]


def test_a_refusal_inside_a_transaction_is_raised_and_the_next_statement_reconnects(
    server, standby, endpoint
):
    with pytest.raises(ConnectionLostInTransaction) as caught:
        with transaction.atomic(using="app"):
            write("in-block-1")
            before = thread_id()
            server.set_global("read_only", 1)
            endpoint.retarget(standby.port)
            write("in-block-2")  # refused: 1290
    assert "not committed" in str(caught.value) or "rolled back" in str(caught.value)
    assert isinstance(caught.value.__cause__, OperationalError)
    assert caught.value.__cause__.args[0] == 1290
    write("after-block")  # a new connection, on the node the endpoint now reaches
    assert thread_id() != before
    assert rows(server) == [] and rows(standby) == ["after-block"]


def test_the_applications_own_read_only_transaction_is_not_a_refusal(server, endpoint):
    before = thread_id()
    db = connections["app"]
    with transaction.atomic(using="app"):
        with db.cursor() as cursor:
            cursor.execute("SET TRANSACTION READ ONLY")
    with db.cursor() as cursor:
        cursor.execute("START TRANSACTION READ ONLY")
        with pytest.raises(Exception) as caught:
            cursor.execute(f"INSERT INTO {TABLE} (k) VALUES ('x')")
        cursor.execute("ROLLBACK")
    assert caught.value.args[0] == 1792
    assert not isinstance(caught.value, ConnectionLostInTransaction)
    assert thread_id() == before  # the connection was kept: the node is writable
    assert rows(server) == []


def test_a_refused_executemany_whose_rows_were_consumed_is_not_run_again(server, endpoint):
    thread_id()
    server.set_global("read_only", 1)
    params = ((f"gen-{n}",) for n in range(3))  # an iterator: it cannot be sent twice
    with pytest.raises(OperationalError) as caught:
        with connections["app"].cursor() as cursor:
            cursor.executemany(f"INSERT INTO {TABLE} (k) VALUES (%s)", params)
    assert caught.value.args[0] == 1290
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "it was not run again (its parameters were consumed)" in notes
    server.set_global("read_only", 0)
    with contextlib.suppress(StopIteration):
        next(params)
    write("next")
    assert rows(server) == ["next"]


def test_the_node_role_appears_in_the_log_once_per_replacement(
    server, standby, endpoint, caplog: Any
):
    caplog.set_level("INFO", logger="django_dbkeepalive")
    thread_id()
    server.set_global("read_only", 1)
    endpoint.retarget(standby.port)
    write("logged")
    lines = [r.getMessage() for r in caplog.records if "refused it" in r.getMessage()]
    assert len(lines) == 1
    assert "'app'" in lines[0] and "read_only" in lines[0]


@override_settings(DBKEEPALIVE={"RETRY_CONNECT_FOR": 0})
def test_a_refused_write_whose_reconnect_fails_says_it_never_ran(server, endpoint):
    thread_id()
    server.set_global("read_only", 1)
    endpoint.retarget(free_port())  # the endpoint now leads nowhere
    with pytest.raises(OperationalError) as caught:
        write("nowhere")
    assert caught.value.args[0] in (2002, 2003, 2013, -1)  # could not connect
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "It never ran, and connecting again to run it failed" in notes
    assert rows(server) == []
    server.set_global("read_only", 0)
    endpoint.retarget(server.port)
    write("back")
    assert rows(server) == ["back"]


def test_a_refused_statement_that_fails_otherwise_on_the_new_node_raises_that_error(
    server, standby, endpoint
):
    table = "only_on_the_old_primary"
    server.query(f"CREATE TABLE IF NOT EXISTS {DB}.{table} (k VARCHAR(40))")
    standby.query(f"DROP TABLE IF EXISTS {DB}.{table}")
    try:
        thread_id()
        server.set_global("read_only", 1)
        endpoint.retarget(standby.port)
        with pytest.raises(Exception) as caught:
            with connections["app"].cursor() as cursor:
                cursor.execute(f"INSERT INTO {table} (k) VALUES ('x')")
        assert caught.value.args[0] == 1146  # the new node's own answer, not the refusal
        assert "doesn't exist" in str(caught.value)
        assert server.query(f"SELECT COUNT(*) FROM {DB}.{table}") == [(0,)]
    finally:
        server.set_global("read_only", 0)
        server.query(f"DROP TABLE IF EXISTS {DB}.{table}")


def test_a_node_whose_transactions_are_all_read_only_is_a_refusing_node(server, endpoint):
    # 1792 from a node-wide read-only transaction default (tx_read_only), unlike the
    # application's own START TRANSACTION READ ONLY: the node cannot serve writes.
    server.set_global("tx_read_only", 1)
    try:
        connections["app"].close()  # new sessions take the global default
        with pytest.raises(OperationalError) as caught:
            write("read-only-default")
        assert caught.value.args[0] == 1792
        notes = "\n".join(getattr(caught.value, "__notes__", []))
        assert "It was sent again once on a new connection" in notes
    finally:
        server.set_global("tx_read_only", 0)
    connections["app"].close()
    write("writable-again")
    assert rows(server) == ["writable-again"]
