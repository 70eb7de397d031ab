"""The worker fix-up: Celery's ``DjangoWorkerFixup`` with connections reused across tasks.

Owns: what happens around each task (tidy the connections of the reused aliases before
and after it, guard them during it, warn when it held one idle past its limit) and at
worker shutdown. Must never import: :mod:`django_dbkeepalive.contrib.celery`'s
``install`` (it installs this).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from typing import Any

from celery import Celery, signals  # type: ignore[import-untyped]
from celery.fixups.django import DjangoWorkerFixup  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from ... import guard
from ...fresh import Using, _aliases, _end_scope, _start_scope, _tidy, refresh_connections

logger = logging.getLogger("django_dbkeepalive")

_NEEDS_THE_GUARD = (
    "django_dbkeepalive.contrib.celery.install(app) needs django-dbkeepalive's connection "
    "guard, but {why}: without the guard, connections reused across tasks fail after a "
    "quiet period. Add 'django_dbkeepalive' to INSTALLED_APPS, or remove the install(app) "
    "call to keep Celery's default (every connection closed around each task)."
)


def _guard_missing() -> str | None:
    """Why the guard cannot protect this process's connections, or None when it can (or
    when Django's apps are not loaded yet, so it cannot be known)."""
    from django.apps import apps

    if not apps.ready:
        return None
    if not apps.is_installed("django_dbkeepalive"):
        return _NEEDS_THE_GUARD.format(why="'django_dbkeepalive' is not in INSTALLED_APPS")
    if not guard.is_installed():
        return _NEEDS_THE_GUARD.format(why="it is not installed in this process any more")
    return None


def _require_guard() -> None:
    problem = _guard_missing()
    if problem is not None:
        raise ImproperlyConfigured(problem)


def _task_started(aliases: Iterable[str]) -> list[Any]:
    """Before a task, in the thread that runs it: tidy this thread's connections of
    ``aliases``, guard them for the task; returns their wrappers for _task_finished()."""
    aliases = list(aliases)
    for alias in aliases:
        _tidy(connections[alias], next_unit=True)
    return _start_scope(aliases)


def _lost_transaction(outcome: Any) -> bool:
    """Whether a task's outcome (its return value, or the exception it ended with) is, or
    was caused by, a ``ConnectionLostInTransaction`` (also through Celery's ``Retry``)."""
    from ...errors import ConnectionLostInTransaction

    seen: set[int] = set()
    todo = [outcome]
    while todo:
        exc = todo.pop()
        if not isinstance(exc, BaseException) or id(exc) in seen:
            continue
        if isinstance(exc, ConnectionLostInTransaction):
            return True
        seen.add(id(exc))
        todo += [exc.__cause__, exc.__context__, getattr(exc, "exc", None)]
    return False


def _task_finished(wrappers: list[Any], name: str, *, lost: bool = False) -> None:
    """After a task: end the guard scopes of _task_started(), log one warning if the task
    held a connection idle past its limit, tidy the connections for the next task.

    ``lost``: the task ended with ``ConnectionLostInTransaction``."""
    over = _end_scope(wrappers)
    for db in wrappers:
        _tidy(db, next_unit=True)
    if not over:
        return
    if lost:
        consequence = (
            "The task's transaction was lost with the connection (it failed with "
            "ConnectionLostInTransaction): nothing it wrote in that transaction was saved."
        )
    else:
        consequence = (
            "The task went on (the guard replaced the connection, or the session was "
            "still open), but a transaction open across such a pause is lost once the "
            "server's wait_timeout passes."
        )
    logger.warning(
        "dbkeepalive: the Celery task %s held a database connection idle past its limit: "
        "%s. %s Keep slow work (API calls, file building) outside transaction.atomic(), "
        "or raise the server's wait_timeout.",
        name,
        "; ".join(over),
        consequence,
    )


def _is_eager(task: Any) -> bool:
    return bool(getattr(getattr(task, "request", None), "is_eager", False))


def _close_kept(db: Any) -> None:
    """Close ``db``'s connection properly (``COM_QUIT``), from any thread: its own thread
    is not running a task (the pool has stopped)."""
    if db.connection is None or db.in_atomic_block:
        return
    db.inc_thread_sharing()  # Django's way to let another thread close it
    try:
        guard.close_connection(db)  # a dead connection is dropped without writing to it
    finally:
        db.dec_thread_sharing()


