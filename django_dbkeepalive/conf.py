"""The ``DBKEEPALIVE`` setting: defaults, validation and per-alias resolution.

Nothing is read at import time: every access reads ``settings.DBKEEPALIVE`` again, so
``override_settings`` works. The guard copies what it needs onto a connection when the
connection opens, so the hot path never reads settings.
"""

from __future__ import annotations

import difflib
import math
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
    "RETRY_CONNECT_FOR": 5.0,
}
#: Keys allowed only at the top level, with their defaults (``DATABASES``: none).
TOP_LEVEL_ONLY = ("DATABASES", "PATCH")
TOP_LEVEL_DEFAULTS: dict[str, Any] = {"PATCH": True}

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

#: Upper bounds, so that a value validation accepts always works where it is used.
#: ``MARGIN``, ``WAIT_TIMEOUT``, ``PEEK_AFTER``, ``PING_AFTER``: 365 days, the largest
#: ``wait_timeout`` MySQL and MariaDB accept.
MAX_SECONDS = 31_536_000
#: ``CLIENT_TIMEOUTS`` values: libmariadb turns seconds into milliseconds in a C ``int``.
MAX_CLIENT_TIMEOUT = 2_147_483
#: ``TCP_KEEPALIVE``: the largest ``TCP_KEEPIDLE`` Linux accepts.
MAX_TCP_KEEPALIVE = 32_767

_ALLOWED = {
    "AUTO_GUARD": "True or False",
    "MARGIN": f"a number of seconds from 0 to {MAX_SECONDS}",
    "WAIT_TIMEOUT": (
        f"None (read from the server) or a number of seconds > 0 and at most {MAX_SECONDS}"
    ),
    "PEEK_AFTER": f"a number of seconds from 0 to {MAX_SECONDS}",
    "PING_AFTER": f"None (never ping) or a number of seconds from 0 to {MAX_SECONDS}",
    "RETRY_READS": "True or False",
    "CLIENT_TIMEOUTS": (
        "None or False (leave the driver's timeouts alone), True (the recommended "
        "values), or a dict of 'connect_timeout', 'read_timeout', 'write_timeout' "
        f"to whole seconds from 1 to {MAX_CLIENT_TIMEOUT}"
    ),
    "RETRY_CONNECT_FOR": (
        f"a number of seconds from 0 (off) to {MAX_SECONDS}: how long connecting is "
        "retried, with backoff, while the server cannot be reached"
    ),
    "TCP_KEEPALIVE": (
        "None or False (off), or whole seconds of idle before TCP probes, "
        f"from 1 to {MAX_TCP_KEEPALIVE}"
    ),
    "PATCH": "True (patch Django's classes: every backend is guarded) or False",
    "DATABASES": (
        "a dict mapping database aliases to dicts of per-alias settings (any key but DATABASES)"
    ),
}
_ALLOWED_TIMEOUT = f"whole seconds from 1 to {MAX_CLIENT_TIMEOUT}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with ``DBKEEPALIVE``; ``key`` is the path to it below the setting
    (``"MARGIN"``, ``"DATABASES['default']['MARGIN']"``; ``""`` for the setting itself) and
    ``id`` the system check ID of its kind (``dbkeepalive.E001`` ... ``E004``). Messages
    write the path as Python: ``DBKEEPALIVE['DATABASES']['default']['MARGIN']``."""

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
    #: seconds during which a connect that cannot reach the server is retried (0: never).
    retry_connect_for: float = 5.0


def _is_number(value: object) -> bool:
    """A finite int or float (not a bool): ``inf``, ``nan`` and ints too large for a
    float are not numbers of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range (10**400)
        return False


def _in_range(value: object, low: float, high: float, *, low_open: bool = False) -> bool:
    if not _is_number(value):
        return False
    number: float = value  # type: ignore[assignment]
    return (number > low if low_open else number >= low) and number <= high


