"""django_dbkeepalive.contrib.celery with a real worker and a real broker.

A private redis-server is the broker; ``celery worker`` runs the test project
(``testproject/celery.py``) against the session's MariaDB, with the prefork pool (two
processes), the threads pool and the solo pool. Tasks write uniquely keyed rows in three
rounds: before a pause longer than ``wait_timeout``, after it, and after the worker's
connections were KILLed. When the worker stops, the connections it kept must be closed
properly (``COM_QUIT``): the server's error log names every connection it saw aborted.

The tests of the second half run tasks through Celery's own tracer in this process,
with the worker fix-up installed here as a worker installs it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, signals
from celery.app.trace import build_tracer
from celery.exceptions import Retry
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, transaction
from django.test import modify_settings, override_settings
from django.utils.connection import ConnectionDoesNotExist

from django_dbkeepalive import ConnectionLostInTransaction, guard
from django_dbkeepalive.contrib.celery import KeepaliveWorkerFixup, install
from django_dbkeepalive.testing import assert_recycles, expire_connection, kill_connection
from testproject.testapp.tasks import reader_connection_id, write_item

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
            # With CELERY_DB_REUSE_MAX the worker may close one right now: gone either way.
            self.server.kill(thread_id, gone_ok=True)
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


def aborted_ids(server: Any) -> set[int]:
    """The connections the server logged as aborted (closed without COM_QUIT)."""
    return {int(n) for n in re.findall(r"Aborted connection (\d+)", server.error_log_tail(10**6))}


def assert_closed_properly(server: Any, ids: set[int]) -> None:
    """The connections ``ids`` are gone from the server, and none was aborted."""
    assert ids
    assert wait_for(lambda: not ids & worker_ids(server, set())), "still open after stop"
    if not server.external:
        time.sleep(0.2)  # the server writes its log line as the session ends
        assert not ids & aborted_ids(server), server.error_log_tail(10)


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
    kept = worker_ids(server, set())  # the pool threads' connections, idle
    assert worker.stop() == 0
    assert_closed_properly(server, kept)  # closed by the main process at shutdown
    clean(worker.log())
    rounds.check_rows()
    assert len({pid for pid, _, _ in rounds.results}) == 1
    tasks = len(rounds.keys)
    print(f"threads: {tasks} tasks, {connects} connects")
    assert connects <= tasks // 5


def test_solo_worker_with_using_keeps_celerys_closes_for_the_other_aliases(
    set_wait_timeout, server, client, start_worker
):
    # install(app, using="default") from a worker_init receiver (late), AUTO_GUARD off:
    # "default" is kept across tasks and guarded by the integration alone; "reader" is
    # closed around every task, as Celery does, so a pause cannot leave it dead.
    set_wait_timeout(2)
    worker = start_worker(
        "solo",
        DBK_CELERY_USING="default",
        DBK_CELERY_INSTALL_AT="worker_init",
        DBK_CELERY_AUTO_GUARD="0",
    )
    reader_user = server.reader_user if not server.external else server.user
    first = client.call("dbk.read_reader")
    # Celery sends the result before task_postrun closes the connection: wait for it.
    assert wait_for(lambda: not server.processlist(user=reader_user))  # closed after the task
    writes = [client.call("dbk.write", f"solo-{n}") for n in range(2)]
    assert writes[0][2] == writes[1][2]  # kept from one task to the next
    time.sleep(PAUSE)  # the server closes the worker's idle connection
    after = [client.call("dbk.read_reader") for _ in range(2)]
    assert len({first[2], *(tid for _, _, tid in after)}) == 3  # one connection per task
    [(_, _, written)] = [client.call("dbk.write", "solo-after")]
    assert written != writes[0][2]  # the dead one was replaced before the task's write
    kept = worker_ids(server, set())
    assert kept == {written}
    assert worker.stop() == 0
    assert_closed_properly(server, kept)
    assert "install(app) from worker_init" in worker.log()
    clean(worker.log())


@pytest.mark.parametrize("install_at", ["worker_process_init", "worker_ready"])
def test_install_after_the_worker_started_takes_over_or_says_it_cannot(
    server, client, start_worker, install_at
):
    worker = start_worker("prefork", DBK_CELERY_INSTALL_AT=install_at)
    before = server.connections_total()
    results = client.write([f"late-{n}" for n in range(12)])
    connects = server.connections_total() - before
    assert worker.stop() == 0
    log = worker.log()
    assert "Traceback" not in log and "ERROR" not in log, log
    warned = [line for line in log.splitlines() if "WARNING django_dbkeepalive" in line]
    if install_at == "worker_process_init":
        # Each pool process took over from Celery's fix-up: its connection is kept.
        assert not warned, log
        assert connects <= 2 == len({pid for pid, _, _ in results})
    else:
        # The pool processes were already running with Celery's fix-up: they go on
        # closing their connection around every task, and the log says so.
        [line] = warned
        assert "install(app) ran after the worker had started" in line
        assert "pool processes already running keep Celery's default" in line
        assert connects >= len(results)


def test_a_worker_without_the_app_in_installed_apps_refuses_to_start(start_worker):
    with pytest.raises(RuntimeError, match="did not start") as caught:
        start_worker("solo", DBK_APP="0")
    message = str(caught.value)
    assert "ImproperlyConfigured" in message
    assert "'django_dbkeepalive' is not in INSTALLED_APPS" in message
    assert "Add 'django_dbkeepalive' to INSTALLED_APPS" in message


# ------------------------------------------------- in this process, Celery's own tracer


class Traced:
    """A Celery app with the integration, its worker fix-up installed in this process as
    a worker installs it, and tasks run through Celery's tracer (not eagerly): the
    prerun/postrun signals fire in the calling thread, as in a worker's pool."""

    def __init__(self, using: Any = None) -> None:
        self.app = Celery(f"dbk-inproc-{uuid.uuid4().hex[:6]}", set_as_current=False)
        install(self.app, using=using)
        signals.import_modules.send(sender=self.app)  # what a starting worker sends
        [fixup] = self.app._fixups
        self.fixup: KeepaliveWorkerFixup = fixup.worker_fixup
        assert isinstance(self.fixup, KeepaliveWorkerFixup)
        self.fixup.install()
        self.trace = define_tasks(self.app)

    def run(self, key: str, **kwargs: Any) -> int:
        result = self.outcome(key, **kwargs)
        assert result.info is None, result  # no exception
        return int(result.retval)

    def outcome(self, key: str, **kwargs: Any) -> Any:
        """Run the task; return Celery's trace result (``.retval``, ``.info``)."""
        return run_task(self.trace, key, **kwargs)

    def close(self) -> None:
        uninstall_worker_fixup(self.fixup)


