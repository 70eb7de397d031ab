"""Making production's connection faults happen in tests: a real ``KILL``, and a
connection that looks idle past its limit without sleeping.

Owns: :func:`kill_connection` and :func:`expire_connection`, through the guard's small
API (never its private fields).
Must never import: anything but the guard's API and :mod:`.recycles`.
"""

from __future__ import annotations

import select
import socket
import warnings
from typing import Any

from django.db import connections

from .. import guard
from ..fresh import _aliases
from .recycles import ExpireInTransactionWarning, TransactionLostWarning, _require_guard

#: How long :func:`kill_connection` waits for the client's socket to show the KILL.
KILL_TIMEOUT = 5.0


def _mysql_wrapper(using: str, helper: str) -> Any:
    """This thread's wrapper of ``using``, once the alias, the guard and the vendor are
    known to be fine (nothing is done before that)."""
    if not isinstance(using, str):
        raise TypeError(f"django-dbkeepalive: {helper}() takes one alias, not {using!r}")
    [alias] = _aliases(using)
    _require_guard(helper)
    db = connections[alias]
    if db.vendor != "mysql":
        raise ValueError(
            f"django-dbkeepalive: the {using!r} connection is {db.vendor}; "
            "kill_connection() and expire_connection() support MySQL and MariaDB only."
        )
    return db


def _in_testcase_transaction(db: Any) -> bool:
    """Whether ``db`` is inside the transaction of a ``django.test.TestCase`` (or
    pytest-django's ``db`` fixture, which uses one)."""
    return any(getattr(block, "_from_testcase", False) for block in db.atomic_blocks)


def _warn_lost_transaction(db: Any) -> None:
    if _in_testcase_transaction(db):
        where = (
            "inside the transaction that wraps this test (django.test.TestCase, or "
            "pytest-django's `db` fixture)"
        )
        later = (
            " The later tests of a TestCase class fail too, with the same error: the "
            "class-level transaction they run in was on this connection."
        )
    else:
        where = "inside a transaction"
        later = ""
    warnings.warn(
        f"django-dbkeepalive: kill_connection() {where}: the transaction is lost (the "
        f"server rolled it back), and the next statement on {db.alias!r} before the "
        f"transaction ends raises ConnectionLostInTransaction.{later} To test code that "
        "survives a lost connection, use a transactional test (TransactionTestCase, "
        "pytest-django's transactional_db or @pytest.mark.django_db(transaction=True)).",
        TransactionLostWarning,
        stacklevel=3,
    )


