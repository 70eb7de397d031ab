"""django_dbkeepalive.contrib.celery with a real worker and a real broker.

A private redis-server is the broker; ``celery worker`` runs the test project
(``testproject/celery.py``) against the session's MariaDB, with the prefork pool (two
processes) and the threads pool. Tasks write uniquely keyed rows in three rounds: before
a pause longer than ``wait_timeout``, after it, and after the worker's connections were
KILLed.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, signals
from celery.app.trace import build_tracer
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.test import override_settings
from django.utils.connection import ConnectionDoesNotExist

from django_dbkeepalive.contrib.celery import KeepaliveWorkerFixup, install
from django_dbkeepalive.testing import assert_recycles, expire_connection, kill_connection
from testproject.testapp.tasks import write_item

from .celery_worker import CeleryWorker, Client
from .conftest import wait_for
from .redis_server import RedisServer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery]
GUARD_OFF = {"AUTO_GUARD": False}  # so only the integration keeps tasks alive

Raw = Callable[..., list[tuple[Any, ...]]]
TASKS = 20  # per round; three rounds
PAUSE = 3  # seconds; the tests set wait_timeout to 2


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    redis = RedisServer()
    try:
        redis.start()
        yield redis
    finally:
        redis.close()


@pytest.fixture(scope="module")
def client(broker: RedisServer) -> Iterator[Client]:
    client = Client(broker.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def start_worker(broker: RedisServer, driver: str) -> Iterator[Callable[..., CeleryWorker]]:
    workers: list[CeleryWorker] = []

    def start(pool: str, *args: str, **env: str) -> CeleryWorker:
        worker = CeleryWorker(
            broker.url, pool=pool, env={**os.environ, "DBK_DRIVER": driver, **env}, args=args
        )
        workers.append(worker)
        return worker.start()

    yield start
    for worker in workers:
        worker.close()


def worker_ids(server: Any, keep: set[int]) -> set[int]:
    """The connections of the test's database user, but those in ``keep``."""
    return {int(p["id"]) for p in server.processlist(user=server.user)} - keep


def counts(raw: Raw) -> dict[str, tuple[int, int]]:
    """key -> (rows with that key, id of the connection that wrote it)."""
    rows = raw("SELECT `key`, COUNT(*), MAX(value) FROM testapp_item GROUP BY `key`")
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


class Rounds:
    """Three rounds of TASKS tasks: a pause past wait_timeout, then a KILL of every
    connection of the worker (but its main process's) in between."""

    def __init__(self, client: Client, server: Any, raw: Raw) -> None:
        self.client, self.server, self.raw = client, server, raw
        self.keys: list[str] = []
        self.results: list[tuple[int, int, int]] = []
        self.killed: set[int] = set()

    def round(self, name: str) -> None:
        keys = [f"{name}-{n}" for n in range(TASKS)]
        self.keys += keys
        self.results += self.client.write(keys)

    def run(self, spare: set[int], may_hold_none: bool = False) -> int:
        """Run the rounds; returns the server's new connections during them.

        ``may_hold_none``: with CELERY_DB_REUSE_MAX, Celery closes every connection of a
        process after each N tasks, so at the KILL the worker may hold none."""
        before = self.server.connections_total()
        self.round("a")
        time.sleep(PAUSE)  # the server closes the worker's idle connections
        self.round("b")
        self.killed = worker_ids(self.server, spare)
        assert self.killed or may_hold_none, "the worker holds no connection between tasks"
        for thread_id in self.killed:
            self.server.kill(thread_id)
        assert wait_for(lambda: not self.killed & worker_ids(self.server, spare))
        self.round("c")
        return int(self.server.connections_total() - before)

    def check_rows(self) -> dict[str, tuple[int, int]]:
        written = counts(self.raw)
        assert {k: n for k, (n, _) in written.items() if k in self.keys} == dict.fromkeys(
            self.keys, 1
        )
        assert len(self.results) == len(self.keys)
        # Each task reported the connection it wrote with.
        assert [written[k][1] for k in self.keys] == [tid for _, _, tid in self.results]
        return written

    @property
    def connections_used(self) -> set[int]:
        return {tid for _, _, tid in self.results}