def define_tasks(app: Celery) -> Any:
    @app.task(name="inproc.write")
    def write(
        key: str,
        leave_manual: bool = False,
        pause: bool = False,
        lose: bool = False,
        retry: bool = False,
        reader: bool = False,
        hold: threading.Event | None = None,
    ) -> int:
        if reader:
            return reader_connection_id()
        if pause:
            count_items()
            expire_connection()  # a slow API call between two statements
        if lose:
            try:
                with transaction.atomic():
                    write_item(key)
                    expire_connection(idle=10**6)  # past wait_timeout inside the transaction
                    write_item(f"{key}-b")
            except ConnectionLostInTransaction as exc:
                if retry:  # what `raise self.retry(exc=exc)` raises
                    raise Retry("lost its transaction", exc=exc) from None
                raise
        thread_id = write_item(key)
        if hold is not None:
            hold.wait(10)
            thread_id = write_item(f"{key}-after-hold")
        if leave_manual:
            transaction.set_autocommit(False)
        return thread_id

    tracer = build_tracer(write.name, write, app=app, eager=False)
    tracer.task = write  # type: ignore[attr-defined]
    return tracer


def run_task(trace: Any, key: str, **kwargs: Any) -> Any:
    task_id = str(uuid.uuid4())
    return trace(task_id, [key], kwargs, request={"id": task_id})


