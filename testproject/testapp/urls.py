from django.urls import path

from . import views

urlpatterns = [
    path("long/", views.long_view, name="long"),
    path("items/", views.items_view, name="items"),
    path("async-long/", views.async_long_view, name="async-long"),
    path("stream/", views.stream_view, name="stream"),
]
