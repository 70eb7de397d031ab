from django.urls import include, path

urlpatterns = [path("", include("testproject.testapp.urls"))]
