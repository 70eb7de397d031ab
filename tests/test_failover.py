"""The guard across real topology changes (issue 14), with the app installed, through
Django's ORM: a replication failover behind the fault proxy and behind HAProxy, a
transaction on the demoted node, an endpoint left on a refusing node, a Galera node that
lost quorum, and a server restart behind HAProxy while four threads read and write.

Django's ``default`` alias is pointed at the topology's endpoint for each test, as the
application user (no ``SUPER``, no ``READ_ONLY ADMIN``: see tests/replication.py); the
session's test database is not used (``django_db_blocker`` lets the test connect). The
driver is the one Django uses (``DBK_DRIVER``): run the module once per driver. Every
count is read as root over a separate connection to each node.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError, connection, connections, transaction

from django_dbkeepalive import ConnectionLostInTransaction
from django_dbkeepalive.testing import record_recycles
from testproject.testapp.models import Item

from .conftest import close_connections, wait_for
from .galera import GaleraCluster
from .replication import APP_DATABASE, APP_USER, MariaDBNode, ReplicatedPair

pytestmark = [pytest.mark.ha, pytest.mark.timeout(120)]

TABLE = f"`{APP_DATABASE}`.`{Item._meta.db_table}`"


# -- Django on a topology --------------------------------------------------------------


@contextlib.contextmanager
def django_at(port: int, password: str) -> Iterator[None]:
    """The ``default`` alias connects to 127.0.0.1:``port`` as the application user, in
    every thread (their wrappers share this settings dict), for the block."""
    settings_dict = connections["default"].settings_dict
    saved = dict(settings_dict)
    close_connections()
    settings_dict.update(
        HOST="127.0.0.1", PORT=port, USER=APP_USER, PASSWORD=password, NAME=APP_DATABASE
    )
    try:
        yield
    finally:
        close_connections()
        settings_dict.clear()
        settings_dict.update(saved)


@contextlib.contextmanager
def through_proxy(pair: ReplicatedPair) -> Iterator[tuple[MariaDBNode, MariaDBNode]]:
    """Django's ``default`` alias at the pair's fault proxy: yields (primary, replica)."""
    assert pair.proxy is not None
    with django_at(pair.proxy.port, pair.app_password):
        yield pair.primary, pair.replica


def create_table(port: int, password: str) -> None:
    with django_at(port, password):
        with connection.schema_editor() as editor:
            editor.create_model(Item)


def port_now() -> int:
    """The ``@@port`` of the node the ``default`` connection reached."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@port")
        return int(cursor.fetchone()[0])


def rows(node: MariaDBNode, key: str) -> int:
    """Rows with ``key`` on ``node`` (root, a connection of its own)."""
    return int(node.query(f"SELECT COUNT(*) FROM {TABLE} WHERE `key` = %s", (key,))[0][0])


def app_sessions(node: MariaDBNode) -> int:
    return len(node.processlist(user=APP_USER))


@contextlib.contextmanager
def general_log(*nodes: MariaDBNode) -> Iterator[None]:
    """The nodes' general query log, into ``mysql.general_log``, for the block: it
    records each statement as received, before the node refuses it. (Never truncated:
    each test's keys are its own, and a TRUNCATE would enter the binary log of a
    demoted node and break its rejoin.)"""
    for node in nodes:
        node.set_global("log_output", "TABLE")
        node.set_global("general_log", 1)
    try:
        yield
    finally:
        for node in nodes:
            node.set_global("general_log", 0)


def inserts_of(node: MariaDBNode, key: str) -> list[int]:
    """The sessions (thread ids) that sent the INSERT of ``key`` to ``node``, one entry
    per time it was sent (from its general log)."""
    found = node.query(
        "SELECT thread_id FROM mysql.general_log WHERE command_type = 'Query'"
        " AND CONVERT(argument USING utf8mb4) LIKE %s ORDER BY event_time",
        (f"INSERT INTO %'{key}'%",),
    )
    return [int(row[0]) for row in found]


# -- replication -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(driver: str, django_db_blocker: Any) -> Iterator[ReplicatedPair]:
    """A primary and a replica behind both the fault proxy and HAProxy (``driver``:
    Django uses the driver DBK_DRIVER names)."""
    with ReplicatedPair(endpoint="both") as started, django_db_blocker.unblock():
        create_table(started.port, started.app_password)
        yield started


@pytest.fixture
def replicated(pair: ReplicatedPair, django_db_blocker: Any) -> Iterator[ReplicatedPair]:
    """The module's pair; afterwards the demoted node replicates again and both
    endpoints lead to the primary, whichever node it is now."""
    with django_db_blocker.unblock():
        yield pair
    assert pair.proxy is not None
    pair.proxy.retarget(pair.primary.port)
    if not pair.replica_status():
        pair.rejoin()


def endpoint_port(pair: ReplicatedPair, endpoint: str) -> int:
    if endpoint == "proxy":
        assert pair.proxy is not None
        return pair.proxy.port
    assert pair.haproxy is not None
    return int(pair.haproxy.port)


