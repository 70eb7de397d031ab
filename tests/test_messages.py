"""What an error that reaches user code says after a real fault: the alias, what
happened, what to do; never SQL parameters or passwords."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    connection,
    transaction,
)
from django.test import override_settings

from django_dbkeepalive import ConnectionLostInTransaction, fresh_connection, guard
from testproject.testapp.models import Item

from .conftest import close_connections, needs_read_timeout
from .proxy import FaultProxy
from .servers import _free_port as free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

Raw = Callable[..., list[tuple[Any, ...]]]
SECRET = "s3cret-parameter-value"


#: What a statement lost in flight or an unreachable server raises: Connector/Python's
#: pure-Python driver says it with an InterfaceError, the others an OperationalError.
LOST_ERRORS = (OperationalError, InterfaceError)
#: Connector/Python's C extension keeps its socket inside libmysqlclient: no peek, so the
#: failed ping finds the close, and the idle time against wait_timeout narrows the cause.
CEXT = os.environ.get("DBK_DRIVER") == "connector-cext"
#: What is said of a session closed while idle, not for inactivity, without a peek.
CLOSED_UNSEEN = "killed (KILL), the server restarted, or the network reset it"


def keys(raw: Raw) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


def notes(exc: BaseException) -> str:
    return " ".join(getattr(exc, "__notes__", []))


def thread_id() -> int:
    connection.ensure_connection()
    return int(connection.connection.thread_id())


def no_secrets(text: str, server: Any) -> None:
    assert SECRET not in text
    assert server.password not in text and server.root_password not in text


def lost_in_transaction(statement: Callable[[], Any], before: Callable[[], Any]) -> str:
    """Run ``before`` then ``statement`` in an atomic block; return the message raised."""
    with pytest.raises(ConnectionLostInTransaction) as caught:
        with transaction.atomic():
            Item.objects.create(key="first")
            before()
            statement()
    message = str(caught.value)
    assert "'default'" in message
    assert "rolled the transaction back" in message and "leave the atomic block" in message
    return message


def test_kill_while_idle_in_a_transaction_names_the_kill(server, raw) -> None:
    message = lost_in_transaction(
        lambda: Item.objects.create(key=SECRET),
        lambda: (server.kill(thread_id()), time.sleep(0.3)),
    )
    if CEXT:
        assert CLOSED_UNSEEN in message and "not for inactivity" in message
    else:
        assert "the server closed the session while it was idle" in message
    assert "killed (KILL)" in message
    assert "find out what kills connections" in message
    no_secrets(message, server)
    assert keys(raw) == []


@override_settings(DBKEEPALIVE={"PEEK_AFTER": 1000})
def test_kill_while_a_write_is_in_flight_says_it_was_not_rerun(server, raw) -> None:
    Item.objects.count()
    with connection.cursor() as cursor:
        victim = thread_id()
        import threading

        killer = threading.Timer(0.3, server.kill, (victim,))
        killer.start()
        try:
            with pytest.raises(LOST_ERRORS) as caught:
                cursor.execute(
                    "INSERT INTO testapp_item (`key`, value, created) SELECT %s, SLEEP(2), NOW()",
                    [SECRET],
                )
        finally:
            killer.join()
    text = notes(caught.value)
    assert "'default'" in text
    assert "while this statement was in flight" in text and "KILL" in text
    assert "not run again" in text and "check whether it took effect" in text
    no_secrets(text, server)
    Item.objects.create(key="next")
    assert keys(raw) == ["next"]


def test_idle_past_wait_timeout_in_a_transaction(set_wait_timeout, raw, server) -> None:
    set_wait_timeout(2)
    Item.objects.count()
    assert guard.state_of(connection).wait == 2  # read as the connection opened: no pause needed
    message = lost_in_transaction(lambda: Item.objects.create(key="second"), lambda: time.sleep(3))
    assert "idle 3." in message and "longer than the server's wait_timeout (2s)" in message
    assert "outside transaction.atomic()" in message
    assert keys(raw) == []


def test_idle_before_wait_timeout_is_known_mentions_both_causes(set_wait_timeout, raw) -> None:
    # A connection opened while nothing guarded it (AUTO_GUARD off, outside any scope)
    # has no known limit when a guarded scope first uses it after a pause.
    set_wait_timeout(2)
    with override_settings(DBKEEPALIVE={"AUTO_GUARD": False}):

        def in_a_scope() -> None:
            assert guard.state_of(connection).wait is None
            with fresh_connection():
                Item.objects.create(key="second")

        message = lost_in_transaction(in_a_scope, lambda: time.sleep(3))
    # MariaDB resets a connection it closes for inactivity; a proxy would too.
    # Slept 3 s; a loaded machine may add a tenth.
    if CEXT:  # no peek: learning the limits late is what finds the close
        assert "the server closed the session while it was idle" in message
        assert re.search(r"idle 3\.\ds; the server's wait_timeout is not known yet", message)
        return
    assert re.search(
        r"the connection was reset after it sat idle 3\.\ds: by the server if its wait_timeout",
        message,
    ), message
    assert "otherwise by a proxy, load balancer or firewall" in message


@pytest.mark.restart
def test_restart_while_idle_in_a_transaction(server, raw) -> None:
    message = lost_in_transaction(lambda: Item.objects.create(key="second"), server.restart)
    assert (CLOSED_UNSEEN if CEXT else "the server shut down or restarted") in message
    assert keys(raw) == []


@pytest.mark.restart
@override_settings(DBKEEPALIVE={"RETRY_CONNECT_FOR": 1})
def test_server_down_says_it_cannot_be_reached_and_what_was_lost(server, raw) -> None:
    Item.objects.create(key="a")
    server.stop()
    try:
        time.sleep(0.2)
        started = time.monotonic()
        # (Connector/Python's C extension raises a plain DatabaseError for 2003.)
        with pytest.raises(DatabaseError if CEXT else LOST_ERRORS) as caught:
            Item.objects.create(key="b")
        assert 1.0 <= time.monotonic() - started < 2.5  # retried for RETRY_CONNECT_FOR
        text = notes(caught.value)
        assert "DBKEEPALIVE['RETRY_CONNECT_FOR']" in text
        assert caught.value.args[0] in (2002, 2003, 2013)
        assert "could not connect to database 'default'" in text
        assert "down or restarting" in text
        assert "Its previous connection was lost" in text and "restart" in text
        assert "Nothing was sent" in text and "Retry once the server is back" in text
        no_secrets(text, server)
    finally:
        server.start_again()
    Item.objects.create(key="c")
    assert keys(raw) == ["a", "c"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100})
def test_proxy_reset_while_idle_in_a_transaction(via_proxy: FaultProxy, raw) -> None:
    message = lost_in_transaction(
        lambda: Item.objects.create(key="second"),
        lambda: (via_proxy.reset_all(), time.sleep(0.3)),
    )
    assert (CLOSED_UNSEEN if CEXT else "the network connection was reset") in message
    # Slept 0.3 s; a loaded machine may add some tenths.
    assert re.search(
        r"idle 0\.[3-9]s; the guard's idle limit is 95\.0s, the server's wait_timeout 100s", message
    ), message
    assert "proxy, load balancer, firewall" in message
    assert keys(raw) == []


@needs_read_timeout
def test_read_timeout_in_a_transaction(via_proxy: FaultProxy, db_options, raw) -> None:
    db_options(read_timeout=2)
    message = lost_in_transaction(lambda: Item.objects.create(key="second"), via_proxy.blackhole)
    assert "no reply within the client's read_timeout (2s)" in message
    assert "a statement was in flight" in message
    assert keys(raw) == []


@pytest.fixture
def small_max_allowed_packet(server) -> Iterator[int]:
    """The server's max_allowed_packet lowered to 64 KiB for new connections."""
    old = server.get_global("max_allowed_packet")
    server.set_global("max_allowed_packet", 65536)
    close_connections()
    try:
        yield 65536
    finally:
        server.set_global("max_allowed_packet", old)
        close_connections()