def _thread_id(db: Any, conn: Any) -> int:
    found = guard.driver_of(db).thread_id(conn)  # each driver names it differently
    if found is None:  # pragma: no cover - every MySQL driver says it for an open connection
        raise RuntimeError(
            f"django-dbkeepalive: the {db.alias!r} connection's driver does not say its "
            "server thread id: kill_connection() cannot KILL it"
        )
    return int(found)


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
    transaction it raises ``ConnectionLostInTransaction``). That needs the guard on for
    the connection: with ``AUTO_GUARD`` off, only inside a guarded scope
    (``fresh_connection``, ``keepalive_job``, the middleware, a Celery task), whose
    start notices the KILL in any case. ``notice=False``: the next statement is sent on
    the dead connection, as when the KILL arrives while the statement is already on its
    way: a read is re-run on a new connection, a write fails with the driver's error
    2013 (it may have been applied, so it is never re-run).

    Inside a transaction it warns (:class:`TransactionLostWarning`): the transaction is
    lost, and in a ``TestCase`` so is the class-level transaction of the later tests.

    Example::

        Item.objects.create(key="a")
        kill_connection()
        Item.objects.create(key="b")  # works: the guard reconnected first
    """
    db = _mysql_wrapper(using, "kill_connection")
    db.ensure_connection()
    if guard.in_transaction(db):
        _warn_lost_transaction(db)
    conn = db.connection
    victim = _thread_id(db, conn)
    killer = db.get_new_connection(db.get_connection_params())
    try:
        cursor = killer.cursor()
        try:
            cursor.execute(f"KILL {victim:d}")
        finally:
            cursor.close()
    finally:
        killer.close()
    _wait_readable(db, conn, victim)
    if notice:
        guard.notice_at_next_statement(db)
    else:
        guard.unwatch_until_reconnect(db)
    return victim


def _wait_readable(db: Any, conn: Any, victim: int) -> None:
    fd = guard.driver_of(db).fileno(conn)
    if fd is None or fd < 0:  # pragma: no cover - Connector/Python's C extension
        return  # no socket object to wait on (or the driver already closed it)
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    if not poller.poll(KILL_TIMEOUT * 1000):
        raise AssertionError(
            f"django-dbkeepalive: the server did not close connection {victim} within "
            f"{KILL_TIMEOUT:g}s of KILL {victim}"
        )


def expire_connection(using: str = "default", *, idle: float | None = None) -> float:
    """Make this thread's connection of ``using`` look idle past its limit, without
    sleeping. Returns the idle time it now appears to have.

    The next statement takes the guard's recycle path exactly as after a real pause: the
    connection is closed and replaced (``connection_recycled`` with reason ``"idle"``),
    and the statement runs on the new one. With ``AUTO_GUARD`` off that happens at the
    start of the next guarded scope (``fresh_connection``, ``keepalive_job``...), not on
    a statement outside one.

    Inside a transaction, below the server's ``wait_timeout``, the guard goes on with the
    live session: nothing visible happens, and it warns
    (:class:`ExpireInTransactionWarning`). ``idle``: the idle time to simulate instead,
    in seconds (default: just past the limit, which is read from the server first if the
    guard has not done so yet). Past the server's ``wait_timeout`` a transaction counts
    as lost: ``ConnectionLostInTransaction``. Opens the connection first if there is none.

    Raises ``RuntimeError`` over a Unix socket: there the guard pings a connection idle
    past its limit instead of recycling it (nothing drops a local socket silently), in
    tests as in production, so there is nothing to expire. It moves the guard's private
    bookkeeping, so use it with the django-dbkeepalive version it came with.

    Example::

        Item.objects.count()
        expire_connection()
        with assert_recycles(1, reasons=["idle"]):
            Item.objects.count()
    """
    db = _mysql_wrapper(using, "expire_connection")
    db.ensure_connection()
    try:
        limit, wait = guard.idle_limits(db)
    except LookupError:
        raise RuntimeError(
            f"django-dbkeepalive: the {using!r} connection is not known to the guard "
            "(it was opened while the guard was not installed)."
        ) from None
    if guard.socket_family(db) not in (socket.AF_INET, socket.AF_INET6):
        raise RuntimeError(
            f"django-dbkeepalive: expire_connection() needs a TCP connection, but the "
            f"{using!r} connection {_not_tcp(db)}. There the guard pings a connection "
            "idle past its limit instead of closing it (in production too), so there is "
            "nothing to expire. Connect the tests over TCP (HOST '127.0.0.1'), or use "
            "kill_connection() to test a lost connection."
        )
    assert limit is not None and wait is not None  # known together (wait inf: unreadable)
    idle = float(limit) + 0.05 if idle is None else float(idle)
    if guard.in_transaction(db) and limit < idle < wait:
        warnings.warn(
            f"django-dbkeepalive: expire_connection() inside a transaction: the {using!r} "
            f"connection now looks idle {idle:.1f}s, past its limit but within the "
            "server's wait_timeout, where the guard goes on with the live session "
            "(it never reconnects inside a transaction), so nothing visible happens. "
            f"Pass idle= a value past wait_timeout ({wait:g}s) to simulate a lost "
            "transaction, or call it outside the transaction to see a recycle.",
            ExpireInTransactionWarning,
            stacklevel=2,
        )
    guard.pretend_idle(db, idle)
    return idle


def _not_tcp(db: Any) -> str:
    """How ``db``'s connection is not a TCP one the kernel reports on."""
    if guard.socket_family(db) == socket.AF_UNIX:
        return "is over a Unix socket"
    if hasattr(socket, "TCP_INFO"):  # pragma: no cover - Connector/Python's C extension
        return "has no TCP socket the kernel reports on"  # (it has no socket object)
    return "is on a platform without TCP_INFO (Linux only)"  # pragma: no cover - not Linux
