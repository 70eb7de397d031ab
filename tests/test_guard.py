"""The guard against real faults: wait_timeout, KILL, restart, idle inside transactions."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import InterfaceError, OperationalError, connection, connections, transaction
from django.test import Client, override_settings

from django_dbkeepalive import ConnectionLostInTransaction, guard, testing
from django_dbkeepalive.signals import connection_recycled
from django_dbkeepalive.testing import TransactionLostWarning, kill_connection
from testproject.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True)

CONNECTOR = connection.Database.__name__ == "mysql.connector"
#: What a statement sent on a connection the server closed raises: Connector/Python's
#: pure-Python connection says 2013 with an InterfaceError, the others OperationalError.
LOST_ERRORS: tuple[type[Exception], ...] = (
    (OperationalError, InterfaceError) if CONNECTOR else (OperationalError,)
)

Raw = Callable[..., list[tuple[Any, ...]]]
#: Connector/Python's C extension keeps its socket inside libmysqlclient: no peek, no
#: kernel idle count, and a connection past its idle limit is pinged, not dropped.
CEXT = os.environ.get("DBK_DRIVER") == "connector-cext"


def expire_connection(**kwargs: Any) -> None:
    if CEXT:
        pytest.skip("expire_connection() needs a socket: the C extension exposes none")
    testing.expire_connection(**kwargs)


@pytest.fixture
def recycles() -> Iterator[list[tuple[str, str, float]]]:
    """Every ``connection_recycled`` signal sent during the test: (alias, reason, idle)."""
    seen: list[tuple[str, str, float]] = []

    def receiver(sender: str, reason: str, idle: float, **kwargs: Any) -> None:
        seen.append((sender, reason, idle))

    connection_recycled.connect(receiver)
    yield seen
    connection_recycled.disconnect(receiver)


def thread_id() -> int:
    connection.ensure_connection()
    return int(connection.connection.thread_id())


def keys(raw: Raw) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


def test_read_after_idle_past_server_wait_timeout_reconnects(
    set_wait_timeout, server, recycles, driver
):
    set_wait_timeout(2)
    assert Item.objects.count() == 0
    before = server.connections_total()
    time.sleep(3)
    assert Item.objects.count() == 0
    assert server.connections_total() == before + 1
    # No socket (the C extension): past the idle limit the guard asks the server.
    assert [r[1] for r in recycles] in ([["ping_failed"]] if CEXT else (["disconnected"], ["idle"]))


def test_write_after_idle_past_server_wait_timeout_saves_exactly_one_row(
    set_wait_timeout, raw, recycles
):
    set_wait_timeout(2)
    Item.objects.create(key="before")
    time.sleep(3)
    Item.objects.create(key="after")
    assert keys(raw) == ["before", "after"]
    assert len(recycles) == 1


def test_long_request_reads_sleeps_past_wait_timeout_and_saves(set_wait_timeout, raw):
    set_wait_timeout(2)
    Item.objects.create(key="existing")
    response = Client().get("/long/", {"sleep": "3", "key": "from-request"})
    assert response.status_code == 200
    assert response.json() == {"count": 1}
    assert keys(raw) == ["existing", "from-request"]


def test_atomic_as_first_operation_after_idle_commits(set_wait_timeout, raw):
    set_wait_timeout(2)
    Item.objects.create(key="a")
    time.sleep(3)
    with transaction.atomic():
        Item.objects.create(key="b")
        Item.objects.create(key="c")
    assert keys(raw) == ["a", "b", "c"]


def test_cursor_created_before_idle_works_after_it(set_wait_timeout, raw):
    set_wait_timeout(2)
    cursor = connection.cursor()
    cursor.execute("SELECT 1")
    time.sleep(3)
    cursor.execute("INSERT INTO testapp_item (`key`, value, created) VALUES ('x', 1, NOW())")
    cursor.execute("SELECT COUNT(*) FROM testapp_item")
    assert cursor.fetchone() == (1,)
    assert keys(raw) == ["x"]


def test_proactive_recycle_before_the_server_closes_it(recycles, server, db_options):
    # The session's own value (init_command runs before the guard reads it), read as the
    # connection opens: the limit is known before the first pause.
    db_options(init_command="SET SESSION wait_timeout = 2")
    cursor = connection.cursor()
    cursor.execute("SELECT 1")
    assert guard.state_of(connection).wait == 2.0
    assert guard.state_of(connection).limit == 1.0  # 2 s minus a margin capped at half of it
    old = thread_id()
    expire_connection()  # past the limit, still inside wait_timeout: the session is alive
    assert old in [p["id"] for p in server.processlist()]
    cursor.execute("SELECT 2")
    assert cursor.fetchone() == (2,)
    assert thread_id() != old
    assert [r[1] for r in recycles] == ["idle"]


def test_configured_wait_timeout_is_used_without_asking_the_server(recycles):
    with override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 2, "MARGIN": 0.5}):
        connection.close()
        Item.objects.count()
        assert guard.state_of(connection).limit == 1.5
        expire_connection()  # idle past the 1.5 s limit
        Item.objects.count()
    assert [r[1] for r in recycles] == ["idle"]


def test_kill_then_read_and_write_succeed(server, raw, recycles):
    Item.objects.create(key="a")
    kill_connection()
    assert Item.objects.count() == 1
    kill_connection()
    Item.objects.create(key="b")
    assert keys(raw) == ["a", "b"]
    assert [r[1] for r in recycles] == ["disconnected", "disconnected"]


@pytest.mark.restart
def test_server_restart_then_read_and_write_succeed(server, raw):
    Item.objects.create(key="a")
    server.restart()
    assert Item.objects.count() == 1
    server.restart()
    Item.objects.create(key="b")
    assert keys(raw) == ["a", "b"]


def test_idle_inside_atomic_raises_commits_nothing_and_recovers(set_wait_timeout, raw):
    set_wait_timeout(2)
    with pytest.raises(ConnectionLostInTransaction) as caught:
        with transaction.atomic():
            Item.objects.create(key="first")
            time.sleep(3)
            Item.objects.create(key="second")
    message = str(caught.value)
    assert "'default'" in message and "idle 3." in message and "rolled" in message
    assert isinstance(caught.value, OperationalError)
    assert caught.value.alias == "default" and caught.value.idle >= 3
    assert keys(raw) == []
    Item.objects.create(key="after")
    assert keys(raw) == ["after"]


def test_kill_inside_atomic_raises_and_nothing_is_committed(server, raw):
    with pytest.raises(ConnectionLostInTransaction):
        with transaction.atomic():
            Item.objects.create(key="first")
            with pytest.warns(TransactionLostWarning):  # the test's own point
                kill_connection()
            Item.objects.create(key="second")
    assert keys(raw) == []
    assert Item.objects.count() == 0


def test_idle_before_commit_raises_instead_of_committing_nothing(set_wait_timeout, raw):
    set_wait_timeout(2)
    with pytest.raises(ConnectionLostInTransaction):
        with transaction.atomic():
            Item.objects.create(key="first")
            time.sleep(3)
    assert keys(raw) == []
    Item.objects.create(key="after")
    assert keys(raw) == ["after"]


def test_nested_atomic_lost_connection_rolls_back_whole_block(server, raw):
    with pytest.raises(ConnectionLostInTransaction):
        with transaction.atomic():
            Item.objects.create(key="outer")
            with transaction.atomic():
                Item.objects.create(key="inner")
                with pytest.warns(TransactionLostWarning):  # the test's own point
                    kill_connection()
                Item.objects.create(key="inner2")
    assert keys(raw) == []
    assert Item.objects.count() == 0


def test_manual_transaction_lost_stays_manual_after_rollback(server, raw):
    transaction.set_autocommit(False)
    try:
        Item.objects.create(key="lost")
        with pytest.warns(TransactionLostWarning):  # the test's own point
            kill_connection()
        with pytest.raises(ConnectionLostInTransaction):
            Item.objects.create(key="lost2")
        transaction.rollback()
        assert transaction.get_autocommit() is False
        Item.objects.create(key="kept")
        assert keys(raw) == []  # not committed yet: still a manual transaction
        transaction.commit()
        assert keys(raw) == ["kept"]
    finally:
        transaction.set_autocommit(True)


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_read_that_hits_a_dead_connection_is_rerun_once(server, recycles):
    Item.objects.create(key="a")
    kill_connection(notice=False)  # the statement below hits the dead connection
    before = server.connections_total()
    assert list(Item.objects.values_list("key", flat=True)) == ["a"]
    assert server.connections_total() == before + 1
    assert [r[1] for r in recycles] == ["disconnected"]


def kill_between_statements(server) -> None:
    """A real KILL of this thread's connection, as an administrator's lands between two
    statements: the server closes the session, and its FIN reaches the client socket.
    The guard's state is not touched (unlike kill_connection())."""
    import select

    connection.ensure_connection()
    conn = connection.connection
    server.kill(int(conn.thread_id()))
    fd = guard.driver_of(connection).fileno(conn)
    if fd is None:  # no socket to watch (the C extension): until the server ends it
        deadline = time.monotonic() + 5
        while int(conn.thread_id()) in [p["id"] for p in server.processlist()]:
            assert time.monotonic() < deadline, "the server did not end the session in 5 s"
            time.sleep(0.02)
        return
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(5000), "the server did not close the session within 5 s"