@pytest.mark.parametrize(
    ("endpoint", "kill_sessions"),
    [("proxy", False), ("haproxy", False), ("proxy", True)],
    ids=["proxy", "haproxy", "proxy-sessions-killed"],
)
def test_after_a_failover_a_write_outside_a_transaction_runs_once_on_the_new_primary(
    replicated: ReplicatedPair, endpoint: str, kill_sessions: bool, caplog: Any
) -> None:
    pair = replicated
    old, new = pair.primary, pair.replica
    key = f"moved-{endpoint}-{kill_sessions}"
    with django_at(endpoint_port(pair, endpoint), pair.app_password):
        Item.objects.create(key=f"before-{key}")  # a persistent connection ...
        assert port_now() == old.port  # ... on the primary
        before = connection.connection
        assert app_sessions(old) == 1
        # old: read_only (its sessions kept, or killed); the endpoint leads to new
        pair.failover(kill_sessions=kill_sessions)
        assert app_sessions(old) == (0 if kill_sessions else 1)
        caplog.clear()
        with record_recycles("default") as log, general_log(old, new):
            item = Item.objects.create(key=key)  # no error reaches this code
        # Refused once by the demoted node (1290) and run once on the new primary; a
        # killed session is noticed before the statement is sent.
        reason = "disconnected" if kill_sessions else "read_only"
        assert log.reasons == [reason]
        assert [r.name for r in caplog.records if f"reason: {reason}" in r.getMessage()] == [
            "django_dbkeepalive"
        ]
        sent = (len(inserts_of(old, key)), len(inserts_of(new, key)))
        assert sent == ((0, 1) if kill_sessions else (1, 1))
        assert connection.connection is not before
        assert port_now() == new.port
        assert Item.objects.get(key=key).pk == item.pk
        # The demoted node's session was closed (COM_QUIT), not left behind.
        assert wait_for(lambda: app_sessions(old) == 0, timeout=3)
        assert app_sessions(new) == 1
    assert (rows(new, key), rows(old, key)) == (1, 0)
    assert rows(new, f"before-{key}") == rows(old, f"before-{key}") == 1


def test_a_write_refused_inside_atomic_raises_and_the_next_statement_reaches_the_new_primary(
    replicated: ReplicatedPair,
) -> None:
    pair = replicated
    with through_proxy(pair) as (old, new):
        Item.objects.create(key="tx-before")
        assert port_now() == old.port
        before = connection.connection
        pair.failover()
        with record_recycles("default") as log:
            with pytest.raises(ConnectionLostInTransaction) as caught:
                with transaction.atomic():
                    # Reads still work on the demoted node: the block goes on ...
                    assert Item.objects.filter(key="tx-before").count() == 1
                    Item.objects.create(key="tx-1")  # ... until it writes: refused
                    Item.objects.create(key="tx-2")  # never runs
            # The block's rollback closed the session on the demoted node (leaving
            # the block turns autocommit on again: on a new connection).
            assert log.reasons == ["read_only"]
            assert connection.connection is not before
            assert wait_for(lambda: app_sessions(old) == 0, timeout=3)
            Item.objects.create(key="tx-after")  # a new connection, on the new primary
            assert port_now() == new.port
        assert log.reasons == ["read_only"]
    error = caught.value
    assert isinstance(error, OperationalError)
    assert (error.args[0], error.cause) == (1290, "read_only")
    assert "The transaction was not committed, and nothing it wrote was saved" in str(error)
    assert "--read-only" in str(error.__cause__)
    for node in (old, new):
        assert (rows(node, "tx-1"), rows(node, "tx-2")) == (0, 0)
    assert (rows(new, "tx-after"), rows(old, "tx-after")) == (1, 0)
    assert app_sessions(old) == 0


def test_an_endpoint_still_on_the_refusing_node_raises_1290_with_the_node_state(
    replicated: ReplicatedPair,
) -> None:
    pair = replicated
    with through_proxy(pair) as (old, new):
        Item.objects.create(key="stale-before")
        pair.failover()
        pair.proxy.retarget(old.port)  # the endpoint was not moved
        logins = old.connections_total()
        with record_recycles("default") as log, general_log(old, new):
            with pytest.raises(OperationalError) as caught:
                Item.objects.create(key="stale")
        # Sent once on the old connection and once on one new connection; both refused.
        sent = inserts_of(old, "stale")
        assert len(sent) == 2 and len(set(sent)) == 2
        assert inserts_of(new, "stale") == []
        assert old.connections_total() - logins == 1
        assert log.reasons == ["read_only", "read_only"]
        assert connection.connection is None  # the next statement connects again
        pair.proxy.retarget(new.port)  # the operator moves the endpoint after all
        Item.objects.create(key="stale-after")
        assert port_now() == new.port
    error = caught.value
    assert type(error) is OperationalError
    assert error.args[0] == 1290 and "--read-only" in error.args[1]
    [note] = [n for n in getattr(error, "__notes__", []) if "django-dbkeepalive" in n]
    assert "read_only=ON" in note
    assert "sent again once on a new connection" in note
    for node in (old, new):
        assert rows(node, "stale") == 0
    assert (rows(new, "stale-after"), rows(old, "stale-after")) == (1, 0)


