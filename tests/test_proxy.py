"""The guard against network faults, through a TCP proxy that resets, cuts and
blackholes the connection between Django and the private server (tests/proxy.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import OperationalError, ProgrammingError, connection, transaction
from django.test import override_settings

from django_dbkeepalive import ConnectionLostInTransaction, guard, refresh_connections
from django_dbkeepalive.signals import connection_recycled
from testproject.testapp.models import Item

from .conftest import wait_for
from .proxy import FaultProxy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(30)]

Raw = Callable[..., list[tuple[Any, ...]]]


def keys(raw: Raw) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


def notes(exc: BaseException) -> str:
    return " ".join(getattr(exc, "__notes__", []))


@pytest.fixture
def recycles() -> Iterator[list[str]]:
    """The reasons of every ``connection_recycled`` signal sent during the test."""
    seen: list[str] = []

    def receiver(sender: str, reason: str, **kwargs: Any) -> None:
        seen.append(reason)

    connection_recycled.connect(receiver)
    yield seen
    connection_recycled.disconnect(receiver)


def test_queries_go_through_the_proxy(via_proxy: FaultProxy, server) -> None:
    assert Item.objects.count() == 0
    [flow] = via_proxy.open_flows()
    assert flow.bytes_up > 0 and flow.bytes_down > 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@port")
        assert cursor.fetchone() == (server.port,)


def test_latency_delays_every_round_trip(via_proxy: FaultProxy) -> None:
    Item.objects.count()
    via_proxy.set_latency(0.1)
    start = time.monotonic()
    Item.objects.count()
    assert time.monotonic() - start >= 0.2  # the query and its reply, 0.1 s each


def test_reset_then_read_and_write_succeed(via_proxy: FaultProxy, raw: Raw, recycles) -> None:
    Item.objects.create(key="a")
    assert via_proxy.reset_all() == 1
    time.sleep(0.2)  # past PEEK_AFTER: the guard sees the reset before sending
    assert Item.objects.count() == 1
    assert via_proxy.reset_all() == 1
    time.sleep(0.2)
    Item.objects.create(key="b")
    assert keys(raw) == ["a", "b"]
    assert recycles == ["disconnected", "disconnected"]


def test_reset_right_before_a_statement_it_still_succeeds_once(
    via_proxy: FaultProxy, raw: Raw
) -> None:
    Item.objects.create(key="a")
    via_proxy.reset_all()
    # Within PEEK_AFTER: sent on the reset socket, which fails before anything left
    # (2006), so even a write is sent again.
    Item.objects.create(key="b")
    via_proxy.reset_all()
    assert Item.objects.count() == 2
    assert keys(raw) == ["a", "b"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100})
def test_cut_after_an_insert_saves_it_once_and_reports_it_not_rerun(
    via_proxy: FaultProxy, raw: Raw
) -> None:
    Item.objects.count()
    via_proxy.cut_after_next_client_write()
    with pytest.raises(OperationalError) as caught:
        Item.objects.create(key="cut")
    assert via_proxy.wait_cut()
    assert caught.value.args[0] == 2013
    text = notes(caught.value)
    assert "'default'" in text and "not run again" in text and "in flight" in text
    assert keys(raw) == ["cut"]  # the server committed it: the client never heard
    Item.objects.create(key="next")  # a new flow
    assert keys(raw) == ["cut", "next"]  # and the cut INSERT was never sent twice
    assert len(via_proxy.flows) == 2


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100})
def test_cut_inside_atomic_raises_and_commits_nothing(via_proxy: FaultProxy, raw: Raw) -> None:
    Item.objects.count()
    with pytest.raises(ConnectionLostInTransaction) as caught:
        with transaction.atomic():
            Item.objects.create(key="first")
            via_proxy.cut_after_next_client_write()
            Item.objects.create(key="second")
    assert via_proxy.wait_cut()
    assert caught.value.alias == "default"
    assert "rolled the transaction back" in str(caught.value)
    assert keys(raw) == []  # no partial commit: the server rolled both back
    Item.objects.create(key="after")
    assert keys(raw) == ["after"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 2})
def test_blackhole_after_idle_past_the_limit_reconnects_without_touching_the_flow(
    via_proxy: FaultProxy, recycles
) -> None:
    Item.objects.count()
    assert (
        guard.state_of(connection).limit == 1.0
    )  # WAIT_TIMEOUT 2 minus the margin (capped at half)
    [flow] = via_proxy.open_flows()
    assert via_proxy.blackhole() == 1
    time.sleep(1.3)  # past the limit; the server has not closed anything
    start = time.monotonic()
    assert Item.objects.count() == 0
    assert time.monotonic() - start < 1.0
    assert recycles == ["idle"]
    # Not a byte was sent on the dead flow (no ping, no COM_QUIT): the guard dropped it
    # on the kernel's count of the proxy's silence (TCP_INFO), then opened a new flow.
    assert flow.mode == "blackhole" and flow.dropped_up == 0
    assert len(via_proxy.flows) == 2


def test_blackhole_of_an_active_flow_fails_a_write_within_read_timeout(
    via_proxy: FaultProxy, db_options, raw: Raw
) -> None:
    db_options(read_timeout=2)
    Item.objects.create(key="a")
    via_proxy.blackhole()
    start = time.monotonic()
    with pytest.raises(OperationalError) as caught:
        Item.objects.create(key="b")
    elapsed = time.monotonic() - start
    assert 1.5 < elapsed < 4.0, elapsed
    assert caught.value.args[0] == 2013
    text = notes(caught.value)
    assert "no reply within the client's read_timeout (2s)" in text
    assert "not run again" in text
    Item.objects.create(key="c")  # a new flow
    assert keys(raw) == ["a", "c"]  # "b" never got past the blackhole


def test_blackhole_of_an_active_flow_reruns_a_read_on_a_new_flow(
    via_proxy: FaultProxy, db_options
) -> None:
    db_options(read_timeout=2)
    Item.objects.create(key="a")
    via_proxy.blackhole()
    start = time.monotonic()
    assert Item.objects.count() == 1
    assert 1.5 < time.monotonic() - start < 4.0
    assert len(via_proxy.flows) == 2


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100})
def test_cut_after_a_commit_says_its_outcome_is_unknown(via_proxy: FaultProxy, raw: Raw) -> None:
    Item.objects.count()
    with pytest.raises(ConnectionLostInTransaction) as caught:
        with transaction.atomic():
            Item.objects.create(key="committed")
            via_proxy.cut_after_next_client_write()  # the next write is the COMMIT
    assert via_proxy.wait_cut()
    message = str(caught.value)
    assert "The COMMIT was sent but its reply was lost" in message
    assert "UNKNOWN: check the data" in message
    assert "rolled the transaction back" not in message
    assert keys(raw) == ["committed"]  # here it was applied, and never sent twice
    Item.objects.create(key="after")
    assert keys(raw) == ["committed", "after"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100})
def test_cut_after_a_read_reruns_it_on_a_new_flow(via_proxy: FaultProxy) -> None:
    Item.objects.create(key="a")
    via_proxy.cut_after_next_client_write()
    assert list(Item.objects.values_list("key", flat=True)) == ["a"]
    assert via_proxy.wait_cut()
    assert len(via_proxy.flows) == 2


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100, "PING_AFTER": 0.5})
def test_blackhole_below_the_limit_is_caught_by_the_ping_within_read_timeout(
    via_proxy: FaultProxy, db_options, raw: Raw, recycles
) -> None:
    db_options(read_timeout=2)
    Item.objects.create(key="a")
    via_proxy.blackhole()
    time.sleep(0.7)  # past PING_AFTER, far below the limit
    start = time.monotonic()
    Item.objects.create(key="b")  # the ping times out; the write goes to a new flow
    assert 1.5 < time.monotonic() - start < 4.0
    assert recycles == ["ping_failed"]
    assert keys(raw) == ["a", "b"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100})
def test_a_connection_lost_while_django_sets_it_up_is_replaced(
    via_proxy: FaultProxy, raw: Raw
) -> None:
    # The new flow's login passes; its first statement (Django's session setup) is cut.
    # Plain Django would keep the dead half-open connection for every later statement.
    via_proxy.cut_after_next_client_write(skip=1)
    Item.objects.create(key="a")
    assert via_proxy.wait_cut()
    assert len(via_proxy.flows) == 2
    assert keys(raw) == ["a"]
    Item.objects.create(key="b")
    assert keys(raw) == ["a", "b"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100, "RETRY_CONNECT_FOR": 0})
def test_a_connection_lost_twice_while_being_set_up_says_so(
    via_proxy: FaultProxy, raw: Raw
) -> None:
    via_proxy.cut_after_next_client_write(skip=1, times=2)
    with pytest.raises(OperationalError) as caught:
        Item.objects.create(key="a")
    assert via_proxy.wait_cut(2)
    text = notes(caught.value)
    assert "a new connection to database 'default' was lost twice" in text
    assert "before any statement of yours was sent" in text
    Item.objects.create(key="b")  # nothing half-open was left behind
    assert keys(raw) == ["b"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100, "RETRY_CONNECT_FOR": 3})
def test_a_setup_lost_again_and_again_is_retried_with_backoff_until_it_holds(
    via_proxy: FaultProxy, raw: Raw, recycles
) -> None:
    via_proxy.cut_after_next_client_write(skip=1, times=4)
    started = time.monotonic()
    Item.objects.create(key="a")  # five connects: the first four lost at setup
    elapsed = time.monotonic() - started
    assert via_proxy.wait_cut(4)
    assert len(via_proxy.flows) == 5
    assert 0.05 + 0.1 + 0.2 <= elapsed < 2.5  # backoff after the second loss: 50, 100, 200 ms
    assert keys(raw) == ["a"]


@pytest.fixture
def silent_server() -> Iterator[tuple[int, list[Any]]]:
    """A TCP server that accepts connections and never sends a byte (a stalled server,
    or a load balancer with nothing healthy behind it): ``(port, accepted sockets)``."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[Any] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        listener.close()
        for sock in accepted:
            sock.close()


