"""CLIENT_TIMEOUTS and TCP_KEEPALIVE: added to the connection where the user has not
set them, and in effect on the driver's real socket."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import OperationalError, connection
from django.test import override_settings

from django_dbkeepalive import guard
from django_dbkeepalive.conf import RECOMMENDED_TIMEOUTS, find_problems
from testproject.testapp.models import Item

from .conftest import close_connections
from .proxy import FaultProxy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(30)]

Raw = Callable[..., list[tuple[Any, ...]]]
NO_TIMEOUTS = {"connect_timeout": None, "read_timeout": None, "write_timeout": None}


def socket_options() -> dict[str, int]:
    """The keepalive options of the default connection's socket, read back from its fd."""
    connection.ensure_connection()
    fd = guard.sockets.verified_fd(guard.state_of(connection))
    assert fd is not None
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return {
            "SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "TCP_KEEPIDLE": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "TCP_KEEPINTVL": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "TCP_KEEPCNT": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        }
    finally:
        sock.close()


def test_client_timeouts_fill_in_only_what_options_lack(db_options) -> None:
    db_options(**{**NO_TIMEOUTS, "connect_timeout": 7})
    assert "read_timeout" not in connection.get_connection_params()  # off by default
    timeouts = {"connect_timeout": 3, "read_timeout": 2, "write_timeout": 4}
    with override_settings(DBKEEPALIVE={"CLIENT_TIMEOUTS": timeouts}):
        params = connection.get_connection_params()
        assert params["connect_timeout"] == 7  # the user's OPTIONS win
        assert params["read_timeout"] == 2 and params["write_timeout"] == 4
    with override_settings(DBKEEPALIVE={"CLIENT_TIMEOUTS": True}):
        params = connection.get_connection_params()
        assert params["read_timeout"] == RECOMMENDED_TIMEOUTS["read_timeout"]
        assert params["connect_timeout"] == 7
    with override_settings(DBKEEPALIVE={"DATABASES": {"default": {"CLIENT_TIMEOUTS": timeouts}}}):
        assert connection.get_connection_params()["read_timeout"] == 2


def test_client_timeouts_leave_an_option_file_alone(db_options) -> None:
    db_options(**NO_TIMEOUTS, read_default_file="/nonexistent/my.cnf")
    with override_settings(DBKEEPALIVE={"CLIENT_TIMEOUTS": True}):
        params = connection.get_connection_params()
    assert "read_timeout" not in params


def test_client_read_timeout_ends_a_blackholed_statement(
    via_proxy: FaultProxy, db_options, raw: Raw, driver: str
) -> None:
    db_options(**NO_TIMEOUTS)
    with override_settings(DBKEEPALIVE={"CLIENT_TIMEOUTS": {"read_timeout": 2}}):
        close_connections()
        Item.objects.create(key="a")
        if driver == "pymysql":
            assert connection.connection._read_timeout == 2
        via_proxy.blackhole()
        start = time.monotonic()
        with pytest.raises(OperationalError) as caught:
            Item.objects.create(key="b")
        elapsed = time.monotonic() - start
        assert 1.5 < elapsed < 4.0, elapsed
        assert "read_timeout (2s)" in " ".join(caught.value.__notes__)
        Item.objects.create(key="c")
    assert [r[0] for r in raw("SELECT `key` FROM testapp_item ORDER BY id")] == ["a", "c"]


def test_tcp_keepalive_is_set_on_the_connection_socket(driver: str) -> None:
    with override_settings(DBKEEPALIVE={"TCP_KEEPALIVE": 30}):
        close_connections()
        assert socket_options() == {
            "SO_KEEPALIVE": 1,
            "TCP_KEEPIDLE": 30,
            "TCP_KEEPINTVL": 10,
            "TCP_KEEPCNT": guard.sockets.KEEPALIVE_PROBES,
        }
        assert Item.objects.count() == 0  # the connection works as before
    close_connections()
    assert socket_options()["TCP_KEEPIDLE"] != 30  # off by default: the kernel's value


@pytest.mark.parametrize(
    "value",
    [
        {"CLIENT_TIMEOUTS": {"read_timeout": 2.5}},
        {"CLIENT_TIMEOUTS": {"read_timeout": 0}},
        {"CLIENT_TIMEOUTS": {"timeout": 5}},
        {"CLIENT_TIMEOUTS": 60},
        {"TCP_KEEPALIVE": 0},
        {"TCP_KEEPALIVE": "60"},
        {"TCP_KEEPALIVE": True},
        {"DATABASES": {"default": {"TCP_KEEPALIVE": -1}}},
    ],
)
def test_invalid_timeout_settings_are_reported(value: dict[str, Any]) -> None:
    [problem] = find_problems(value, ["default"])
    assert problem.id == "dbkeepalive.E003"
    assert "CLIENT_TIMEOUTS" in problem.message or "TCP_KEEPALIVE" in problem.message


@pytest.mark.parametrize(
    "value",
    [
        {"CLIENT_TIMEOUTS": None},
        {"CLIENT_TIMEOUTS": False},
        {"CLIENT_TIMEOUTS": True},
        {"CLIENT_TIMEOUTS": {"connect_timeout": 5, "read_timeout": 60}},
        {"TCP_KEEPALIVE": None},
        {"TCP_KEEPALIVE": False},
        {"TCP_KEEPALIVE": 60},
    ],
)
def test_valid_timeout_settings(value: dict[str, Any]) -> None:
    assert find_problems(value, ["default"]) == []
