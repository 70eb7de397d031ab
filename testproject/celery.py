"""The test project's Celery app: ``celery -A testproject.celery:app worker``.

Environment (see tests/celery_worker.py): DBK_CELERY_BROKER (broker and result backend;
without it nothing connects anywhere), DBK_CELERY_INTEGRATION (``0``: plain Celery),
DBK_CELERY_USING (``install(app, using=...)``: comma-separated aliases),
DBK_CELERY_INSTALL_AT (a worker signal, ``worker_init``, ``worker_process_init`` or
``worker_ready``: call ``install(app)`` late, from a receiver of it),
DBK_CELERY_AUTO_GUARD (``0``: ``DBKEEPALIVE["AUTO_GUARD"] = False``),
DBK_CELERY_DB_REUSE_MAX, DBK_CELERY_PARENT_HOLDS; and DBK_APP (``0``: no
django_dbkeepalive in INSTALLED_APPS).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

if os.environ.get("DBK_CELERY_AUTO_GUARD") == "0":
    from django.conf import settings

    settings.DBKEEPALIVE = {**settings.DBKEEPALIVE, "AUTO_GUARD": False}

app = Celery("testproject")
app.config_from_object("django.conf:settings", namespace="CELERY")

if os.environ.get("DBK_CELERY_INTEGRATION", "1") != "0":
    from django_dbkeepalive.contrib.celery import install

    _listed = os.environ.get("DBK_CELERY_USING")
    _using = _listed.split(",") if _listed else None
    _install_at = os.environ.get("DBK_CELERY_INSTALL_AT", "")
    if not _install_at:
        install(app, using=_using)  # the one line a project adds
    else:

        def _install_late(**kwargs: Any) -> None:
            print(f"install(app) from {_install_at}", flush=True)
            install(app, using=_using)

        getattr(signals, _install_at).connect(_install_late, weak=False)


@app.task(name="dbk.write")
def write(key: str) -> tuple[int, int, int]:
    """Write ``Item(key)``; return (pid, thread, id of the server connection used)."""
    from testproject.testapp.tasks import write_item

    return os.getpid(), threading.get_ident(), write_item(key)


@app.task(name="dbk.read_reader")
def read_reader() -> tuple[int, int, int]:
    """Read through the ``reader`` alias; return (pid, thread, id of its connection)."""
    from testproject.testapp.tasks import reader_connection_id

    return os.getpid(), threading.get_ident(), reader_connection_id()


def _parent_holds() -> bool:
    return os.environ.get("DBK_CELERY_PARENT_HOLDS") == "1"


@signals.worker_ready.connect
def _hold_a_connection(**kwargs: Any) -> None:
    # The worker's main process keeps a connection open while the prefork pool forks
    # new children (--max-tasks-per-child): a child must never close or use it.
    if _parent_holds():
        from django.db import connection

        from testproject.testapp.tasks import write_item

        # A session that outlives the tests' short wait_timeout, set as it opens (so the
        # guard knows its limit from the start); the children's connections keep theirs.
        options = connection.settings_dict.setdefault("OPTIONS", {})
        saved = dict(options)
        options["init_command"] = "SET SESSION wait_timeout = 600"
        try:
            connection.close()
            connection.ensure_connection()
        finally:
            options.clear()
            options.update(saved)
        write_item("parent-start")


@signals.worker_shutdown.connect
def _use_it_again(**kwargs: Any) -> None:
    if _parent_holds():
        from testproject.testapp.tasks import write_item

        write_item("parent-end")
