"""A view doing three queries, for the request benchmark."""

from django.http import HttpRequest, HttpResponse
from django.urls import path

from testproject.testapp.models import Item


def three(request: HttpRequest) -> HttpResponse:
    Item.objects.count()
    Item.objects.filter(key="x").exists()
    list(Item.objects.all()[:1])
    return HttpResponse("ok")


urlpatterns = [path("three/", three)]
