"""``BaseKeepaliveCommand``: a ``BaseCommand`` for long-running management commands."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand

from .fresh import Using, fresh_connection, refresh_connections

__all__ = ["BaseKeepaliveCommand"]


class _Terminated(BaseException):
    """SIGTERM arrived: unwinds the command like Ctrl-C, then the signal is re-sent."""


@contextlib.contextmanager
def _sigterm_ends_cleanly() -> Iterator[None]:
    """Let SIGTERM (systemd, Kubernetes, supervisors) end the command like Ctrl-C does:
    ``finally`` blocks run and connections close with ``COM_QUIT``; then the process
    dies of SIGTERM as it would have. Only in the main thread, and only when nobody
    installed a SIGTERM handler of their own."""
    term = getattr(signal, "SIGTERM", None)
    if (
        term is None
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(term) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    signal.signal(term, handler)
    try:
        yield
    except _Terminated:
        signal.signal(term, signal.SIG_DFL)
        os.kill(os.getpid(), term)
        raise  # only if the signal is blocked in this thread
    finally:
        if signal.getsignal(term) is handler:
            signal.signal(term, signal.SIG_DFL)


class BaseKeepaliveCommand(BaseCommand):
    """A management command whose connections survive pauses of any length.

    ``handle()`` runs inside :class:`~django_dbkeepalive.fresh_connection`; every
    connection is closed when the command ends (normally, on an exception, on Ctrl-C
    or on SIGTERM). Call ``self.keepalive()`` in loops: it costs no round trip and releases
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
        with _sigterm_ends_cleanly():
            try:
                with fresh_connection():
                    return super().execute(*args, **options)
            finally:
                # Also after an exception, Ctrl-C or SIGTERM: the server must not keep a
                # session for a command that has stopped. A connection inside the
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
