"""The aliases the checks look at: their settings, their backend, their client timeouts.

Owns: reading ``DATABASES`` and ``DBKEEPALIVE`` for one alias without connecting (which
aliases are MySQL, which backend fails to load, which timeouts the driver gets).
Must never import: the other check modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connections

from ..conf import TIMEOUT_NAMES, AliasSettings, conf
from .registry import MIDDLEWARE_PATH


def settings_dict_of(alias: str) -> Mapping[str, Any]:
    """``DATABASES[alias]`` as Django resolved it (the dict its wrappers share), also
    when the alias's backend cannot be loaded."""
    settings_dict: Mapping[str, Any] = connections.settings[alias]
    return settings_dict


def options_of(settings_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    options = settings_dict.get("OPTIONS")
    return options if isinstance(options, Mapping) else {}


def is_real(value: object) -> bool:
    """A number (``int`` or ``float``), not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def backend_error(alias: str) -> Exception | None:
    """The exception loading ``alias``'s database backend raises (``ImproperlyConfigured:
    Error loading MySQLdb module`` when no MySQL driver is installed), or ``None``."""
    try:
        connections[alias]  # loads the backend and makes the wrapper
    except Exception as exc:
        return exc
    return None


def split_aliases(aliases: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """``(MySQL/MariaDB aliases, other aliases)`` among ``aliases`` (default: all
    configured ones), in the order given. Aliases not in ``DATABASES``, and aliases whose
    backend cannot be loaded (:func:`backend_error`, reported as ``E005``), are skipped.

    The vendor comes from the backend (``connections[alias].vendor``), so third-party
    backends built on Django's MySQL backend count as MySQL. No connection is opened.
    """
    configured = list(connections)
    wanted = configured if aliases is None else [a for a in aliases if a in configured]
    mysql: list[str] = []
    other: list[str] = []
    for alias in dict.fromkeys(wanted):
        if backend_error(alias) is not None:
            continue
        (mysql if connections[alias].vendor == "mysql" else other).append(alias)
    return mysql, other


def alias_settings(alias: str) -> AliasSettings | None:
    """The resolved settings for ``alias``, or ``None`` while ``DBKEEPALIVE`` is invalid
    (the E00x errors say why; checks that depend on it wait until it is fixed)."""
    if conf.problems():
        return None
    return conf.for_alias(alias)


def middleware_installed() -> bool:
    return MIDDLEWARE_PATH in (getattr(settings, "MIDDLEWARE", None) or ())


def driver_name(db: Any) -> str:
    return "PyMySQL" if getattr(db.Database, "__name__", "") == "pymysql" else "mysqlclient"


@dataclass(frozen=True)
class ClientTimeout:
    """One client timeout of an alias as its connections get it.

    ``source``: ``"options"`` (``OPTIONS`` has it, and wins), ``"client_timeouts"``
    (``DBKEEPALIVE['CLIENT_TIMEOUTS']`` adds it), ``"option_file"`` (not in ``OPTIONS``,
    and ``CLIENT_TIMEOUTS`` is skipped because ``OPTIONS`` has ``read_default_file``,
    which may set it) or ``None`` (not set: the driver's default). ``value`` is what the
    driver gets (``None``: not set, or unknown).
    """

    name: str
    value: Any
    source: str | None

    @property
    def effective(self) -> bool:
        """It bounds the wait: a number > 0 (``None`` and ``0`` mean no timeout)."""
        return is_real(self.value) and self.value > 0


def client_timeouts(alias: str) -> dict[str, ClientTimeout]:
    """``connect_timeout``, ``read_timeout``, ``write_timeout`` of ``alias``: what the
    guard passes to the driver (``OPTIONS`` wins; otherwise ``CLIENT_TIMEOUTS``, unless
    ``OPTIONS`` has ``read_default_file``)."""
    options = options_of(settings_dict_of(alias))
    extra = conf.client_timeouts_for(alias) or {}
    found: dict[str, ClientTimeout] = {}
    for name in TIMEOUT_NAMES:
        if name in options:
            found[name] = ClientTimeout(name, options[name], "options")
        elif "read_default_file" in options:
            found[name] = ClientTimeout(name, None, "option_file")
        elif name in extra:
            found[name] = ClientTimeout(name, extra[name], "client_timeouts")
        else:
            found[name] = ClientTimeout(name, None, None)
    return found
