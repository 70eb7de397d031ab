"""The guard's own cost per ``CursorWrapper.execute()``, without a driver or a server.

A stub driver cursor returns at once, so what is left is Django's wrapper and the
guard's hot path; run under callgrind by ``benchmarks/callgrind.py --wrapper``, which
subtracts plain Django. (The stub stands in for the driver only to take its network
time out of the count; the real-driver figures come from ``workload.py``.)

    python benchmarks/wrapper.py MODE N SQL     MODE: plain | app
"""

from __future__ import annotations

import gc
import select
import socket
import sys
import time


class StubCursor:
    """A driver cursor whose execute() does nothing."""

    def execute(self, sql: str, params: object = None) -> int:
        return 1


def main() -> None:
    mode, n, sql = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=["django_dbkeepalive"] if mode == "app" else [],
        DATABASES={"default": {"ENGINE": "django.db.backends.mysql", "NAME": "bench"}},
    )
    django.setup()
    from django.db import connections
    from django.db.backends.utils import CursorWrapper

    db = connections["default"]
    db.needs_rollback = False
    if mode == "app":
        # The state the guard gives a connection it guards, on a quiet socket: the hot
        # path of a statement right after another (the slow path is never due).
        from django_dbkeepalive.guard.connect import state_for

        quiet, _peer = socket.socketpair()
        poller = select.poll()
        poller.register(quiet.fileno(), select.POLLIN | select.POLLPRI)
        state = state_for(db)
        state.on = True
        state.due = time.monotonic() + 1e9
        state.poll = poller.poll
    cursor = CursorWrapper(StubCursor(), db)
    cursor.execute(sql)
    gc.collect()
    gc.disable()
    for _ in range(n):
        cursor.execute(sql)


if __name__ == "__main__":
    main()
