"""MySQL Connector/Python (``ENGINE = "mysql.connector.django"``, pure Python): what only
its adapter does. Its ping never reconnects by itself, its client timeouts are its own
exception classes (``ReadTimeoutError``), and the diagnose command names how it runs.

Runs with ``DBK_DRIVER=connector`` (the connector session of ``make test``); skipped
with the other drivers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import Error, connection
from django.test import override_settings

from django_dbkeepalive.diagnose import diagnose
from django_dbkeepalive.testing import record_recycles
from testproject.testapp.models import Item

from .conftest import close_connections, needs_read_timeout
from .proxy import FaultProxy

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(30),
    pytest.mark.skipif(
        connection.Database.__name__ != "mysql.connector",
        reason="Connector/Python only (DBK_DRIVER=connector)",
    ),
]

Raw = Callable[..., list[tuple[Any, ...]]]
CEXT = os.environ.get("DBK_DRIVER") == "connector-cext"


def keys(raw: Raw) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


def session_id() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


@override_settings(DBKEEPALIVE={"PING_AFTER": 0.3})
def test_a_connection_idle_past_ping_after_is_pinged_and_kept(server) -> None:
    old = session_id()
    seen = server.connections_total()
    time.sleep(0.4)
    with record_recycles("default") as recycles:
        assert session_id() == old  # the ping answered: the same session goes on
    assert recycles.reasons == []
    assert server.connections_total() == seen


@needs_read_timeout
@override_settings(
    DBKEEPALIVE={"WAIT_TIMEOUT": 100, "PING_AFTER": 0.5, "CLIENT_TIMEOUTS": {"read_timeout": 1}}
)
def test_its_read_timeout_ends_a_ping_on_a_blackholed_flow_and_the_write_goes_on(
    via_proxy: FaultProxy, db_options, raw: Raw
) -> None:
    db_options(read_timeout=None)  # CLIENT_TIMEOUTS adds it: this version accepts it
    assert connection.get_connection_params()["read_timeout"] == 1
    Item.objects.create(key="a")
    via_proxy.blackhole()
    time.sleep(0.6)  # past PING_AFTER
    started = time.monotonic()
    with record_recycles("default") as recycles:
        Item.objects.create(key="b")  # its ReadTimeoutError: a new flow, then the write
    assert 0.8 < time.monotonic() - started < 3.0
    assert recycles.reasons == ["ping_failed"]
    assert keys(raw) == ["a", "b"]


@needs_read_timeout
@override_settings(DBKEEPALIVE={"WAIT_TIMEOUT": 100, "CLIENT_TIMEOUTS": {"read_timeout": 1}})
def test_a_write_that_waits_out_its_read_timeout_is_never_run_again_and_says_so(
    server, db_options, raw: Raw
) -> None:
    db_options(read_timeout=None)
    Item.objects.count()
    old = session_id()
    with pytest.raises(Error) as caught:  # its ReadTimeoutError, as Django's Error
        with connection.cursor() as cursor:
            cursor.execute("DO SLEEP(3)")  # not a read: never run again
    # Its C extension says 2013 (lost), pure Python its ReadTimeoutError's 3024.
    assert caught.value.args[0] == (2013 if CEXT else 3024)
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "no reply within the client's read_timeout (1s)" in notes
    assert "It was not run again, because the server may have applied it" in notes
    assert session_id() != old  # the next statement reconnects
    close_connections()


def test_the_diagnose_command_says_it_runs_in_pure_python() -> None:
    import mysql.connector

    (report,) = diagnose(["default"]).databases
    library = report.driver["client_library"]
    assert library.startswith("pure Python")
    assert ("C extension is not loadable" in library) == (not mysql.connector.HAVE_CEXT)


def test_the_timeouts_check_asks_only_for_the_timeouts_this_release_accepts(db_options) -> None:
    # Connector/Python before 9.x refuses read_timeout (it cannot connect with it): the
    # check must never tell the user to add it there.
    from mysql.connector.constants import DEFAULT_CONFIGURATION

    from django_dbkeepalive.checks import configuration_messages

    db_options(read_timeout=None, write_timeout=None)
    [w006] = [m for m in configuration_messages("default") if m.id == "dbkeepalive.W006"] or [None]
    if "read_timeout" in DEFAULT_CONFIGURATION:
        assert w006 is not None and "has no read_timeout in OPTIONS" in w006.msg
    else:
        assert w006 is None
