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

Each worker process (prefork) or pool thread (``--pool threads``) then keeps its
connection from one task to the next. Around every task, for the aliases in ``using``:

- before it: a connection that is dead (killed, server restarted), idle past its limit
  (the server's ``wait_timeout`` minus the margin) or older than a positive
  ``CONN_MAX_AGE`` is closed, so the task's first query opens a new one; the guard is on
  for the task even when ``DBKEEPALIVE["AUTO_GUARD"]`` is off;
- after it: the same, plus Django's own rules for a connection a task left in a bad state
  (errors that made it unusable, autocommit not restored); a warning is logged when the
  task held a connection idle past its limit (an atomic block open at that point would
  have been lost).

``CONN_MAX_AGE = 0`` (Django's default, "close at the end of each request") does not
close a worker's connection after each task: a task is not a request, and the guard
makes the reuse safe. A positive ``CONN_MAX_AGE`` caps the age of worker connections as
usual. ``CELERY_DB_REUSE_MAX`` keeps its meaning (close every connection after that many
tasks) when set. Celery's fork handling is unchanged: a prefork child never closes or
uses a connection it inherited from the parent (the guard has already detached it without
touching the socket), so the parent's connection stays usable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from celery import Celery, signals  # type: ignore[import-untyped]
from celery.fixups.django import (  # type: ignore[import-untyped]
    DjangoFixup,
    DjangoWorkerFixup,
)
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from .. import guard
from ..fresh import Using, _aliases, refresh_connections

__all__ = ["KeepaliveWorkerFixup", "install"]

logger = logging.getLogger("django_dbkeepalive")

# Marks an app that install() has already handled.
_INSTALLED_ATTR = "_dbkeepalive_celery"


def _wrappers(aliases: Iterable[str]) -> list[Any]:
    """This thread's wrappers of ``aliases`` (created if needed: cheap, no connection)."""
    return [connections[alias] for alias in aliases]


def _tidy(db: Any) -> None:
    """Close ``db``'s connection when it must not be reused by the next task.

    What ``close_if_unusable_or_obsolete()`` does, except that ``CONN_MAX_AGE = 0`` does
    not mean "close now" (the guard enforces a positive ``CONN_MAX_AGE`` itself), plus the
    guard's checks: dead (peek), idle past its limit, ping due and failing."""
    if db.connection is None or db.in_atomic_block:
        return
    guard.check_idle(db)  # dead, idle past the limit, CONN_MAX_AGE > 0 reached
    if db.connection is None:
        return
    db.health_check_done = False  # CONN_HEALTH_CHECKS: check again in the next task
    if db.get_autocommit() != db.settings_dict["AUTOCOMMIT"]:
        # The task left a manual transaction behind: never hand it to the next task.
        guard.close_connection(db)
        return
    if db.errors_occurred:
        if db.is_usable():
            db.errors_occurred = False
        else:
            guard.close_connection(db)
            guard.notify_closed(db, "ping_failed")


def _task_started(using: Using) -> list[Any]:
    """Before a task, in the thread that runs it: tidy this thread's connections of
    ``using``, guard them for the task; returns their wrappers for _task_finished()."""
    wrappers = _wrappers(_aliases(using))
    for db in wrappers:
        _tidy(db)
        guard.take_idle_report(db)  # idling between tasks is not the next task's doing
        guard.enable(db)
    return wrappers


def _task_finished(wrappers: list[Any], name: str) -> None:
    """After a task: end the guard scopes of _task_started(), log one warning if the task
    held a connection idle past its limit, tidy the connections for the next task."""
    over = []
    for db in wrappers:
        try:
            report = guard.take_idle_report(db)
        finally:
            guard.disable(db)
        if report is not None:
            idle, limit = report
            limit_text = f"limit {limit:.1f}s" if math.isfinite(limit) else "limit unknown"
            over.append(f"{db.alias!r} idle {idle:.1f}s ({limit_text})")
        _tidy(db)
    if over:
        logger.warning(
            "dbkeepalive: the Celery task %s held a database connection idle past its "
            "limit: %s. The guard reconnected, but a transaction open at that point would "
            "have been lost. Keep slow work (API calls, file building) outside "
            "transaction.atomic(), or raise the server's wait_timeout.",
            name,
            "; ".join(over),
        )


def _is_eager(task: Any) -> bool:
    return bool(getattr(getattr(task, "request", None), "is_eager", False))


class KeepaliveWorkerFixup(DjangoWorkerFixup):  # type: ignore[misc]
    """Celery's ``DjangoWorkerFixup`` with connection reuse across tasks.

    Everything else of the fix-up is Celery's: ``django.setup()`` and checks, closing the
    caches after each task, closing inherited connections in prefork children, closing
    connections when the worker starts and when an embedded beat starts.
    """

    def __init__(self, app: Celery, using: Using = None) -> None:
        super().__init__(app)
        self.using = using
        self._scopes: dict[str, list[Any]] = {}  # task id -> wrappers of task_started()

    def install(self) -> KeepaliveWorkerFixup:
        # A prefork child that exits (worker shutdown, --max-tasks-per-child) says
        # goodbye to the server instead of leaving an aborted connection behind.
        signals.worker_process_shutdown.connect(self.on_worker_process_shutdown)
        super().install()
        return self

    def on_worker_process_shutdown(self, **kwargs: Any) -> None:
        refresh_connections(self.using, close=True)

    def on_task_prerun(self, sender: Any, **kwargs: Any) -> None:
        if _is_eager(sender):
            return
        if self.db_reuse_max:
            self.close_database()  # Celery's count: closes all every db_reuse_max tasks
        self._scopes[str(kwargs.get("task_id"))] = _task_started(self.using)

    def on_task_postrun(self, sender: Any, **kwargs: Any) -> None:
        if _is_eager(sender):
            return
        wrappers = self._scopes.pop(str(kwargs.get("task_id")), None)
        if wrappers is not None:
            _task_finished(wrappers, getattr(sender, "name", None) or "?")
        if self.db_reuse_max:
            self.close_database()
        self.close_cache()

    def _close_database(self, *args: Any, **kwargs: Any) -> None:
        # Dead connections first, dropped without writing to (or waiting on) their
        # sockets; then Celery's own close of the rest. (Celery < 5.5 takes `force`.)
        for db in connections.all(initialized_only=True):
            if db.connection is not None and not db.in_atomic_block:
                guard.check_idle(db)
        super()._close_database(*args, **kwargs)


def _django_fixup(app: Celery) -> DjangoFixup | None:
    for fixup in getattr(app, "_fixups", None) or ():
        if isinstance(fixup, DjangoFixup):
            return fixup
    return None


def install(app: Celery, *, using: Using = None) -> None:
    """Make ``app``'s workers reuse their database connections across tasks, safely.

    Call it once, where the Celery app is created (``proj/celery.py``), after
    ``DJANGO_SETTINGS_MODULE`` is set. ``using`` limits it to some aliases (default: all).
    Idempotent. Nothing changes for eager tasks (``task_always_eager``, ``apply()``).
    Raises ``ImproperlyConfigured`` when the app has no Django fix-up (Celery adds it when
    ``DJANGO_SETTINGS_MODULE`` is set before the app is created).

    Example::

        app = Celery("proj")
        app.config_from_object("django.conf:settings", namespace="CELERY")
        install(app)
    """
    if using is not None:
        using = _aliases(using)  # an unknown alias fails here, not in every task
    if getattr(app, _INSTALLED_ATTR, False):
        return
    fixup = _django_fixup(app)
    if fixup is None:
        raise ImproperlyConfigured(
            "django_dbkeepalive.contrib.celery.install(app): the Celery app has no Django "
            "fix-up. Celery adds it when DJANGO_SETTINGS_MODULE is set before the app is "
            "created: put os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
            "'yourproject.settings') above Celery(...), and do not pass fixups=[]."
        )

    def adopt(**kwargs: Any) -> None:
        # Sent while the worker starts (settings configured, before ``worker_init``
        # installs the worker fix-up): replace Celery's worker fix-up with ours.
        current = fixup._worker_fixup
        if isinstance(current, KeepaliveWorkerFixup):
            return
        ours = KeepaliveWorkerFixup(app, using)
        if getattr(current, "worker", None) is not None:  # Celery >= 5.5 records it
            ours.worker = current.worker
        fixup.worker_fixup = ours

    def check(sender: Any = None, **kwargs: Any) -> None:
        if getattr(sender, "app", app) is app and not isinstance(
            fixup._worker_fixup, KeepaliveWorkerFixup
        ):
            logger.warning(
                "dbkeepalive: django_dbkeepalive.contrib.celery.install(app) ran after the "
                "worker had started: Celery will close every connection around each task. "
                "Call install(app) where the Celery app is created."
            )

    # weak=False: these closures live only here. The Django fix-up connected its own
    # import_modules receiver when the app was created, so ours runs after it.
    signals.import_modules.connect(adopt, sender=app, weak=False)
    signals.worker_init.connect(check, weak=False)
    setattr(app, _INSTALLED_ATTR, True)
