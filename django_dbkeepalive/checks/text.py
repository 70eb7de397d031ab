"""Words of the checks' messages: secrets masked, sizes and seconds, where a server is.

Owns: :func:`mask_secrets` (no message or report ever shows a password) and the small
formatters every check message and the diagnose command share.
Must never import: the other check modules except :mod:`.aliases`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..conf import conf
from ..guard import limit_for
from .aliases import options_of, settings_dict_of


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


_SECRET_KEYS = ("password", "passwd")
_MASK = "********"
_WORD = "A-Za-z0-9_"
#: Secrets shorter than this are masked only where they stand as a value (quoted, in a
#: DSN, after ``=``): masking every "a" or "1" would garble the text and, by what it
#: leaves out, show the password.
_SHORT_SECRET = 4


def _secrets(settings_dict: Mapping[str, Any]) -> list[str]:
    found = [settings_dict.get("PASSWORD")]
    found += [v for k, v in options_of(settings_dict).items() if str(k).lower() in _SECRET_KEYS]
    return [str(s) for s in found if s not in (None, "")]


def _secret_pattern(secret: str) -> re.Pattern[str]:
    s = re.escape(secret)
    if len(secret) >= _SHORT_SECRET:
        return re.compile(rf"(?<![{_WORD}]){s}(?![{_WORD}])")
    return re.compile(rf"(?<='){s}(?=')|(?<=\"){s}(?=\")|(?<=:){s}(?=@)|(?<==){s}(?![{_WORD}])")


def mask_secrets(text: str, settings_dict: Mapping[str, Any]) -> str:
    """``text`` with the alias's password (``PASSWORD``, ``OPTIONS`` ``password``/
    ``passwd``) replaced by ``********`` wherever it appears as a whole token (not
    inside a longer word: a password ``a`` leaves ``OperationalError`` alone). A password
    shorter than 4 characters is masked only where it stands as a value: quoted
    (``'x'``, ``"x"``), in a DSN (``:x@``) or after ``=``."""
    for secret in sorted(set(_secrets(settings_dict)), key=len, reverse=True):
        text = _secret_pattern(secret).sub(_MASK, text)
    return text


def socket_path(settings_dict: Mapping[str, Any]) -> str | None:
    """The unix socket an alias connects through (``OPTIONS['unix_socket']``, or a
    ``HOST`` starting with ``/``), or ``None`` for TCP."""
    socket = options_of(settings_dict).get("unix_socket")
    host = str(settings_dict.get("HOST") or "")
    if socket:
        return str(socket)
    return host if host.startswith("/") else None


def describe_server(settings_dict: Mapping[str, Any]) -> str:
    """Where an alias connects, for messages: ``host:port`` or the unix socket path."""
    socket = socket_path(settings_dict)
    if socket:
        return f"unix socket {socket}"
    host = str(settings_dict.get("HOST") or "")
    port = settings_dict.get("PORT") or 3306
    return f"{host or 'localhost'}:{port}"


def seconds(value: float) -> str:
    return f"{value:g} s"


def size(value: int) -> str:
    # max_allowed_packet: the server keeps it a multiple of 1024.
    if value % (1024 * 1024) == 0:
        return f"{value // (1024 * 1024)} MiB"
    return f"{value / 1024:g} KiB"


def alias_key(alias: str, key: str) -> str:
    """Where to set ``key`` for ``alias``: the per-alias override if it has one."""
    raw = conf.raw.get("DATABASES")
    if isinstance(raw, Mapping) and isinstance(raw.get(alias), Mapping) and key in raw[alias]:
        return f"DBKEEPALIVE['DATABASES'][{alias!r}][{key!r}]"
    return f"DBKEEPALIVE[{key!r}]"


def limit_formula(wait: float, margin: float) -> str:
    """How the guard's idle limit follows from ``wait`` and ``margin``, as
    ``guard.limit_for`` computes it: ``"295 s = 300 s - margin 5 s"``, or with the
    half-timeout fallback ``"30 s = 60 s - min(margin 60 s, half)"``."""
    limit = limit_for(wait, margin)
    rule = (
        f"margin {seconds(margin)}"
        if margin <= wait / 2
        else f"min(margin {seconds(margin)}, half)"
    )
    return f"{seconds(round(limit, 3))} = {seconds(wait)} - {rule}"


def error_text(alias: str, exc: BaseException) -> str:
    """``"OperationalError: (2003, ...)"`` for an error on ``alias``, password masked."""
    return mask_secrets(f"{type(exc).__name__}: {one_line(exc)}", settings_dict_of(alias))
