"""The system checks' IDs, levels and titles, and how a message is made.

Owns: :data:`REGISTRY` (every ID, in order: never renumbered, never reused) and
:func:`message`. Must never import: the other check modules, the guard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core import checks

#: The tag every check of this app carries (``manage.py check --tag dbkeepalive``).
TAG = "dbkeepalive"
APP_NAME = "django_dbkeepalive"
MIDDLEWARE_PATH = "django_dbkeepalive.middleware.KeepaliveMiddleware"
#: Below this, ``max_allowed_packet`` gets a warning (the default of MariaDB and of both
#: drivers' client side; MySQL 8 defaults to 64 MiB).
MIN_MAX_ALLOWED_PACKET = 16 * 1024 * 1024
#: The longest the checks and ``manage.py dbkeepalive`` wait on a server (seconds): the
#: connect, read and write timeouts of their own connections are capped at this (an
#: alias's smaller ones are kept), so a server that accepts connections but never
#: answers cannot hang them.
DIAGNOSTIC_TIMEOUT = 10


@dataclass(frozen=True)
class CheckInfo:
    """One check ID: its level, what it is about, and which check function reports it."""

    id: str
    level: str  # "error", "warning" or "info"
    title: str
    source: str  # "settings", "configuration" or "server"


#: Every check ID, in order. Never renumber or reuse one.
REGISTRY: tuple[CheckInfo, ...] = (
    CheckInfo("dbkeepalive.E001", "error", "DBKEEPALIVE is not a dict", "settings"),
    CheckInfo("dbkeepalive.E002", "error", "DBKEEPALIVE has an unknown key", "settings"),
    CheckInfo(
        "dbkeepalive.E003",
        "error",
        "a DBKEEPALIVE value has the wrong type or is out of range",
        "settings",
    ),
    CheckInfo(
        "dbkeepalive.E004",
        "error",
        "DBKEEPALIVE['DATABASES'] names an alias that is not in DATABASES",
        "settings",
    ),
    CheckInfo(
        "dbkeepalive.E005",
        "error",
        "the alias's database backend cannot be loaded (for example, no MySQL driver)",
        "configuration",
    ),
    CheckInfo(
        "dbkeepalive.E006",
        "error",
        "connecting with the alias's settings fails, and not because of the network "
        "(settings, credentials, database name, init_command)",
        "server",
    ),
    CheckInfo(
        "dbkeepalive.W001",
        "warning",
        "CONN_MAX_AGE is None or not below the server's wait_timeout",
        "server",
    ),
    CheckInfo(
        "dbkeepalive.W002",
        "warning",
        "MARGIN is not below wait_timeout: the guard has no usable idle window",
        "server",
    ),
    CheckInfo(
        "dbkeepalive.W003",
        "warning",
        "DBKEEPALIVE WAIT_TIMEOUT gives an idle limit not below the server's wait_timeout",
        "server",
    ),
    CheckInfo(
        "dbkeepalive.W004", "warning", "the server's max_allowed_packet is below 16 MiB", "server"
    ),
    CheckInfo(
        "dbkeepalive.W005",
        "warning",
        "could not reach the server to check its timeouts (network, server down)",
        "server",
    ),
    CheckInfo(
        "dbkeepalive.W006",
        "warning",
        "a MySQL alias has no connect_timeout / read_timeout in OPTIONS",
        "configuration",
    ),
    CheckInfo(
        "dbkeepalive.W007",
        "warning",
        "KeepaliveMiddleware is in MIDDLEWARE but django_dbkeepalive is not in INSTALLED_APPS",
        "configuration",
    ),
    CheckInfo(
        "dbkeepalive.W008",
        "warning",
        "AUTO_GUARD is off and KeepaliveMiddleware is not installed: nothing guards requests",
        "configuration",
    ),
    CheckInfo(
        "dbkeepalive.W009",
        "warning",
        "PATCH is off and the alias's ENGINE is not a django_dbkeepalive backend: unguarded",
        "configuration",
    ),
    CheckInfo(
        "dbkeepalive.I001",
        "info",
        "a non-MySQL alias: the guard enforces only CONN_MAX_AGE on it",
        "configuration",
    ),
    CheckInfo(
        "dbkeepalive.I002",
        "info",
        "a PostgreSQL alias: guarded, with the differences from MySQL listed",
        "configuration",
    ),
    CheckInfo(
        "dbkeepalive.W010",
        "warning",
        "an alias that receives writes points at a node that cannot take them "
        "(read_only=ON, or a Galera node not ready)",
        "server",
    ),
    CheckInfo(
        "dbkeepalive.I003",
        "info",
        "the alias's server was not checked: the caller's context forbade connecting "
        "(a Django test that did not declare the alias)",
        "server",
    ),
    CheckInfo(
        "dbkeepalive.W011",
        "warning",
        "a MySQL or PostgreSQL alias whose driver the guard does not know or no longer "
        "supports: not guarded",
        "configuration",
    ),
)
#: The IDs of :data:`REGISTRY`, in order.
CHECK_IDS: tuple[str, ...] = tuple(info.id for info in REGISTRY)
_BY_ID = {info.id: info for info in REGISTRY}
_LEVELS: dict[str, Callable[..., checks.CheckMessage]] = {
    "error": checks.Error,
    "warning": checks.Warning,
    "info": checks.Info,
}


def message(check_id: str, msg: str, hint: str, obj: Any = None) -> checks.CheckMessage:
    return _LEVELS[_BY_ID[check_id].level](msg, hint=hint, obj=obj, id=check_id)