def clean(log: str) -> None:
    """No task error, no traceback, no signal handler error in the worker's log, and the
    integration was in place before the worker started."""
    assert "Traceback" not in log and "ERROR" not in log, log
    assert not [line for line in log.splitlines() if "WARNING django_dbkeepalive" in line], log


def parent_id(raw: Raw) -> int:
    assert wait_for(lambda: "parent-start" in counts(raw))
    return counts(raw)["parent-start"][1]


@pytest.mark.parametrize("reuse_max", [None, "10"], ids=["reuse", "db_reuse_max"])
def test_prefork_worker_reuses_connections_across_pauses_kills_and_forks(
    set_wait_timeout, server, raw, client, start_worker, reuse_max
):
    set_wait_timeout(2)
    env = {"DBK_CELERY_PARENT_HOLDS": "1"}
    if reuse_max:
        env["DBK_CELERY_DB_REUSE_MAX"] = reuse_max
    # New children are forked while the main process holds a connection.
    worker = start_worker("prefork", "--max-tasks-per-child=25", **env)
    parent = parent_id(raw)
    rounds = Rounds(client, server, raw)
    connects = rounds.run(spare={parent}, may_hold_none=bool(reuse_max))
    assert worker.stop() == 0
    clean(worker.log())
    written = rounds.check_rows()
    pids = {pid for pid, _, _ in rounds.results}
    assert len(pids) >= 3  # children were replaced: forks with the parent's connection open
    # The parent's session survived every fork: the same connection, still usable.
    assert written["parent-end"] == (1, parent)
    assert parent not in rounds.connections_used
    tasks = len(rounds.keys)
    print(f"prefork reuse_max={reuse_max}: {tasks} tasks, {connects} connects")
    assert connects <= tasks // (3 if reuse_max else 5)
    if not reuse_max:  # (with it, Celery may have closed them all before the pause)
        assert "recycled the 'default' connection" in worker.log()  # the pause, the KILL


@pytest.mark.parametrize("reuse_max", [None], ids=["reuse"])
def test_threads_worker_reuses_connections_across_pauses_and_kills(
    set_wait_timeout, server, raw, client, start_worker, reuse_max
):
    set_wait_timeout(2)
    worker = start_worker("threads")
    rounds = Rounds(client, server, raw)
    connects = rounds.run(spare=set())
    assert worker.stop() == 0
    clean(worker.log())
    rounds.check_rows()
    assert len({pid for pid, _, _ in rounds.results}) == 1
    tasks = len(rounds.keys)
    print(f"threads: {tasks} tasks, {connects} connects")
    assert connects <= tasks // 5


# ------------------------------------------------- in this process, Celery's own tracer


class Traced:
    """A Celery app with the integration, its worker fix-up installed in this process as
    a worker installs it, and tasks run through Celery's tracer (not eagerly): the
    prerun/postrun signals fire in this thread, as in a worker's pool."""

    def __init__(self) -> None:
        self.app = Celery(f"dbk-inproc-{uuid.uuid4().hex[:6]}", set_as_current=False)
        install(self.app)
        signals.import_modules.send(sender=self.app)  # what a starting worker sends
        [fixup] = self.app._fixups
        self.fixup: KeepaliveWorkerFixup = fixup.worker_fixup
        assert isinstance(self.fixup, KeepaliveWorkerFixup)
        self.fixup.install()

        @self.app.task(name="inproc.write")
        def write(key: str, leave_manual: bool = False, pause: bool = False) -> int:
            if pause:
                count_items()
                expire_connection()  # a slow API call between two statements
            thread_id = write_item(key)
            if leave_manual:
                transaction.set_autocommit(False)
            return thread_id

        self.trace = build_tracer(write.name, write, app=self.app, eager=False)

    def run(self, key: str, **kwargs: Any) -> int:
        task_id = str(uuid.uuid4())
        result = self.trace(task_id, [key], kwargs, request={"id": task_id})
        assert result.info is None, result  # no exception
        return int(result.retval)

    def close(self) -> None:
        fixup = self.fixup
        signals.task_prerun.disconnect(fixup.on_task_prerun)
        signals.task_postrun.disconnect(fixup.on_task_postrun)
        signals.worker_process_init.disconnect(fixup.on_worker_process_init)
        signals.worker_process_shutdown.disconnect(fixup.on_worker_process_shutdown)
        signals.beat_embedded_init.disconnect(fixup.close_database)


