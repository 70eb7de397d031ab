"""The app config: installs the guard and validates ``DBKEEPALIVE`` at startup."""

from __future__ import annotations

from django.apps import AppConfig


class DbKeepaliveConfig(AppConfig):
    name = "django_dbkeepalive"
    verbose_name = "django-dbkeepalive"

    def ready(self) -> None:
        from . import guard
        from .conf import conf

        conf.validate()
        guard.install()
