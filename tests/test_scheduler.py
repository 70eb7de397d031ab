"""APScheduler 3.x jobs across quiet periods longer than the server's wait_timeout."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from django.db import OperationalError, connection
from django.test import override_settings
from django.utils.connection import ConnectionDoesNotExist

from django_dbkeepalive import keepalive_job
from django_dbkeepalive.contrib.apscheduler import KeepaliveThreadPoolExecutor
from testproject.testapp.tasks import Writer

from .conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

Raw = Callable[..., list[tuple[Any, ...]]]
GUARD_OFF = {"AUTO_GUARD": False}  # so only the integration under test keeps jobs alive
INTERVAL = 3  # seconds between runs; the tests set wait_timeout to 2


def rows(raw: Raw) -> list[tuple[str, int]]:
    """(key, id of the server connection that wrote it) of every item, in order."""
    return [(r[0], int(r[1])) for r in raw("SELECT `key`, value FROM testapp_item ORDER BY id")]


def live_ids(server: Any) -> set[int]:
    return {int(p["id"]) for p in server.processlist(user=server.user)}


def own_id() -> int:
    connection.ensure_connection()
    return int(connection.connection.thread_id())


class Run:
    """A BackgroundScheduler with one-thread pools (every run of a job reuses the same
    thread, as in a quiet production scheduler), recording each job's outcomes."""

    def __init__(self, executors: dict[str, Any]) -> None:
        self.events: dict[str, list[JobExecutionEvent]] = {}
        self.stored: dict[str, Callable[..., Any]] = {}  # job id -> func, after the runs
        self._changed = threading.Condition()
        self.scheduler = BackgroundScheduler(executors=executors, timezone=timezone.utc)
        self.scheduler.add_listener(self._record, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)

    def _record(self, event: JobExecutionEvent) -> None:
        with self._changed:
            self.events.setdefault(event.job_id, []).append(event)
            self._changed.notify_all()

    def add(self, job_id: str, func: Callable[[], Any], executor: str = "default") -> None:
        self.scheduler.add_job(
            func,
            "interval",
            seconds=INTERVAL,
            id=job_id,
            executor=executor,
            next_run_time=datetime.now(timezone.utc),  # first run now, then every 3 s
        )

    def until(self, runs: int) -> None:
        """Start, wait until every job ran ``runs`` times, pause the jobs, shut down."""
        ids = [job.id for job in self.scheduler.get_jobs()]
        self.scheduler.start()
        try:
            with self._changed:
                done = self._changed.wait_for(
                    lambda: all(len(self.events.get(i, [])) >= runs for i in ids),
                    timeout=runs * INTERVAL + 10,
                )
            assert done, f"jobs did not run {runs} times: {self.events}"
            for job_id in ids:
                self.scheduler.pause_job(job_id)
            self.stored = {job.id: job.func for job in self.scheduler.get_jobs()}
        finally:
            self.scheduler.shutdown(wait=True)

    def errors(self) -> list[BaseException]:
        return [e.exception for evs in self.events.values() for e in evs if e.exception]


def one_thread(cls: type[ThreadPoolExecutor] = ThreadPoolExecutor) -> ThreadPoolExecutor:
    return cls(max_workers=1)


@override_settings(DBKEEPALIVE=GUARD_OFF)
def test_decorated_job_and_keepalive_executor_run_every_time_and_hold_no_connection(
    set_wait_timeout, raw, server
):
    set_wait_timeout(2)
    mine = own_id()
    before = live_ids(server)
    plain = Writer("executor-")
    run = Run({"default": one_thread(), "keepalive": one_thread(KeepaliveThreadPoolExecutor)})
    run.add("decorated", keepalive_job(Writer("decorated-")))
    run.add("undecorated", plain, executor="keepalive")
    run.until(runs=3)
    assert run.errors() == []
    written = rows(raw)
    assert sorted(key for key, _ in written) == [
        *(f"decorated-{n}" for n in range(3)),
        *(f"executor-{n}" for n in range(3)),
    ]
    # CONN_MAX_AGE = 0: each run's connection was closed after it, none is left open.
    assert wait_for(lambda: not {tid for _, tid in written} & live_ids(server))
    assert live_ids(server) - before - {mine} == set()
    # The executor wrapped what it ran, not the job the scheduler stored.
    assert run.stored["undecorated"] is plain


@override_settings(DBKEEPALIVE=GUARD_OFF)
def test_persistent_connections_of_pool_threads_are_replaced_after_quiet_periods(
    set_wait_timeout, conn_max_age, raw
):
    # CONN_MAX_AGE = None: the pool thread keeps its connection between runs, and the
    # server closes it during each pause. Every run must notice before its first query.
    set_wait_timeout(2)
    conn_max_age(None)
    run = Run({"default": one_thread(), "keepalive": one_thread(KeepaliveThreadPoolExecutor)})
    run.add("decorated", keepalive_job(Writer("decorated-")))
    run.add("undecorated", Writer("executor-"), executor="keepalive")
    run.until(runs=2)
    assert run.errors() == []
    written = dict(rows(raw))
    assert sorted(written) == ["decorated-0", "decorated-1", "executor-0", "executor-1"]
    assert written["decorated-0"] != written["decorated-1"]
    assert written["executor-0"] != written["executor-1"]


@override_settings(DBKEEPALIVE=GUARD_OFF)
def test_an_undecorated_job_on_a_plain_executor_fails_after_a_quiet_period(set_wait_timeout, raw):
    # The control for the tests above: the same job without the integration.
    set_wait_timeout(2)
    run = Run({"default": one_thread()})
    run.add("plain", Writer("plain-"))
    run.until(runs=2)
    [error] = run.errors()
    assert isinstance(error, OperationalError)
    assert error.args[0] in (2006, 2013, 4031)
    assert [key for key, _ in rows(raw)] == ["plain-0"]


def test_keepalive_executor_rejects_an_unknown_alias_when_created():
    with pytest.raises(ConnectionDoesNotExist, match="'replica' is not a database alias"):
        KeepaliveThreadPoolExecutor(using="replica")


def test_keepalive_executor_is_configurable_by_its_dotted_path(raw, caplog):
    caplog.set_level(logging.INFO, logger="apscheduler.executors")
    path = "django_dbkeepalive.contrib.apscheduler:KeepaliveThreadPoolExecutor"
    scheduler = BackgroundScheduler(
        {"apscheduler.executors.default": {"class": path, "max_workers": "2"}},
        timezone=timezone.utc,
    )
    scheduler.add_job(Writer("configured-"))  # a date job: runs once, now
    scheduler.start()
    try:
        assert wait_for(lambda: len(rows(raw)) == 1)
        assert isinstance(scheduler._lookup_executor("default"), KeepaliveThreadPoolExecutor)
    finally:
        scheduler.shutdown(wait=True)
    # APScheduler logs the job it runs by its str(): the job's own, not the wrapper's.
    [job] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Running job")]
    assert job.startswith('Running job "Writer (trigger: date[')