def test_too_large_statement_is_not_called_a_lost_connection(
    small_max_allowed_packet, server, raw
) -> None:
    Item.objects.create(key="a")
    big = SECRET + "x" * 200_000
    with connection.cursor() as cursor, pytest.raises(OperationalError) as caught:
        cursor.execute(
            "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, LENGTH(%s), NOW())",
            ["b", big],
        )
    text = notes(caught.value)
    assert "This is not a lost connection" in text
    assert "max_allowed_packet (65,536 bytes)" in text
    assert "200," in text  # the statement's size in bytes
    assert "It was not sent again" in text
    no_secrets(text, server)
    assert keys(raw) == ["a"]
    Item.objects.create(key="c")  # the next statement reconnects
    assert keys(raw) == ["a", "c"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100})
def test_too_large_statement_before_the_limit_was_read_reads_it_on_a_new_connection(
    small_max_allowed_packet, server, raw
) -> None:
    Item.objects.create(key="a")
    # WAIT_TIMEOUT given: nothing was asked of the server as the connection opened.
    assert guard.state_of(connection).max_packet is None
    with connection.cursor() as cursor, pytest.raises(OperationalError) as caught:
        cursor.execute(
            "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, LENGTH(%s), NOW())",
            ["b", "x" * 200_000],
        )
    text = notes(caught.value)
    assert "max_allowed_packet (65,536 bytes)" in text  # read on the new connection
    assert "It was not sent again" in text
    assert guard.state_of(connection).max_packet == 65536
    Item.objects.create(key="c")
    assert keys(raw) == ["a", "c"]


def test_too_large_statement_in_a_transaction(small_max_allowed_packet, server, raw) -> None:
    Item.objects.count()
    time.sleep(0.3)
    Item.objects.count()  # the guard reads wait_timeout and max_allowed_packet here
    assert guard.state_of(connection).max_packet == 65536
    message = lost_in_transaction(
        lambda: connection.cursor().execute("SELECT LENGTH(%s)", [SECRET * 10_000]),
        lambda: None,
    )
    assert "larger than the server's max_allowed_packet (65,536 bytes)" in message
    no_secrets(message, server)
    assert keys(raw) == []


