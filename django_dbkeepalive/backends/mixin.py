"""The mixin that builds the guard into a backend's ``DatabaseWrapper``.

Example (a backend of your own, or a third-party one)::

    # myproject/db/mysql/base.py, then ENGINE = "myproject.db.mysql"
    from django_prometheus.db.backends.mysql import base
    from django_dbkeepalive.backends.mixin import KeepaliveWrapperMixin

    class DatabaseWrapper(KeepaliveWrapperMixin, base.DatabaseWrapper):
        pass
"""

from __future__ import annotations

from ..guard.native import GuardedWrapperMixin

__all__ = ["KeepaliveWrapperMixin"]


class KeepaliveWrapperMixin(GuardedWrapperMixin):
    """Put first in the bases of a backend's ``DatabaseWrapper``: its connections are
    guarded by its own methods (``connect``, ``set_autocommit``, ``commit``,
    ``rollback``, ``is_usable``, ``get_connection_params`` and its cursors'
    ``execute``, ``executemany``, ``callproc``, ``close``), which always call
    ``super()``. Needs ``"django_dbkeepalive"`` in ``INSTALLED_APPS``; with
    ``DBKEEPALIVE["PATCH"]`` on (the default) it only passes through to the patched
    classes, which guard every alias.

    Example::

        from django.db.backends.mysql import base

        class DatabaseWrapper(KeepaliveWrapperMixin, base.DatabaseWrapper):
            pass
    """