# PEEK_AFTER = 1000: every statement below takes the hot path, as one right after
# another does; a KILL in between is then seen by the peek before a write only.
@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_write_right_after_a_kill_runs_once_on_a_new_connection(server, raw, recycles):
    Item.objects.create(key="a")
    kill_between_statements(server)  # no pause: the write below takes the hot path
    before = server.connections_total()
    Item.objects.create(key="b")
    assert keys(raw) == ["a", "b"]
    assert server.connections_total() == before + 1
    assert [r[1] for r in recycles] == ["disconnected"]


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_executemany_and_raw_writes_right_after_a_kill_run_once(server, raw, recycles):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        kill_between_statements(server)
        if CEXT:
            # No socket: nothing proves the session ended before the write left, so
            # its fate is unknown to the guard and it is never re-run.
            with pytest.raises(OperationalError, match="It was not run again"):
                cursor.executemany(
                    "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, 0, NOW())",
                    [["m1"], ["m2"]],
                )
            assert raw("SELECT `key` FROM testapp_item") == []
            return
        cursor.executemany(
            "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, 0, NOW())",
            [["m1"], ["m2"]],
        )
        kill_between_statements(server)
        cursor.execute("UPDATE testapp_item SET value = value + 1")
    assert raw("SELECT `key`, value FROM testapp_item ORDER BY id") == [("m1", 1), ("m2", 1)]
    assert [r[1] for r in recycles] == ["disconnected", "disconnected"]


