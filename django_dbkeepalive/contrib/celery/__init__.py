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

import logging
from typing import Any

from billiard.process import current_process  # type: ignore[import-untyped]
from celery import Celery, signals  # type: ignore[import-untyped]
from celery.fixups.django import DjangoFixup  # type: ignore[import-untyped]
from celery.local import Proxy  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured

from ...fresh import Using, _aliases
from .fixup import KeepaliveWorkerFixup, _require_guard

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