def test_a_server_that_never_answers_the_login_is_waited_on_once(
    silent_server: tuple[int, list[Any]], db_options: Callable[..., None]
) -> None:
    port, accepted = silent_server
    db_options(connect_timeout=1, read_timeout=1)
    settings_dict = connection.settings_dict
    saved = settings_dict["HOST"], settings_dict["PORT"]
    settings_dict.update(HOST="127.0.0.1", PORT=port)
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError) as caught:
            Item.objects.count()
        elapsed = time.monotonic() - started
    finally:
        settings_dict.update(HOST=saved[0], PORT=saved[1])
        connection.close()
    # Connecting again would only wait as long again (it once doubled the wait).
    assert len(accepted) == 1
    assert elapsed < 2.0
    text = notes(caught.value)
    assert "did not complete the login in time" in text
    assert "Nothing was sent" in text
    assert Item.objects.count() == 0  # the real server again: nothing was left behind


def test_a_blackholed_session_behind_a_proxy_is_never_killed_on_a_guess(
    via_proxy: FaultProxy, db_options, raw: Raw, server, caplog
) -> None:
    # Behind a proxy the server sees the proxy's address, so nothing proves which of its
    # sessions was the lost one: the guard does not KILL it (the proxy ends it when its
    # own client timeout passes). tests/test_zombies.py has the direct case, killed.
    db_options(read_timeout=1)
    assert wait_for(lambda: int(server.query("SHOW GLOBAL STATUS LIKE 'Uptime'")[0][1]) >= 3)
    Item.objects.count()
    old = int(connection.connection.thread_id())
    caplog.set_level("DEBUG", logger="django_dbkeepalive")
    try:
        with pytest.raises(ConnectionLostInTransaction) as caught:
            with transaction.atomic():
                Item.objects.create(key="a")
                via_proxy.blackhole()
                Item.objects.create(key="b")
        assert caught.value.cause == "timeout"
        # Leaving the block reconnected (SET autocommit=1) on a new flow; the old
        # session is still there, holding its transaction.
        assert old in [p["id"] for p in server.processlist()]
        assert f"previous session {old} not killed" in caplog.text
        assert "a proxy or load balancer sits in between" in caplog.text
        Item.objects.create(key="c")  # the new flow works
    finally:
        server.kill(old)  # its lock on "a" would hold up the next tests
    assert keys(raw) == ["c"]


