"""PostgreSQL failover: a write refused by a hot standby (SQLSTATE 25006), on a real
streaming-replication pair (the session's private server and a standby copied from it
with pg_basebackup), the endpoint being the fault proxy, as a virtual IP or HAProxy would
be. The application's own read-only transaction is never taken for a failover."""

from __future__ import annotations

from collections.abc import Iterator

import django
import pytest
from django.db import Error, connections, transaction

from django_dbkeepalive import ConnectionLostInTransaction
from django_dbkeepalive.guard.families.postgresql import sqlstate_of
from django_dbkeepalive.testing import record_recycles

from .postgres import PostgresServer, PostgresStandby
from .proxy import HOST as PROXY_HOST
from .proxy import FaultProxy
from .test_postgres import TABLE
from .test_postgres import backend_pid as backend
from .test_postgres import insert as write

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def standby(postgres: PostgresServer) -> Iterator[PostgresStandby]:
    """A hot standby of ``postgres``, replaying an empty table of unique keys."""
    postgres.query(f"CREATE TABLE IF NOT EXISTS {TABLE} (k text PRIMARY KEY)")
    postgres.query(f"TRUNCATE {TABLE}")
    node = PostgresStandby(postgres)
    try:
        node.start()
        node.wait_replayed()
        assert node.in_recovery()
        yield node
    finally:
        node.close()


@pytest.fixture
def endpoint(standby: PostgresStandby, pg_alias: str) -> Iterator[FaultProxy]:
    """The "pg" alias connects through a proxy that points at the standby: the endpoint
    as it is while a failover is under way, or when it lags behind one."""
    proxy = FaultProxy(standby.port).start()
    db = connections[pg_alias]
    saved = db.settings_dict["HOST"], db.settings_dict["PORT"]
    db.close()
    db.settings_dict.update(HOST=PROXY_HOST, PORT=proxy.port)
    try:
        yield proxy
    finally:
        db.close()
        db.settings_dict.update(HOST=saved[0], PORT=saved[1])
        proxy.close()


def rows(node: PostgresServer) -> list[str]:
    return [row[0] for row in node.query(f"SELECT k FROM {TABLE} ORDER BY k")]


def test_a_write_refused_by_a_hot_standby_runs_once_on_the_new_primary(
    postgres: PostgresServer, standby: PostgresStandby, endpoint: FaultProxy, pg_alias: str
) -> None:
    db = connections[pg_alias]
    before = backend(db)  # a persistent connection to the standby
    endpoint.retarget(postgres.port)  # the endpoint moved to the primary
    with record_recycles(pg_alias) as recycles:
        write(db, "after-failover")  # no error reaches the caller
    assert rows(postgres) == ["after-failover"]
    assert [r.reason for r in recycles] == ["read_only"]
    assert backend(db) != before
    assert before not in [int(p) for p in standby.backends()]  # closed properly


def test_a_hot_standby_in_a_transaction_says_nothing_was_committed_and_the_next_write_moves(
    postgres: PostgresServer, standby: PostgresStandby, endpoint: FaultProxy, pg_alias: str
) -> None:
    db = connections[pg_alias]
    backend(db)
    endpoint.retarget(postgres.port)
    with pytest.raises(ConnectionLostInTransaction) as caught:
        with transaction.atomic(using=pg_alias):
            write(db, "in-block")
    message = str(caught.value)
    assert "'pg'" in message and "hot standby" in message
    assert "The transaction was not committed" in message
    assert caught.value.cause == "read_only"
    write(db, "after-block")  # a new connection, through the moved endpoint
    assert rows(postgres) == ["after-block"]


def test_an_endpoint_still_on_the_standby_gets_the_error_with_the_nodes_state(
    postgres: PostgresServer, standby: PostgresStandby, endpoint: FaultProxy, pg_alias: str
) -> None:
    db = connections[pg_alias]
    backend(db)
    with record_recycles(pg_alias) as recycles, pytest.raises(Error) as caught:
        write(db, "refused")
    assert sqlstate_of(caught.value) == "25006"  # the first refusal, raised as it was
    assert sqlstate_of(caught.value.__cause__) == "25006"  # from the second one
    text = " ".join(getattr(caught.value, "__notes__", []))
    assert "hot standby" in text and "refused it too (in_hot_standby=on)" in text
    assert [r.reason for r in recycles] == ["read_only", "read_only"]  # once re-run
    assert rows(postgres) == [] and rows(standby) == []
    endpoint.retarget(postgres.port)
    write(db, "later")  # the next statement connects again
    assert rows(postgres) == ["later"]


def test_the_applications_own_read_only_transaction_is_not_a_failover(
    postgres: PostgresServer, pg_alias: str
) -> None:
    postgres.query(f"CREATE TABLE IF NOT EXISTS {TABLE} (k text PRIMARY KEY)")
    postgres.query(f"TRUNCATE {TABLE}")
    db = connections[pg_alias]
    before = backend(db)
    with db.cursor() as cursor:
        cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    with record_recycles(pg_alias) as recycles, pytest.raises(Error) as caught:
        write(db, "refused")
    assert "read-only transaction" in str(caught.value)
    assert not any("dbkeepalive" in note for note in getattr(caught.value, "__notes__", []))
    assert list(recycles) == []
    assert backend(db) == before  # the same session, as the application left it
    with db.cursor() as cursor:
        cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
    write(db, "written")
    assert rows(postgres) == ["written"]


def test_a_pooled_connection_to_a_hot_standby_is_never_handed_out_again(
    postgres: PostgresServer,
    standby: PostgresStandby,
    endpoint: FaultProxy,
    pg_alias: str,
    pg_driver: str,
) -> None:
    if pg_driver != "psycopg" or django.VERSION < (5, 1):
        pytest.skip("Django's connection pool needs Django 5.1+ and psycopg 3")
    pytest.importorskip("psycopg_pool")
    db = connections[pg_alias]
    db.close()
    db.settings_dict["OPTIONS"]["pool"] = {"min_size": 1, "max_size": 1}
    db.settings_dict["CONN_MAX_AGE"] = 0  # the pool refuses persistent connections
    try:
        on_standby = backend(db)  # checked out: the pool's only connection, to the standby
        endpoint.retarget(postgres.port)
        with record_recycles(pg_alias) as recycles:
            write(db, "pooled")  # the pool must not hand the standby's session back
        assert [r.reason for r in recycles] == ["read_only"]
        assert rows(postgres) == ["pooled"]
        assert on_standby not in [int(p) for p in standby.backends()]
        db.close()
    finally:
        db.close_pool()
        del db.settings_dict["OPTIONS"]["pool"]
        db.settings_dict["CONN_MAX_AGE"] = None
