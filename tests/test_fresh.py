"""``fresh_connection`` and ``keepalive_job`` in all their forms."""

from __future__ import annotations

import asyncio
import time

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection, transaction
from django.test import override_settings
from django.utils.connection import ConnectionDoesNotExist

from django_dbkeepalive import fresh_connection, keepalive_job
from testproject.testapp.models import Item

from .conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def thread_id() -> int:
    connection.ensure_connection()
    return int(connection.connection.thread_id())


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 2})
def test_context_manager_closes_a_connection_idle_past_its_limit():
    connection.close()
    Item.objects.count()
    old = thread_id()
    time.sleep(1.2)  # limit: 2 s minus a margin capped at 1 s
    with fresh_connection():
        assert connection.connection is None  # closed: the next query reconnects
        Item.objects.create(key="a")
    assert thread_id() != old


def test_context_manager_closes_a_connection_the_server_killed(server):
    Item.objects.count()
    server.kill(thread_id())
    time.sleep(0.3)
    with fresh_connection("default"):
        assert connection.connection is None
    assert Item.objects.count() == 0


def test_close_true_releases_connections_on_exit(server):
    with fresh_connection(close=True):
        Item.objects.create(key="a")
        tid = thread_id()
        assert tid in [p["id"] for p in server.processlist()]
    assert connection.connection is None
    assert wait_for(lambda: tid not in [p["id"] for p in server.processlist()])


def test_a_healthy_recent_connection_is_kept(settings):
    connection.settings_dict["CONN_MAX_AGE"] = 60
    try:
        connection.close()
        Item.objects.count()
        old = thread_id()
        with fresh_connection():
            Item.objects.count()
        assert thread_id() == old
    finally:
        connection.settings_dict["CONN_MAX_AGE"] = 0


def test_inside_an_atomic_block_nothing_is_closed(server):
    with transaction.atomic():
        Item.objects.create(key="a")
        old = thread_id()
        with fresh_connection(close=True):
            assert thread_id() == old
        Item.objects.create(key="b")
    assert Item.objects.count() == 2


def test_sync_decorator_with_and_without_arguments(server):
    calls = []

    @fresh_connection
    def bare() -> int:
        calls.append("bare")
        return Item.objects.count()

    @fresh_connection(using=["default"], close=True)
    def with_args() -> int:
        calls.append("args")
        return Item.objects.create(key="k").pk

    assert bare() == 0
    assert with_args() > 0
    assert connection.connection is None  # close=True
    assert calls == ["bare", "args"]
    assert bare.__name__ == "bare"


def test_async_decorator_and_async_with(server):
    @fresh_connection(close=True)
    async def job() -> int:
        await Item.objects.acreate(key="async")
        return await Item.objects.acount()

    async def main() -> int:
        first = await job()
        async with fresh_connection():
            await Item.objects.acreate(key="with")
        return first

    assert asyncio.run(main()) == 1
    assert sorted(Item.objects.values_list("key", flat=True)) == ["async", "with"]


def test_unknown_alias_gets_a_clear_error():
    with pytest.raises(ConnectionDoesNotExist) as caught:
        with fresh_connection("replica"):
            pass
    message = str(caught.value)
    assert "'replica' is not a database alias" in message and "default" in message


def test_keepalive_job_bare_and_with_arguments_survive_quiet_periods(set_wait_timeout):
    set_wait_timeout(2)

    @keepalive_job
    def job(key: str) -> None:
        Item.objects.create(key=key)

    @keepalive_job(using="default")
    def other(key: str) -> None:
        Item.objects.create(key=key)

    job("1")
    time.sleep(3)
    other("2")
    time.sleep(3)
    job("3")
    assert list(Item.objects.order_by("id").values_list("key", flat=True)) == ["1", "2", "3"]


def test_keepalive_job_closes_obsolete_connections_after_the_job(server):
    # CONN_MAX_AGE = 0 (the default): a pooled thread must not hoard its connection.
    @keepalive_job
    def job() -> int:
        return thread_id()

    def run_in_thread() -> int:
        tid = job()
        assert connection.connection is None
        return tid

    tid = asyncio.run(sync_to_async(run_in_thread, thread_sensitive=False)())
    assert wait_for(lambda: tid not in [p["id"] for p in server.processlist()])


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 2})
def test_a_check_between_units_of_work_does_not_reset_the_idle_clock(recycles):
    connection.settings_dict["CONN_MAX_AGE"] = 60  # kept across the check
    try:
        connection.close()
        Item.objects.count()
        old = thread_id()
        time.sleep(0.6)
        with fresh_connection():  # checks, sends nothing: the connection stays idle
            assert thread_id() == old
        time.sleep(0.6)  # 1.2 s since the last statement: past the 1 s limit
        Item.objects.count()
        assert thread_id() != old
        assert recycles.reasons == ["idle"]
    finally:
        connection.settings_dict["CONN_MAX_AGE"] = 0


def test_the_routine_close_of_conn_max_age_0_is_not_reported_as_a_recycle(conn_max_age):
    from django_dbkeepalive.testing import record_recycles

    conn_max_age(0)

    @keepalive_job
    def job() -> int:
        return Item.objects.count()

    with record_recycles() as log:
        job()
        assert connection.connection is None  # Django's per-unit-of-work close ran
        job()
    assert log == []
    conn_max_age(1)
    Item.objects.count()
    time.sleep(1.1)
    with record_recycles() as log:
        job()  # now the age limit did close it: that is a recycle
    assert log.reasons == ["max_age"]


