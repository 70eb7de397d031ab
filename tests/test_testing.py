"""django_dbkeepalive.testing and its pytest plugin, against the real server."""

from __future__ import annotations

import threading
import time
import unittest
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError, connection, connections, transaction
from django.test import TestCase, modify_settings, override_settings
from django.utils.connection import ConnectionDoesNotExist

from django_dbkeepalive import ConnectionLostInTransaction, fresh_connection, guard
from django_dbkeepalive.testing import (
    ExpireInTransactionWarning,
    RecycleLog,
    TransactionLostWarning,
    assert_recycles,
    expire_connection,
    faults,
    kill_connection,
    record_recycles,
)
from testproject.testapp.models import Item

from .conftest import close_connections

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


def test_kill_connection_inside_atomic_loses_the_transaction_and_warns(raw):
    with pytest.raises(ConnectionLostInTransaction):
        with transaction.atomic():
            Item.objects.create(key="lost")
            with pytest.warns(TransactionLostWarning) as caught:
                kill_connection()
            Item.objects.create(key="lost-too")
    [warning] = caught
    assert warning.filename == __file__  # points at the caller
    text = str(warning.message)
    assert text.startswith("django-dbkeepalive: kill_connection() inside a transaction: ")
    assert "the next statement on 'default' before the transaction ends raises" in text
    assert "use a transactional test (TransactionTestCase" in text
    assert "TestCase class" not in text  # not a TestCase's transaction
    assert keys(raw) == []
    Item.objects.create(key="after")
    assert keys(raw) == ["after"]


def test_kill_connection_in_a_testcase_warns_that_the_later_tests_of_the_class_fail(raw):
    warned: list[warnings.WarningMessage] = []

    class KilledInTestCase(TestCase):  # a user's TestCase, run here
        def test_1_kills(self) -> None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                kill_connection()
            warned.extend(caught)
            with self.assertRaises(ConnectionLostInTransaction):
                Item.objects.create(key="x")

        def test_2_later(self) -> None:
            Item.objects.count()

    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(KilledInTestCase).run(result)
    close_connections()
    # The warning said what then happened: the first test passed, the later one failed.
    [warning] = warned
    assert warning.category is TransactionLostWarning
    text = str(warning.message)
    assert "inside the transaction that wraps this test (django.test.TestCase" in text
    assert "The later tests of a TestCase class fail too" in text
    assert "pytest-django's transactional_db" in text
    assert result.testsRun == 2
    [(failed, trace)] = result.errors + result.failures
    assert failed.id().endswith("test_2_later"), trace
    assert "ConnectionLostInTransaction" in trace
    assert keys(raw) == []
    assert Item.objects.count() == 0  # this (transactional) test's connection works


def test_kill_connection_with_the_guard_off_is_noticed_by_the_next_guarded_scope(raw):
    Item.objects.create(key="a")
    with override_settings(DBKEEPALIVE={"AUTO_GUARD": False}):
        kill_connection()  # notice=True, but nothing guards the next statement...
        with assert_recycles(1, reasons=["disconnected"]), fresh_connection():
            Item.objects.create(key="b")  # ...but a scope's start looks at the socket
    assert keys(raw) == ["a", "b"]


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
    assert idle > guard.state_of(connection).limit
    assert old in live_ids(server)  # the session itself is alive and well
    with assert_recycles(1, reasons=["idle"]) as log:
        assert Item.objects.count() == 0
    assert log[0].idle >= idle
    assert own_id() != old
    assert time.monotonic() - started < 1.0  # no waiting for wait_timeout


@override_settings(DBKEEPALIVE={"AUTO_GUARD": False})
def test_expire_connection_reads_the_limit_when_the_guard_does_not_know_it_yet():
    connection.close()
    connection.ensure_connection()
    assert guard.state_of(connection).limit is None  # opened while nothing guarded it: not read yet
    expire_connection()
    assert guard.state_of(connection).limit is not None
    with assert_recycles(0):
        Item.objects.create(key="x")  # AUTO_GUARD off: a statement alone notices nothing
    with assert_recycles(1, reasons=["idle"]), fresh_connection():  # a scope's start does
        Item.objects.create(key="y")


def test_expire_connection_below_the_limit_changes_nothing():
    Item.objects.count()
    old = own_id()
    expire_connection(idle=0.5)
    with assert_recycles(0):
        Item.objects.count()
    assert own_id() == old


def test_expire_connection_inside_atomic_warns_it_does_nothing_below_wait_timeout(raw):
    with assert_recycles(0), transaction.atomic():
        Item.objects.create(key="a")
        with pytest.warns(ExpireInTransactionWarning) as caught:
            expire_connection()  # past the limit, inside wait_timeout: the session is alive
        Item.objects.create(key="b")
    assert keys(raw) == ["a", "b"]
    [warning] = caught
    assert warning.filename == __file__
    text = str(warning.message)
    assert "expire_connection() inside a transaction" in text
    assert "so nothing visible happens" in text
    assert "Pass idle= a value past wait_timeout (28800s)" in text
    with pytest.raises(ConnectionLostInTransaction), transaction.atomic():
        Item.objects.create(key="c")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the intended loss: no warning
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


