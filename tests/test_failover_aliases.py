"""Several aliases on a replicated pair: a ``default`` writer through the failover
endpoint and a ``replica`` alias on the replica, with a database router. A failing
replica never affects writes; after a promotion both aliases work (``make ha``)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError, connection, connections
from django.test import override_settings

from testproject.testapp.models import Item

from .conftest import close_connections
from .replication import ReplicatedPair
from .test_failover import create_table, django_at, rows

pytestmark = [pytest.mark.ha, pytest.mark.timeout(120)]


class ReadsFromReplica:
    """The usual read/write split: reads from ``replica``, writes to ``default``."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "replica"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"


@pytest.fixture(scope="module")
def split(driver: str, django_db_blocker: Any) -> Iterator[ReplicatedPair]:
    with ReplicatedPair(endpoint="proxy") as started, django_db_blocker.unblock():
        create_table(started.port, started.app_password)
        yield started


@contextlib.contextmanager
def replica_alias(port: int) -> Iterator[None]:
    """``replica``: the ``default`` alias's settings (as the application user) on
    ``port``, the replica's own address."""
    connections.settings["replica"] = {**copy.deepcopy(connection.settings_dict), "PORT": port}
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            connections["replica"].close()
        with contextlib.suppress(AttributeError):
            del connections["replica"]
        del connections.settings["replica"]


def port_of(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT @@port")
        return int(cursor.fetchone()[0])


def test_a_failing_replica_never_affects_writes_and_both_aliases_work_after_promotion(
    split: ReplicatedPair, django_db_blocker: Any
) -> None:
    pair = split
    assert pair.proxy is not None
    first_replica = pair.replica
    with (
        django_db_blocker.unblock(),
        django_at(pair.proxy.port, pair.app_password),
        replica_alias(first_replica.port),
        override_settings(
            DATABASE_ROUTERS=[ReadsFromReplica()], DBKEEPALIVE={"RETRY_CONNECT_FOR": 0.5}
        ),
    ):
        Item.objects.create(key="split-1")
        pair.wait_caught_up()
        assert Item.objects.filter(key="split-1").count() == 1  # read on the replica
        assert (port_of("default"), port_of("replica")) == (pair.primary.port, first_replica.port)

        first_replica.stop()
        try:
            Item.objects.create(key="split-2")  # the writer does not notice
            with pytest.raises(OperationalError) as caught:
                Item.objects.filter(key="split-2").count()
            assert caught.value.args[0] in (2002, 2003, 2013)  # the replica, unreachable
            notes = "\n".join(getattr(caught.value, "__notes__", []))
            assert "could not connect to database 'replica' (tried " in notes
            Item.objects.create(key="split-3")  # still unaffected
        finally:
            first_replica.start_again()
        pair.wait_caught_up()
        assert Item.objects.filter(key__in=["split-2", "split-3"]).count() == 2

        pair.failover()  # the replica is promoted; the endpoint moves to it
        assert pair.primary is first_replica
        Item.objects.create(key="split-4")  # default: through the endpoint, the new primary
        # replica: the same node, now the primary; the read sees the write at once.
        assert Item.objects.filter(key="split-4").count() == 1
        assert port_of("default") == port_of("replica") == first_replica.port
    close_connections()
    assert rows(pair.primary, "split-4") == 1 and rows(pair.replica, "split-4") == 0
    for key in ("split-1", "split-2", "split-3"):
        assert rows(pair.primary, key) == 1
