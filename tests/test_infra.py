"""The test infrastructure itself: the private server and the fixtures do what they claim."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import Client

from testproject.testapp.models import Item

from .conftest import close_connections, wait_for
from .mariadb import MariaDBServer

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent


def test_django_uses_the_session_server(server: MariaDBServer) -> None:
    with connection.cursor() as cur:
        cur.execute("SELECT @@port, CURRENT_USER()")
        port, user = cur.fetchone()
    assert port == server.port
    assert user.split("@")[0] == server.user
    if not server.external:
        assert server.port != 3306  # never the shared server


def test_test_database_name(raw: Callable[..., list[tuple[Any, ...]]]) -> None:
    name = connection.settings_dict["NAME"]
    assert name.startswith("test_dbkeepalive")  # plus _gw0 etc. under xdist/tox -p
    assert raw("SELECT DATABASE()") == [(name,)]
    assert os.environ["DBK_DB_NAME"] == name  # for subprocesses


def test_connections_total_counts_one_new_connection(server: MariaDBServer) -> None:
    close_connections()
    before = server.connections_total()
    connection.ensure_connection()
    assert server.connections_total() - before == 1
    # Our own admin queries are not counted.
    assert server.connections_total() - before == 1


def test_kill_removes_the_django_connection(server: MariaDBServer) -> None:
    connection.ensure_connection()
    thread_id = connection.connection.thread_id()
    assert thread_id in {p["id"] for p in server.processlist(user=server.user)}
    server.kill(thread_id)
    assert wait_for(lambda: thread_id not in {p["id"] for p in server.processlist()})
    close_connections()


@pytest.mark.restart
def test_restart_keeps_port_and_data(
    server: MariaDBServer, raw: Callable[..., list[tuple[Any, ...]]]
) -> None:
    Item.objects.create(key="before-restart", value=7)
    port = server.port
    server.restart()
    assert server.port == port
    assert raw("SELECT value FROM testapp_item WHERE `key` = %s", ("before-restart",)) == [(7,)]


@pytest.mark.restart
def test_crash_and_start_again_keep_committed_rows(
    server: MariaDBServer, raw: Callable[..., list[tuple[Any, ...]]]
) -> None:
    Item.objects.create(key="before-crash", value=8)
    server.crash()
    assert not server.running
    server.start_again()
    assert raw("SELECT value FROM testapp_item WHERE `key` = %s", ("before-crash",)) == [(8,)]


def test_set_wait_timeout_applies_to_new_connections(
    server: MariaDBServer, set_wait_timeout: Callable[[int], None]
) -> None:
    set_wait_timeout(5)
    with connection.cursor() as cur:
        cur.execute("SELECT @@SESSION.wait_timeout")
        assert cur.fetchone()[0] == 5
    assert server.get_global("interactive_timeout") == 5


def test_driver_fixture(driver: str) -> None:
    assert driver == os.environ.get("DBK_DRIVER", "mysqlclient")
    connection.ensure_connection()
    package = type(connection.connection).__module__
    expected = {"pymysql": "pymysql", "connector": "mysql.connector.connection"}
    expected["connector-cext"] = "mysql.connector.connection_cext"
    assert package.startswith(expected.get(driver, "MySQLdb"))


def test_subprocess_manage_py_uses_the_test_database() -> None:
    # showmigrations reads django_migrations: [X] only in the migrated test database.
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "testproject" / "manage.py"),
            "showmigrations",
            "testapp",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "[X] 0001_initial" in out


def test_testproject_views(client: Client) -> None:
    assert client.get("/long/?sleep=0&key=a").json() == {"count": 0}
    assert client.get("/async-long/?sleep=0&key=b").json() == {"count": 1}
    assert client.get("/items/").json() == {"count": 2}
    assert client.get("/long/?sleep=soon").status_code == 400
