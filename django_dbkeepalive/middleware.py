"""``KeepaliveMiddleware``: guarded connections for the whole of every request.

Add it near the top of ``MIDDLEWARE``::

    MIDDLEWARE = [
        "django_dbkeepalive.middleware.KeepaliveMiddleware",
        ...
    ]

It works in both WSGI and ASGI projects (sync and async capable, like Django's own
middleware), without an extra thread hop in either mode except to reach the thread that
runs the ORM.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.http import HttpRequest, HttpResponseBase

from .fresh import _end_scope, _start_scope, refresh_connections

__all__ = ["KeepaliveMiddleware"]

logger = logging.getLogger("django_dbkeepalive")

GetResponse = Callable[[HttpRequest], HttpResponseBase]
AsyncGetResponse = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


def _start_request() -> list[Any]:
    """Validate this thread's connections and guard every alias; returns the wrappers."""
    refresh_connections()
    return _start_scope(connections.settings)


def _view_name(request: HttpRequest) -> str:
    match = getattr(request, "resolver_match", None)
    name = getattr(match, "view_name", None)
    return str(name) if name else request.path


def _finish_request(request: HttpRequest, wrappers: list[Any]) -> None:
    """End the guard scopes; log one warning if the request idled past a limit."""
    over = _end_scope(wrappers)
    if over:
        logger.warning(
            "dbkeepalive: the request to %s held a database connection idle past its "
            "limit: %s. The guard reconnected, but a transaction open at that point would "
            "have been lost. Move slow work (API calls, file building) out of the request, "
            "or raise the server's wait_timeout.",
            _view_name(request),
            "; ".join(over),
        )


class KeepaliveMiddleware:
    """Validates connections at request start and guards every query of the request.

    Also when ``DBKEEPALIVE = {"AUTO_GUARD": False}``: every alias is guarded for the
    duration of the request. At its end (also after an exception) one warning is logged
    on the ``django_dbkeepalive`` logger when a connection was idle past its limit
    during the request, naming the alias, the numbers and the view.

    Example::

        MIDDLEWARE = [
            "django_dbkeepalive.middleware.KeepaliveMiddleware",
            "django.middleware.security.SecurityMiddleware",
            ...
        ]
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse | AsyncGetResponse) -> None:
        if not apps.is_installed("django_dbkeepalive"):
            # The guard is installed by the app; without it this would silently do
            # nothing (and the system checks that would say so are the app's too).
            raise ImproperlyConfigured(
                "dbkeepalive.W007: django_dbkeepalive.middleware.KeepaliveMiddleware is in "
                "MIDDLEWARE but 'django_dbkeepalive' is not in INSTALLED_APPS. Add "
                "'django_dbkeepalive' to INSTALLED_APPS."
            )
        # Either kind; async_mode tells which one it is.
        self.get_response: Callable[[HttpRequest], Any] = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            # Django sees an async middleware and awaits __call__'s coroutine.
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        wrappers = _start_request()
        try:
            response = self.get_response(request)
        except BaseException:
            _finish_request(request, wrappers)
            raise
        if not _finish_with(response, request, wrappers):
            _finish_request(request, wrappers)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        # Connections belong to the thread the async ORM runs its queries in: the
        # thread-sensitive executor, which is where these must run too.
        wrappers = await sync_to_async(_start_request, thread_sensitive=True)()
        try:
            response: HttpResponseBase = await self.get_response(request)
        except BaseException:
            await sync_to_async(_finish_request, thread_sensitive=True)(request, wrappers)
            raise
        if not _finish_with(response, request, wrappers):
            await sync_to_async(_finish_request, thread_sensitive=True)(request, wrappers)
        return response


def _finish_with(response: HttpResponseBase, request: HttpRequest, wrappers: list[Any]) -> bool:
    """For a streaming response, end the scope when the server closes the response
    (after the last chunk was sent, or the client went away), not when the view
    returns: the body's generator runs the queries. Django's own file responses close
    their files the same way. ``False``: not streaming, end it now."""
    closers = getattr(response, "_resource_closers", None)
    if not getattr(response, "streaming", False) or not isinstance(closers, list):
        return False
    closers.append(lambda: _finish_request(request, wrappers))
    return True
