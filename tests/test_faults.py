"""Faults reproduced one by one against real servers: those the soak run (make soak)
found, and a KILL that meets each of the operations the guard wraps (a procedure call,
executemany, COMMIT, ROLLBACK, entering a transaction, closing a cursor, a ping).

Also run with the guarded ENGINE (``DBK_BACKEND=engine``, tests/sessions.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from django_dbkeepalive import ConnectionLostInTransaction
from django_dbkeepalive.testing import TransactionLostWarning, kill_connection
from testproject.testapp.models import Item

from .conftest import close_connections

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

CONNECTOR = connection.Database.__name__ == "mysql.connector"
#: Its pure-Python connection says 2013 with an InterfaceError, the others OperationalError.
LOST_ERRORS = (OperationalError, InterfaceError) if CONNECTOR else (OperationalError,)
#: Connector/Python raises InterfaceError (not a DatabaseError) when it cannot connect.
CONNECT_ERRORS = (DatabaseError, InterfaceError) if CONNECTOR else (DatabaseError,)
#: Its callproc() reads the whole CALL, final status included, before it returns.
READS_CALL_TO_END = pytest.mark.skipif(
    CONNECTOR,
    reason="Connector/Python's callproc() reads the CALL to its end (the procedure's pause"
    " included) before it returns: no result is left unread for close() to fail on",
)

Raw = Callable[..., list[tuple[Any, ...]]]


def keys(raw: Raw) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


@pytest.mark.restart
def test_server_down_when_an_atomic_block_ends_leaves_autocommit_on(server, raw) -> None:
    # The block's rollback drops the dead connection; Django's set_autocommit(True) at
    # the block's end then fails to connect. The next connection must be in autocommit
    # mode, or the next create() would sit in a transaction nobody commits, and be lost.
    with pytest.raises(CONNECT_ERRORS):
        with transaction.atomic():
            Item.objects.create(key="rolled-back")
            server.stop()
            Item.objects.create(key="never")
    server.start_again()
    Item.objects.create(key="after")
    assert connection.get_autocommit() is True
    close_connections()
    assert keys(raw) == ["after"]


# -- a statement, a procedure, COMMIT or ROLLBACK on a session KILLed unnoticed ---------
# kill_connection(notice=False): the KILL "arrives while the statement is on its way", so
# the operation below is sent on the dead session (PEEK_AFTER = 1000: no slow path).
UNNOTICED = override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
PROCEDURE = "dbk_add_item"


def notes(exc: BaseException) -> str:
    return " ".join(getattr(exc, "__notes__", []))


@pytest.fixture
def procedure(raw: Raw) -> Iterator[str]:
    """A stored procedure of the test database, ``(key, pause)``: inserts a row, returns
    the table's row count as a result set, then sleeps ``pause`` seconds before the
    CALL's final status (which the driver reads when the cursor is closed)."""
    raw(f"DROP PROCEDURE IF EXISTS {PROCEDURE}")
    raw(
        f"CREATE PROCEDURE {PROCEDURE}(IN k VARCHAR(100), IN pause DOUBLE) BEGIN "
        "INSERT INTO testapp_item (`key`, value, created) VALUES (k, 0, NOW()); "
        "SELECT COUNT(*) FROM testapp_item; DO SLEEP(pause); END"
    )
    yield PROCEDURE
    raw(f"DROP PROCEDURE IF EXISTS {PROCEDURE}")


def session_id() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


def test_a_procedure_called_after_a_kill_runs_once_on_a_new_connection(
    server, raw, procedure
) -> None:
    Item.objects.create(key="a")
    victim = kill_connection()
    with connection.cursor() as cursor:
        cursor.callproc(procedure, ["from-proc", 0])
        if CONNECTOR:  # it hands the CALL's result sets out through stored_results()
            (result,) = cursor.stored_results()
            assert list(result.fetchall()) == [(2,)]
        else:
            assert list(cursor.fetchall()) == [(2,)]  # the procedure's own result set
    assert keys(raw) == ["a", "from-proc"]
    assert session_id() != victim


@UNNOTICED
def test_a_procedure_call_that_meets_a_dead_session_is_never_run_again(
    server, raw, procedure
) -> None:
    Item.objects.create(key="a")
    cursor = connection.cursor()  # before the KILL (Connector/Python's cursor() pings)
    kill_connection(notice=False)
    with cursor, pytest.raises(LOST_ERRORS) as caught:
        cursor.callproc(procedure, ["never", 0])
    assert "It was not run again" in notes(caught.value)
    assert keys(raw) == ["a"]
    Item.objects.create(key="b")  # the next statement reconnects
    assert keys(raw) == ["a", "b"]


@READS_CALL_TO_END
def test_closing_a_cursor_with_unread_results_of_a_killed_session_raises_nothing(
    server, raw, procedure
) -> None:
    cursor = connection.cursor()
    cursor.callproc(procedure, ["p", 30])  # the CALL's final status is still to come
    victim = kill_connection()
    cursor.close()  # the driver's read of it fails (2013): nothing is left to save
    assert session_id() != victim
    assert keys(raw) == ["p"]


