"""The ``DBKEEPALIVE`` setting: defaults, validation and per-alias resolution.

Nothing is read at import time: every access reads ``settings.DBKEEPALIVE`` again, so
``override_settings`` works. The guard copies what it needs onto a connection when the
connection opens, so the hot path never reads settings.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

SETTING_NAME = "DBKEEPALIVE"

#: Keys allowed at the top level and in ``DATABASES[alias]``, with their defaults.
DEFAULTS: dict[str, Any] = {
    "AUTO_GUARD": True,
    "MARGIN": 5.0,
    "WAIT_TIMEOUT": None,
    "PEEK_AFTER": 0.1,
    "PING_AFTER": 60.0,
    "RETRY_READS": True,
    "CLIENT_TIMEOUTS": None,
    "TCP_KEEPALIVE": None,
}
#: Keys allowed only at the top level.
TOP_LEVEL_ONLY = ("DATABASES",)

#: Check IDs of the kinds of ``DBKEEPALIVE`` problems (stable: never renumbered or reused).
#: The system checks in :mod:`django_dbkeepalive.checks` report each problem under its ID.
E_NOT_A_DICT = "dbkeepalive.E001"
E_UNKNOWN_KEY = "dbkeepalive.E002"
E_INVALID_VALUE = "dbkeepalive.E003"
E_UNKNOWN_ALIAS = "dbkeepalive.E004"

#: The client timeouts ``CLIENT_TIMEOUTS = True`` adds where ``OPTIONS`` has none (seconds).
RECOMMENDED_TIMEOUTS: dict[str, int] = {
    "connect_timeout": 10,
    "read_timeout": 300,
    "write_timeout": 300,
}
TIMEOUT_NAMES = tuple(RECOMMENDED_TIMEOUTS)

_ALLOWED = {
    "AUTO_GUARD": "True or False",
    "MARGIN": "a number of seconds >= 0",
    "WAIT_TIMEOUT": "None (read from the server) or a number of seconds > 0",
    "PEEK_AFTER": "a number of seconds >= 0",
    "PING_AFTER": "None (never ping) or a number of seconds >= 0",
    "RETRY_READS": "True or False",
    "CLIENT_TIMEOUTS": (
        "None or False (leave the driver's timeouts alone), True (the recommended "
        "values), or a dict of 'connect_timeout', 'read_timeout', 'write_timeout' "
        "to whole seconds > 0"
    ),
    "TCP_KEEPALIVE": "None or False (off), or whole seconds > 0 of idle before TCP probes",
    "DATABASES": "a dict mapping database aliases to dicts of the keys above",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with ``DBKEEPALIVE``; ``key`` is the dotted path to it and ``id``
    the system check ID of its kind (``dbkeepalive.E001`` ... ``E004``)."""

    key: str
    message: str
    hint: str
    id: str


