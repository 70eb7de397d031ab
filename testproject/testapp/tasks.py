"""Importable job functions for the scheduler, thread and process tests."""

from __future__ import annotations

import itertools
import os

from django.db import connection, connections

from .models import Item


def write_item(key: str) -> int:
    """Create ``Item(key)`` whose value is the server's id of the connection that wrote
    it; return that id."""
    # Asked with a query, not the driver's cached thread_id(): the query goes through
    # the guard, which may replace the connection first.
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        thread_id = int(cursor.fetchone()[0])
    Item.objects.create(key=key, value=thread_id)
    return thread_id


def reader_connection_id() -> int:
    """Count the items through the ``reader`` alias; return the server's id of the
    connection that read them."""
    with connections["reader"].cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM testapp_item")
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


def write_item_in_process(key: str) -> tuple[int, int]:
    """``write_item`` for a process pool: ``(pid, connection id)``."""
    return os.getpid(), write_item(key)


class Writer:
    """A job that writes ``PREFIX0``, ``PREFIX1``, ... one item per call."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._numbers = itertools.count()

    def __call__(self) -> int:
        return write_item(f"{self.prefix}{next(self._numbers)}")

    def __repr__(self) -> str:
        return f"Writer({self.prefix!r})"
