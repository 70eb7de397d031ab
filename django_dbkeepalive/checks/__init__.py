"""System checks: settings that cannot work against the server, and how to fix them.

Registered by ``AppConfig.ready()`` (tag ``dbkeepalive``):

- :func:`check_settings` — ``DBKEEPALIVE`` itself (``dbkeepalive.E001`` ... ``E004``);
- :func:`check_configuration` — ``DATABASES``, ``MIDDLEWARE`` and ``INSTALLED_APPS``
  without a round trip (``E005``, ``W006`` ... ``W008``, ``I001``);
- :func:`check_servers` — tagged ``database`` as well, so it runs only for
  ``manage.py check --database ALIAS``, ``migrate`` and the ``dbkeepalive`` command: reads
  each MySQL/MariaDB server's timeouts over a short-lived connection of its own, whose
  client timeouts are capped (:func:`diagnostic_connection`) (``W001`` ... ``W005``,
  ``E006``).

The package: :mod:`.registry` (the IDs), :mod:`.configuration` (no connection),
:mod:`.server` (the server's variables), :mod:`.connection` (the checks' own bounded
connection), :mod:`.connect_errors` (a failed connect), :mod:`.aliases` and
:mod:`.text` (shared helpers, secret masking). The diagnose command builds on the same
pieces. Checks use the guard; the guard never imports them.

Every ID is listed in :data:`REGISTRY` and documented in ``docs/checks.md``. IDs are
stable: a check that goes away leaves its ID unused, it is never given to another.
Silence one with ``SILENCED_SYSTEM_CHECKS = ["dbkeepalive.W006"]``.
"""

from __future__ import annotations

from .aliases import (
    ClientTimeout,
    alias_settings,
    backend_error,
    client_timeouts,
    split_aliases,
)
from .configuration import (
    check_configuration,
    check_settings,
    configuration_messages,
    middleware_messages,
)
from .connect_errors import connect_error_kind, connect_error_message, unreachable_message
from .connection import (
    ServerVariables,
    diagnostic_connection,
    diagnostic_settings,
    read_server_variables,
)
from .registry import (
    CHECK_IDS,
    DIAGNOSTIC_TIMEOUT,
    MIDDLEWARE_PATH,
    MIN_MAX_ALLOWED_PACKET,
    REGISTRY,
    TAG,
    CheckInfo,
)
from .server import check_alias_server, check_servers, server_messages
from .text import describe_server, error_text, limit_formula, mask_secrets, socket_path

__all__ = [
    "CHECK_IDS",
    "DIAGNOSTIC_TIMEOUT",
    "MIDDLEWARE_PATH",
    "MIN_MAX_ALLOWED_PACKET",
    "REGISTRY",
    "TAG",
    "CheckInfo",
    "ClientTimeout",
    "ServerVariables",
    "alias_settings",
    "backend_error",
    "check_alias_server",
    "check_configuration",
    "check_servers",
    "check_settings",
    "client_timeouts",
    "configuration_messages",
    "connect_error_kind",
    "connect_error_message",
    "describe_server",
    "diagnostic_connection",
    "diagnostic_settings",
    "error_text",
    "limit_formula",
    "mask_secrets",
    "middleware_messages",
    "read_server_variables",
    "server_messages",
    "socket_path",
    "split_aliases",
    "unreachable_message",
]