@dataclass(frozen=True)
class AliasSettings:
    """The resolved settings for one database alias."""

    auto_guard: bool
    margin: float
    wait_timeout: float | None
    peek_after: float
    ping_after: float | None
    retry_reads: bool
    #: connect/read/write timeouts to add to the driver's parameters where OPTIONS has none.
    client_timeouts: Mapping[str, int] | None = None
    #: idle seconds before TCP keepalive probes (``None``: the socket is left alone).
    tcp_keepalive: int | None = None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole_seconds(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _timeouts_ok(value: object) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if not isinstance(value, Mapping):
        return False
    return all(k in TIMEOUT_NAMES and _is_whole_seconds(v) for k, v in value.items())


def _check_value(key: str, value: object, path: str) -> Problem | None:
    ok: bool
    if key == "CLIENT_TIMEOUTS":
        ok = _timeouts_ok(value)
    elif key == "TCP_KEEPALIVE":
        ok = value is None or value is False or _is_whole_seconds(value)
    elif key in ("AUTO_GUARD", "RETRY_READS"):
        ok = isinstance(value, bool)
    elif key in ("MARGIN", "PEEK_AFTER"):
        ok = _is_number(value) and value >= 0  # type: ignore[operator]
    elif key == "PING_AFTER":
        ok = value is None or (_is_number(value) and value >= 0)  # type: ignore[operator]
    elif key == "WAIT_TIMEOUT":
        ok = value is None or (_is_number(value) and value > 0)  # type: ignore[operator]
    else:  # pragma: no cover - callers pass known keys only
        ok = True
    if ok:
        return None
    return Problem(
        path,
        f"{SETTING_NAME}[{path}] is {value!r}; it must be {_ALLOWED[key]}.",
        f"Set {SETTING_NAME}[{path}] to {_ALLOWED[key]}, or remove it to use the "
        f"default ({DEFAULTS[key]!r}).",
        E_INVALID_VALUE,
    )


def _unknown_key(key: object, path: str, allowed: list[str]) -> Problem:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    return Problem(
        path,
        f"{SETTING_NAME} has an unknown key {path!r}.",
        f"{hint}Valid keys: {', '.join(allowed)}.",
        E_UNKNOWN_KEY,
    )


def find_problems(value: object, aliases: list[str] | None = None) -> list[Problem]:
    """Every problem in a ``DBKEEPALIVE`` value (``[]`` when it is valid).

    ``aliases``, when given, is the list of configured database aliases; per-alias
    overrides that name another alias are reported.
    """
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [
            Problem(
                "",
                f"{SETTING_NAME} is a {type(value).__name__}; it must be a dict.",
                f"Set {SETTING_NAME} = {{...}} with keys among {', '.join(_ALLOWED)}.",
                E_NOT_A_DICT,
            )
        ]
    problems: list[Problem] = []
    top_keys = [*DEFAULTS, *TOP_LEVEL_ONLY]
    for key, item in value.items():
        if key not in top_keys:
            problems.append(_unknown_key(key, str(key), top_keys))
        elif key == "DATABASES":
            problems.extend(_alias_problems(item, aliases))
        else:
            problem = _check_value(key, item, key)
            if problem:
                problems.append(problem)
    return problems


def _alias_problems(value: object, aliases: list[str] | None) -> list[Problem]:
    if not isinstance(value, Mapping):
        return [
            Problem(
                "DATABASES",
                f"{SETTING_NAME}['DATABASES'] is a {type(value).__name__}; "
                f"it must be {_ALLOWED['DATABASES']}.",
                f"Example: {SETTING_NAME} = {{'DATABASES': {{'default': {{'MARGIN': 10}}}}}}.",
                E_INVALID_VALUE,
            )
        ]
    problems = []
    for alias, overrides in value.items():
        where = f"DATABASES[{alias!r}]"
        if aliases is not None and alias not in aliases:
            problems.append(
                Problem(
                    where,
                    f"{SETTING_NAME}[{where}] names the database alias {alias!r}, "
                    "which is not in settings.DATABASES.",
                    f"Configured aliases: {', '.join(aliases) or '(none)'}. Fix the "
                    "alias or remove the entry.",
                    E_UNKNOWN_ALIAS,
                )
            )
        if not isinstance(overrides, Mapping):
            problems.append(
                Problem(
                    where,
                    f"{SETTING_NAME}[{where}] is a {type(overrides).__name__}; it must be a dict.",
                    f"Use keys among {', '.join(DEFAULTS)}.",
                    E_INVALID_VALUE,
                )
            )
            continue
        for key, item in overrides.items():
            path = f"{where}[{key!r}]"
            if key not in DEFAULTS:
                problems.append(_unknown_key(key, path, list(DEFAULTS)))
            else:
                problem = _check_value(key, item, path)
                if problem:
                    problems.append(problem)
    return problems


class Settings:
    """Typed access to ``DBKEEPALIVE``; every property reads the setting again."""

    @property
    def raw(self) -> Mapping[str, Any]:
        value = getattr(settings, SETTING_NAME, None)
        return value if isinstance(value, Mapping) else {}

    def validate(self) -> None:
        """Raise ``ImproperlyConfigured`` naming every invalid key, its check ID and its fix."""
        problems = self.problems()
        if problems:
            lines = [f"- ({p.id}) {p.message} {p.hint}" for p in problems]
            raise ImproperlyConfigured(f"Invalid {SETTING_NAME} setting:\n" + "\n".join(lines))

    def problems(self) -> list[Problem]:
        """Every problem in the current ``DBKEEPALIVE`` (``[]`` when it is valid)."""
        return find_problems(getattr(settings, SETTING_NAME, None), list(settings.DATABASES))

    def for_alias(self, alias: str) -> AliasSettings:
        """The settings in force for ``alias``: defaults, top level, then overrides."""
        raw = self.raw
        merged = dict(DEFAULTS)
        merged.update({k: v for k, v in raw.items() if k in DEFAULTS})
        overrides = raw.get("DATABASES", {})
        if isinstance(overrides, Mapping):
            alias_overrides = overrides.get(alias, {})
            if isinstance(alias_overrides, Mapping):
                merged.update({k: v for k, v in alias_overrides.items() if k in DEFAULTS})
        return AliasSettings(
            auto_guard=bool(merged["AUTO_GUARD"]),
            margin=float(merged["MARGIN"]),
            wait_timeout=(
                None if merged["WAIT_TIMEOUT"] is None else float(merged["WAIT_TIMEOUT"])
            ),
            peek_after=float(merged["PEEK_AFTER"]),
            ping_after=(None if merged["PING_AFTER"] is None else float(merged["PING_AFTER"])),
            retry_reads=bool(merged["RETRY_READS"]),
            client_timeouts=_client_timeouts(merged["CLIENT_TIMEOUTS"]),
            tcp_keepalive=int(merged["TCP_KEEPALIVE"]) if merged["TCP_KEEPALIVE"] else None,
        )


def _client_timeouts(value: object) -> Mapping[str, int] | None:
    if value is True:
        return dict(RECOMMENDED_TIMEOUTS)
    if not value or not isinstance(value, Mapping):
        return None
    return {str(k): int(v) for k, v in value.items()}


conf = Settings()
