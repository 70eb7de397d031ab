"""Test helpers: make production's connection faults happen in milliseconds.

Against a real MySQL or MariaDB server (the one your tests already use), with either
driver::

    from django_dbkeepalive.testing import assert_recycles, expire_connection, kill_connection

    def test_the_import_survives_a_killed_connection(transactional_db):
        import_batch(1)
        kill_connection()  # a real KILL, as an administrator or a failover would
        with assert_recycles(1, reasons=["disconnected"]):
            import_batch(2)  # reconnects before its first statement

    def test_the_job_survives_wait_timeout(transactional_db):
        run_job()
        expire_connection()  # as if idle past its limit, without sleeping
        with assert_recycles(reasons=["idle"]):
            run_job()

The pytest plugin (:mod:`django_dbkeepalive.pytest_plugin`) exposes them as fixtures:
``kill_connection``, ``expire_connection`` and ``recycles``.

Use ``transactional_db`` (or ``@pytest.mark.django_db(transaction=True)``,
``TransactionTestCase``): with ``db`` / ``TestCase`` every test runs inside a transaction,
where the guard never reconnects and a lost connection raises
``ConnectionLostInTransaction`` instead.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Collection, Iterator
from typing import Any, NamedTuple

from django.db import connections

from . import guard
from .signals import connection_recycled

__all__ = [
    "Recycle",
    "RecycleLog",
    "assert_recycles",
    "expire_connection",
    "kill_connection",
    "record_recycles",
]

#: How long :func:`kill_connection` waits for the client's socket to show the KILL.
KILL_TIMEOUT = 5.0


# ------------------------------------------------------------------------ recycles


class Recycle(NamedTuple):
    """One ``connection_recycled`` signal: the alias, the reason and the idle seconds."""

    alias: str
    reason: str
    idle: float


class RecycleLog(list[Recycle]):
    """The recycles seen so far (a list of :class:`Recycle`, in the order they were sent,
    from every thread)."""

    @property
    def reasons(self) -> list[str]:
        """The reasons, in order: ``["idle", "disconnected"]``."""
        return [r.reason for r in self]

    def of(self, alias: str) -> RecycleLog:
        """Only the recycles of ``alias``."""
        return RecycleLog(r for r in self if r.alias == alias)


@contextlib.contextmanager
def record_recycles(using: str | Collection[str] | None = None) -> Iterator[RecycleLog]:
    """Collect the guard's recycles (of ``using``: an alias, several, or all) while the
    block runs, from every thread.

    Example::

        with record_recycles("default") as log:
            run_job()
        assert log.reasons == ["idle"]
    """
    aliases = _alias_set(using)
    log = RecycleLog()
    lock = threading.Lock()

    def receiver(sender: Any, reason: str, idle: float, **kwargs: Any) -> None:
        if aliases is None or sender in aliases:
            with lock:
                log.append(Recycle(str(sender), reason, float(idle)))

    connection_recycled.connect(receiver, weak=False, dispatch_uid=("dbkeepalive", id(log)))
    try:
        yield log
    finally:
        connection_recycled.disconnect(dispatch_uid=("dbkeepalive", id(log)))


@contextlib.contextmanager
def assert_recycles(
    count: int | None = None,
    reasons: Collection[str] | None = None,
    using: str | Collection[str] | None = None,
) -> Iterator[RecycleLog]:
    """Assert what the guard recycled while the block ran.

    ``count``: how many recycles (``None``: at least one when ``reasons`` is also
    ``None``, otherwise not checked). ``reasons``: a list, compared in order with the
    reasons seen (``["disconnected", "idle"]``), or a set, that every recycle's reason is
    one of. ``using``: count only these aliases. Nothing is asserted when the block
    raises. Yields the :class:`RecycleLog`.

    Example::

        with assert_recycles(1, reasons=["idle"], using="default"):
            Item.objects.count()
        with assert_recycles(0):  # the hot path: nothing recycled
            Item.objects.count()
    """
    with record_recycles(using) as log:
        yield log
    seen = ", ".join(f"{r.alias}:{r.reason} (idle {r.idle:.1f}s)" for r in log) or "none"
    where = "" if using is None else f" of {sorted(_alias_set(using) or ())}"
    if count is not None:
        assert len(log) == count, f"expected {count} recycle(s){where}, saw {len(log)}: {seen}"
    elif reasons is None:
        assert log, f"expected at least one recycle{where}, saw none"
    if reasons is not None:
        if isinstance(reasons, (set, frozenset)):
            odd = [r for r in log.reasons if r not in reasons]
            assert not odd, f"expected only reasons {sorted(reasons)}{where}, saw {seen}"
        else:
            assert log.reasons == list(reasons), (
                f"expected recycles {list(reasons)}{where}, saw {seen}"
            )


def _alias_set(using: str | Collection[str] | None) -> set[str] | None:
    if using is None:
        return None
    return {using} if isinstance(using, str) else set(using)


# -------------------------------------------------------------------- kill, expire


def _mysql_wrapper(using: str) -> Any:
    db = connections[using]
    if db.vendor != "mysql":
        raise ValueError(
            f"django-dbkeepalive: the {using!r} connection is {db.vendor}; "
            "kill_connection() and expire_connection() support MySQL and MariaDB only."
        )
    return db


def _thread_id(conn: Any) -> int:
    return int(conn.thread_id())  # both mysqlclient and PyMySQL


def kill_connection(using: str = "default", *, notice: bool = True) -> int:
    """KILL this thread's connection of ``using`` on the server, as an administrator, a
    failover or a server restart would. Returns the killed connection's id.

    Opens the connection first if there is none. The ``KILL`` is sent through a second,
    short-lived connection made with the alias's own settings (a user may always kill
    its own connections), then this waits until the connection's socket shows that the
    server closed it (at most :data:`KILL_TIMEOUT` seconds).

    ``notice=True`` (default): the guard looks at the connection before its next statement,
    as after any pause longer than ``PEEK_AFTER``, so the next statement runs on a new
    connection (a read, a write, ``transaction.atomic()``: all succeed; inside a
    transaction it raises ``ConnectionLostInTransaction``). ``notice=False``: the next
    statement is sent on the dead connection, as when the KILL lands right after the
    previous statement: a read is re-run on a new connection, a write fails with the
    driver's error 2013 (it may have been applied, so it is never re-run).

    Example::

        Item.objects.create(key="a")
        kill_connection()
        Item.objects.create(key="b")  # works: the guard reconnected first
    """
    db = _mysql_wrapper(using)
    db.ensure_connection()
    conn = db.connection
    victim = _thread_id(conn)
    killer = db.get_new_connection(db.get_connection_params())
    try:
        cursor = killer.cursor()
        try:
            cursor.execute(f"KILL {victim:d}")
        finally:
            cursor.close()
    finally:
        killer.close()
    _wait_readable(conn, victim)
    if notice and db.connection is conn and guard._guarded(db):
        db._dbk_due = -guard.INF  # PRIVATE: the next statement takes the slow path
    return victim


def _wait_readable(conn: Any, victim: int) -> None:
    fd = guard._fileno(conn)
    if fd is None or fd < 0:
        return  # the driver already closed its socket: nothing to wait for
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    if not poller.poll(KILL_TIMEOUT * 1000):
        raise AssertionError(
            f"django-dbkeepalive: the server did not close connection {victim} within "
            f"{KILL_TIMEOUT:g}s of KILL {victim}"
        )


# PRIVATE: the guard's idle bookkeeping is internal to it. expire_connection() moves it
# through this one helper, so a change there breaks only this function (the test suite
# covers it). The kernel's own count of how long the server has been silent (TCP_INFO,
# which the guard trusts over its own clock) is shifted by the same amount for the
# connection's next check only.
# id(wrapper) -> (driver connection, the _dbk_last set, seconds)
_shifts: dict[int, tuple[Any, float, float]] = {}
_shift_lock = threading.Lock()
_real_kernel_idle = guard._kernel_idle


def _shifted_kernel_idle(db: Any) -> float | None:
    real = _real_kernel_idle(db)
    with _shift_lock:
        shift = _shifts.pop(id(db), None)
    if real is None or shift is None:
        return real
    conn, last, seconds = shift
    if conn is not db.connection or last != db._dbk_last:
        return real  # a check has run since (or a new connection): the shift is spent
    return real + seconds


def _shift_idle(db: Any, seconds: float) -> None:
    """As far as the guard can tell, ``db``'s connection has been idle ``seconds`` longer."""
    global _real_kernel_idle
    with _shift_lock:
        if guard._kernel_idle is not _shifted_kernel_idle:
            _real_kernel_idle = guard._kernel_idle
            guard._kernel_idle = _shifted_kernel_idle
        db._dbk_last = time.monotonic() - seconds
        _shifts[id(db)] = (db.connection, db._dbk_last, seconds)
    cfg = db._dbk_cfg
    if guard._guarded(db) and cfg is not None:
        db._dbk_due = db._dbk_last + cfg.peek_after


