"""The soak run's Django side: a row model without a unique key, a view, a command.

Imported by :mod:`soak.run` after ``django.setup()``. ``SoakRow.key`` is deliberately
not unique, so a write that ran twice shows up as two rows instead of an
``IntegrityError``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import models, transaction
from django.http import HttpRequest, HttpResponse
from django.urls import path

from django_dbkeepalive import BaseKeepaliveCommand

TABLE_SQL = (
    "CREATE TABLE soak_row (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
    "`key` VARCHAR(100) NOT NULL, writer VARCHAR(20) NOT NULL, "
    "created DATETIME(6) NOT NULL, KEY soak_row_key (`key`)) ENGINE=InnoDB"
)


class SoakRow(models.Model):
    key = models.CharField(max_length=100)
    writer = models.CharField(max_length=20)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "testapp"
        db_table = "soak_row"
        managed = False


def write_view(request: HttpRequest) -> HttpResponse:
    """A long request: a read, some work without the database, then two rows in one
    transaction (``KEY-a`` and ``KEY-b``). HTTP 200 means both are committed."""
    key = request.GET["key"]
    SoakRow.objects.filter(writer="web").exists()
    time.sleep(float(request.GET.get("pause", "0")))
    with transaction.atomic():
        SoakRow.objects.create(key=f"{key}-a", writer="web")
        SoakRow.objects.create(key=f"{key}-b", writer="web")
    return HttpResponse("ok")


urlpatterns = [path("write", write_view)]


class SoakCommand(BaseKeepaliveCommand):
    """A crawler-style loop: ``keepalive()``, a write (sometimes two in a transaction),
    a pause of up to 3 s; until ``stop`` is set. ``write(writer, keys, fn)`` records
    each attempt."""

    help = "soak: write rows with pauses until stopped"

    def __init__(
        self,
        stop: threading.Event,
        write: Callable[[str, list[str], Callable[[], Any]], None],
        rng: random.Random,
    ) -> None:
        super().__init__()
        self.stop = stop
        self.write = write
        self.rng = rng

    def handle(self, *args: Any, **options: Any) -> None:
        n = 0
        while not self.stop.is_set():
            self.keepalive()
            key = f"cmd-{n}"
            if n % 3 == 2:

                def pair(key: str = key) -> None:
                    with transaction.atomic():
                        SoakRow.objects.create(key=f"{key}-a", writer="command")
                        SoakRow.objects.create(key=f"{key}-b", writer="command")

                self.write("command", [f"{key}-a", f"{key}-b"], pair)
            else:
                self.write(
                    "command",
                    [key],
                    lambda key=key: SoakRow.objects.create(key=key, writer="command"),
                )
            n += 1
            self.stop.wait(self.rng.choice([0.05, 0.2, 0.5, 1.0, 2.5, 3.0]))
