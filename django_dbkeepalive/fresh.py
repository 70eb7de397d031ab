"""``fresh_connection`` and ``keepalive_job``: connection hygiene around a unit of work."""

from __future__ import annotations

import functools
import inspect
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
    """What ``close_old_connections()`` does, plus the guard's idle and liveness checks.

    For each alias (in this thread): a connection idle past its limit, closed by the
    server, unusable after errors or older than ``CONN_MAX_AGE`` is closed, so the next
    query reconnects. ``close=True`` closes every connection. A connection inside an
    atomic block is never touched.

    Example::

        for batch in batches:
            refresh_connections()  # cheap: no round trip unless idle for a while
            process(batch)
    """
    wanted = set(_aliases(using))
    for db in connections.all(initialized_only=True):
        if db.alias not in wanted or db.connection is None or db.in_atomic_block:
            continue
        if close:
            guard.close_connection(db)
            continue
        guard.check_idle(db)
        if db.connection is not None:
            errors = db.errors_occurred
            db.close_if_unusable_or_obsolete()
            # CONN_MAX_AGE = 0 closes at the end of every unit of work: Django's routine,
            # not a recycle worth a signal.
            if db.connection is None and (errors or db.settings_dict.get("CONN_MAX_AGE")):
                guard.notify_closed(db, "ping_failed" if errors else "max_age")


class fresh_connection:
    """Context manager and decorator that hands out healthy connections.

    On entry and exit it does what ``close_old_connections()`` does, plus: a connection
    idle past its limit, or closed by the server, is closed so the next query
    reconnects. ``using`` is an alias, a list of aliases, or ``None`` for all.
    ``close=True`` closes the connections on exit. Inside an atomic block it never
    closes anything. Works on sync and ``async def`` functions, and as ``async with``.

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
        refresh_connections(self.using)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        refresh_connections(self.using, close=self.close)

    async def __aenter__(self) -> fresh_connection:
        # The ORM's async methods run in the thread-sensitive executor: refresh there.
        await sync_to_async(refresh_connections, thread_sensitive=True)(self.using)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await sync_to_async(refresh_connections, thread_sensitive=True)(
            self.using, close=self.close
        )

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
