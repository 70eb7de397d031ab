"""A server that is briefly down (a restart, a failover in progress): connecting again is
retried with a bounded backoff (``RETRY_CONNECT_FOR``), so statements issued meanwhile
succeed once it is back; never inside a transaction."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import OperationalError, connection, connections, transaction
from django.test import override_settings

from django_dbkeepalive import ConnectionLostInTransaction
from testproject.testapp.models import Item

from .conftest import close_connections

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.restart]


def keys(raw: Any) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


def in_thread(work: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``work()`` in a thread with connections of its own; returns the thread and a
    list that receives its result or the exception it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except Exception as exc:
            outcome.append(exc)
        finally:
            for db in connections.all(initialized_only=True):
                try:
                    db.close()
                except Exception:  # a connection to the restarted server
                    db.connection = None

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_statements_issued_while_the_server_restarts_succeed_once_it_is_back(server, raw):
    Item.objects.create(key="before")
    server.stop()
    try:
        started = time.monotonic()
        writer, written = in_thread(lambda: Item.objects.create(key="during").key)
        reader, counted = in_thread(lambda: Item.objects.count())
        time.sleep(0.5)  # both are waiting to connect: nothing was sent
        assert writer.is_alive() and reader.is_alive()
    finally:
        server.start_again()
    writer.join(10)
    reader.join(10)
    assert written == ["during"] and counted in ([1], [2])
    assert time.monotonic() - started < 5.0
    close_connections()
    assert keys(raw) == ["before", "during"]  # written once


def test_reads_of_four_threads_through_a_restart_never_fail(server):
    Item.objects.create(key="x")
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = [0]

    def loop() -> None:
        while not stop.is_set():
            try:
                assert Item.objects.filter(key="x").count() == 1
                reads[0] += 1
            except Exception as exc:
                failures.append(exc)
            time.sleep(0.01)

    threads = [in_thread(loop)[0] for _ in range(4)]
    time.sleep(0.3)
    server.restart()  # shutdown and start: about a second without a server
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert failures == []
    assert reads[0] > 40


@override_settings(DBKEEPALIVE={"RETRY_CONNECT_FOR": 0})
def test_with_retry_connect_for_zero_a_statement_fails_at_once_while_the_server_is_down(server):
    Item.objects.count()
    server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError) as caught:
            Item.objects.count()
        assert time.monotonic() - started < 1.0
        assert caught.value.args[0] in (2002, 2003, 2013)
    finally:
        server.start_again()
    close_connections()


def test_a_lost_connection_inside_a_transaction_is_never_reconnected(server, raw):
    Item.objects.create(key="a")
    with pytest.raises(ConnectionLostInTransaction):
        with transaction.atomic():
            Item.objects.create(key="b")
            server.restart()
            Item.objects.create(key="c")  # raises: the transaction is gone
    Item.objects.create(key="d")  # after the block, a new connection
    assert keys(raw) == ["a", "d"]
    assert connection.connection is not None