@pytest.mark.parametrize(
    "exc, evidence",
    [
        (TimeoutError("timed out"), "timeout"),
        (ConnectionResetError(104, "Connection reset by peer"), "reset"),
        (
            OperationalError(2013, "Lost connection to MySQL server during query (timed out)"),
            "timeout",
        ),
        (
            OperationalError(
                2013,
                "Lost connection to MySQL server during query "
                "([Errno 104] Connection reset by peer)",
            ),
            "reset",
        ),
        (OperationalError(2013, "Lost connection to server during query"), None),
    ],
)
def test_network_evidence_refines_the_wording_only(
    exc: BaseException, evidence: str | None
) -> None:
    from django_dbkeepalive.guard.causes import network_evidence

    assert network_evidence(exc) == evidence


@pytest.mark.parametrize(
    "kind, idle, wait, said",
    [
        ("gone", 3.0, 2.0, "sat idle 3.0s, longer than the server's wait_timeout (2s)"),
        ("lost", 3.0, 2.0, "sat idle 3.0s, longer than the server's wait_timeout (2s)"),
        ("gone", 0.3, 28800.0, "not for inactivity: idle 0.3s, under the server's wait_timeout"),
        ("gone", 0.3, None, "idle past its wait_timeout, KILL, a restart, or a network reset"),
        ("lost", 0.3, 100.0, "the server closed it (KILL, a restart or a crash)"),
    ],
)
def test_a_close_found_without_a_peek_is_narrowed_by_the_idle_time(
    kind: str, idle: float, wait: float | None, said: str
) -> None:
    # What a failed ping says when no socket could be peeked (the C extension's case).
    from django_dbkeepalive.guard.causes import explain

    assert said in explain(kind, idle=idle, wait=wait).what


def test_too_large_blob_statement_counts_the_blobs_bytes(
    small_max_allowed_packet, server, raw
) -> None:
    Item.objects.create(key="a")
    with connection.cursor() as cursor, pytest.raises(OperationalError) as caught:
        cursor.execute(
            "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, LENGTH(%s), NOW())",
            ["b", b"\x00" * 300_000],
        )
    text = notes(caught.value)
    assert "This is not a lost connection" in text
    assert "300," in text  # the blob's bytes, counted as sent
    Item.objects.create(key="c")
    assert keys(raw) == ["a", "c"]


def test_too_large_executemany_of_an_iterator_says_its_size_is_not_known(
    small_max_allowed_packet, server, raw
) -> None:
    Item.objects.create(key="a")
    rows = ((f"k{n}", "x" * 100_000) for n in range(3))  # consumed by the driver
    if CEXT:  # its executemany() takes a list or tuple only: the driver's own error
        with connection.cursor() as cursor, pytest.raises(ProgrammingError, match="list or"):
            cursor.executemany("INSERT INTO testapp_item (`key`) VALUES (%s)", rows)
        assert connection.connection is not None  # not taken for a lost connection
        Item.objects.create(key="c")
        assert keys(raw) == ["a", "c"]
        return
    with connection.cursor() as cursor, pytest.raises(OperationalError) as caught:
        cursor.executemany(
            "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, LENGTH(%s), NOW())",
            rows,
        )
    text = notes(caught.value)
    if caught.value.args[0] == 1153:  # the server's own word for it
        assert "This is not a lost connection" in text
        assert "size not known" in text
    else:  # the server's close seen first (libmariadb): the size cannot tell it apart
        assert caught.value.args[0] in (2006, 2013)
        assert "It was not run again" in text
    Item.objects.create(key="c")
    assert keys(raw) == ["a", "c"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100, "RETRY_CONNECT_FOR": 0})
def test_too_large_statement_when_the_server_cannot_be_reached_again_says_its_limit_is_unknown(
    small_max_allowed_packet, server, via_proxy, raw
) -> None:
    Item.objects.create(key="a")  # through the proxy; its limit was never read
    via_proxy.retarget(free_port())  # new connections now fail
    with connection.cursor() as cursor, pytest.raises(OperationalError) as caught:
        cursor.execute(
            "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, LENGTH(%s), NOW())",
            ["b", "x" * 200_000],
        )
    text = notes(caught.value)
    if caught.value.args[0] == 1153:  # the server said why: the size is the reason
        assert "max_allowed_packet (not known here)" in text
        assert "It was not sent again" in text
    elif caught.value.args[0] == 2006 or "re-run the statement failed" in text:
        # Closed before it was sent (2006, or a 2013 after the server's close the guard
        # saw on the socket): re-run, if it could connect; the rows below prove it was not.
        assert "connecting again to re-run the statement failed" in text
    else:  # its reply lost (2013): never run again
        assert "It was not run again" in text
    via_proxy.retarget(server.port)  # reachable again: the next statement reconnects
    Item.objects.create(key="c")
    assert keys(raw) == ["a", "c"]
