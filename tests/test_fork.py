"""Forked processes never share (or close) the parent's connection."""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from django.db import OperationalError, connection, connections, transaction

from django_dbkeepalive import ConnectionLostInTransaction, guard
from testproject.testapp.models import Item
from testproject.testapp.tasks import write_item, write_item_in_process

from .conftest import close_connections

pytestmark = pytest.mark.django_db(transaction=True)

Raw = Callable[..., list[tuple[Any, ...]]]


def rows(raw: Raw) -> list[tuple[str, int]]:
    """(key, id of the server connection that wrote it) of every item, in order."""
    return [(r[0], int(r[1])) for r in raw("SELECT `key`, value FROM testapp_item ORDER BY id")]


def current_id() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


def in_child(body: Callable[[], bool]) -> int:
    """Fork; the child runs ``body`` and exits 0 if it returned True (1 if it returned
    False, 2 if it raised). The parent returns the child's exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 2
        try:
            code = 0 if body() else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_child_uses_its_own_connection_and_the_parents_keeps_working(raw, server):
    parent = write_item("parent-before")
    before = server.connections_total()

    def child() -> bool:
        # The usual advice for forked children; on a shared socket it would send
        # COM_QUIT on the parent's session. The guard has already detached it.
        connections.close_all()
        own = write_item("child")
        connections.close_all()
        return own != parent

    assert in_child(child) == 0
    assert current_id() == parent  # the same session as before the fork, still usable
    write_item("parent-after")
    written = rows(raw)
    assert [key for key, _ in written] == ["parent-before", "child", "parent-after"]
    (_, first), (_, child_id), (_, last) = written
    assert first == last == parent and child_id != parent
    assert server.connections_total() == before + 1  # the child's, and only that one


def test_child_that_queries_without_closing_first_leaves_the_parent_intact(raw):
    parent = write_item("parent-before")
    assert in_child(lambda: write_item("child") != parent) == 0
    write_item("parent-after")
    assert [key for key, _ in rows(raw)] == ["parent-before", "child", "parent-after"]
    assert current_id() == parent


def test_fork_pool_workers_write_on_their_own_connections(raw):
    parent = write_item("parent-before")
    pool = multiprocessing.get_context("fork").Pool(2)
    try:
        results = pool.map(write_item_in_process, [f"w-{n}" for n in range(6)], chunksize=1)
    finally:
        pool.close()
        pool.join()
    pids = {pid for pid, _ in results}
    ids = {tid for _, tid in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert parent not in ids
    assert len(ids) == len(pids)  # one connection per worker process, kept across tasks
    write_item("parent-after")
    assert current_id() == parent
    written = rows(raw)
    assert sorted(key for key, _ in written) == sorted(
        ["parent-before", "parent-after", *(f"w-{n}" for n in range(6))]
    )
    assert {tid for key, tid in written if key.startswith("w-")} == ids


def test_child_forked_inside_a_transaction_cannot_use_it_and_the_parent_commits(raw):
    def child() -> bool:
        try:
            Item.objects.create(key="from-child")
        except ConnectionLostInTransaction as exc:
            # It must not tell the child to redo work the parent may still commit.
            message = str(exc)
            return (
                exc.cause == "fork"
                and "belongs to the parent" in message
                and "must not redo" in message
                and "rolled the transaction back" not in message
            )
        return False

    with transaction.atomic():
        Item.objects.create(key="in-transaction")
        assert in_child(child) == 0
        Item.objects.create(key="after-fork")
    assert [key for key, _ in rows(raw)] == ["in-transaction", "after-fork"]


def test_without_the_guard_a_childs_close_all_breaks_the_parents_connection(raw):
    # The control for the tests above: plain Django shares the socket with the child.
    write_item("parent-before")
    guard.uninstall()
    try:
        assert in_child(lambda: connections.close_all() is None) == 0
        with pytest.raises(OperationalError) as caught:
            Item.objects.count()
        # -1: Connector/Python's "MySQL Connection not available" (its cursor() pings).
        assert caught.value.args[0] in (2006, 2013, -1)
    finally:
        close_connections()
        guard.install()
    assert [key for key, _ in rows(raw)] == ["parent-before"]
