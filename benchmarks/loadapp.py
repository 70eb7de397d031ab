"""The Django side of the load runs (:mod:`benchmarks.load`): a row table, four views, a
middleware that reports why a request failed.

Served by real application servers (gunicorn, uvicorn, uWSGI) with the settings of
:mod:`benchmarks.load_settings`. ``LoadRow.key`` is deliberately not unique (the table is
``benchmarks.load.TABLE_SQL``): a write that ran twice shows up as two rows, not as an
``IntegrityError``.

- ``/w?key=K`` (sync) and ``/aw?key=K`` (async ORM): one ``INSERT`` in autocommit;
  HTTP 200 means the row is committed.
- ``/r?key=K`` and ``/ar?key=K``: one indexed read.
- A request that raises gets HTTP 500 with JSON ``{"error", "code", "cause"}``: the
  exception's type, its driver error code and what the exception's notes say (never its
  message, which could quote SQL).
"""

from __future__ import annotations

from django.db import models
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.utils.deprecation import MiddlewareMixin

#: What a django-dbkeepalive note says -> the cause reported (first match wins).
NOTE_CAUSES = (
    ("may have applied it", "write_unknown"),
    ("could not connect", "unreachable"),
    ("being opened", "setup"),
    ("was run again once", "failed_again"),
    ("was not run again", "read_not_rerun"),
)


class LoadRow(models.Model):
    key = models.CharField(max_length=100)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "testapp"
        db_table = "load_row"  # created by benchmarks.load.TABLE_SQL
        managed = False


def _key(request: HttpRequest) -> str:
    return request.GET["key"][:100]


def write(request: HttpRequest) -> HttpResponse:
    LoadRow.objects.create(key=_key(request))
    return HttpResponse("ok")


def read(request: HttpRequest) -> HttpResponse:
    LoadRow.objects.filter(key=_key(request)).exists()
    return HttpResponse("ok")


async def async_write(request: HttpRequest) -> HttpResponse:
    await LoadRow.objects.acreate(key=_key(request))
    return HttpResponse("ok")


async def async_read(request: HttpRequest) -> HttpResponse:
    await LoadRow.objects.filter(key=_key(request)).aexists()
    return HttpResponse("ok")


urlpatterns = [
    path("w", write),
    path("r", read),
    path("aw", async_write),
    path("ar", async_read),
]


def cause_of(exc: BaseException) -> str:
    """The failure's cause: from django-dbkeepalive's note when there is one, else
    ``lost`` (a disconnect error without a note: plain Django), ``in_transaction``, or
    the exception's type."""
    from django_dbkeepalive import ConnectionLostInTransaction, is_disconnect

    notes = " ".join(getattr(exc, "__notes__", ()))
    for needle, cause in NOTE_CAUSES:
        if needle in notes:
            return cause
    if isinstance(exc, ConnectionLostInTransaction):
        return "in_transaction"
    if "django-dbkeepalive" in notes:
        return "noted"
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if code in (2002, 2003):
        return "refused"
    if is_disconnect(exc):
        return "lost"
    return type(exc).__name__


class ErrorReport(MiddlewareMixin):
    """Turns an exception of a view into HTTP 500 with its type, code and cause (sync
    and async: ``MiddlewareMixin`` runs it either way, so async views stay async)."""

    def process_exception(self, request: HttpRequest, exception: Exception) -> JsonResponse:
        code = exception.args[0] if exception.args and isinstance(exception.args[0], int) else None
        body = {"error": type(exception).__name__, "code": code, "cause": cause_of(exception)}
        return JsonResponse(body, status=500)
