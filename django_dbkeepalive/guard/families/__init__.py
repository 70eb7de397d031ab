"""The database families the guard knows, and the one predicate for a lost connection.

Owns: finding the family and driver adapter of a ``DatabaseWrapper`` (from its
``vendor`` and its backend's ``Database`` module, never from the connection object's
class) and :func:`classify`, which decides "is this a disconnect" for every family.
Must never import: the rules or the wrappers.
"""

from __future__ import annotations

from typing import Any

from ..disconnects import Disconnect
from .base import Driver, Family
from .mysql import MYSQL
from .postgresql import POSTGRESQL

__all__ = ["FAMILIES", "OTHER", "classify", "driver_of", "family_of"]

#: Every family with a server the guard watches, in the order :func:`classify` asks.
FAMILIES: tuple[Family, ...] = (MYSQL, POSTGRESQL)
#: Any other vendor (SQLite, third-party backends): only ``CONN_MAX_AGE``.
OTHER = Family()
_BY_VENDOR = {family.vendor: family for family in FAMILIES}


def family_of(db: Any) -> Family:
    """The family of a ``DatabaseWrapper``, by its ``vendor``."""
    return _BY_VENDOR.get(getattr(db, "vendor", None), OTHER)


def driver_of(db: Any, family: Family | None = None) -> Driver:
    """The driver adapter of a ``DatabaseWrapper``, by its backend's DB-API module."""
    return (family or family_of(db)).driver_for(getattr(db, "Database", None))


def classify(exc: BaseException) -> Disconnect | None:
    """A :class:`Disconnect` when ``exc`` means the connection is lost, else ``None``.

    The one predicate for every driver: it looks at MySQL's error code (never at the
    text, which differs by client library), at PostgreSQL's SQLSTATE, at the driver's
    exception class, and down the ``__cause__`` chain that Django's error wrapper builds.

    Example::

        try:
            cursor.execute("SELECT 1")
        except Exception as exc:
            if classify(exc):
                ...  # the connection is gone; reconnect before the next statement
    """
    current: BaseException | None = exc
    for _ in range(6):
        if current is None:
            return None
        for family in FAMILIES:
            found = family.classify(current)
            if found is not None:
                return found
        if isinstance(current, ConnectionError):
            # A socket error that a driver let through unwrapped.
            return Disconnect(-1, "network", not_sent=False, retryable=True)
        current = current.__cause__
    return None