UNKNOWN_FATE = "It was not run again, because the server may have applied it"


def test_four_threads_reading_and_writing_through_haproxy_ride_a_server_restart(
    replicated: ReplicatedPair,
) -> None:
    """Every read, and every write issued while the server is down, succeeds once it
    is back. A write in flight at the instant the server shuts down may lose its reply:
    its fate is unknown, so it is never re-run; it reaches the caller with a note."""
    pair = replicated
    primary = pair.primary
    assert pair.haproxy is not None
    stop = threading.Event()
    # (what, key, started, ended, the exception or None), from every thread
    done: list[tuple[str, str, float, float, BaseException | None]] = []

    def op(what: str, key: str, call: Any) -> None:
        started = time.monotonic()
        error = None
        try:
            call()
        except Exception as exc:  # what reached the application
            error = exc
        done.append((what, key, started, time.monotonic(), error))

    def loop(worker: int) -> None:
        try:
            n = 0
            while not stop.is_set():
                key = f"restart-{worker}-{n}"
                op("write", key, lambda key=key: Item.objects.create(key=key))
                op("read", key, lambda: Item.objects.filter(key__startswith="restart").count())
                n += 1
                time.sleep(0.01)
        finally:
            close_connections()

    with django_at(int(pair.haproxy.port), pair.app_password):
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        primary.stop()  # a clean shutdown ...
        stopped = time.monotonic()
        time.sleep(0.3)  # ... the threads go on issuing statements ...
        primary.start_again()  # ... and the server is back
        back = time.monotonic()
        wait_for(lambda: sum(1 for d in list(done) if d[2] >= back) >= 20, timeout=10)
        stop.set()
        for thread in threads:
            thread.join(15)
    failed = [(what, key, t, exc) for what, key, *t, exc in done if exc is not None]
    for what, _key, (started, ended), exc in failed:  # in flight as the server shut down
        assert (what, started < stopped, ended < back) == ("write", True, True), repr(exc)
        assert isinstance(exc, OperationalError) and exc.args[0] in (1053, 2013), repr(exc)
        assert any(UNKNOWN_FATE in note for note in getattr(exc, "__notes__", [])), exc
    # Everything else succeeded: among it, statements issued before the server was back
    # and answered after it had stopped, which waited for it (one per thread at least).
    waited = [exc for _, _, started, ended, exc in done if started < back and ended >= stopped]
    assert waited.count(None) >= 4
    assert len([1 for _, _, started, _, _ in done if started >= back]) >= 20
    found = dict(
        primary.query(
            f"SELECT `key`, COUNT(*) FROM {TABLE} WHERE `key` LIKE 'restart-%%' GROUP BY `key`"
        )
    )
    acknowledged = {key for what, key, _, _, exc in done if what == "write" and exc is None}
    assert acknowledged <= set(found)  # every acknowledged write is there ...
    assert set(found) <= acknowledged | {key for _, key, _, _ in failed}  # ... nothing else
    assert set(found.values()) == {1}  # ... and each exactly once


# -- Galera ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def galera(driver: str, django_db_blocker: Any) -> Iterator[GaleraCluster]:
    with GaleraCluster(size=3) as cluster, django_db_blocker.unblock():
        hap = cluster.start_haproxy()
        create_table(int(hap.port), cluster.app_password)
        yield cluster


def test_a_galera_node_that_lost_quorum_is_left_for_a_healthy_one(
    galera: GaleraCluster, django_db_blocker: Any
) -> None:
    hap = galera.haproxy
    assert hap is not None
    with django_db_blocker.unblock(), django_at(int(hap.port), galera.app_password):
        Item.objects.create(key="galera-before")
        node = galera.node_on_port(port_now())
        before = connection.connection
        try:
            galera.isolate(node)  # its sessions stay open, and get 1047 WSREP
            hap.wait_server_state(node.name, "DOWN", timeout=5)
            with record_recycles("default") as log:
                Item.objects.create(key="galera-after")  # refused, re-run elsewhere
            assert log.reasons == ["not_ready"]
            assert connection.connection is not before
            reached = galera.node_on_port(port_now())
            assert reached is not node and reached.is_ready()
            healthy = [n for n in galera.nodes if n is not node]
            for other in healthy:
                assert wait_for(lambda other=other: rows(other, "galera-after") == 1)
        finally:
            galera.heal(node)
            hap.wait_server_state(node.name, "UP", timeout=5)
    # Once back in the cluster, the node has the row too: written exactly once.
    assert [rows(n, "galera-after") for n in galera.nodes] == [1, 1, 1]
