"""A real Django project for django-dbkeepalive's tests, demo and benchmarks."""
