"""Celery integration: workers keep their database connections across tasks, safely.

Celery's Django fix-up closes every connection before and after each task, so a busy
worker opens one connection per task; its ``CELERY_DB_REUSE_MAX`` setting turns reuse on
and brings back "MySQL server has gone away" after quiet periods. With the guard, reuse is
safe: one line after the Celery app is created ::

    # proj/celery.py
    import os
    from celery import Celery

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")

    from django_dbkeepalive.contrib.celery import install
    install(app)

It needs ``"django_dbkeepalive"`` in ``INSTALLED_APPS`` (the guard is what makes the
reuse safe): without it, ``install()`` raises ``ImproperlyConfigured``, at once when
Django is set up, otherwise when the worker starts.

Each worker process (prefork) or pool thread (``--pool threads``) then keeps its
connection from one task to the next. Around every task, for the aliases in ``using``:

- before it: a connection that is dead (killed, server restarted), idle past its limit
  (the server's ``wait_timeout`` minus the margin) or older than a positive
  ``CONN_MAX_AGE`` is closed, so the task's first query opens a new one; the guard is on
  for the task even when ``DBKEEPALIVE["AUTO_GUARD"]`` is off;
- after it: the same, plus Django's own rules for a connection a task left in a bad state
  (errors that made it unusable, autocommit not restored); a warning is logged when the
  task held a connection idle past its limit.

Aliases outside ``using`` keep Celery's behaviour exactly: closed before and after each
task (or every ``CELERY_DB_REUSE_MAX`` tasks). ``CONN_MAX_AGE = 0`` (Django's default,
"close at the end of each request") does not close a worker's connection after each
task: a task is not a request, and the guard makes the reuse safe. A positive
``CONN_MAX_AGE`` caps the age of worker connections as usual. ``CELERY_DB_REUSE_MAX``
keeps its meaning (close every connection after that many tasks) when set. Celery's fork
handling is unchanged: a prefork child never closes or uses a connection it inherited
from the parent (the guard has already detached it without touching the socket), so the
parent's connection stays usable. When the worker stops (warm shutdown), the connections
its tasks kept are closed properly (``COM_QUIT``), whatever the pool.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from typing import Any

from billiard.process import current_process  # type: ignore[import-untyped]
from celery import Celery, signals  # type: ignore[import-untyped]
from celery.fixups.django import (  # type: ignore[import-untyped]
    DjangoFixup,
    DjangoWorkerFixup,
)
from celery.local import Proxy  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from .. import guard
from ..fresh import Using, _aliases, _end_scope, _start_scope, _tidy, refresh_connections

__all__ = ["KeepaliveWorkerFixup", "install"]

logger = logging.getLogger("django_dbkeepalive")

# On an app that install() has handled: the aliases it was given (a tuple, or None: all).
_INSTALLED_ATTR = "_dbkeepalive_celery"
_UNSET = object()

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
    from ..errors import ConnectionLostInTransaction

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
            except Exception:  # shutting down: never fail over a connection
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


def _django_fixup(app: Celery) -> DjangoFixup | None:
    for fixup in getattr(app, "_fixups", None) or ():
        if isinstance(fixup, DjangoFixup):
            return fixup
    return None


def _disconnect(plain: Any) -> bool:
    """Disconnect the receivers of Celery's own worker fix-up; whether it had been
    installed (``worker_init`` has run in this process, or its parent)."""
    installed = bool(signals.task_prerun.disconnect(plain.on_task_prerun))
    signals.task_postrun.disconnect(plain.on_task_postrun)
    signals.worker_process_init.disconnect(plain.on_worker_process_init)
    signals.beat_embedded_init.disconnect(plain.close_database)
    return installed


def _prefork_pool_started(ours: KeepaliveWorkerFixup) -> bool | None:
    """In the worker's main process: whether its prefork pool's processes are running
    (None: cannot tell, with Celery < 5.5)."""
    worker = getattr(ours, "worker", None)
    if worker is None:
        return None
    pool_cls = getattr(worker, "pool_cls", "")
    name = pool_cls if isinstance(pool_cls, str) else getattr(pool_cls, "__module__", "")
    if "prefork" not in name:
        return False
    return getattr(getattr(worker, "pool", None), "_pool", None) is not None


def _adopt(app: Celery, fixup: DjangoFixup, using: Using) -> KeepaliveWorkerFixup:
    """Put our worker fix-up in place of Celery's, in this process (idempotent).

    Before ``worker_init`` (the usual case), Celery installs ours when the worker starts.
    After it (install() ran late: from ``worker_init``, ``worker_process_init``,
    ``worker_ready``...), Celery's is taken out and ours installed at once."""
    current = fixup._worker_fixup
    if isinstance(current, KeepaliveWorkerFixup):
        return current
    _require_guard()
    ours = KeepaliveWorkerFixup(app, using)
    late = False
    if current is not None:
        if getattr(current, "worker", None) is not None:  # Celery >= 5.5 records it
            ours.worker = current.worker
        late = _disconnect(current)
    fixup.worker_fixup = ours
    if late:
        ours.install()
        if current_process().name == "MainProcess" and _prefork_pool_started(ours) is not False:
            logger.warning(
                "dbkeepalive: django_dbkeepalive.contrib.celery.install(app) ran after the "
                "worker had started%s: its pool processes already running keep Celery's "
                "default and close every connection around each task (processes started "
                "from now on, e.g. after --max-tasks-per-child, keep theirs). Call "
                "install(app) where the Celery app is created (proj/celery.py).",
                "" if ours.worker is not None else " (if its prefork pool had started)",
            )
    return ours


