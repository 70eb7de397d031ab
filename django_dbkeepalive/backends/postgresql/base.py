"""Django's PostgreSQL backend with the connection guard built in (see
:mod:`django_dbkeepalive.backends`)."""

from __future__ import annotations

from django.db.backends.postgresql import base

from ..mixin import KeepaliveWrapperMixin

__all__ = ["DatabaseWrapper"]


class DatabaseWrapper(KeepaliveWrapperMixin, base.DatabaseWrapper):
    """Django's PostgreSQL ``DatabaseWrapper``, guarded without patching."""
