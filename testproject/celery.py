"""The test project's Celery app: ``celery -A testproject.celery:app worker``.

Environment (see tests/celery_worker.py): DBK_CELERY_BROKER (broker and result backend;
without it nothing connects anywhere), DBK_CELERY_INTEGRATION (``0``: plain Celery),
DBK_CELERY_DB_REUSE_MAX, DBK_CELERY_PARENT_HOLDS.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

app = Celery("testproject")
app.config_from_object("django.conf:settings", namespace="CELERY")

if os.environ.get("DBK_CELERY_INTEGRATION", "1") != "0":
    from django_dbkeepalive.contrib.celery import install

    install(app)  # the one line a project adds


@app.task(name="dbk.write")
def write(key: str) -> tuple[int, int, int]:
    """Write ``Item(key)``; return (pid, thread, id of the server connection used)."""
    from testproject.testapp.tasks import write_item

    return os.getpid(), threading.get_ident(), write_item(key)


def _parent_holds() -> bool:
    return os.environ.get("DBK_CELERY_PARENT_HOLDS") == "1"


@signals.worker_ready.connect
def _hold_a_connection(**kwargs: Any) -> None:
    # The worker's main process keeps a connection open while the prefork pool forks
    # new children (--max-tasks-per-child): a child must never close or use it.
    if _parent_holds():
        from django.db import connection

        from testproject.testapp.tasks import write_item

        with connection.cursor() as cursor:
            cursor.execute("SET SESSION wait_timeout = 600")
        write_item("parent-start")


@signals.worker_shutdown.connect
def _use_it_again(**kwargs: Any) -> None:
    if _parent_holds():
        from testproject.testapp.tasks import write_item

        write_item("parent-end")