def test_an_atomic_block_begun_after_a_kill_while_idle_runs_on_a_new_connection(
    server, raw, recycles
):
    # The peek sees the server's close; without a socket (the C extension) the guard
    # pings before the transaction begins. Either way nothing of it meets the dead one.
    Item.objects.count()
    victim = thread_id()
    server.kill(victim)
    time.sleep(0.3)  # more than PEEK_AFTER (0.1 s)
    before = server.connections_total()
    with transaction.atomic():
        Item.objects.create(key="a")
        Item.objects.create(key="b")
        assert thread_id() != victim
    assert keys(raw) == ["a", "b"]
    assert server.connections_total() == before + 1
    assert [r[1] for r in recycles] == ["disconnected"]


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_commit_after_a_kill_says_the_transaction_was_rolled_back(server, raw):
    with pytest.raises(ConnectionLostInTransaction) as caught:
        with transaction.atomic():
            Item.objects.create(key="lost")
            kill_between_statements(server)  # the COMMIT below is the next operation
    message = str(caught.value)
    if CEXT:  # no socket: nothing proves the session ended before the COMMIT left
        assert "whether the transaction was saved is UNKNOWN" in message
    else:
        assert "The server rolled the transaction back" in message
        assert "UNKNOWN" not in message
    assert keys(raw) == []
    Item.objects.create(key="after")
    assert keys(raw) == ["after"]


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_locking_read_outside_a_transaction_is_rerun_after_a_kill(server, raw):
    Item.objects.create(key="a")
    kill_connection(notice=False)
    with connection.cursor() as cursor:
        cursor.execute("SELECT `key` FROM testapp_item WHERE `key` = %s FOR UPDATE", ["a"])
        assert list(cursor.fetchall()) == [("a",)]


