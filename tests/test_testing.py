"""django_dbkeepalive.testing and its pytest plugin, against the real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import OperationalError, connection, transaction
from django.test import override_settings

from django_dbkeepalive import ConnectionLostInTransaction
from django_dbkeepalive.testing import (
    RecycleLog,
    assert_recycles,
    expire_connection,
    kill_connection,
    record_recycles,
)
from testproject.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True)

Raw = Callable[..., list[tuple[Any, ...]]]


def keys(raw: Raw) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


def own_id() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


def live_ids(server: Any) -> set[int]:
    return {int(p["id"]) for p in server.processlist()}


# ---------------------------------------------------------------- kill_connection


def test_kill_connection_kills_for_real_and_the_next_read_and_write_succeed(server, raw):
    Item.objects.create(key="a")
    before = server.connections_total()
    killed = kill_connection()
    assert killed not in live_ids(server)  # gone on the server, not merely flagged
    with assert_recycles(1, reasons=["disconnected"]):
        assert Item.objects.count() == 1
    assert own_id() != killed
    kill_connection()
    with assert_recycles(reasons=["disconnected"]):
        Item.objects.create(key="b")
    assert keys(raw) == ["a", "b"]
    # Two new sessions, plus the two short-lived connections that sent the KILLs.
    assert server.connections_total() == before + 4


def test_kill_connection_opens_a_connection_when_there_is_none(server):
    connection.close()
    killed = kill_connection()
    assert killed not in live_ids(server)
    assert Item.objects.count() == 0


def test_kill_connection_inside_atomic_loses_the_transaction(raw):
    with pytest.raises(ConnectionLostInTransaction):
        with transaction.atomic():
            Item.objects.create(key="lost")
            kill_connection()
            Item.objects.create(key="lost-too")
    assert keys(raw) == []
    Item.objects.create(key="after")
    assert keys(raw) == ["after"]


def test_kill_connection_without_notice_lets_a_write_hit_the_dead_connection(raw):
    Item.objects.create(key="a")
    kill_connection(notice=False)
    with pytest.raises(OperationalError) as caught:
        Item.objects.create(key="maybe")
    assert caught.value.args[0] in (2013, 2006, 1927)
    kill_connection(notice=False)
    with assert_recycles(1, reasons=["disconnected"]):
        assert Item.objects.count() == 1  # a read is re-run on a new connection
    assert keys(raw) == ["a"]


# -------------------------------------------------------------- expire_connection


def test_expire_connection_recycles_the_live_session_without_sleeping(server):
    Item.objects.count()
    old = own_id()
    started = time.monotonic()
    idle = expire_connection()
    assert idle > connection._dbk_limit
    assert old in live_ids(server)  # the session itself is alive and well
    with assert_recycles(1, reasons=["idle"]) as log:
        assert Item.objects.count() == 0
    assert log[0].idle >= idle
    assert own_id() != old
    assert time.monotonic() - started < 1.0  # no waiting for wait_timeout


def test_expire_connection_reads_the_limit_when_the_guard_does_not_know_it_yet():
    connection.close()
    connection.ensure_connection()
    assert connection._dbk_limit is None  # a new connection: not read yet
    expire_connection()
    assert connection._dbk_limit is not None
    with assert_recycles(1, reasons=["idle"]):
        Item.objects.create(key="x")


def test_expire_connection_below_the_limit_changes_nothing():
    Item.objects.count()
    old = own_id()
    expire_connection(idle=0.5)
    with assert_recycles(0):
        Item.objects.count()
    assert own_id() == old


def test_expire_connection_inside_atomic_goes_on_below_wait_timeout_and_fails_past_it(raw):
    with assert_recycles(0), transaction.atomic():
        Item.objects.create(key="a")
        expire_connection()  # past the limit, inside wait_timeout: the session is alive
        Item.objects.create(key="b")
    assert keys(raw) == ["a", "b"]
    with pytest.raises(ConnectionLostInTransaction), transaction.atomic():
        Item.objects.create(key="c")
        expire_connection(idle=10**6)  # past the server's wait_timeout
        Item.objects.create(key="d")
    assert keys(raw) == ["a", "b"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 30, "MARGIN": 10})
def test_expire_connection_follows_the_configured_limit():
    connection.close()
    Item.objects.count()
    assert expire_connection() > 20
    with assert_recycles(reasons=["idle"]):
        Item.objects.count()


def test_expire_connection_needs_the_guard():
    connection.ensure_connection()
    saved = connection._dbk_conn
    connection._dbk_conn = None
    try:
        with pytest.raises(RuntimeError, match="not known to the guard"):
            expire_connection()
    finally:
        connection._dbk_conn = saved


def test_helpers_refuse_an_unknown_alias():
    from django.utils.connection import ConnectionDoesNotExist

    with pytest.raises(ConnectionDoesNotExist):
        kill_connection("nope")
    with pytest.raises(ConnectionDoesNotExist):
        expire_connection("nope")


# --------------------------------------------------------------- assert_recycles


def test_assert_recycles_reports_what_happened():
    Item.objects.count()
    expire_connection()
    with pytest.raises(AssertionError, match=r"expected 2 recycle\(s\), saw 1: default:idle"):
        with assert_recycles(2):
            Item.objects.count()
    expire_connection()
    with pytest.raises(AssertionError, match=r"expected recycles \['disconnected'\]"):
        with assert_recycles(reasons=["disconnected"]):
            Item.objects.count()
    with pytest.raises(AssertionError, match="at least one"):
        with assert_recycles():
            Item.objects.count()
    expire_connection()
    with assert_recycles(reasons={"idle", "disconnected"}):
        Item.objects.count()
    expire_connection()
    with assert_recycles(0, using="reader"):  # another alias's recycles only
        Item.objects.count()


def test_assert_recycles_asserts_nothing_when_the_block_raises():
    with pytest.raises(KeyError):
        with assert_recycles(5):
            raise KeyError("x")


def test_record_recycles_sees_other_threads():
    def work() -> None:
        try:
            Item.objects.count()
            kill_connection()
            Item.objects.count()
        finally:
            connection.close()

    with record_recycles("default") as log:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert isinstance(log, RecycleLog)
    assert log.reasons == ["disconnected"]
    assert log.of("default") == log and log.of("reader") == []


# ------------------------------------------------------------------ the fixtures


def test_plugin_fixtures(kill_connection, expire_connection, recycles, raw):
    Item.objects.create(key="a")
    kill_connection()
    Item.objects.create(key="b")
    expire_connection()
    Item.objects.create(key="c")
    assert recycles.reasons == ["disconnected", "idle"]
    assert keys(raw) == ["a", "b", "c"]