class KeepaliveWorkerFixup(DjangoWorkerFixup):  # type: ignore[misc]
    """Celery's ``DjangoWorkerFixup`` with connection reuse across tasks.

    Everything else of the fix-up is Celery's: ``django.setup()`` and checks, closing the
    caches after each task, closing inherited connections in prefork children, closing
    connections when the worker starts and when an embedded beat starts, and closing the
    connections of aliases outside ``using`` around each task. Should the guard not be
    installed in the worker (see :func:`install`), every task gets Celery's behaviour.
    """

    def __init__(self, app: Celery, using: Using = None) -> None:
        super().__init__(app)
        self.using = using
        self._reused = _aliases(using)  # kept across tasks
        reused = set(self._reused)
        self._others = {alias for alias in connections.settings if alias not in reused}
        self._scopes: dict[str, list[Any]] = {}  # task id -> wrappers of task_started()
        # Every wrapper a task used, in every thread (a pool thread's own wrappers would
        # be gone with it before the worker's shutdown): id(wrapper) -> wrapper.
        self._kept: dict[int, Any] = {}
        self._kept_lock = threading.Lock()

    def install(self) -> KeepaliveWorkerFixup:
        # A prefork child that exits (worker shutdown, --max-tasks-per-child) says
        # goodbye to the server instead of leaving an aborted connection behind; so does
        # the worker, at shutdown, for the connections of its solo or threads pool.
        signals.worker_process_shutdown.connect(self.on_worker_process_shutdown)
        signals.worker_shutdown.connect(self.on_worker_shutdown)
        super().install()
        problem = _guard_missing()
        if problem is not None:  # (install() raises it as soon as it can be known)
            logger.error("dbkeepalive: %s Until then, Celery closes every connection.", problem)
        return self

    def on_worker_process_shutdown(self, **kwargs: Any) -> None:
        if guard.is_installed():
            refresh_connections(self.using, close=True)

    def on_worker_shutdown(self, **kwargs: Any) -> None:
        """The worker stops (after a warm shutdown, its pool has finished every task):
        close the connections its tasks kept, in every thread, but never one a task
        still uses."""
        with self._kept_lock:
            kept = list(self._kept.values())
            self._kept.clear()
        busy = {id(db) for wrappers in list(self._scopes.values()) for db in wrappers}
        for db in kept:
            if id(db) in busy:
                continue
            try:
                _close_kept(db)
            except Exception:  # pragma: no cover - close_connection() swallows close errors
                # (belt and braces: shutting down, never fail over a connection)
                logger.debug("dbkeepalive: could not close %r at shutdown", db, exc_info=True)

    def on_task_prerun(self, sender: Any, **kwargs: Any) -> None:
        if not guard.is_installed():
            super().on_task_prerun(sender, **kwargs)  # Celery's: close everything
            return
        if _is_eager(sender):
            return
        if self.db_reuse_max:
            self.close_database()  # Celery's count: closes all every db_reuse_max tasks
        elif self._others:
            self._close_aliases(self._others)  # Celery's close, for the others only
        wrappers = _task_started(self._reused)
        self._scopes[str(kwargs.get("task_id"))] = wrappers
        with self._kept_lock:
            for db in wrappers:
                self._kept[id(db)] = db

    def on_task_postrun(self, sender: Any, **kwargs: Any) -> None:
        if not guard.is_installed():
            super().on_task_postrun(sender, **kwargs)
            return
        if _is_eager(sender):
            return
        wrappers = self._scopes.pop(str(kwargs.get("task_id")), None)
        if wrappers is not None:
            name = getattr(sender, "name", None) or "?"
            _task_finished(wrappers, name, lost=_lost_transaction(kwargs.get("retval")))
        if self.db_reuse_max:
            self.close_database()
        elif self._others:
            self._close_aliases(self._others)
        self.close_cache()

    def _close_database(self, *args: Any, **kwargs: Any) -> None:
        # Dead connections of the reused aliases first, dropped without writing to (or
        # waiting on) their sockets; then Celery's own close of all. (Celery < 5.5 takes
        # `force`.)
        if guard.is_installed():
            reused = set(self._reused)
            for db in connections.all(initialized_only=True):
                if db.alias in reused and db.connection is not None and not db.in_atomic_block:
                    guard.check_idle(db)
        super()._close_database(*args, **kwargs)

    def _close_aliases(self, aliases: set[str]) -> None:
        """Celery's ``_close_database()``, for ``aliases`` only."""
        is_prefork = getattr(self, "_is_prefork", None)  # Celery >= 5.5
        prefork = bool(is_prefork()) if is_prefork is not None else False
        for db in connections.all(initialized_only=True):
            if db.alias not in aliases:
                continue
            try:
                db.close()
                options = self._settings.DATABASES.get(db.alias, {}).get("OPTIONS", {})
                if options.get("pool") and prefork and hasattr(db, "close_pool"):
                    with contextlib.suppress(KeyError):
                        db.close_pool()
            except self.interface_errors:
                pass
            except self.DatabaseError as exc:
                text = str(exc)
                if "closed" not in text and "not connected" not in text:
                    raise
