"""``BaseKeepaliveCommand``: a ``BaseCommand`` for long-running management commands."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from .fresh import Using, fresh_connection, refresh_connections

__all__ = ["BaseKeepaliveCommand"]


class BaseKeepaliveCommand(BaseCommand):
    """A management command whose connections survive pauses of any length.

    ``handle()`` runs inside :class:`~django_dbkeepalive.fresh_connection`; every
    connection is closed when the command ends (normally, on an exception or on
    Ctrl-C). Call ``self.keepalive()`` in loops: it costs no round trip and releases
    connections that are idle past their limit, dead or obsolete. The command's
    arguments and options are its own: nothing is added to them.

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
            # Also after an exception or Ctrl-C (KeyboardInterrupt): the server must not
            # keep a session for a command that has stopped. A connection inside the
            # caller's atomic block (call_command() in a transaction) is left alone.
            refresh_connections(close=True)

    def keepalive(self, using: Using = None) -> None:
        """Release idle, dead or obsolete connections; the next query reconnects.

        Example::

            for url in urls:
                self.keepalive()  # no round trip unless the connection idled
                Page.objects.create(url=url, body=fetch(url))
        """
        refresh_connections(using)