@pytest.mark.restart
def test_a_session_of_a_restarted_server_is_never_killed_by_id(
    via_proxy: FaultProxy, db_options, server
) -> None:
    # Thread ids start again after a restart: the old id may be someone else's now.
    import pymysql

    db_options(read_timeout=1)
    Item.objects.count()
    old = int(connection.connection.thread_id())
    via_proxy.blackhole()
    with pytest.raises(OperationalError):
        Item.objects.create(key="b")  # times out; the next connection would end it
    server.restart()
    bystanders = []
    try:
        while not bystanders or bystanders[-1].thread_id() < old:
            bystanders.append(
                pymysql.connect(
                    host=server.host, port=server.port, user=server.user, password=server.password
                )
            )
        victim = next((c for c in bystanders if c.thread_id() == old), None)
        assert victim is not None, "no session got the old id after the restart"
        assert Item.objects.count() == 0  # a new connection, which must not KILL the victim
        with victim.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
    finally:
        for c in bystanders:
            c.close()


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100, "PING_AFTER": 0.5})
def test_a_failed_ping_inside_a_transaction_raises_connection_lost_in_transaction(
    via_proxy: FaultProxy, db_options, raw: Raw
) -> None:
    db_options(read_timeout=1)
    Item.objects.count()
    with pytest.raises(ConnectionLostInTransaction) as caught:
        with transaction.atomic():
            Item.objects.create(key="a")
            via_proxy.blackhole()
            time.sleep(0.7)  # past PING_AFTER: the next statement pings first
            Item.objects.create(key="b")
    assert "lost inside a transaction" in str(caught.value)
    assert caught.value.__cause__ is not None and caught.value.__cause__.args[0] == 2013
    assert keys(raw) == []  # nothing of it was committed
    Item.objects.create(key="after")  # the block is left: a new flow
    assert keys(raw) == ["after"]


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100})
def test_a_read_re_run_that_fails_for_another_reason_raises_that_error(
    via_proxy: FaultProxy,
) -> None:
    # A temporary table lives in its session: the read's re-run on a new session cannot
    # find it, and that error (not a lost connection) reaches the caller.
    with connection.cursor() as cursor:
        cursor.execute("CREATE TEMPORARY TABLE scratch (id INT)")
        via_proxy.cut_after_next_client_write()
        with pytest.raises(ProgrammingError) as caught:
            cursor.execute("SELECT COUNT(*) FROM scratch")
    assert via_proxy.wait_cut()
    assert caught.value.args[0] == 1146
    assert len(via_proxy.flows) == 2  # run once more, on a new flow
    assert Item.objects.count() == 0


@override_settings(DBKEEPALIVE={"AUTO_GUARD": False, "PEEK_AFTER": 0.05})
def test_a_loops_refresh_on_a_silently_dropped_flow_replaces_it_within_read_timeout(
    via_proxy: FaultProxy, db_options, raw: Raw, recycles
) -> None:
    db_options(read_timeout=1)
    Item.objects.create(key="a")  # opened while nothing guarded it: no limit was read
    via_proxy.blackhole()
    time.sleep(0.1)
    started = time.monotonic()
    refresh_connections()  # reading the limit now gets no reply: the flow is dead
    assert 0.8 < time.monotonic() - started < 3.0
    assert recycles == ["ping_failed"]
    Item.objects.create(key="b")  # on a new flow
    assert keys(raw) == ["a", "b"]
