"""Several aliases: ``default`` (the writer) and ``reader`` (the same database through a
second, read-only user, with its own OPTIONS and DBKEEPALIVE overrides).

Each alias's connection is guarded on its own: its own idle clock, its own limit, its
own recycles (``connection_recycled`` with ``sender`` = the alias).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import OperationalError, connections
from django.test import override_settings

from django_dbkeepalive import fresh_connection, guard, refresh_connections
from django_dbkeepalive.testing import (
    assert_recycles,
    expire_connection,
    kill_connection,
    record_recycles,
)
from testproject.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "reader"])

Raw = Callable[..., list[tuple[Any, ...]]]
PAUSE = 1.6  # seconds; the tests set wait_timeout to 1


def session(alias: str) -> tuple[int, str]:
    """(server connection id, user) of this thread's connection of ``alias``."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID(), CURRENT_USER()")
        thread_id, user = cursor.fetchone()
    return int(thread_id), str(user).split("@")[0]


def read(n: int = 1) -> None:
    for _ in range(n):
        Item.objects.using("reader").count()


def keys(raw: Raw) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


def test_the_aliases_are_two_users_with_their_own_settings(server):
    writer, writer_user = session("default")
    reader, reader_user = session("reader")
    assert writer != reader
    assert writer_user == server.user
    if not server.external:
        assert reader_user == server.reader_user != writer_user
        with pytest.raises(OperationalError):  # read-only: SELECT privileges only
            Item.objects.using("reader").create(key="nope")
    with connections["reader"].cursor() as cursor:
        # tx_isolation (MariaDB < 11.1) or transaction_isolation (MySQL, MariaDB 11.1+)
        cursor.execute("SHOW SESSION VARIABLES LIKE '%isolation'")
        found = dict(cursor.fetchall())
    isolation = found.get("transaction_isolation") or found.get("tx_isolation")
    assert isolation == "READ-COMMITTED"  # from the reader's OPTIONS
    assert guard.state_of(connections["reader"]).cfg.margin == 2.0  # settings.DBKEEPALIVE override
    assert guard.state_of(connections["default"]).cfg.margin == 5.0


def test_writer_idle_while_reader_busy_and_the_other_way_round(set_wait_timeout, raw):
    set_wait_timeout(1)
    with record_recycles() as log:
        Item.objects.create(key="w-0")
        reader, _ = session("reader")
        deadline = time.monotonic() + PAUSE
        while time.monotonic() < deadline:  # the reader works; the writer idles
            read()
            time.sleep(0.1)
        Item.objects.create(key="w-1")  # past wait_timeout: on a new connection
        assert session("reader")[0] == reader  # busy all along: never recycled
        assert [r.alias for r in log] == ["default"]
        writer, _ = session("default")
        deadline = time.monotonic() + PAUSE
        while time.monotonic() < deadline:  # the writer works; the reader idles
            Item.objects.filter(key="w-1").update(value=1)
            time.sleep(0.1)
        read()  # past wait_timeout: on a new connection
        assert session("default")[0] == writer
        assert session("reader")[0] != reader
    assert [r.alias for r in log] == ["default", "reader"]
    assert set(log.reasons) <= {"idle", "disconnected"}
    assert keys(raw) == ["w-0", "w-1"]


@override_settings(
    DBKEEPALIVE={
        "DATABASES": {
            "default": {"WAIT_TIMEOUT": 0.6, "MARGIN": 0.3},  # limit 0.3 s
            "reader": {"WAIT_TIMEOUT": 1.6, "MARGIN": 0.4},  # limit 1.2 s
        }
    }
)
def test_per_alias_overrides_give_each_alias_its_own_limit():
    for alias in ("default", "reader"):
        connections[alias].close()  # new connections pick up the overrides
    Item.objects.count()
    read()
    time.sleep(0.5)  # the same pause: past default's limit, below reader's
    with assert_recycles(1, reasons=["idle"], using="default"):
        Item.objects.count()
    with assert_recycles(0):
        read()
    time.sleep(1.3)  # past reader's limit
    with assert_recycles(1, reasons=["idle"], using="reader") as log:
        read()
    assert 1.2 < log[0].idle < 1.6


@override_settings(DBKEEPALIVE={"DATABASES": {"reader": {"AUTO_GUARD": False}}})
def test_per_alias_auto_guard():
    for alias in ("default", "reader"):
        connections[alias].close()
    Item.objects.count()
    read()
    kill_connection("default")
    kill_connection("reader")
    with assert_recycles(1, reasons=["disconnected"], using="default"):
        Item.objects.count()
    with pytest.raises(OperationalError):  # not guarded: plain Django's error
        read()
    connections["reader"].close()


def test_each_alias_is_recycled_on_its_own(server):
    writer, _ = session("default")
    reader, _ = session("reader")
    with assert_recycles(1, reasons=["disconnected"], using="reader") as log:
        assert kill_connection("reader") == reader
        read()
        assert session("default")[0] == writer
    assert [r.alias for r in log] == ["reader"]
    reader = session("reader")[0]
    expire_connection("default")
    with assert_recycles(1, reasons=["idle"]) as log:
        Item.objects.count()
        assert session("reader")[0] == reader
    assert log[0].alias == "default"


def test_refresh_and_fresh_connection_touch_only_the_aliases_named(server):
    writer, _ = session("default")
    session("reader")
    kill_connection("default")
    kill_connection("reader")
    with assert_recycles(1, using="reader"):
        refresh_connections(using="reader")  # closes the dead reader now
    assert connections["reader"].connection is None
    assert connections["default"].connection is not None  # still there, dead
    with assert_recycles(1, reasons=["disconnected"], using="default"):
        with fresh_connection(using=["default"]):
            pass
    assert connections["default"].connection is None
    assert session("default")[0] != writer