@READS_CALL_TO_END
def test_with_auto_guard_off_closing_such_a_cursor_raises_the_drivers_error(
    server, procedure
) -> None:
    with override_settings(DBKEEPALIVE={"AUTO_GUARD": False}):
        close_connections()
        cursor = connection.cursor()
        cursor.callproc(procedure, ["p", 30])
        kill_connection()
        with pytest.raises(Exception) as caught:
            cursor.close()  # not guarded: the guard hides nothing
        # The driver's raw error (a cursor's close is outside Django's error wrapper).
        assert type(caught.value).__module__.split(".")[0] in ("MySQLdb", "pymysql")
        assert caught.value.args[0] == 2013
        close_connections()


@UNNOTICED
def test_executemany_that_meets_a_dead_session_is_never_run_again(server, raw) -> None:
    Item.objects.create(key="a")
    cursor = connection.cursor()  # before the KILL (Connector/Python's cursor() pings)
    kill_connection(notice=False)
    with cursor, pytest.raises(LOST_ERRORS) as caught:
        cursor.executemany(
            "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, 0, NOW())",
            [["m1"], ["m2"]],
        )
    assert "It was not run again" in notes(caught.value)
    assert keys(raw) == ["a"]
    with connection.cursor() as cursor:  # a new connection, and the hot path again
        cursor.executemany(
            "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, 0, NOW())",
            [["m3"], ["m4"]],
        )
    assert keys(raw) == ["a", "m3", "m4"]


@UNNOTICED
def test_a_commit_sent_on_a_killed_session_says_its_outcome_is_unknown(server, raw) -> None:
    Item.objects.count()
    with pytest.raises(ConnectionLostInTransaction) as caught:
        with transaction.atomic():
            Item.objects.create(key="lost")
            with pytest.warns(TransactionLostWarning):  # the test's own point
                kill_connection(notice=False)  # the COMMIT below is sent on it
    assert "The COMMIT was sent but its reply was lost" in str(caught.value)
    assert keys(raw) == []  # the KILL rolled it back (the client could not know)
    Item.objects.create(key="after")
    assert keys(raw) == ["after"]


@UNNOTICED
def test_a_rollback_sent_on_a_killed_session_lets_the_blocks_own_error_through(server, raw) -> None:
    Item.objects.count()
    with pytest.raises(ValueError, match="the block's own error"):
        with transaction.atomic():
            Item.objects.create(key="lost")
            with pytest.warns(TransactionLostWarning):
                kill_connection(notice=False)  # the ROLLBACK below is sent on it
            raise ValueError("the block's own error")
    assert keys(raw) == []
    assert connection.get_autocommit() is True
    Item.objects.create(key="after")
    assert keys(raw) == ["after"]


@UNNOTICED
def test_an_atomic_block_entered_on_a_killed_session_starts_on_a_new_one(server, raw) -> None:
    Item.objects.count()
    victim = kill_connection(notice=False)  # SET autocommit=0 is sent on it
    before = server.connections_total()
    with transaction.atomic():
        Item.objects.create(key="a")
        Item.objects.create(key="b")
        assert session_id() != victim
    assert keys(raw) == ["a", "b"]
    assert server.connections_total() == before + 1


def test_is_usable_says_a_killed_session_is_unusable_without_reconnecting(server) -> None:
    Item.objects.count()
    assert connection.is_usable() is True
    kill_connection()
    before = server.connections_total()
    # PyMySQL's own ping would reconnect silently, skipping Django's session setup.
    assert connection.is_usable() is False
    assert server.connections_total() == before
    assert Item.objects.count() == 0  # the next statement reconnects
    assert server.connections_total() == before + 1


def test_a_write_after_a_kill_runs_once_with_queries_captured(server, raw) -> None:
    Item.objects.count()
    with CaptureQueriesContext(connection) as captured:  # Django's debug cursor
        kill_connection()
        Item.objects.create(key="debug")
    assert keys(raw) == ["debug"]
    assert len([q for q in captured.captured_queries if "INSERT" in q["sql"]]) == 1


class Interrupted(BaseException):
    """What a signal handler raises mid-statement (as Ctrl-C's KeyboardInterrupt, or a
    deadline library's timeout): no ``Exception``, so nothing should swallow it."""


def test_a_statement_interrupted_by_a_signal_leaves_no_half_read_reply_behind(server) -> None:
    victim = session_id()

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        with pytest.raises(Interrupted), connection.cursor() as cursor:
            cursor.execute("SELECT SLEEP(3)")
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    # The reply of SLEEP(3) is still on its way on the old session: a statement sent
    # there would read it as its own. It runs on a new connection instead.
    with connection.cursor() as cursor:
        cursor.execute("SELECT 42")
        assert cursor.fetchone() == (42,)
    assert session_id() != victim


