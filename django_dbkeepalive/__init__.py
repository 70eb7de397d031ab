"""django-dbkeepalive: Django database connections that survive the server closing them.

Add ``"django_dbkeepalive"`` to ``INSTALLED_APPS``; that is all most projects need. The
public names below are imported lazily, so importing this package has no side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BaseKeepaliveCommand",
    "ConnectionLostInTransaction",
    "fresh_connection",
    "is_disconnect",
    "keepalive_job",
    "refresh_connections",
]

_LAZY = {
    "BaseKeepaliveCommand": "django_dbkeepalive.commands",
    "ConnectionLostInTransaction": "django_dbkeepalive.errors",
    "is_disconnect": "django_dbkeepalive.errors",
    "fresh_connection": "django_dbkeepalive.fresh",
    "keepalive_job": "django_dbkeepalive.fresh",
    "refresh_connections": "django_dbkeepalive.fresh",
}

if TYPE_CHECKING:
    from .commands import BaseKeepaliveCommand
    from .errors import ConnectionLostInTransaction, is_disconnect
    from .fresh import fresh_connection, keepalive_job, refresh_connections


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'django_dbkeepalive' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