@pytest.mark.skipif(
    CONNECTOR,
    reason="Connector/Python's cursor() pings first: a KILL between two ORM reads is found"
    " before the read is sent, which then runs on a new connection whatever RETRY_READS"
    " says (the in-flight case: test_session_dependent_read_is_not_rerun)",
)
@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000, "RETRY_READS": False})
def test_reads_are_not_rerun_when_retry_reads_is_off(server):
    Item.objects.count()
    kill_connection(notice=False)
    with pytest.raises(OperationalError):
        Item.objects.count()
    assert Item.objects.count() == 0


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_session_dependent_read_is_not_rerun(server):
    Item.objects.count()
    cursor = connection.cursor()  # before the KILL: the statement meets the dead session
    kill_connection(notice=False)
    with pytest.raises(LOST_ERRORS):
        cursor.execute("SELECT LAST_INSERT_ID()")
    cursor.execute("SELECT 1")
    assert cursor.fetchone() == (1,)


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_driver_interface_error_never_reaches_code_after_a_disconnect(server):
    cursor = connection.cursor()
    cursor.execute("SELECT 1")
    kill_connection(notice=False)
    with pytest.raises(LOST_ERRORS):
        cursor.execute("SELECT LAST_INSERT_ID()")  # never re-run: it needs the old session
    # PyMySQL would now raise InterfaceError(0, '') on every statement of this cursor.
    for _ in range(3):
        cursor.execute("SELECT COUNT(*) FROM testapp_item")
        assert cursor.fetchone() == (0,)


def test_hot_path_sends_nothing_but_the_statements(server):
    cursor = connection.cursor()
    cursor.execute("SELECT 1")
    expire_connection(idle=0.3)  # a short pause: the guard reads wait_timeout once
    cursor.execute("SHOW SESSION STATUS LIKE 'Questions'")
    start = int(cursor.fetchone()[1])
    for _ in range(200):
        cursor.execute("SELECT 1")
    cursor.execute("SHOW SESSION STATUS LIKE 'Questions'")
    assert int(cursor.fetchone()[1]) == start + 201


def test_guard_off_leaves_connections_to_django(set_wait_timeout):
    with override_settings(DBKEEPALIVE={"AUTO_GUARD": False}):
        set_wait_timeout(2)
        Item.objects.count()
        time.sleep(3)
        with pytest.raises(OperationalError):
            Item.objects.count()
    connection.close()


def test_conn_max_age_is_enforced_between_statements(recycles, settings):
    connection.close()
    connection.settings_dict["CONN_MAX_AGE"] = 1
    try:
        Item.objects.count()
        old = thread_id()
        time.sleep(1.2)
        Item.objects.count()
        assert thread_id() != old
        assert [r[1] for r in recycles] == ["max_age"]
    finally:
        connection.settings_dict["CONN_MAX_AGE"] = 0
        connection.close()


def test_a_long_statement_is_not_mistaken_for_idle_time(recycles):
    cursor = connection.cursor()
    cursor.execute("SET SESSION wait_timeout = 2")
    cursor.execute("CREATE TEMPORARY TABLE scratch (id INT)")
    expire_connection(idle=0.3)  # a short pause
    cursor.execute("INSERT INTO scratch VALUES (1)")  # the guard reads wait_timeout here
    old = thread_id()
    cursor.execute("SELECT SLEEP(2.5)")  # longer than wait_timeout, but busy, not idle
    cursor.execute("SELECT COUNT(*) FROM scratch")  # session state must survive
    assert cursor.fetchone() == (1,)
    with transaction.atomic():
        cursor.execute("INSERT INTO scratch VALUES (2)")
        cursor.execute("SELECT SLEEP(2.5)")
        cursor.execute("INSERT INTO scratch VALUES (3)")
    cursor.execute("SELECT COUNT(*) FROM scratch")
    assert cursor.fetchone() == (3,)
    assert thread_id() == old
    assert recycles == []


@pytest.mark.skipif(
    CONNECTOR and not connection.settings_dict["OPTIONS"].get("buffered"),
    reason="Connector/Python's cursors are unbuffered by default: an iterator still reading"
    " its rows from a connection the guard replaced cannot finish (OPTIONS buffered=True"
    " reads them first, as mysqlclient and PyMySQL do; docs/connector.md)",
)
def test_an_iterator_whose_loop_body_outlives_its_connection_finishes(raw):
    # The loop body's write replaces the connection under the iterator's open cursor;
    # closing that cursor at the end must not raise the driver's raw 2006.
    for n in range(3):
        Item.objects.create(key=f"src-{n}")
    seen = []
    for item in Item.objects.filter(key__startswith="src-").order_by("id").iterator(chunk_size=2):
        seen.append(item.key)
        kill_connection()
        Item.objects.create(key=f"copy-{item.key}")
    assert seen == ["src-0", "src-1", "src-2"]
    assert sorted(keys(raw)) == sorted(
        ["src-0", "src-1", "src-2", "copy-src-0", "copy-src-1", "copy-src-2"]
    )


