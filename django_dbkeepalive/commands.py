"""``BaseKeepaliveCommand``: a ``BaseCommand`` for long-running management commands."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import connections

from .fresh import Using, fresh_connection, refresh_connections

__all__ = ["BaseKeepaliveCommand"]


class BaseKeepaliveCommand(BaseCommand):
    """A management command whose connections survive pauses of any length.

    ``handle()`` runs inside :class:`~django_dbkeepalive.fresh_connection`; every
    connection is closed when the command ends (normally, on an exception or on
    Ctrl-C). Call ``self.keepalive()`` in loops: it costs no round trip and releases
    connections that are idle past their limit, dead or obsolete.

    Example::

        from django_dbkeepalive import BaseKeepaliveCommand

        class Command(BaseKeepaliveCommand):
            def handle(self, *args, **options):
                while True:
                    self.keepalive()
                    for page in crawl():  # minutes between writes
                        Page.objects.create(url=page.url)
    """

    def execute(self, *args: Any, **options: Any) -> str | None:
        try:
            with fresh_connection():
                return super().execute(*args, **options)
        finally:
            for db in connections.all(initialized_only=True):
                from . import guard

                guard.close_connection(db)

    def keepalive(self, using: Using = None) -> None:
        """Release idle, dead or obsolete connections; the next query reconnects."""
        refresh_connections(using)
