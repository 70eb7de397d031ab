"""Worker threads: ``threading.Thread`` and ``concurrent.futures.ThreadPoolExecutor``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.db import OperationalError, connections
from django.test import override_settings

from django_dbkeepalive import keepalive_job
from testproject.testapp.tasks import write_item

from .conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

Raw = Callable[..., list[tuple[Any, ...]]]
GUARD_OFF = {"AUTO_GUARD": False}  # so only keepalive_job keeps the workers alive
PAUSE = 3  # seconds; the tests set wait_timeout to 2


def rows(raw: Raw) -> dict[str, int]:
    """key -> id of the server connection that wrote it."""
    return {r[0]: int(r[1]) for r in raw("SELECT `key`, value FROM testapp_item")}


def live_ids(server: Any) -> set[int]:
    return {int(p["id"]) for p in server.processlist()}


class Worker(threading.Thread):
    """A long-lived thread that calls ``func(key)`` for each key, pausing in between,
    then closes its connections (as a well-behaved worker does when it stops)."""

    def __init__(self, func: Callable[[str], Any], keys: list[str]) -> None:
        super().__init__()
        self.func, self.keys = func, keys
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            for n, key in enumerate(self.keys):
                if n:
                    time.sleep(PAUSE)
                self.func(key)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            connections.close_all()


def test_an_undecorated_thread_is_kept_alive_by_the_automatic_guard(set_wait_timeout, raw):
    set_wait_timeout(2)
    worker = Worker(write_item, ["t-0", "t-1"])
    worker.start()
    worker.join()
    assert worker.errors == []
    written = rows(raw)
    assert sorted(written) == ["t-0", "t-1"]
    assert written["t-0"] != written["t-1"]  # the first connection died in the pause


@override_settings(DBKEEPALIVE=GUARD_OFF)
def test_keepalive_job_keeps_thread_and_pool_workers_alive_across_quiet_periods(
    set_wait_timeout, conn_max_age, raw
):
    # CONN_MAX_AGE = None: each worker keeps its connection between jobs, and the
    # server closes it during the pause.
    set_wait_timeout(2)
    conn_max_age(None)
    job = keepalive_job(write_item)
    worker = Worker(job, ["thread-0", "thread-1"])
    worker.start()  # runs alongside the pool below
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(job, "pool-0").result()
        time.sleep(PAUSE)
        pool.submit(job, "pool-1").result()  # .result() re-raises a job's error
    worker.join()
    assert worker.errors == []
    written = rows(raw)
    assert sorted(written) == ["pool-0", "pool-1", "thread-0", "thread-1"]
    assert written["pool-0"] != written["pool-1"]
    assert written["thread-0"] != written["thread-1"]


@override_settings(DBKEEPALIVE=GUARD_OFF)
def test_an_undecorated_pool_job_fails_after_a_quiet_period(set_wait_timeout, raw):
    # The control for the test above.
    set_wait_timeout(2)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(write_item, "pool-0").result()
        time.sleep(PAUSE)
        with pytest.raises(OperationalError) as caught:
            pool.submit(write_item, "pool-1").result()
        pool.submit(connections.close_all).result()
    # -1: Connector/Python's "MySQL Connection not available" (its cursor() pings).
    assert caught.value.args[0] in (2006, 2013, 4031, -1)
    assert sorted(rows(raw)) == ["pool-0"]


def test_keepalive_job_leaves_no_connection_in_idle_pool_threads(raw, server):
    # CONN_MAX_AGE = 0 (Django's default): a pool thread must not hoard a connection.
    job = keepalive_job(write_item)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for n in range(4):
            pool.submit(job, f"k-{n}").result()
        # The threads are alive and idle: their connections must be gone already.
        ids = set(rows(raw).values())
        assert len(rows(raw)) == 4
        assert wait_for(lambda: not ids & live_ids(server))


def test_an_undecorated_pool_job_leaves_its_connection_open(raw, server):
    # The control for the test above.
    with ThreadPoolExecutor(max_workers=1) as pool:
        tid = pool.submit(write_item, "k").result()
        try:
            time.sleep(0.3)
            assert tid in live_ids(server)
        finally:
            pool.submit(connections.close_all).result()
