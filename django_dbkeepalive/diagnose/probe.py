"""The live idle-and-reconnect test of ``manage.py dbkeepalive --probe``.

Owns: :func:`run_probe`: a connection of its own idles past a SESSION ``wait_timeout``
of 1 s, then a query runs through the guard, and what happened is reported.
Must never import: :mod:`.gather`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .. import checks, guard
from ..signals import connection_recycled
from .report import PROBE_IDLE, PROBE_WAIT_TIMEOUT, ProbeResult

Progress = Callable[[str], None]


def _one(cursor: Any, sql: str) -> Any:
    cursor.execute(sql)
    row = cursor.fetchone()
    return None if row is None else row[-1]


def run_probe(
    alias: str,
    *,
    wait_timeout: int = PROBE_WAIT_TIMEOUT,
    idle: float = PROBE_IDLE,
    progress: Progress | None = None,
) -> ProbeResult:
    """A live test: idle past the server's wait_timeout, then query through the guard.

    Opens a new connection for ``alias`` (a separate ``DatabaseWrapper`` in this thread,
    so the thread's own connection is left alone, with the capped client timeouts of
    :func:`~django_dbkeepalive.checks.diagnostic_connection`), sets its SESSION ``wait_timeout``
    to ``wait_timeout`` seconds, sleeps ``idle`` seconds so the server closes it, runs
    ``SELECT 1`` and reports what the guard did (``connection_recycled`` reasons), how
    long that query took, and the connection ids and server connection counts around it.
    """
    reasons: list[str] = []
    me = threading.get_ident()

    def on_recycled(sender: str, reason: str, **kwargs: Any) -> None:
        if sender == alias and threading.get_ident() == me:
            reasons.append(reason)

    cfg = checks.alias_settings(alias)
    installed = guard.is_installed()
    forced = installed and cfg is not None and not cfg.auto_guard
    result = ProbeResult(True, "failed", "", forced_guard=forced, session_wait_timeout=wait_timeout)
    with checks.diagnostic_connection(alias) as db:
        _probe(db, alias, result, reasons, on_recycled, wait_timeout, idle, progress)
    result.reasons = list(reasons)
    return result


def _probe(
    db: Any,
    alias: str,
    result: ProbeResult,
    reasons: list[str],
    on_recycled: Callable[..., None],
    wait_timeout: int,
    idle: float,
    progress: Progress | None,
) -> None:
    installed = guard.is_installed()
    forced = result.forced_guard
    connection_recycled.connect(on_recycled, weak=False)
    try:
        db.ensure_connection()
        if forced:
            guard.enable(db)
        with db.cursor() as cursor:
            result.connection_id_before = int(_one(cursor, "SELECT CONNECTION_ID()"))
            result.server_connections_before = int(
                _one(cursor, "SHOW GLOBAL STATUS LIKE 'Connections'")
            )
            cursor.execute(f"SET SESSION wait_timeout = {int(wait_timeout)}")
        started = time.monotonic()
        if progress:
            progress(
                f"probe {alias!r}: connection {result.connection_id_before} idle for "
                f"{idle:g} s past its session wait_timeout of {wait_timeout} s "
            )
        step = 0.5
        while (left := idle - (time.monotonic() - started)) > 0:
            time.sleep(min(step, left))
            if progress:
                progress(".")
        result.idle_seconds = round(time.monotonic() - started, 3)
        if progress:
            progress(" querying\n")
        t0 = time.monotonic()
        try:
            with db.cursor() as cursor:
                value = _one(cursor, "SELECT 1")
                result.query_seconds = round(time.monotonic() - t0, 4)
                result.connection_id_after = int(_one(cursor, "SELECT CONNECTION_ID()"))
                result.server_connections_after = int(
                    _one(cursor, "SHOW GLOBAL STATUS LIKE 'Connections'")
                )
        except Exception as exc:
            result.query_seconds = round(time.monotonic() - t0, 4)
            result.error = checks.error_text(alias, exc)
            result.outcome = "failed"
            result.detail = (
                f"the query after the idle period failed ({result.error}); the guard did not "
                "recover the connection"
                + (
                    ""
                    if installed
                    else " (the guard is not installed: add 'django_dbkeepalive' to INSTALLED_APPS)"
                )
                + "."
            )
            return
        result.reasons = list(reasons)
        if int(value) != 1:  # pragma: no cover - a server that cannot add
            result.detail = f"SELECT 1 returned {value!r}"
            return
        if result.connection_id_after != result.connection_id_before:
            result.outcome, result.recovered = "recovered", True
            why = ", ".join(reasons) or "no signal"
            result.detail = (
                f"the server closed connection {result.connection_id_before} after "
                f"{wait_timeout} s idle; the guard replaced it ({why}) and the query ran on "
                f"connection {result.connection_id_after} in {result.query_seconds * 1000:.1f} ms"
            )
        else:
            result.outcome, result.recovered = "not_closed", True
            result.detail = (
                f"connection {result.connection_id_before} was still open after "
                f"{result.idle_seconds:g} s idle with wait_timeout {wait_timeout} s (a proxy "
                "between the application and the server?); nothing to recover"
            )
        return
    except Exception as exc:
        result.error = checks.error_text(alias, exc)
        result.detail = f"the probe could not run: {result.error}"
        return
    finally:
        connection_recycled.disconnect(on_recycled)
        if forced:
            guard.disable(db)
        result.reasons = list(reasons)