@UNNOTICED
@pytest.mark.skipif(
    CONNECTOR,
    reason="Connector/Python's cursor() pings first: the dead session is replaced before the"
    " read is sent, so the killed read is its first loss, and it is re-run",
)
def test_a_read_run_again_that_loses_its_new_connection_too_raises_naming_both(server) -> None:
    Item.objects.count()
    kill_connection(notice=False)  # the read below meets the dead session first
    killed: list[int] = []

    def kill_the_rerun() -> None:  # as an administrator would, once it is running
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for process in server.processlist():
                if "dbk_rerun" in (process["info"] or ""):
                    server.kill(process["id"])
                    killed.append(process["id"])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_rerun)
    killer.start()
    try:
        with connection.cursor() as cursor, pytest.raises(OperationalError) as caught:
            cursor.execute("SELECT SLEEP(20) AS dbk_rerun")
    finally:
        killer.join()
    assert len(killed) == 1  # the re-run reached the server, once
    assert "the statement was run again once on a new connection, which was lost too" in (
        notes(caught.value)
    )
    assert Item.objects.count() == 0  # and the next statement reconnects


# -- the end of a transaction, cut in flight by a proxy (the statement reached the server,
# its reply never came back) -------------------------------------------------------------


def test_a_lost_reply_to_the_end_of_an_atomic_block_after_its_commit_is_quiet(
    via_proxy, raw
) -> None:
    ran = []
    Item.objects.count()
    with transaction.atomic():
        Item.objects.create(key="committed")
        transaction.on_commit(lambda: ran.append("hook"))
        # COMMIT passes; the "SET autocommit=1" after it is cut: the work is committed.
        via_proxy.cut_after_next_client_write(skip=1)
    assert via_proxy.wait_cut()
    assert ran == ["hook"]  # the committed transaction's hooks still run
    assert keys(raw) == ["committed"]
    assert connection.get_autocommit() is True
    with transaction.atomic():  # the same without hooks
        Item.objects.create(key="again")
        via_proxy.cut_after_next_client_write(skip=1)
    assert via_proxy.wait_cut(2)
    Item.objects.create(key="after")  # a new connection, in autocommit mode
    assert keys(raw) == ["committed", "again", "after"]


def test_a_lost_rollback_reply_lets_the_blocks_own_error_through(via_proxy, raw) -> None:
    Item.objects.count()
    with pytest.raises(ValueError, match="the block's own error"):
        with transaction.atomic():
            Item.objects.create(key="rolled-back")
            via_proxy.cut_after_next_client_write()  # the ROLLBACK
            raise ValueError("the block's own error")
    assert via_proxy.wait_cut()
    assert keys(raw) == []
    Item.objects.create(key="after")  # the next statement gets a new connection
    assert keys(raw) == ["after"]


def test_a_lost_reply_to_leaving_manual_mode_with_work_pending_says_its_outcome_is_unknown(
    via_proxy, raw
) -> None:
    # MySQL's "SET autocommit=1" commits the open transaction: with its reply lost, the
    # work may be saved, and running it again would write it twice.
    if os.environ.get("DBK_DRIVER") == "connector-cext":
        pytest.skip(
            "the C extension has no socket to peek: the guard pings first, so the cut "
            "falls on the ping and the COMMIT is never sent"
        )
    Item.objects.count()
    transaction.set_autocommit(False)
    try:
        Item.objects.create(key="pending")
        via_proxy.cut_after_next_client_write()  # the "SET autocommit=1"
        with pytest.raises(ConnectionLostInTransaction) as caught:
            transaction.set_autocommit(True)
    finally:
        if not connection.get_autocommit():
            transaction.set_autocommit(True)
    assert via_proxy.wait_cut()
    message = str(caught.value)
    assert "its reply was lost" in message and "UNKNOWN: check the data" in message
    assert "nothing this transaction wrote was saved" not in message
    assert keys(raw) == ["pending"]  # here the server did commit it
    assert connection.get_autocommit() is True
    Item.objects.create(key="after")
    assert keys(raw) == ["pending", "after"]


# -- a transaction run by hand (set_autocommit(False)), its session KILLed ---------------


def test_a_rollback_by_hand_after_a_kill_raises_nothing_and_the_next_statement_reconnects(
    server, raw
) -> None:
    transaction.set_autocommit(False)
    try:
        Item.objects.create(key="lost")
        with pytest.warns(TransactionLostWarning):
            victim = kill_connection()
        transaction.rollback()  # the server rolled it back already: nothing to wait on
    finally:
        transaction.set_autocommit(True)
    assert keys(raw) == []
    Item.objects.create(key="after")
    assert keys(raw) == ["after"]
    assert session_id() != victim


def test_leaving_manual_mode_after_a_lost_statement_raises_and_autocommit_is_back(
    server, raw
) -> None:
    transaction.set_autocommit(False)
    try:
        Item.objects.create(key="lost")
        with pytest.warns(TransactionLostWarning):
            kill_connection()
        with pytest.raises(ConnectionLostInTransaction):
            Item.objects.create(key="never")  # the guard sees the KILL: not sent
    finally:
        with pytest.raises(ConnectionLostInTransaction) as caught:
            transaction.set_autocommit(True)  # the work since set_autocommit(False) is gone
    assert "nothing this transaction wrote was saved" in str(caught.value)
    assert connection.get_autocommit() is True
    assert keys(raw) == []
    Item.objects.create(key="after")
    assert keys(raw) == ["after"]
