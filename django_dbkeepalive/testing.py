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
``ConnectionLostInTransaction`` instead; ``kill_connection()`` there also breaks the
later tests of a ``TestCase`` class, and warns (:class:`TransactionLostWarning`).

Every helper needs ``"django_dbkeepalive"`` in ``INSTALLED_APPS`` (it raises
``ImproperlyConfigured`` before doing anything otherwise).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import warnings
from collections.abc import Collection, Iterable, Iterator
from typing import Any, NamedTuple

from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from . import guard
from .fresh import _aliases
from .signals import REASONS, connection_recycled

__all__ = [
    "ExpireInTransactionWarning",
    "Recycle",
    "RecycleLog",
    "TestingWarning",
    "TransactionLostWarning",
    "assert_recycles",
    "expire_connection",
    "kill_connection",
    "record_recycles",
]

#: How long :func:`kill_connection` waits for the client's socket to show the KILL.
KILL_TIMEOUT = 5.0


class TestingWarning(UserWarning):
    """Base class of the warnings of :mod:`django_dbkeepalive.testing`."""


class TransactionLostWarning(TestingWarning):
    """:func:`kill_connection` was called inside a transaction: the transaction is lost
    (and in a ``TestCase``, so is the class-level one the later tests rely on)."""


class ExpireInTransactionWarning(TestingWarning):
    """:func:`expire_connection` was called inside a transaction, where a connection
    idle past its limit but within the server's ``wait_timeout`` changes nothing."""


def _require_guard(helper: str) -> None:
    """Raise before doing anything when the guard is not installed in this process."""
    from django.apps import apps

    if not apps.is_installed("django_dbkeepalive"):
        why = "'django_dbkeepalive' is not in INSTALLED_APPS"
    elif not guard.is_installed():
        why = "the guard was removed from this process (guard.uninstall())"
    else:
        return
    raise ImproperlyConfigured(
        f"django-dbkeepalive: {helper}() needs the connection guard, but {why}. Add "
        "'django_dbkeepalive' to INSTALLED_APPS in the settings your tests run with."
    )


# ------------------------------------------------------------------------ recycles


class Recycle(NamedTuple):
    """One ``connection_recycled`` signal: the alias, the reason and the idle seconds."""

    alias: str
    reason: str
    idle: float


class RecycleLog(list[Recycle]):
    """The recycles seen so far (a list of :class:`Recycle`, in the order they were sent,
    from every thread)."""

    def __init__(self, recycles: Iterable[Recycle] = ()) -> None:
        super().__init__(recycles)
        # The recycles of the aliases a `using` filter left out (for messages only).
        self._left_out: list[Recycle] = []

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
    block runs, from every thread. An unknown alias raises ``ConnectionDoesNotExist``.

    Example::

        with record_recycles("default") as log:
            run_job()
        assert log.reasons == ["idle"]
    """
    _require_guard("record_recycles")
    aliases = _alias_set(using)
    log = RecycleLog()
    lock = threading.Lock()

    def receiver(sender: Any, reason: str, idle: float, **kwargs: Any) -> None:
        recycle = Recycle(str(sender), reason, float(idle))
        with lock:
            if aliases is None or sender in aliases:
                log.append(recycle)
            else:
                log._left_out.append(recycle)

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
    one of; each must be one of :data:`django_dbkeepalive.signals.REASONS` (a bare
    string is refused: write ``["idle"]``). ``using``: count only these aliases (an
    unknown alias raises ``ConnectionDoesNotExist``). Nothing is asserted when the block
    raises. Yields the :class:`RecycleLog`.

    Example::

        with assert_recycles(1, reasons=["idle"], using="default"):
            Item.objects.count()
        with assert_recycles(0):  # the hot path: nothing recycled
            Item.objects.count()
    """
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
        raise TypeError(f"django-dbkeepalive: count must be an int or None, not {count!r}")
    if count is not None and count < 0:
        raise ValueError(f"django-dbkeepalive: count must be 0 or more, not {count}")
    _require_guard("assert_recycles")
    expected = _checked_reasons(reasons)
    with record_recycles(using) as log:
        yield log
    seen = _listed(log) or "none"
    where = "" if using is None else f" of {sorted(_alias_set(using) or ())}"
    if log._left_out:
        seen += f" (not counted, other aliases: {_listed(log._left_out)})"
    if count is not None:
        assert len(log) == count, f"expected {count} recycle(s){where}, saw {len(log)}: {seen}"
    elif expected is None:
        assert log, f"expected at least one recycle{where}, saw {seen}"
    if isinstance(expected, frozenset):
        odd = [r for r in log.reasons if r not in expected]
        assert not odd, f"expected only reasons {sorted(expected)}{where}, saw {seen}"
    elif expected is not None:
        assert log.reasons == expected, f"expected recycles {expected}{where}, saw {seen}"


def _checked_reasons(reasons: Collection[str] | None) -> list[str] | frozenset[str] | None:
    """``reasons`` as a list (in order) or a frozenset (any order), validated."""
    if reasons is None:
        return None
    if isinstance(reasons, (str, bytes)):
        raise TypeError(
            f"django-dbkeepalive: reasons must be a list (compared in order) or a set of "
            f"reasons, not the string {reasons!r}: write reasons=[{reasons!r}]."
        )
    checked = frozenset(reasons) if isinstance(reasons, (set, frozenset)) else list(reasons)
    unknown = [r for r in checked if r not in REASONS]
    if unknown:
        raise ValueError(
            f"django-dbkeepalive: unknown recycle reason(s) {', '.join(map(repr, unknown))}; "
            f"the reasons are {', '.join(map(repr, REASONS))}."
        )
    return checked


def _listed(recycles: Iterable[Recycle]) -> str:
    return ", ".join(f"{r.alias}:{r.reason} (idle {r.idle:.1f}s)" for r in recycles)


def _alias_set(using: str | Collection[str] | None) -> set[str] | None:
    """The aliases of ``using`` (None: all); an unknown one raises ConnectionDoesNotExist."""
    if using is None:
        return None
    return set(_aliases(using))


# -------------------------------------------------------------------- kill, expire


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
    _wait_readable(db, conn, victim)
    if db.connection is conn:
        if notice:
            guard.notice_at_next_statement(db)
        else:
            guard.unwatch_until_reconnect(db)
    return victim


def _wait_readable(db: Any, conn: Any, victim: int) -> None:
    fd = guard.driver_of(db).fileno(conn)
    if fd is None or fd < 0:
        return  # the driver already closed its socket: nothing to wait for
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
    assert limit is not None
    idle = float(limit) + 0.05 if idle is None else float(idle)
    if wait is None:
        wait = float("inf")
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
    if not hasattr(socket, "TCP_INFO"):
        return "is on a platform without TCP_INFO (Linux only)"
    return "has no TCP socket the kernel reports on"