def test_closing_a_cursor_of_a_dead_connection_hands_it_to_the_guard(server):
    cursor = connection.cursor()
    cursor.execute("SELECT 1")
    kill_connection()
    cursor.close()  # no error: nothing to save on a dead connection
    assert Item.objects.count() == 0  # the next statement reconnects


def _kill_right_after_commit(server, monkeypatch, then=None):
    """Make the next COMMIT succeed, then lose the session before Django's following
    SET autocommit=1 (the end of an atomic block): a real KILL (or ``then``)."""
    db = connections["default"]
    real_commit = db.commit

    def commit() -> None:
        real_commit()
        (then or (lambda: kill_between_statements(server)))()

    monkeypatch.setattr(db, "commit", commit)


def test_a_kill_right_after_commit_is_not_reported_as_a_lost_transaction(server, raw, monkeypatch):
    # Reported as lost, the committed work would be run again by the caller: duplicates.
    _kill_right_after_commit(server, monkeypatch)
    hooks = []
    with transaction.atomic():
        Item.objects.create(key="a")
        Item.objects.create(key="b")
        transaction.on_commit(lambda: hooks.append("ran"))
    monkeypatch.undo()
    assert keys(raw) == ["a", "b"]
    assert hooks == ["ran"]
    assert connection.get_autocommit() is True
    Item.objects.create(key="c")  # autocommit, on a new connection: committed at once
    assert keys(raw) == ["a", "b", "c"]


@pytest.mark.restart
def test_a_server_gone_right_after_commit_leaves_the_block_committed(server, raw, monkeypatch):
    _kill_right_after_commit(server, monkeypatch, then=server.crash)
    hooks = []
    with transaction.atomic():
        Item.objects.create(key="a")
        transaction.on_commit(lambda: hooks.append("ran"))
    monkeypatch.undo()
    assert hooks == ["ran"]
    server.start_again()
    assert keys(raw) == ["a"]
    Item.objects.create(key="b")
    assert keys(raw) == ["a", "b"]


def test_a_connection_lost_in_manual_mode_raises_once_when_leaving_it(server, raw):
    transaction.set_autocommit(False)
    try:
        Item.objects.create(key="uncommitted")
        kill_between_statements(server)
        with pytest.raises(ConnectionLostInTransaction) as caught:
            transaction.set_autocommit(True)  # MySQL would commit here: the work is gone
        assert "rolled the transaction back" in str(caught.value)
    finally:
        if not connection.get_autocommit():
            transaction.set_autocommit(True)
    assert connection.get_autocommit() is True
    for key in ("next", "and-next"):  # never stuck: plain autocommit statements again
        Item.objects.create(key=key)
    assert keys(raw) == ["next", "and-next"]


@pytest.mark.restart
def test_over_tls_idle_pauses_are_not_taken_for_a_close_and_a_kill_still_is(
    server, db_options, raw, recycles
):
    if not server.set_tls(True):
        pytest.skip("openssl is not installed: the private server cannot offer TLS")
    try:
        _tls_pauses_and_kill(server, db_options, raw, recycles)
    finally:
        server.set_tls(False)


def _tls_pauses_and_kill(server, db_options, raw, recycles):
    if CONNECTOR:
        db_options(ssl_ca=str(server.ssl_cert), ssl_verify_identity=False)
    else:
        db_options(ssl={"ca": str(server.ssl_cert), "check_hostname": False})
    with connection.cursor() as cursor:
        cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
        assert cursor.fetchone()[1].startswith("TLS")  # the session really is encrypted
    first = thread_id()
    for turn in range(8):
        Item.objects.count()
        time.sleep(0.15)  # past PEEK_AFTER: the slow path peeks at TLS records
        Item.objects.create(key=f"tls-{turn}")  # a write: polled first
    assert recycles == []  # nothing the TLS layer sends looked like a close
    assert thread_id() == first

    kill_connection()
    Item.objects.create(key="after-kill")
    assert [reason for _, reason, _ in recycles] == ["disconnected"]
    assert keys(raw) == [f"tls-{turn}" for turn in range(8)] + ["after-kill"]