def uninstall_worker_fixup(fixup: Any) -> None:
    """Undo what a worker fix-up's install() connected in this process."""
    signals.task_prerun.disconnect(fixup.on_task_prerun)
    signals.task_postrun.disconnect(fixup.on_task_postrun)
    signals.worker_process_init.disconnect(fixup.on_worker_process_init)
    signals.beat_embedded_init.disconnect(fixup.close_database)
    if isinstance(fixup, KeepaliveWorkerFixup):
        signals.worker_process_shutdown.disconnect(fixup.on_worker_process_shutdown)
        signals.worker_shutdown.disconnect(fixup.on_worker_shutdown)


def count_items() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM testapp_item")


def reset_connection() -> None:
    if connection.connection is not None and not connection.get_autocommit():
        connection.rollback()
        connection.set_autocommit(True)


@pytest.fixture
def traced() -> Iterator[Traced]:
    app = Traced()
    try:
        yield app
    finally:
        app.close()
        reset_connection()


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


@pytest.mark.django_db(transaction=True, databases=["default", "reader"])
@override_settings(DBKEEPALIVE=GUARD_OFF)
def test_aliases_outside_using_are_closed_around_every_task_as_celery_does(server):
    app = Traced(using="default")
    try:
        reader_user = server.reader_user if not server.external else server.user
        readers = []
        for n in range(3):
            readers.append(app.run(f"r-{n}", reader=True))
            assert connections["reader"].connection is None  # closed after the task
            # (the server ends a closed session in its own thread, a moment later)
            assert wait_for(lambda: not server.processlist(user=reader_user))
        assert len(set(readers)) == 3  # a new connection per task, as Celery's own
        connections["reader"].ensure_connection()  # left open by code between tasks
        killed = kill_connection("reader", notice=False)  # dead, unnoticed (guard off)
        writer = app.run("w-0")
        assert connections["reader"].connection is None  # closed before the task
        assert app.run("r-3", reader=True) not in (killed, *readers)
        assert app.run("w-1") == writer  # "default" is kept across tasks
    finally:
        app.close()


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
    message = record.getMessage()
    assert "the Celery task inproc.write held a database connection idle past its limit" in (
        message
    )
    assert "'default' idle" in message
    assert "The task went on" in message and "was lost" not in message


def test_a_task_whose_transaction_was_lost_is_reported_as_such(traced, caplog, raw):
    outcomes: list[Any] = []

    def postrun(retval: Any = None, **kwargs: Any) -> None:
        outcomes.append(retval)

    signals.task_postrun.connect(postrun, weak=False)
    try:
        with caplog.at_level(logging.WARNING, logger="django_dbkeepalive"):
            traced.outcome("lost", lose=True)
    finally:
        signals.task_postrun.disconnect(postrun)
    [exc] = outcomes
    assert isinstance(exc, ConnectionLostInTransaction)
    [record] = [r for r in caplog.records if r.name == "django_dbkeepalive"]
    message = record.getMessage()
    assert "The task's transaction was lost with the connection (it failed with " in message
    assert "ConnectionLostInTransaction): nothing it wrote in that transaction was saved" in (
        message
    )
    assert "went on" not in message
    assert counts(raw) == {}  # nothing of the transaction was committed
    assert traced.run("next") > 0  # the next task gets a working connection


def test_the_connections_kept_by_pool_threads_are_closed_at_shutdown_but_not_a_busy_one(
    traced, server, raw
):
    # Tasks in two pool-like threads that then end (as a threads pool's do at a warm
    # shutdown), and a third thread whose task is still running at worker_shutdown.
    ids: list[int] = []

    def pool_thread(key: str, hold: threading.Event | None = None) -> None:
        ids.append(traced.run(key, hold=hold))

    done = [threading.Thread(target=pool_thread, args=(f"s-{n}",)) for n in range(2)]
    for thread in done:
        thread.start()
        thread.join()
    hold = threading.Event()
    busy = threading.Thread(target=pool_thread, args=("busy", hold))
    busy.start()
    assert wait_for(lambda: "busy" in counts(raw))
    idle_ids = set(ids)
    assert len(idle_ids) == 2 and idle_ids <= worker_ids(server, set())
    signals.worker_shutdown.send(sender=None)
    assert_closed_properly(server, idle_ids)
    hold.set()  # the running task goes on, on its own connection, untouched
    busy.join()
    [busy_id] = set(ids) - idle_ids
    assert counts(raw)["busy-after-hold"] == (1, busy_id)