def count_items() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM testapp_item")


@pytest.fixture
def traced() -> Iterator[Traced]:
    app = Traced()
    try:
        yield app
    finally:
        app.close()
        if not connection.get_autocommit():
            connection.rollback()
            connection.set_autocommit(True)


@override_settings(DBKEEPALIVE=GUARD_OFF)
def test_tasks_reuse_one_connection_and_replace_it_after_a_kill_or_idle(traced, raw):
    first = traced.run("t-0")
    assert traced.run("t-1") == first  # Celery alone would connect for every task
    kill_connection()
    with assert_recycles(1, reasons=["disconnected"]):
        second = traced.run("t-2")
    expire_connection()
    with assert_recycles(1, reasons=["idle"]):
        third = traced.run("t-3")
    assert len({first, second, third}) == 3
    assert counts(raw) == {
        "t-0": (1, first),
        "t-1": (1, first),
        "t-2": (1, second),
        "t-3": (1, third),
    }


def test_a_task_that_leaves_autocommit_off_does_not_pass_its_connection_on(traced):
    first = traced.run("m-0", leave_manual=True)
    assert connection.connection is None  # closed after the task, rolled back
    assert traced.run("m-1") != first


def test_a_task_that_idles_past_the_limit_is_reported(traced, caplog):
    with caplog.at_level(logging.WARNING, logger="django_dbkeepalive"):
        traced.run("p-0")
        assert not caplog.records
        traced.run("p-1", pause=True)
    [record] = caplog.records
    assert "the Celery task inproc.write held a database connection idle past its limit" in (
        record.getMessage()
    )
    assert "'default' idle" in record.getMessage()


def test_install_needs_celerys_django_fixup():
    with pytest.raises(ImproperlyConfigured, match="DJANGO_SETTINGS_MODULE"):
        install(Celery("no-fixups", fixups=[], set_as_current=False))


def test_install_rejects_an_unknown_alias_at_once():
    with pytest.raises(ConnectionDoesNotExist, match="'replica' is not a database alias"):
        install(Celery("bad-alias", set_as_current=False), using="replica")


def test_install_twice_adopts_once(caplog):
    app = Celery("twice", set_as_current=False)
    install(app)
    install(app)
    receivers = len(signals.import_modules.receivers)
    install(app)
    assert len(signals.import_modules.receivers) == receivers
    try:
        with caplog.at_level(logging.WARNING, logger="django_dbkeepalive"):
            signals.worker_init.send(sender=type("Worker", (), {"app": app})())
    finally:  # Celery's fix-up installed its own worker fix-up in this process: undo it
        plain = app._fixups[0].worker_fixup
        signals.task_prerun.disconnect(plain.on_task_prerun)
        signals.task_postrun.disconnect(plain.on_task_postrun)
        signals.worker_process_init.disconnect(plain.on_worker_process_init)
        signals.beat_embedded_init.disconnect(plain.close_database)
    # worker_init without import_modules first: install() came too late; it says so.
    assert any("ran after the worker had started" in r.getMessage() for r in caplog.records)
