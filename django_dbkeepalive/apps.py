"""The app config: installs the guard, validates ``DBKEEPALIVE`` and registers the checks."""

from __future__ import annotations

from django.apps import AppConfig


class DbKeepaliveConfig(AppConfig):
    name = "django_dbkeepalive"
    verbose_name = "django-dbkeepalive"

    def ready(self) -> None:
        from django.core import checks as django_checks

        from . import checks, guard
        from .conf import conf

        conf.validate()
        django_checks.register(checks.check_settings, checks.TAG)
        django_checks.register(checks.check_configuration, checks.TAG)
        django_checks.register(checks.check_servers, django_checks.Tags.database, checks.TAG)
        guard.install(patch=conf.patch)