def _is_whole_seconds(value: object, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= high


def path_text(path: tuple[object, ...]) -> str:
    """``DBKEEPALIVE['DATABASES']['default']['MARGIN']`` for ``('DATABASES', 'default',
    'MARGIN')``: where a value is, written as Python."""
    return SETTING_NAME + "".join(f"[{part!r}]" for part in path)


def type_text(value: object) -> str:
    """``None``, ``an int``, ``a str``: what ``value`` is, for a message."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _value_text(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({type_text(value)})"


def _key_text(path: tuple[object, ...]) -> str:
    # Problem.key: "MARGIN", "DATABASES['default']['MARGIN']" (the path below DBKEEPALIVE).
    if not path:
        return ""
    head, *rest = path
    return str(head) + "".join(f"[{part!r}]" for part in rest)


def _invalid(
    path: tuple[object, ...], value: object, allowed: str, default: object, hint: str = ""
) -> Problem:
    where = path_text(path)
    return Problem(
        _key_text(path),
        f"{where} is {_value_text(value)}; it must be {allowed}.",
        hint or f"Set {where} to {allowed}, or remove it to use the default ({default!r}).",
        E_INVALID_VALUE,
    )


def _timeouts_problems(value: object, path: tuple[object, ...]) -> list[Problem]:
    if value is None or isinstance(value, bool):
        return []
    if not isinstance(value, Mapping):
        return [_invalid(path, value, _ALLOWED["CLIENT_TIMEOUTS"], DEFAULTS["CLIENT_TIMEOUTS"])]
    problems = []
    for name, item in value.items():
        where = (*path, name)
        if name not in TIMEOUT_NAMES:
            # E003, not E002: the key is valid, its value (this dict) is not.
            problems.append(_unknown_key(name, path, list(TIMEOUT_NAMES), E_INVALID_VALUE))
        elif not _is_whole_seconds(item, MAX_CLIENT_TIMEOUT):
            example = RECOMMENDED_TIMEOUTS[str(name)]
            hint = f"Set {path_text(where)} to {_ALLOWED_TIMEOUT} (e.g. {example}), or remove it."
            problems.append(_invalid(where, item, _ALLOWED_TIMEOUT, None, hint))
    return problems


def _check_value(key: str, value: object, path: tuple[object, ...]) -> list[Problem]:
    ok: bool
    if key == "CLIENT_TIMEOUTS":
        return _timeouts_problems(value, path)
    if key == "TCP_KEEPALIVE":
        ok = value is None or value is False or _is_whole_seconds(value, MAX_TCP_KEEPALIVE)
    elif key in ("AUTO_GUARD", "RETRY_READS"):
        ok = isinstance(value, bool)
    elif key in ("MARGIN", "PEEK_AFTER", "RETRY_CONNECT_FOR"):
        ok = _in_range(value, 0, MAX_SECONDS)
    elif key == "PING_AFTER":
        ok = value is None or _in_range(value, 0, MAX_SECONDS)
    elif key == "WAIT_TIMEOUT":
        ok = value is None or _in_range(value, 0, MAX_SECONDS, low_open=True)
    else:  # pragma: no cover - callers pass known keys only
        ok = True
    return [] if ok else [_invalid(path, value, _ALLOWED[key], DEFAULTS[key])]


def _unknown_key(
    key: object, path: tuple[object, ...], allowed: list[str], check_id: str = E_UNKNOWN_KEY
) -> Problem:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    return Problem(
        _key_text((*path, key)),
        f"{path_text(path)} has an unknown key {key!r}.",
        f"{hint}Valid keys: {', '.join(allowed)}.",
        check_id,
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
                f"{SETTING_NAME} is {type_text(value)}; it must be a dict.",
                f"Set {SETTING_NAME} = {{...}} with keys among {', '.join(_ALLOWED)}.",
                E_NOT_A_DICT,
            )
        ]
    problems: list[Problem] = []
    top_keys = [*DEFAULTS, *TOP_LEVEL_ONLY]
    for key, item in value.items():
        if key not in top_keys:
            problems.append(_unknown_key(key, (), top_keys))
        elif key == "DATABASES":
            problems.extend(_alias_problems(item, aliases))
        elif key == "PATCH":
            if not isinstance(item, bool):
                problems.append(_invalid((key,), item, _ALLOWED[key], TOP_LEVEL_DEFAULTS[key]))
        else:
            problems.extend(_check_value(key, item, (key,)))
    return problems


def _alias_problems(value: object, aliases: list[str] | None) -> list[Problem]:
    if not isinstance(value, Mapping):
        return [
            Problem(
                "DATABASES",
                f"{path_text(('DATABASES',))} is {type_text(value)}; "
                f"it must be {_ALLOWED['DATABASES']}.",
                f"Example: {SETTING_NAME} = {{'DATABASES': {{'default': {{'MARGIN': 10}}}}}}.",
                E_INVALID_VALUE,
            )
        ]
    problems = []
    for alias, overrides in value.items():
        path = ("DATABASES", alias)
        where = path_text(path)
        if aliases is not None and alias not in aliases:
            problems.append(
                Problem(
                    _key_text(path),
                    f"{where} names the database alias {alias!r}, "
                    "which is not in settings.DATABASES.",
                    f"Configured aliases: {', '.join(aliases) or '(none)'}. Fix the "
                    "alias or remove the entry.",
                    E_UNKNOWN_ALIAS,
                )
            )
        if not isinstance(overrides, Mapping):
            problems.append(
                Problem(
                    _key_text(path),
                    f"{where} is {type_text(overrides)}; it must be a dict.",
                    f"Use keys among {', '.join(DEFAULTS)}.",
                    E_INVALID_VALUE,
                )
            )
            continue
        for key, item in overrides.items():
            if key not in DEFAULTS:
                problems.append(_unknown_key(key, path, list(DEFAULTS)))
            else:
                problems.extend(_check_value(key, item, (*path, key)))
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

    def _merged(self, alias: str) -> dict[str, Any]:
        """Defaults, then the top level, then ``alias``'s overrides; a value that
        validation rejects is left out, so its default (or the top level's) applies."""
        raw = self.raw
        merged = dict(DEFAULTS)

        def add(values: Mapping[Any, Any]) -> None:
            for key, value in values.items():
                if key in DEFAULTS and not _check_value(key, value, (key,)):
                    merged[key] = value

        add(raw)
        overrides = raw.get("DATABASES", {})
        if isinstance(overrides, Mapping):
            alias_overrides = overrides.get(alias, {})
            if isinstance(alias_overrides, Mapping):
                add(alias_overrides)
        return merged

    def for_alias(self, alias: str) -> AliasSettings:
        """The settings in force for ``alias``: defaults, top level, then overrides.

        Never raises. A value that :meth:`problems` reports (possible only when the
        setting changed after startup, since ``validate()`` refuses it at startup) is
        ignored, so its default applies: the guard goes on working while the checks
        report the problem.
        """
        merged = self._merged(alias)
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
            retry_connect_for=float(merged["RETRY_CONNECT_FOR"]),
        )

    @property
    def patch(self) -> bool:
        """``PATCH``: whether the guard patches Django's classes (the default), so that
        every alias is guarded whatever its ``ENGINE``. With ``False`` nothing of
        Django's is patched, and only aliases whose ``ENGINE`` is one of
        ``django_dbkeepalive.backends`` (or uses its mixin) are guarded."""
        value = self.raw.get("PATCH", TOP_LEVEL_DEFAULTS["PATCH"])
        return value if isinstance(value, bool) else True

    def client_timeouts_for(self, alias: str) -> Mapping[str, int] | None:
        """The timeouts ``CLIENT_TIMEOUTS`` adds for ``alias`` where ``OPTIONS`` has
        none (``None`` when it adds none)."""
        return self.for_alias(alias).client_timeouts


def _client_timeouts(value: object) -> Mapping[str, int] | None:
    if value is True:
        return dict(RECOMMENDED_TIMEOUTS)
    if not value or not isinstance(value, Mapping):
        return None
    return {str(k): int(v) for k, v in value.items()}


conf = Settings()