def test_scopes_guard_their_statements_when_the_automatic_guard_is_off(server, raw):
    from django_dbkeepalive.testing import kill_connection

    @keepalive_job
    def job(key: str) -> None:
        Item.objects.count()
        kill_connection()  # the server closes the session between two statements
        Item.objects.create(key=key)

    with override_settings(DBKEEPALIVE={"AUTO_GUARD": False}):
        with fresh_connection():
            Item.objects.count()
            kill_connection()
            Item.objects.create(key="in-with")
        job("in-job")
        Item.objects.count()
        kill_connection()  # outside any scope nothing guards it: Django's own failure
        with pytest.raises(OperationalError):
            Item.objects.create(key="unguarded")
    connection.close()
    assert sorted(r[0] for r in raw("SELECT `key` FROM testapp_item")) == ["in-job", "in-with"]


async def _async_scope_body(key: str) -> None:
    from django_dbkeepalive.testing import kill_connection

    await Item.objects.acount()
    await sync_to_async(kill_connection)()
    await Item.objects.acreate(key=key)


def test_async_scopes_guard_their_statements_when_the_automatic_guard_is_off(raw):
    async def main() -> None:
        async with fresh_connection():
            await _async_scope_body("async-with")
        await fresh_connection(_async_scope_body)("async-decorated")

    with override_settings(DBKEEPALIVE={"AUTO_GUARD": False}):
        asyncio.run(main())
    assert sorted(r[0] for r in raw("SELECT `key` FROM testapp_item")) == [
        "async-decorated",
        "async-with",
    ]


def test_checks_inside_a_unit_of_work_keep_a_healthy_conn_max_age_0_connection(
    server, conn_max_age
):
    from django_dbkeepalive import BaseKeepaliveCommand, refresh_connections

    conn_max_age(0)
    command = BaseKeepaliveCommand()
    Item.objects.count()
    before = server.connections_total()
    for _ in range(20):
        refresh_connections()
        command.keepalive()
        Item.objects.count()
    assert server.connections_total() == before  # one connection, no reconnects
    with fresh_connection():
        Item.objects.count()
    assert connection.connection is None  # the end of a unit of work releases it


def test_fresh_connection_shows_its_arguments():
    assert repr(fresh_connection(("default",), close=True)) == (
        "fresh_connection(using=['default'], close=True)"
    )
    assert repr(fresh_connection()) == "fresh_connection(using=None, close=False)"


def test_a_manual_transaction_going_on_is_left_alone_when_a_unit_of_work_starts(raw):
    transaction.set_autocommit(False)
    try:
        Item.objects.create(key="manual")
        before = thread_id()
        with fresh_connection():
            Item.objects.create(key="inside")
            assert thread_id() == before
            assert raw("SELECT COUNT(*) FROM testapp_item")[0][0] == 0  # not committed yet
            transaction.commit()
            transaction.set_autocommit(True)
    finally:
        if connection.connection is not None and not connection.get_autocommit():
            transaction.rollback()
            transaction.set_autocommit(True)
    assert [r[0] for r in raw("SELECT `key` FROM testapp_item ORDER BY id")] == [
        "manual",
        "inside",
    ]


def test_a_manual_transaction_left_open_by_a_unit_of_work_is_rolled_back_silently(
    conn_max_age, raw
):
    from django_dbkeepalive.testing import record_recycles

    conn_max_age(60)  # nothing to do with its age: not reported as "max_age"
    with record_recycles() as log:
        with fresh_connection():
            transaction.set_autocommit(False)
            Item.objects.create(key="left")
    assert connection.connection is None
    assert log == []
    assert raw("SELECT COUNT(*) FROM testapp_item")[0][0] == 0


def test_a_connection_killed_during_a_unit_of_work_is_released_at_its_end(server):
    from django_dbkeepalive.testing import kill_connection, record_recycles

    with record_recycles() as log:
        with fresh_connection():
            Item.objects.count()
            killed = kill_connection()
    assert connection.connection is None  # not handed dead to the next unit of work
    assert log.reasons == ["disconnected"]
    assert wait_for(lambda: killed not in {int(p["id"]) for p in server.processlist()})


def bad_statement() -> None:
    from django.db import ProgrammingError

    with pytest.raises(ProgrammingError):
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")


def test_a_connection_with_errors_is_pinged_kept_when_alive_replaced_when_not(
    via_proxy, db_options
):
    from django_dbkeepalive import refresh_connections
    from django_dbkeepalive.testing import record_recycles

    db_options(read_timeout=1)
    bad_statement()
    before = thread_id()
    with record_recycles() as log:
        refresh_connections()  # a ping answers: kept, its errors forgotten
        assert thread_id() == before and not connection.errors_occurred
        bad_statement()
        via_proxy.blackhole()  # then the network drops it, silently
        refresh_connections()  # the ping gets no answer in read_timeout
        assert connection.connection is None
        assert thread_id() != before
        with fresh_connection():
            bad_statement()
            via_proxy.blackhole()
        assert connection.connection is None  # the end of the unit of work pinged too
    assert log.reasons == ["ping_failed", "ping_failed"]


def test_the_package_lists_its_public_names():
    import django_dbkeepalive

    names = dir(django_dbkeepalive)
    assert set(django_dbkeepalive.__all__) <= set(names)
    assert {"fresh_connection", "keepalive_job", "BaseKeepaliveCommand"} <= set(names)
    assert names == sorted(names)
