"""Views shaped like the long requests that hit "server has gone away":
a query, a pause without database work, then a write."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

from django.http import HttpRequest, JsonResponse, StreamingHttpResponse

from .models import Item


class BadParams(ValueError):
    pass


def _params(request: HttpRequest) -> tuple[float, str]:
    try:
        sleep = float(request.GET.get("sleep", "0"))
    except ValueError:
        raise BadParams("sleep must be a number of seconds") from None
    if not 0 <= sleep <= 3600:
        raise BadParams("sleep must be between 0 and 3600")
    key = request.GET.get("key") or uuid.uuid4().hex
    if len(key) > 100:
        raise BadParams("key is longer than 100 characters")
    return sleep, key


def long_view(request: HttpRequest) -> JsonResponse:
    """``/long/?sleep=S&key=K``: count, sleep S seconds, create Item(key=K)."""
    try:
        sleep, key = _params(request)
    except BadParams as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    count = Item.objects.count()
    time.sleep(sleep)
    Item.objects.create(key=key)
    return JsonResponse({"count": count})


def items_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"count": Item.objects.count()})


async def async_long_view(request: HttpRequest) -> JsonResponse:
    """``/async-long/?sleep=S&key=K``: the same as ``/long/`` through the async ORM."""
    try:
        sleep, key = _params(request)
    except BadParams as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    count = await Item.objects.acount()
    await asyncio.sleep(sleep)
    await Item.objects.acreate(key=key)
    return JsonResponse({"count": count})


def stream_view(request: HttpRequest) -> StreamingHttpResponse | JsonResponse:
    """``/stream/?sleep=S&key=K``: a streamed body that counts, sleeps S seconds, then
    creates Item(key=K), as an export that writes a log row when it is done."""
    try:
        sleep, key = _params(request)
    except BadParams as exc:
        return JsonResponse({"error": str(exc)}, status=400)

    def body() -> Iterator[str]:
        yield f"count {Item.objects.count()}\n"
        time.sleep(sleep)
        Item.objects.create(key=key)
        yield "done\n"

    return StreamingHttpResponse(body(), content_type="text/plain")
