"""The guard's look at a driver's socket (guard/sockets.py) never disturbs the driver,
nor anything else of the process: a process-wide default socket timeout, and a
descriptor number that no longer names the driver's socket."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

import pytest
from django.db import connection, connections
from django.test import override_settings

from django_dbkeepalive import guard
from django_dbkeepalive.testing import expire_connection, kill_connection, record_recycles
from testproject.testapp.models import Item

from .conftest import extra_alias

pytestmark = pytest.mark.django_db(transaction=True)


def driver_fd() -> int:
    connection.ensure_connection()
    fd = guard.driver_of(connection).fileno(connection.connection)
    assert fd is not None and fd >= 0
    return int(fd)


def test_with_a_default_socket_timeout_the_guards_look_leaves_the_drivers_socket_as_it_was(
    server,
) -> None:
    Item.objects.count()
    fd = driver_fd()
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    # A socket object made on a duplicate of the driver's descriptor (as the guard's
    # look at it) turns O_NONBLOCK on for the shared file when a default timeout is set.
    socket.setdefaulttimeout(5)
    try:
        assert guard.socket_family(connection) == socket.AF_INET
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == flags
        expire_connection()  # the next statement asks the kernel how long it was idle
        Item.objects.count()
        fd = driver_fd()
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK == flags & os.O_NONBLOCK
        with connection.cursor() as cursor:
            cursor.execute("SELECT SLEEP(0.3), 7")  # a blocking read works as before
            assert cursor.fetchone() == (0, 7)
    finally:
        socket.setdefaulttimeout(None)


def test_a_descriptor_number_that_now_names_another_file_is_never_touched(
    server, tmp_path: Path
) -> None:
    Item.objects.count()
    fd = driver_fd()
    before = server.connections_total()
    with open(tmp_path / "ours", "w+b") as ours:
        ours.write(b"ours")
        ours.flush()
        inode = os.fstat(ours.fileno()).st_ino
        # The driver's socket is closed behind its back and its number given to a file
        # of ours (as when another thread opens one after the driver closed its socket).
        os.dup2(ours.fileno(), fd)
        assert guard.socket_family(connection) is None  # no longer the recorded socket
        guard.notice_at_next_statement(connection)
        assert Item.objects.count() == 0  # on a new connection, sent there once
        assert server.connections_total() == before + 1
        # The guard never pointed the number at /dev/null (nor wrote to it): the file
        # behind it is still ours, with what we wrote.
        assert os.fstat(ours.fileno()).st_ino == inode
        ours.seek(0)
        assert ours.read() == b"ours"
    connection.close()


def local_thread_id(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 10, "MARGIN": 2, "TCP_KEEPALIVE": 30})
def test_over_a_unix_socket_a_connection_idle_past_its_limit_is_pinged_not_replaced(
    server, caplog
) -> None:
    caplog.set_level("WARNING", logger="django_dbkeepalive")
    if server.socket is None:
        pytest.skip("an external server: no local socket")
    with extra_alias("local", HOST=server.socket) as alias:
        db = connections[alias]
        old = local_thread_id(alias)
        assert guard.socket_family(db) == socket.AF_UNIX
        seen = server.connections_total()
        # Past the idle limit (8 s): nothing drops a local socket silently, so the guard
        # asks the server instead of closing a session a long statement may have kept busy.
        guard.pretend_idle(db, 9.0)
        with record_recycles(alias) as recycles:
            assert local_thread_id(alias) == old
        assert recycles.reasons == []
        assert server.connections_total() == seen
        # The peek works there too: a KILL is seen before the next statement is sent.
        kill_connection(alias)
        with record_recycles(alias) as recycles:
            assert local_thread_id(alias) != old
        assert recycles.reasons == ["disconnected"]
    # TCP keepalive does not apply to a local socket: asked for, it is skipped quietly.
    assert "keepalive" not in caplog.text