def expire_connection(using: str = "default", *, idle: float | None = None) -> float:
    """Make this thread's connection of ``using`` look idle past its limit, without
    sleeping. Returns the idle time it now appears to have.

    The next statement takes the guard's recycle path exactly as after a real pause: the
    connection is closed and replaced (``connection_recycled`` with reason ``"idle"``),
    and the statement runs on the new one; inside a transaction the guard goes on (the
    session is alive), as it does when the idle time is still below ``wait_timeout``.

    ``idle``: the idle time to simulate instead, in seconds (default: just past the
    limit, which is read from the server first if the guard has not done so yet). Past
    the server's ``wait_timeout`` a transaction counts as lost:
    ``ConnectionLostInTransaction``. Opens the connection first if there is none.

    Limitations: TCP connections only (over a Unix socket the guard pings instead of
    recycling, in tests as in production); it moves the guard's private bookkeeping, so
    use it with the django-dbkeepalive version it came with.

    Example::

        Item.objects.count()
        expire_connection()
        with assert_recycles(1, reasons=["idle"]):
            Item.objects.count()
    """
    db = _mysql_wrapper(using)
    db.ensure_connection()
    if db.connection is not db._dbk_conn or db._dbk_cfg is None:
        raise RuntimeError(
            f"django-dbkeepalive: the {using!r} connection is not known to the guard; "
            "is 'django_dbkeepalive' in INSTALLED_APPS?"
        )
    if idle is None:
        if db._dbk_limit is None:
            db._dbk_wait = guard._read_wait_timeout(db.connection)
            db._dbk_limit = guard._limit_for(db._dbk_wait, db._dbk_cfg)
        idle = float(db._dbk_limit) + 0.05
    _shift_idle(db, float(idle))
    return float(idle)
