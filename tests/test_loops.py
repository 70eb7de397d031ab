"""Plain worker loops (a crawler, an RQ-style ``while True`` queue consumer) in threads.

Three recipes run side by side, each in its own long-lived thread that takes keys from
a queue and writes them: ``refresh_connections()`` at the top of each iteration,
``with fresh_connection():`` around each iteration, and a ``BaseKeepaliveCommand``
calling ``self.keepalive()``. Between iterations: a pause longer than the server's
wait_timeout, then a KILL of each loop's connection. AUTO_GUARD is off, so the recipe's
own call is all that stands between each loop and error 2006.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.test import override_settings

from django_dbkeepalive import BaseKeepaliveCommand, fresh_connection, guard, refresh_connections
from testproject.testapp.tasks import write_item

from .conftest import close_connections, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

Raw = Callable[..., list[tuple[Any, ...]]]
PAUSE = 3  # seconds; the test sets wait_timeout to 2
STOP = None


class QueueCommand(BaseKeepaliveCommand):
    """A queue consumer as a management command: ``self.keepalive()`` per job."""

    def __init__(self, inbox: queue.Queue[str | None], outbox: queue.Queue[Any]) -> None:
        super().__init__()
        self.inbox, self.outbox = inbox, outbox

    def handle(self, *args: Any, **options: Any) -> None:
        while (key := self.inbox.get()) is not STOP:
            self.keepalive()
            self.outbox.put(write_item(key))


class Loop(threading.Thread):
    def __init__(self, recipe: str) -> None:
        super().__init__(name=f"loop-{recipe}")
        self.recipe = recipe
        self.inbox: queue.Queue[str | None] = queue.Queue()
        self.outbox: queue.Queue[Any] = queue.Queue()

    def run(self) -> None:
        try:
            if self.recipe == "command":
                call_command(QueueCommand(self.inbox, self.outbox))
                return
            while (key := self.inbox.get()) is not STOP:
                if self.recipe == "refresh_connections":
                    refresh_connections()  # cheap: no round trip unless it idled
                    self.outbox.put(write_item(key))
                else:
                    with fresh_connection():
                        self.outbox.put(write_item(key))
        except BaseException as exc:
            self.outbox.put(exc)
        finally:
            connections.close_all()  # a well-behaved loop releases its connection

    def job(self, key: str) -> int:
        self.inbox.put(key)
        result = self.outbox.get(timeout=30)
        if isinstance(result, BaseException):
            raise result
        return int(result)


def live_ids(server: Any) -> set[int]:
    return {int(p["id"]) for p in server.processlist()}


@override_settings(DBKEEPALIVE={"AUTO_GUARD": False})
def test_worker_loops_survive_pauses_and_kills_and_write_each_row_once(
    set_wait_timeout, conn_max_age, server, raw
):
    # CONN_MAX_AGE = None: every loop keeps its connection between iterations (with 0,
    # fresh_connection closes it at the end of each one).
    set_wait_timeout(2)
    conn_max_age(None)
    loops = [Loop(r) for r in ("refresh_connections", "fresh_connection", "command")]
    for loop in loops:
        loop.start()
    try:
        first = {loop.recipe: loop.job(f"{loop.recipe}-0") for loop in loops}
        time.sleep(PAUSE)  # the server closes the idle connections
        second = {loop.recipe: loop.job(f"{loop.recipe}-1") for loop in loops}
        for thread_id in second.values():
            server.kill(thread_id)
        assert wait_for(lambda: not set(second.values()) & live_ids(server))
        third = {loop.recipe: loop.job(f"{loop.recipe}-2") for loop in loops}
    finally:
        for loop in loops:
            loop.inbox.put(STOP)
            loop.join(30)
    rows = raw("SELECT `key`, COUNT(*), MAX(value) FROM testapp_item GROUP BY `key`")
    written = {key: (int(n), int(tid)) for key, n, tid in rows}
    assert written == {
        f"{loop.recipe}-{n}": (1, ids[loop.recipe])
        for loop in loops
        for n, ids in enumerate((first, second, third))
    }
    for loop in loops:  # a new connection after the pause and after the KILL
        assert len({first[loop.recipe], second[loop.recipe], third[loop.recipe]}) == 3
    assert wait_for(lambda: not set(third.values()) & live_ids(server))  # all released


def questions() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SHOW SESSION STATUS LIKE 'Questions'")
        return int(cursor.fetchone()[1])


@override_settings(DBKEEPALIVE={"AUTO_GUARD": False, "PEEK_AFTER": 0.05})
def test_a_connection_opened_unguarded_learns_its_limit_at_the_loops_first_refresh(
    server,
) -> None:
    close_connections()
    before = questions()  # opened while nothing guarded it: no limit was read
    time.sleep(0.1)
    refresh_connections()  # the loop's call: one round trip to learn wait_timeout
    assert questions() == before + 2  # that read, and this statement
    wait = float(server.query("SELECT @@GLOBAL.wait_timeout")[0][0])
    limit, known = guard.idle_limits(connection)
    assert known == wait and limit is not None and limit < wait
    assert questions() == before + 3  # known already: nothing more was read
    close_connections()
