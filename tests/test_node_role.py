"""The node's role in the diagnose command and check W010: an alias that receives writes
on a read-only node."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

from django_dbkeepalive.checks import check_servers
from django_dbkeepalive.diagnose import diagnose

from .conftest import close_connections

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "reader"])


class WritesToReader:
    """A database router that sends every write to the ``reader`` alias."""

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "reader"


@pytest.fixture
def read_only_server(server: Any) -> Iterator[Any]:
    server.set_global("read_only", 1)
    try:
        yield server
    finally:
        server.set_global("read_only", 0)
        close_connections()


def by_id(messages: list[Any], check_id: str) -> list[Any]:
    return [m for m in messages if m.id == check_id]


def test_the_report_shows_a_writable_node_and_no_galera_state():
    [db] = diagnose(["default"]).as_dict()["databases"]
    assert db["server"]["read_only"] is False
    assert db["server"]["wsrep_ready"] is None and db["server"]["wsrep_cluster_status"] is None
    assert not by_id(check_servers(databases=["default"]), "dbkeepalive.W010")


def test_an_alias_that_receives_writes_on_a_read_only_node_is_warned(read_only_server):
    [db] = diagnose(["default"]).as_dict()["databases"]
    assert db["server"]["read_only"] is True
    assert "dbkeepalive.W010" in [issue["id"] for issue in db["issues"]]
    [warning] = by_id(check_servers(databases=["default", "reader"]), "dbkeepalive.W010")
    assert warning.msg.startswith("Database 'default' receives writes")
    assert "read-only (read_only=ON)" in warning.msg
    assert f"127.0.0.1:{read_only_server.port}" in warning.msg
    assert "DATABASES['default']['HOST']" in warning.hint


@override_settings(DATABASE_ROUTERS=[WritesToReader()])
def test_the_routers_decide_which_alias_receives_writes(read_only_server):
    found = by_id(check_servers(databases=["default", "reader"]), "dbkeepalive.W010")
    assert [m.msg.split("'")[1] for m in found] == ["reader"]