def test_without_the_guard_the_worker_fixup_closes_like_celery(raw):
    # Belt and braces (install() refuses to run without the guard): tasks get Celery's
    # own behaviour, not an AttributeError and connections reused unguarded.
    app = Celery("no-guard", set_as_current=False)
    fixup = KeepaliveWorkerFixup(app).install()
    trace = define_tasks(app)
    guard.uninstall()
    try:
        first = run_task(trace, "ng-0")
        assert first.info is None, first
        assert connection.connection is None  # closed after the task, as Celery does
        second = run_task(trace, "ng-1")
        assert second.info is None and second.retval != first.retval
    finally:
        uninstall_worker_fixup(fixup)
        connection.close()
        guard.install()
    assert set(counts(raw)) == {"ng-0", "ng-1"}


def test_install_needs_celerys_django_fixup():
    with pytest.raises(ImproperlyConfigured, match="DJANGO_SETTINGS_MODULE"):
        install(Celery("no-fixups", fixups=[], set_as_current=False))


def test_install_rejects_an_unknown_alias_at_once():
    with pytest.raises(ConnectionDoesNotExist, match="'replica' is not a database alias"):
        install(Celery("bad-alias", set_as_current=False), using="replica")


@modify_settings(INSTALLED_APPS={"remove": ["django_dbkeepalive"]})
def test_install_without_the_app_in_installed_apps_raises_at_once():
    with pytest.raises(ImproperlyConfigured) as caught:
        install(Celery("no-app", set_as_current=False))
    assert "'django_dbkeepalive' is not in INSTALLED_APPS" in str(caught.value)
    assert "Add 'django_dbkeepalive' to INSTALLED_APPS" in str(caught.value)


def test_install_again_with_the_same_using_does_nothing_and_with_another_raises():
    app = Celery("twice", set_as_current=False)
    install(app, using="default")
    receivers = len(signals.import_modules.receivers)
    install(app, using=["default"])
    assert len(signals.import_modules.receivers) == receivers
    with pytest.raises(ImproperlyConfigured) as caught:
        install(app)
    assert str(caught.value).startswith(
        "django_dbkeepalive.contrib.celery.install(app) was already called for this app "
        "with using=['default']; this call asks for using=None (all aliases)."
    )


def test_install_after_worker_init_takes_over_from_celerys_worker_fixup(caplog):
    app = Celery("late", set_as_current=False)
    [fixup] = app._fixups
    signals.import_modules.send(sender=app)
    # What a starting worker sends (a stand-in for its WorkController: the app, the pool).
    worker = type("Worker", (), {"app": app, "pool_cls": "celery.concurrency.solo:TaskPool"})
    signals.worker_init.send(sender=worker())  # Celery's worker fix-up is installed
    plain = fixup.worker_fixup
    assert type(plain) is not KeepaliveWorkerFixup
    trace = define_tasks(app)
    try:
        first = run_task(trace, "late-0").retval
        assert connection.connection is None  # Celery's: closed after every task
        with caplog.at_level(logging.WARNING, logger="django_dbkeepalive"):
            install(app)  # from a worker_init receiver, say
        ours = fixup.worker_fixup
        assert isinstance(ours, KeepaliveWorkerFixup)
        second = run_task(trace, "late-1").retval
        assert run_task(trace, "late-2").retval == second != first  # kept: ours alone
        assert not caplog.records  # no pool process had started: nothing to warn about
    finally:
        uninstall_worker_fixup(plain)
        uninstall_worker_fixup(fixup.worker_fixup)