def test_expire_connection_needs_a_connection_the_guard_knows():
    connection.ensure_connection()
    saved = guard.state_of(connection).conn
    guard.state_of(connection).conn = None
    try:
        with pytest.raises(RuntimeError, match="not known to the guard"):
            expire_connection()
    finally:
        guard.state_of(connection).conn = saved


@pytest.fixture
def over_unix_socket(server: Any) -> Iterator[None]:
    """The default alias connects over the server's Unix socket for this test."""
    if server.socket is None:
        pytest.skip("the server's Unix socket is not known")
    settings_dict = connections["default"].settings_dict
    saved = settings_dict["HOST"], settings_dict["PORT"]
    close_connections()
    settings_dict.update(HOST=server.socket, PORT="")
    try:
        yield
    finally:
        settings_dict.update(HOST=saved[0], PORT=saved[1])
        close_connections()


def test_expire_connection_over_a_unix_socket_says_it_cannot(over_unix_socket):
    old = own_id()
    with pytest.raises(RuntimeError) as caught:
        expire_connection()
    text = str(caught.value)
    assert "expire_connection() needs a TCP connection, but the 'default' connection" in text
    assert "is over a Unix socket" in text
    assert "the guard pings a connection idle past its limit instead of closing it" in text
    with assert_recycles(0):
        assert own_id() == old  # nothing changed
    killed = kill_connection()  # works over a Unix socket
    with assert_recycles(1, reasons=["disconnected"]):
        assert own_id() != killed


def test_helpers_refuse_an_unknown_alias():
    for helper in (kill_connection, expire_connection):
        with pytest.raises(ConnectionDoesNotExist, match="'nope' is not a database alias"):
            helper("nope")
    with pytest.raises(ConnectionDoesNotExist, match="Configured aliases: default, reader"):
        with assert_recycles(using="nope"):
            pass
    with pytest.raises(ConnectionDoesNotExist, match="'nope' is not a database alias"):
        with record_recycles(["default", "nope"]):
            pass


def test_helpers_take_one_alias_by_name(server):
    old = own_id()
    for helper in (kill_connection, expire_connection):
        with pytest.raises(TypeError) as caught:
            helper(["default"])  # type: ignore[arg-type]
        assert str(caught.value) == (
            f"django-dbkeepalive: {helper.__name__}() takes one alias, not ['default']"
        )
    assert old in live_ids(server)  # nothing was done
    with assert_recycles(0):
        assert own_id() == old


def test_kill_connection_says_when_the_server_close_never_reaches_the_client(
    via_proxy, monkeypatch
):
    # A proxy that keeps the client's flow open (and silent) after the server ended it.
    old = own_id()
    via_proxy.blackhole()
    monkeypatch.setattr(faults, "KILL_TIMEOUT", 0.3)
    started = time.monotonic()
    with pytest.raises(AssertionError) as caught:
        kill_connection()
    assert 0.3 <= time.monotonic() - started < 3
    assert str(caught.value) == (
        f"django-dbkeepalive: the server did not close connection {old} within 0.3s of KILL {old}"
    )


def test_helpers_refuse_to_run_without_the_guard_before_doing_anything(server):
    old = own_id()
    guard.uninstall()
    try:
        for helper in (kill_connection, expire_connection):
            with pytest.raises(ImproperlyConfigured) as caught:
                helper()
            assert str(caught.value) == (
                f"django-dbkeepalive: {helper.__name__}() needs the connection guard, but "
                "the guard was removed from this process (guard.uninstall()). Add "
                "'django_dbkeepalive' to INSTALLED_APPS in the settings your tests run with."
            )
        with pytest.raises(ImproperlyConfigured, match=r"assert_recycles\(\) needs the"):
            with assert_recycles(0):
                pass
        assert old in live_ids(server)  # not killed: nothing was done
    finally:
        guard.install()
    assert own_id() == old  # and the connection is fine
    with modify_settings(INSTALLED_APPS={"remove": ["django_dbkeepalive"]}):
        with pytest.raises(ImproperlyConfigured) as caught:
            kill_connection()
    assert "but 'django_dbkeepalive' is not in INSTALLED_APPS. Add" in str(caught.value)
    assert own_id() == old


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


def test_assert_recycles_refuses_a_bare_string_or_an_unknown_reason():
    with pytest.raises(TypeError, match=r"not the string 'idle': write reasons=\['idle'\]"):
        with assert_recycles(reasons="idle"):
            pass
    with pytest.raises(ValueError) as caught:
        with assert_recycles(reasons={"idle", "idel"}):
            pass
    assert str(caught.value) == (
        "django-dbkeepalive: unknown recycle reason(s) 'idel'; the reasons are 'idle', "
        "'max_age', 'ping_failed', 'disconnected', 'fork', 'read_only', 'not_ready'."
    )
    with pytest.raises(TypeError, match="count must be an int"):
        with assert_recycles("1"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="count must be 0 or more, not -1"):
        with assert_recycles(-1):
            pass


@pytest.mark.django_db(transaction=True, databases=["default", "reader"])
def test_assert_recycles_of_one_alias_mentions_the_others_it_left_out():
    Item.objects.using("reader").count()
    kill_connection("reader")
    with pytest.raises(AssertionError) as caught:
        with assert_recycles(1, using="default"):
            Item.objects.using("reader").count()
    assert str(caught.value).startswith(
        "expected 1 recycle(s) of ['default'], saw 0: none (not counted, other aliases: "
        "reader:disconnected (idle "
    )


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
