"""``fresh_connection`` and ``keepalive_job``: connection hygiene around a unit of work."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar, overload

from asgiref.sync import sync_to_async
from django.db import connections
from django.utils.connection import ConnectionDoesNotExist

from . import guard

F = TypeVar("F", bound=Callable[..., Any])

Using = str | Iterable[str] | None

__all__ = ["fresh_connection", "keepalive_job", "refresh_connections"]


def _aliases(using: Using) -> list[str]:
    configured = list(connections.settings)
    if using is None:
        return configured
    wanted = [using] if isinstance(using, str) else list(using)
    for alias in wanted:
        if not isinstance(alias, str) or alias not in configured:
            raise ConnectionDoesNotExist(
                f"django-dbkeepalive: {alias!r} is not a database alias. Configured "
                f"aliases: {', '.join(configured) or '(none)'}. Pass one of them (or a "
                "list of them, or None for all) as `using`."
            )
    return wanted


def refresh_connections(using: Using = None, *, close: bool = False) -> None:
    """The guard's checks between two statements, as a function call.

    For each alias (in this thread): a connection idle past its limit, closed by the
    server, unusable after errors, left in a manual transaction, or older than a
    positive ``CONN_MAX_AGE`` is closed, so the next query reconnects. A healthy
    connection is kept (also with ``CONN_MAX_AGE = 0``: this is not the end of a unit
    of work). ``close=True`` closes every connection. A connection inside a
    transaction (an atomic block, or autocommit off) is never touched. Costs no round
    trip unless a ping is due.

    Example::

        for batch in batches:
            refresh_connections()  # cheap: no round trip unless idle for a while
            process(batch)
    """
    _refresh(_aliases(using), close=close, end=False)


def _refresh(aliases: Iterable[str], *, close: bool, end: bool) -> None:
    """``end``: the end of a unit of work, where ``close_old_connections()`` applies
    (``CONN_MAX_AGE = 0`` releases the connection, ``CONN_HEALTH_CHECKS`` re-arms)."""
    wanted = set(aliases)
    for db in connections.all(initialized_only=True):
        if db.alias not in wanted or db.connection is None or db.in_atomic_block:
            continue
        if close:
            guard.close_connection(db)
        elif not end:
            if db.get_autocommit():  # else a transaction run by hand is still going on
                _tidy(db)
        else:
            guard.check_idle(db)  # dead, idle past the limit, CONN_MAX_AGE > 0 reached
            if db.connection is None:
                continue
            errors = db.errors_occurred
            # A manual transaction left behind is closed (rolled back) as _tidy() does:
            # not a recycle of the connection, whatever its age or errors.
            manual = db.get_autocommit() != db.settings_dict["AUTOCOMMIT"]
            db.close_if_unusable_or_obsolete()
            # CONN_MAX_AGE = 0 closes at the end of every unit of work: Django's routine,
            # not a recycle worth a signal.
            max_age = db.settings_dict.get("CONN_MAX_AGE")
            if db.connection is None and not manual and (errors or max_age):
                guard.notify_closed(db, "ping_failed" if errors else "max_age")


def _tidy(db: Any, *, next_unit: bool = False) -> None:
    """Close ``db``'s connection if it must not be used on, without a round trip on a
    healthy one: dead, idle past its limit or older than a positive ``CONN_MAX_AGE``
    (the guard's checks), left with the wrong autocommit mode, or broken by errors.

    Django's ``close_if_unusable_or_obsolete()`` without its rule that ``CONN_MAX_AGE =
    0`` closes at once (for Django, "at the end of the request"). ``next_unit``: another
    unit of work (a Celery task) starts next, so ``CONN_HEALTH_CHECKS`` re-arms."""
    if db.connection is None or db.in_atomic_block:
        return
    guard.check_idle(db)
    if db.connection is None:
        return
    if next_unit:
        db.health_check_done = False
    if db.get_autocommit() != db.settings_dict["AUTOCOMMIT"]:
        # A manual transaction left behind: never hand it to the next unit of work.
        guard.close_connection(db)
        return
    if db.errors_occurred:
        if db.is_usable():
            db.errors_occurred = False
        else:
            guard.close_connection(db)
            guard.notify_closed(db, "ping_failed")


def _start_scope(aliases: Iterable[str]) -> list[Any]:
    """Guard this thread's connections of ``aliases`` (also with ``AUTO_GUARD = False``)
    and start counting their idle periods past the limit, for a request or a task;
    returns the wrappers for :func:`_end_scope`."""
    wrappers = [connections[alias] for alias in aliases]
    for db in wrappers:
        guard.take_idle_report(db)  # an idle period before the scope is not its own
        guard.enable(db)
    return wrappers


def _end_scope(wrappers: list[Any]) -> list[str]:
    """End :func:`_start_scope`; returns ``"'alias' idle 3.5s (limit 1.0s)"`` for each
    connection that sat idle past its limit during the scope."""
    over = []
    for db in wrappers:
        try:
            report = guard.take_idle_report(db)
        finally:
            guard.disable(db)
        if report is not None:
            idle, limit = report
            # An infinite limit: the server closed it before the guard learned the limit.
            limit_text = f"limit {limit:.1f}s" if math.isfinite(limit) else "limit unknown"
            over.append(f"{db.alias!r} idle {idle:.1f}s ({limit_text})")
    return over


def _enter(aliases: list[str]) -> None:
    """Start a unit of work: check this thread's connections of ``aliases`` and guard
    them (also with ``AUTO_GUARD = False``) until :func:`_exit`."""
    _refresh(aliases, close=False, end=False)
    for alias in aliases:
        guard.enable(connections[alias])


def _exit(aliases: list[str], *, close: bool) -> None:
    """End a unit of work started by :func:`_enter` (in the same thread: the same
    wrappers, since Django's connections are per thread and per async context)."""
    for alias in aliases:
        guard.disable(connections[alias])
    _refresh(aliases, close=close, end=True)


class fresh_connection:
    """Context manager and decorator that hands out healthy connections.

    On entry, a connection that is dead, idle past its limit, broken by errors or
    older than ``CONN_MAX_AGE`` is closed so the next query reconnects; inside, every
    statement is guarded (also with ``AUTO_GUARD = False``); on exit it also does what
    ``close_old_connections()`` does (``CONN_MAX_AGE = 0`` releases the connection).
    ``using`` is an alias, a list of aliases, or ``None`` for all. ``close=True``
    closes the connections on exit. Inside an atomic block it never closes anything.
    Works on sync and ``async def`` functions, and as ``async with``.

    Example::

        from django_dbkeepalive import fresh_connection

        with fresh_connection():
            report = build_report()  # minutes of work without the database
            Report.objects.create(data=report)

        @fresh_connection(using="default", close=True)
        def nightly_job(): ...
    """

    @overload
    def __new__(cls, using: F, *, close: bool = False) -> F: ...  # type: ignore[misc]

    @overload
    def __new__(cls, using: Using = None, *, close: bool = False) -> fresh_connection: ...

    def __new__(cls, using: Any = None, *, close: bool = False) -> Any:
        if callable(using):  # used bare: @fresh_connection
            return cls(None, close=close)(using)
        return super().__new__(cls)

    def __init__(self, using: Using = None, *, close: bool = False) -> None:
        if using is not None and not isinstance(using, str):
            using = list(using)
        self.using = using
        self.close = close

    def __repr__(self) -> str:
        return f"fresh_connection(using={self.using!r}, close={self.close!r})"

    def __enter__(self) -> fresh_connection:
        _enter(_aliases(self.using))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _exit(_aliases(self.using), close=self.close)

    async def __aenter__(self) -> fresh_connection:
        # The ORM's async methods run in the thread-sensitive executor: the connections
        # to check and guard are that thread's.
        await sync_to_async(_enter, thread_sensitive=True)(_aliases(self.using))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await sync_to_async(_exit, thread_sensitive=True)(_aliases(self.using), close=self.close)

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async with self:
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


@overload
def keepalive_job(func: F) -> F: ...


@overload
def keepalive_job(*, using: Using = None) -> Callable[[F], F]: ...


def keepalive_job(func: Any = None, *, using: Using = None) -> Any:
    """Decorator for scheduler jobs and worker-thread functions.

    Fresh connections before the job; after it, connections that are obsolete
    (``CONN_MAX_AGE``), broken or idle past their limit are closed, so pooled threads
    neither fail after quiet periods nor hoard connections. Usable bare or with
    arguments.

    Example::

        from django_dbkeepalive import keepalive_job

        @keepalive_job
        def sync_prices():
            Price.objects.update(...)

        @keepalive_job(using="reports")
        def rebuild(): ...
    """
    if func is not None:
        return fresh_connection(using)(func)
    return fresh_connection(using)