def test_a_task_that_retries_after_losing_its_transaction_is_reported_as_lost(traced, caplog, raw):
    outcomes: list[Any] = []

    def postrun(retval: Any = None, state: Any = None, **kwargs: Any) -> None:
        outcomes.append((state, retval))

    signals.task_postrun.connect(postrun, weak=False)
    try:
        with caplog.at_level(logging.WARNING, logger="django_dbkeepalive"):
            traced.outcome("lost-retry", lose=True, retry=True)
    finally:
        signals.task_postrun.disconnect(postrun)
    [(state, retval)] = outcomes
    assert state == "RETRY" and isinstance(retval, Retry)
    assert isinstance(retval.exc, ConnectionLostInTransaction)
    [record] = [r for r in caplog.records if r.name == "django_dbkeepalive"]
    message = record.getMessage()
    assert "the Celery task inproc.write held a database connection idle past its limit" in (
        message
    )
    assert "The task's transaction was lost with the connection" in message
    assert counts(raw) == {}
    assert traced.run("after-retry") > 0


def test_an_eager_task_runs_on_the_callers_connection_and_in_its_transaction(traced, raw):
    task = traced.trace.task
    connection.ensure_connection()
    mine = connection.connection
    with assert_recycles(0):
        with transaction.atomic():
            first = task.apply(args=["eager-0"]).get()
            transaction.set_rollback(True)  # the caller's transaction, not the task's
        second = task.apply(args=["eager-1"]).get()
    assert first == second
    assert connection.connection is mine  # not closed or tidied around the eager task
    assert counts(raw) == {"eager-1": (1, second)}


def test_a_task_that_started_before_a_late_install_finishes_normally(raw):
    app = Celery("late-running", set_as_current=False)
    [fixup] = app._fixups
    signals.import_modules.send(sender=app)
    worker = type("Worker", (), {"app": app, "pool_cls": "celery.concurrency.solo:TaskPool"})
    signals.worker_init.send(sender=worker())  # Celery's worker fix-up is installed
    plain = fixup.worker_fixup
    trace = define_tasks(app)
    hold = threading.Event()
    results: list[Any] = []

    def pool_thread() -> None:
        try:
            results.append(run_task(trace, "early", hold=hold))
        finally:
            connection.close()

    thread = threading.Thread(target=pool_thread)
    try:
        thread.start()
        assert wait_for(lambda: "early" in counts(raw))  # its prerun was Celery's
        install(app)  # takes over while the task runs: its postrun is ours
        hold.set()
        thread.join()
        [result] = results
        assert result.info is None, result
        assert "early-after-hold" in counts(raw)
        first = run_task(trace, "next-0").retval
        assert run_task(trace, "next-1").retval == first  # ours from here on: kept
    finally:
        hold.set()
        thread.join()
        uninstall_worker_fixup(plain)
        uninstall_worker_fixup(fixup.worker_fixup)


def test_a_worker_fixup_without_the_guard_says_why_and_leaves_connections_alone(caplog, server):
    guard.uninstall()
    try:
        with pytest.raises(ImproperlyConfigured) as caught:
            install(Celery("no-guard-install", set_as_current=False))
        assert "but it is not installed in this process any more" in str(caught.value)
        with caplog.at_level(logging.ERROR, logger="django_dbkeepalive"):
            fixup = KeepaliveWorkerFixup(Celery("no-guard", set_as_current=False)).install()
        try:
            [record] = [r for r in caplog.records if r.name == "django_dbkeepalive"]
            assert record.levelno == logging.ERROR
            assert record.getMessage().startswith(
                "dbkeepalive: django_dbkeepalive.contrib.celery.install(app) needs "
                "django-dbkeepalive's connection guard, but it is not installed in this "
                "process any more"
            )
            assert record.getMessage().endswith("Until then, Celery closes every connection.")
            # A prefork child exits: without the guard, the fix-up leaves its
            # connections to Celery's own handling.
            connection.ensure_connection()  # (install() closed them, as Celery's does)
            mine = connection.connection
            signals.worker_process_shutdown.send(sender=None, pid=0, exitcode=0)
            assert connection.connection is mine
        finally:
            uninstall_worker_fixup(fixup)
    finally:
        guard.install()
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        assert int(cursor.fetchone()[0]) in {int(p["id"]) for p in server.processlist()}