def install(app: Celery, *, using: Using = None) -> None:
    """Make ``app``'s workers reuse their database connections across tasks, safely.

    Call it once, where the Celery app is created (``proj/celery.py``), after
    ``DJANGO_SETTINGS_MODULE`` is set. ``using`` limits it to some aliases (default: all);
    the others keep Celery's behaviour (closed around each task). Calling it again with
    the same ``using`` does nothing; with another one it raises ``ImproperlyConfigured``.
    Nothing changes for eager tasks (``task_always_eager``, ``apply()``).

    Raises ``ImproperlyConfigured`` when the app has no Django fix-up (Celery adds it when
    ``DJANGO_SETTINGS_MODULE`` is set before the app is created), and when
    ``'django_dbkeepalive'`` is not in ``INSTALLED_APPS``: at once if Django is set up,
    otherwise when the worker starts (which then exits with that error). Called after
    the worker has started (from a ``worker_init``, ``worker_process_init`` or
    ``worker_ready`` handler), it takes over from Celery's worker fix-up at once in that
    process, and logs a warning when prefork pool processes were already running.

    Example::

        app = Celery("proj")
        app.config_from_object("django.conf:settings", namespace="CELERY")
        install(app)
    """
    wanted = None if using is None else tuple(_aliases(using))  # an unknown alias fails here
    _require_guard()
    done = getattr(app, _INSTALLED_ATTR, _UNSET)
    if done is not _UNSET:
        if done != wanted:
            raise ImproperlyConfigured(
                f"django_dbkeepalive.contrib.celery.install(app) was already called for "
                f"this app with using={_shown(done)}; this call asks for "
                f"using={_shown(wanted)}. Call install(app) once, with every alias that "
                "should keep its connections (using=None: all)."
            )
        return
    fixup = _django_fixup(app)
    if fixup is None:
        raise ImproperlyConfigured(
            "django_dbkeepalive.contrib.celery.install(app): the Celery app has no Django "
            "fix-up. Celery adds it when DJANGO_SETTINGS_MODULE is set before the app is "
            "created: put os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
            "'yourproject.settings') above Celery(...), and do not pass fixups=[]."
        )
    setattr(app, _INSTALLED_ATTR, wanted)
    aliases: Using = None if wanted is None else list(wanted)

    def adopt(**kwargs: Any) -> None:
        # Sent while the worker starts, after Celery's fix-up ran django.setup() and
        # before ``worker_init`` installs the worker fix-up. Raising here stops the
        # worker: Celery re-raises what import_modules receivers raise.
        _adopt(app, fixup, aliases)

    def on_worker_init(sender: Any = None, **kwargs: Any) -> None:
        worker_app = getattr(sender, "app", app)
        if isinstance(worker_app, Proxy):
            worker_app = worker_app._get_current_object()
        if worker_app is not app:
            return  # another app's worker
        ours = _adopt(app, fixup, aliases)
        if getattr(ours, "worker", None) is None and sender is not None:
            ours.worker = sender  # Celery < 5.5 does not record it

    # weak=False: these closures live only here. The Django fix-up connected its own
    # import_modules receiver when the app was created, so ours runs after it.
    signals.import_modules.connect(adopt, sender=app, weak=False)
    signals.worker_init.connect(on_worker_init, weak=False)
    if fixup._worker_fixup is not None:
        # The worker has started (import_modules was sent): take over now.
        _adopt(app, fixup, aliases)


def _shown(using: Any) -> str:
    return "None (all aliases)" if using is None else repr(list(using))
