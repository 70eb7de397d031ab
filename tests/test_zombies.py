"""A session the network lost silently is ended from the next connection: only when it is
provably that very session, never a stranger's (two servers share a ``server_id``;
an endpoint that moved; a proxy in between)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError, connection

from .conftest import close_connections, wait_for
from .mariadb import MariaDBServer
from .proxy import FaultProxy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

# A statement the server runs long after the client gave up on it (read_timeout 1 s),
# and that is never re-run (no read): its session stays on the server, a "zombie".
LONG = "DO SLEEP(30)"


@pytest.fixture(scope="module")
def other_server(mariadb: MariaDBServer) -> Iterator[MariaDBServer]:
    """A second private server: the same default ``server_id`` (1), the same user and
    password as the session's, and a database of the test database's name."""
    other = MariaDBServer()
    other.start()
    try:
        for host in ("%", "localhost"):
            other.query("ALTER USER %s@%s IDENTIFIED BY %s", (mariadb.user, host, mariadb.password))
        other.query("CREATE DATABASE IF NOT EXISTS test_dbkeepalive")
        assert other.get_global("server_id") == mariadb.get_global("server_id")
        yield other
    finally:
        other.close()


def thread_id() -> int:
    connection.ensure_connection()
    return int(connection.connection.thread_id())


def lose_to_a_timeout(db_options: Any, server: MariaDBServer) -> int:
    """Make this thread's connection time out on :data:`LONG`; returns its thread id.
    The server keeps running the statement in that session."""
    db_options(read_timeout=1)
    # Proof of no restart since the session opened needs uptime >= its age.
    assert wait_for(lambda: int(server.query("SHOW GLOBAL STATUS LIKE 'Uptime'")[0][1]) >= 3)
    old = thread_id()
    with pytest.raises(OperationalError):
        with connection.cursor() as cursor:
            cursor.execute(LONG)
    assert old in ids(server)
    return old


def end(server: MariaDBServer, session: int) -> None:
    """Clean up: end the lost session if the server has not noticed the loss itself."""
    if session in ids(server):
        with contextlib.suppress(Exception):  # it may end between the two statements
            server.kill(session)


def ids(server: MariaDBServer) -> list[int]:
    return [int(p["id"]) for p in server.processlist()]


def test_a_session_lost_to_a_timeout_is_killed_by_the_next_connection(server, db_options, caplog):
    caplog.set_level("DEBUG", logger="django_dbkeepalive")
    old = lose_to_a_timeout(db_options, server)
    started = time.monotonic()
    assert thread_id() != old  # the next statement's new connection ends the old session
    assert wait_for(lambda: old not in ids(server), timeout=1.0)
    assert time.monotonic() - started < 2.0  # killed, not waited out (SLEEP(30))
    assert f"killed the 'default' connection's previous session {old}" in caplog.text


def test_a_stranger_with_the_same_thread_id_on_another_server_is_never_killed(
    server, other_server, db_options, caplog
):
    caplog.set_level("DEBUG", logger="django_dbkeepalive")
    old = lose_to_a_timeout(db_options, server)
    # Another client of the same user on the other server, with the lost session's id.
    # Thread ids come from a counter: connect and close until it reaches that id (held
    # open, the connections would pass max_connections when the id is high).
    strangers = []
    while True:
        stranger = other_server._admin_connect(db="test_dbkeepalive")
        with stranger.cursor() as cursor:
            cursor.execute("SELECT CONNECTION_ID()")
            [stranger_id] = cursor.fetchone()
        if stranger_id >= old:
            strangers.append(stranger)
            break
        stranger.close()
    assert stranger_id == old, "the other server's thread ids went past the lost one's"
    settings_dict = connection.settings_dict
    saved = settings_dict["PORT"]
    settings_dict["PORT"] = other_server.port  # the endpoint moved (DNS, a virtual IP)
    try:
        close_connections()  # as after the loss: the next statement connects anew
        assert thread_id() != old
        with strangers[-1].cursor() as cursor:
            cursor.execute("SELECT 1")  # alive: not killed
            assert cursor.fetchone() == (1,)
        assert old in ids(other_server)
        assert f"previous session {old} not killed" in caplog.text
        assert "not provably the same server instance" in caplog.text
    finally:
        settings_dict["PORT"] = saved
        close_connections()
        for stranger in strangers:
            stranger.close()
        end(server, old)


def test_a_session_lost_behind_a_proxy_that_moved_is_never_killed(
    server, other_server, db_options, caplog
):
    caplog.set_level("DEBUG", logger="django_dbkeepalive")
    settings_dict = connection.settings_dict
    saved = settings_dict["HOST"], settings_dict["PORT"]
    proxy = FaultProxy(server.port).start()
    close_connections()
    settings_dict.update(HOST="127.0.0.1", PORT=proxy.port)
    try:
        old = lose_to_a_timeout(db_options, server)
        proxy.retarget(other_server.port)  # the load balancer now sends flows elsewhere
        assert thread_id() != old
        assert old in ids(server)  # the lost session: not killed (it cannot be proven)
        assert f"previous session {old} not killed" in caplog.text
    finally:
        settings_dict.update(HOST=saved[0], PORT=saved[1])
        close_connections()
        proxy.close()
        end(server, old)


def test_a_lost_session_that_ended_before_the_next_connection_is_left_alone(
    server, db_options, caplog
):
    caplog.set_level("DEBUG", logger="django_dbkeepalive")
    old = lose_to_a_timeout(db_options, server)
    server.kill(old)  # an administrator (or the server itself) ended it meanwhile
    assert wait_for(lambda: old not in ids(server), timeout=2.0)
    assert thread_id() != old  # a new connection; nothing is sent for the old one
    assert f"previous session {old} not killed: it is gone already" in caplog.text
    assert "killed the 'default' connection's previous session" not in caplog.text


def test_a_session_lost_over_a_unix_socket_is_never_killed(server, db_options, caplog):
    # Over a local socket the server shows no client address: nothing proves which
    # session of the user was ours.
    if server.socket is None:
        pytest.skip("an external server: no local socket")
    caplog.set_level("DEBUG", logger="django_dbkeepalive")
    settings_dict = connection.settings_dict
    saved = settings_dict["HOST"]
    close_connections()
    settings_dict["HOST"] = server.socket
    old = -1
    try:
        old = lose_to_a_timeout(db_options, server)
        assert thread_id() != old
        assert old in ids(server)
        assert f"previous session {old} not killed: not a TCP connection" in caplog.text
    finally:
        settings_dict["HOST"] = saved
        close_connections()
        end(server, old)
