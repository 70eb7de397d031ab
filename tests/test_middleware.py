"""``KeepaliveMiddleware`` through Django's real request stacks (WSGI and ASGI)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync, iscoroutinefunction, sync_to_async
from django.db import IntegrityError, OperationalError, connection
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client, RequestFactory, override_settings

from django_dbkeepalive.middleware import KeepaliveMiddleware
from django_dbkeepalive.testing import assert_recycles, expire_connection, kill_connection
from testproject.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True)


def asgi_get(path: str, data: dict[str, str]) -> Any:
    """A GET through Django's ASGI handler (AsyncClient), from sync test code. (On
    Django 4.2 ``AsyncClient.get`` is no ``async def``: wrapping it directly warns.)"""

    async def get() -> Any:
        return await AsyncClient().get(path, data)

    return async_to_sync(get)()


Raw = Callable[..., list[tuple[Any, ...]]]

KEEPALIVE = "django_dbkeepalive.middleware.KeepaliveMiddleware"
WITH_MIDDLEWARE = [KEEPALIVE, "django.middleware.common.CommonMiddleware"]
WITHOUT_MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
GUARD_OFF = {"AUTO_GUARD": False}
# The server's wait_timeout, also given to the guard so that its limit (4 s minus a
# 2 s margin) is known from the first statement on: a 3 s pause is then recycled
# proactively, before the server closes anything.
WAIT_4 = {"WAIT_TIMEOUT": 4}


def keys(raw: Raw) -> list[str]:
    return [row[0] for row in raw("SELECT `key` FROM testapp_item ORDER BY id")]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "django_dbkeepalive" and r.levelno == logging.WARNING
    ]


def assert_unguarded() -> None:
    """This thread's connection is plain Django again: a query after the server closed
    it fails (a guarded one would see the closed socket and reconnect)."""
    with connection.cursor() as cursor:
        cursor.execute("SET SESSION wait_timeout = 1")
    time.sleep(1.5)
    try:
        with pytest.raises(OperationalError):
            Item.objects.count()
    finally:
        connection.close()


def test_middleware_is_sync_and_async_capable():
    def sync_view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    async def async_view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    assert KeepaliveMiddleware.sync_capable and KeepaliveMiddleware.async_capable
    assert not iscoroutinefunction(KeepaliveMiddleware(sync_view))
    assert iscoroutinefunction(KeepaliveMiddleware(async_view))


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE)
def test_long_wsgi_request_past_wait_timeout_saves_its_row(set_wait_timeout, raw):
    set_wait_timeout(2)
    response = Client().get("/long/", {"sleep": "3", "key": "wsgi"})
    assert response.status_code == 200
    assert response.json() == {"count": 0}
    assert keys(raw) == ["wsgi"]


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE)
def test_long_asgi_request_past_wait_timeout_saves_its_row(set_wait_timeout, raw, caplog):
    set_wait_timeout(2)
    caplog.set_level(logging.DEBUG, logger="django.request")
    with override_settings(DEBUG=True):  # Django logs every sync/async adaptation
        response = asgi_get("/async-long/", {"sleep": "3", "key": "asgi"})
    assert response.status_code == 200
    assert response.json() == {"count": 0}
    assert keys(raw) == ["asgi"]
    # The middleware ran natively async: no thread hop was added around it.
    assert not [r for r in caplog.records if "adapted" in r.getMessage()]


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE, DBKEEPALIVE=GUARD_OFF)
def test_with_auto_guard_off_the_middleware_guards_wsgi_requests(set_wait_timeout, raw):
    set_wait_timeout(2)
    response = Client().get("/long/", {"sleep": "3", "key": "guarded"})
    assert response.status_code == 200
    assert keys(raw) == ["guarded"]


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE, DBKEEPALIVE=GUARD_OFF)
def test_with_auto_guard_off_the_middleware_guards_asgi_requests(set_wait_timeout, raw):
    set_wait_timeout(2)
    response = asgi_get("/async-long/", {"sleep": "3", "key": "a"})
    assert response.status_code == 200
    assert keys(raw) == ["a"]


@override_settings(MIDDLEWARE=WITHOUT_MIDDLEWARE, DBKEEPALIVE=GUARD_OFF)
def test_without_the_middleware_and_auto_guard_off_a_long_request_fails(set_wait_timeout, raw):
    # The control for the two tests above: the same request, minus the middleware.
    set_wait_timeout(2)
    try:
        with pytest.raises(OperationalError) as caught:
            Client().get("/long/", {"sleep": "3", "key": "lost"})
        assert caught.value.args[0] in (2006, 2013, 4031)
        assert keys(raw) == []
    finally:
        connection.close()


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE, DBKEEPALIVE=GUARD_OFF)
def test_with_auto_guard_off_the_middleware_guards_a_streamed_body_until_it_ends(
    set_wait_timeout, raw
):
    set_wait_timeout(2)
    response = Client().get("/stream/", {"sleep": "2.5", "key": "streamed"})
    assert response.status_code == 200
    # The body runs now, after the view returned: its write comes after the pause.
    assert b"".join(response.streaming_content) == b"count 0\ndone\n"
    assert keys(raw) == ["streamed"]
    assert_unguarded()  # and the scope ended with the response


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE, DBKEEPALIVE=GUARD_OFF)
def test_guarding_ends_with_the_request():
    assert Client().get("/items/").status_code == 200
    assert_unguarded()


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE, DBKEEPALIVE=WAIT_4)
def test_a_request_idle_past_the_limit_logs_one_warning_with_the_numbers(
    set_wait_timeout, raw, caplog
):
    set_wait_timeout(4)
    caplog.set_level(logging.INFO, logger="django_dbkeepalive")
    response = Client().get("/long/", {"sleep": "3", "key": "slow"})
    assert response.status_code == 200
    assert keys(raw) == ["slow"]
    [message] = warnings(caplog)
    assert "the request to long held" in message
    assert "'default' idle 3." in message and "(limit 2.0s)" in message
    # A quick request afterwards logs nothing.
    caplog.clear()
    assert Client().get("/items/").status_code == 200
    assert warnings(caplog) == []


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE, DBKEEPALIVE=WAIT_4)
def test_an_async_request_idle_past_the_limit_logs_one_warning(set_wait_timeout, raw, caplog):
    set_wait_timeout(4)
    caplog.set_level(logging.INFO, logger="django_dbkeepalive")
    response = asgi_get("/async-long/", {"sleep": "3", "key": "s"})
    assert response.status_code == 200
    assert keys(raw) == ["s"]
    [message] = warnings(caplog)
    assert "the request to async-long held" in message and "(limit 2.0s)" in message


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE, DBKEEPALIVE={**GUARD_OFF, **WAIT_4})
def test_a_request_that_raises_still_logs_and_ends_guarding(set_wait_timeout, raw, caplog):
    set_wait_timeout(4)
    raw("INSERT INTO testapp_item (`key`, value, created) VALUES ('taken', 0, NOW())")
    caplog.set_level(logging.INFO, logger="django_dbkeepalive")
    with pytest.raises(IntegrityError):
        Client().get("/long/", {"sleep": "3", "key": "taken"})
    [message] = warnings(caplog)
    assert "'default' idle 3." in message
    assert_unguarded()


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE)
def test_a_request_idle_past_wait_timeout_logs_a_warning(set_wait_timeout, raw, caplog):
    set_wait_timeout(2)
    caplog.set_level(logging.INFO, logger="django_dbkeepalive")
    response = Client().get("/long/", {"sleep": "3", "key": "late"})
    assert response.status_code == 200
    assert keys(raw) == ["late"]
    [message] = warnings(caplog)
    assert "'default' idle 3." in message


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE)
def test_the_first_pause_of_a_connection_is_reported_before_the_limit_is_known(
    set_wait_timeout, raw, caplog
):
    # wait_timeout 4, pause 3: past the guard's limit (4 - 2), the session still alive.
    set_wait_timeout(4)
    caplog.set_level(logging.INFO, logger="django_dbkeepalive")
    response = Client().get("/long/", {"sleep": "3", "key": "first"})
    assert response.status_code == 200
    assert keys(raw) == ["first"]
    [message] = warnings(caplog)
    assert "'default' idle 3." in message and "limit 2.0" in message


def test_middleware_without_the_app_stops_with_a_clear_error():
    from django.core.exceptions import ImproperlyConfigured
    from django.test import modify_settings

    from django_dbkeepalive.middleware import KeepaliveMiddleware

    with modify_settings(INSTALLED_APPS={"remove": "django_dbkeepalive"}):
        with pytest.raises(ImproperlyConfigured) as caught:
            KeepaliveMiddleware(lambda request: None)
    assert "'django_dbkeepalive' to INSTALLED_APPS" in str(caught.value)


def assert_unguarded_now() -> None:
    """:func:`assert_unguarded` without the pause: after a KILL, this thread's next
    statement fails (a guarded one would be run on a new connection)."""
    kill_connection()
    try:
        with pytest.raises(OperationalError):
            Item.objects.count()
    finally:
        connection.close()


@override_settings(MIDDLEWARE=WITH_MIDDLEWARE, DBKEEPALIVE=GUARD_OFF)
def test_with_auto_guard_off_the_middleware_guards_an_asgi_streamed_body_until_it_ends(raw):
    response = asgi_get("/stream/", {"sleep": "0", "key": "astreamed"})
    assert response.status_code == 200
    kill_connection()  # the session ends after the view returned, before the body runs
    with assert_recycles(1, reasons=["disconnected"]):
        assert b"".join(response.streaming_content) == b"count 0\ndone\n"
    assert keys(raw) == ["astreamed"]
    assert_unguarded_now()  # the scope ended with the response


@override_settings(DBKEEPALIVE={**GUARD_OFF, **WAIT_4})
def test_a_request_ended_by_a_base_exception_still_logs_and_ends_guarding(raw, caplog):
    # KeyboardInterrupt, SystemExit, a gevent Timeout: Django turns only Exception
    # subclasses into a 500 response, these reach the middleware.
    def view(request: HttpRequest) -> HttpResponse:
        Item.objects.create(key="before")
        expire_connection()  # a slow API call
        Item.objects.create(key="after")
        raise KeyboardInterrupt

    caplog.set_level(logging.INFO, logger="django_dbkeepalive")
    with pytest.raises(KeyboardInterrupt):
        KeepaliveMiddleware(view)(RequestFactory().get("/export/"))
    [message] = warnings(caplog)
    assert message.startswith("dbkeepalive: the request to /export/ held a database connection")
    assert "'default' idle " in message
    assert keys(raw) == ["before", "after"]
    assert_unguarded_now()


@override_settings(DBKEEPALIVE={**GUARD_OFF, **WAIT_4})
def test_an_async_request_cancelled_still_logs_and_ends_guarding(raw, caplog):
    # The ASGI server cancels the request's task when the client goes away.
    @sync_to_async
    def slow_save() -> None:
        Item.objects.create(key="before")
        expire_connection()
        Item.objects.create(key="after")

    async def view(request: HttpRequest) -> HttpResponse:
        await slow_save()
        raise asyncio.CancelledError

    caplog.set_level(logging.INFO, logger="django_dbkeepalive")
    middleware = KeepaliveMiddleware(view)
    with pytest.raises(asyncio.CancelledError):
        async_to_sync(middleware)(RequestFactory().get("/async-export/"))
    [message] = warnings(caplog)
    assert message.startswith("dbkeepalive: the request to /async-export/ held a database")
    assert keys(raw) == ["before", "after"]
    assert_unguarded_now()
