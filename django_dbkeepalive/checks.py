"""System checks: settings that cannot work against the server, and how to fix them.

Registered by ``AppConfig.ready()`` (tag ``dbkeepalive``):

- :func:`check_settings` — ``DBKEEPALIVE`` itself (``dbkeepalive.E001`` ... ``E004``);
- :func:`check_configuration` — ``DATABASES``, ``MIDDLEWARE`` and ``INSTALLED_APPS``
  without a round trip (``W006`` ... ``W008``, ``I001``);
- :func:`check_servers` — tagged ``database`` as well, so it runs only for
  ``manage.py check --database ALIAS``, ``migrate`` and the ``dbkeepalive`` command: reads
  each MySQL/MariaDB server's timeouts over a temporary connection (``W001`` ... ``W005``).

Every ID is listed in :data:`REGISTRY` and documented in ``docs/checks.md``. IDs are
stable: a check that goes away leaves its ID unused, it is never given to another.
Silence one with ``SILENCED_SYSTEM_CHECKS = ["dbkeepalive.W006"]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.db import connections

from . import conf as conf_module
from .conf import AliasSettings, conf
from .errors import is_disconnect

__all__ = [
    "CHECK_IDS",
    "MIDDLEWARE_PATH",
    "MIN_MAX_ALLOWED_PACKET",
    "REGISTRY",
    "TAG",
    "CheckInfo",
    "ServerVariables",
    "alias_settings",
    "check_configuration",
    "check_servers",
    "check_settings",
    "configuration_messages",
    "describe_server",
    "error_text",
    "mask_secrets",
    "middleware_messages",
    "read_server_variables",
    "server_messages",
    "split_aliases",
    "unreachable_message",
]

#: The tag every check of this app carries (``manage.py check --tag dbkeepalive``).
TAG = "dbkeepalive"
APP_NAME = "django_dbkeepalive"
MIDDLEWARE_PATH = "django_dbkeepalive.middleware.KeepaliveMiddleware"
#: Below this, ``max_allowed_packet`` gets a warning (the default of MariaDB and of both
#: drivers' client side; MySQL 8 defaults to 64 MiB).
MIN_MAX_ALLOWED_PACKET = 16 * 1024 * 1024
#: Vendors with no server that could close a connection: nothing for the guard to do.
_SERVERLESS_VENDORS = ("sqlite",)
_DUMMY_ENGINE = "django.db.backends.dummy"
_DEFAULT_CFG = AliasSettings(
    auto_guard=bool(conf_module.DEFAULTS["AUTO_GUARD"]),
    margin=float(conf_module.DEFAULTS["MARGIN"]),
    wait_timeout=None,
    peek_after=float(conf_module.DEFAULTS["PEEK_AFTER"]),
    ping_after=float(conf_module.DEFAULTS["PING_AFTER"]),
    retry_reads=bool(conf_module.DEFAULTS["RETRY_READS"]),
)


@dataclass(frozen=True)
class CheckInfo:
    """One check ID: its level, what it is about, and which check function reports it."""

    id: str
    level: str  # "error", "warning" or "info"
    title: str
    source: str  # "settings", "configuration" or "server"


#: Every check ID, in order. Never renumber or reuse one.
REGISTRY: tuple[CheckInfo, ...] = (
    CheckInfo(conf_module.E_NOT_A_DICT, "error", "DBKEEPALIVE is not a dict", "settings"),
    CheckInfo(conf_module.E_UNKNOWN_KEY, "error", "DBKEEPALIVE has an unknown key", "settings"),
    CheckInfo(
        conf_module.E_INVALID_VALUE,
        "error",
        "a DBKEEPALIVE value has the wrong type or is out of range",
        "settings",
    ),
    CheckInfo(
        conf_module.E_UNKNOWN_ALIAS,
        "error",
        "DBKEEPALIVE['DATABASES'] names an alias that is not in DATABASES",
        "settings",
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
        "DBKEEPALIVE WAIT_TIMEOUT is larger than the server's wait_timeout",
        "server",
    ),
    CheckInfo(
        "dbkeepalive.W004", "warning", "the server's max_allowed_packet is below 16 MiB", "server"
    ),
    CheckInfo(
        "dbkeepalive.W005",
        "warning",
        "could not connect to the server to check its timeouts",
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
        "dbkeepalive.I001",
        "info",
        "a non-MySQL alias: the guard enforces only CONN_MAX_AGE on it",
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


def _message(check_id: str, msg: str, hint: str, obj: Any = None) -> checks.CheckMessage:
    return _LEVELS[_BY_ID[check_id].level](msg, hint=hint, obj=obj, id=check_id)


# ---------------------------------------------------------------------- helpers


def split_aliases(aliases: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """``(MySQL/MariaDB aliases, other aliases)`` among ``aliases`` (default: all
    configured ones), in the order given. Aliases not in ``DATABASES`` are skipped.

    The vendor comes from the backend (``connections[alias].vendor``), so third-party
    backends built on Django's MySQL backend count as MySQL. No connection is opened.
    """
    configured = list(connections)
    wanted = configured if aliases is None else [a for a in aliases if a in configured]
    mysql: list[str] = []
    other: list[str] = []
    for alias in dict.fromkeys(wanted):
        (mysql if connections[alias].vendor == "mysql" else other).append(alias)
    return mysql, other


def _secrets(settings_dict: Mapping[str, Any]) -> list[str]:
    found = [settings_dict.get("PASSWORD")]
    options = settings_dict.get("OPTIONS") or {}
    if isinstance(options, Mapping):
        found += [options.get("password"), options.get("passwd")]
    return [str(s) for s in found if s]


def mask_secrets(text: str, settings_dict: Mapping[str, Any]) -> str:
    """``text`` with the alias's password (``PASSWORD``, ``OPTIONS`` ``password``/
    ``passwd``) replaced by ``********`` wherever it appears."""
    for secret in sorted(_secrets(settings_dict), key=len, reverse=True):
        text = text.replace(secret, "********")
    return text


def describe_server(settings_dict: Mapping[str, Any]) -> str:
    """Where an alias connects, for messages: ``host:port`` or the unix socket path."""
    options = settings_dict.get("OPTIONS") or {}
    socket = options.get("unix_socket") if isinstance(options, Mapping) else None
    host = str(settings_dict.get("HOST") or "")
    if socket or host.startswith("/"):
        return f"unix socket {socket or host}"
    port = settings_dict.get("PORT") or 3306
    return f"{host or 'localhost'}:{port}"


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _size(value: int) -> str:
    if value % (1024 * 1024) == 0:
        return f"{value // (1024 * 1024)} MiB"
    if value % 1024 == 0:
        return f"{value // 1024} KiB"
    return f"{value} bytes"


def _alias_key(alias: str, key: str) -> str:
    """Where to set ``key`` for ``alias``: the per-alias override if it has one."""
    raw = conf.raw.get("DATABASES")
    if isinstance(raw, Mapping) and isinstance(raw.get(alias), Mapping) and key in raw[alias]:
        return f"DBKEEPALIVE['DATABASES'][{alias!r}][{key!r}]"
    return f"DBKEEPALIVE[{key!r}]"


def alias_settings(alias: str) -> AliasSettings | None:
    """The resolved settings for ``alias``, or ``None`` while ``DBKEEPALIVE`` is invalid
    (the E00x errors say why; checks that depend on it wait until it is fixed)."""
    if conf.problems():
        return None
    return conf.for_alias(alias)


def _middleware_installed() -> bool:
    return MIDDLEWARE_PATH in (getattr(settings, "MIDDLEWARE", None) or ())


# ------------------------------------------------------------------- settings


def check_settings(**kwargs: Any) -> list[checks.CheckMessage]:
    """``dbkeepalive.E001`` ... ``E004``: the problems ``conf.validate()`` raises at
    startup, for settings changed later (``override_settings``) and ``manage.py check``."""
    return [_message(p.id, p.message, p.hint) for p in conf.problems()]


# -------------------------------------------------------------- configuration


def configuration_messages(alias: str) -> list[checks.CheckMessage]:
    """The checks of one alias that need no connection (``W006``, ``W008``, ``I001``)."""
    db = connections[alias]
    found: list[checks.CheckMessage] = []
    mysql, _other = split_aliases([alias])
    if mysql:
        found += _timeout_messages(alias, db)
    elif db.vendor not in _SERVERLESS_VENDORS and db.settings_dict.get("ENGINE") != _DUMMY_ENGINE:
        found.append(
            _message(
                "dbkeepalive.I001",
                f"Database {alias!r} uses {db.display_name} ({db.settings_dict.get('ENGINE')}); "
                "django-dbkeepalive protects it only partly: a connection older than "
                "CONN_MAX_AGE is closed before its next statement (not only at request "
                "boundaries), but the server's idle timeout is not read, the socket is not "
                "checked before use, idle connections are not pinged, and reads that fail "
                "on a lost connection are not re-run.",
                "Keep CONN_MAX_AGE below every idle timeout between the application and "
                "this server (server, connection pooler, load balancer), and set "
                "CONN_HEALTH_CHECKS = True so Django tests reused connections at the "
                "start of each request.",
            )
        )
    cfg = alias_settings(alias)
    if cfg is not None and not cfg.auto_guard and not _middleware_installed():
        found.append(
            _message(
                "dbkeepalive.W008",
                f"{_alias_key(alias, 'AUTO_GUARD')} is False for database {alias!r} and "
                f"MIDDLEWARE does not include {MIDDLEWARE_PATH!r}: nothing guards this "
                "connection during requests, so a request whose connection idled past the "
                "server's wait_timeout fails with 'server has gone away' (2006/2013).",
                f"Add {MIDDLEWARE_PATH!r} to MIDDLEWARE, or set AUTO_GUARD back to True. "
                "Code run inside fresh_connection() or @keepalive_job stays guarded either way.",
            )
        )
    return found


def _timeout_messages(alias: str, db: Any) -> list[checks.CheckMessage]:
    options = dict(db.settings_dict.get("OPTIONS") or {})
    # DBKEEPALIVE["CLIENT_TIMEOUTS"] fills in what OPTIONS lacks when connecting; invalid
    # settings are reported by E00x.
    with contextlib.suppress(ValueError):
        options = {**(conf.for_alias(alias).client_timeouts or {}), **options}
    pymysql = getattr(db.Database, "__name__", "") == "pymysql"
    missing = [
        name
        for name in ("connect_timeout", "read_timeout")
        # PyMySQL gives up connecting after 10 s by default; mysqlclient never does.
        if name not in options and not (pymysql and name == "connect_timeout")
    ]
    if not missing:
        return []
    effects = []
    if "connect_timeout" in missing:
        effects.append(
            "without connect_timeout, connecting to a server that does not answer waits "
            "for the operating system's TCP connect timeout (about 2 minutes on Linux)"
        )
    if "read_timeout" in missing:
        effects.append(
            "without read_timeout, a query on a connection that a firewall, NAT or load "
            "balancer dropped silently waits until TCP retransmission gives up (about 15 "
            "minutes on Linux), hanging the worker all that time"
        )
    return [
        _message(
            "dbkeepalive.W006",
            f"Database {alias!r} has no {' or '.join(missing)} in OPTIONS: "
            + "; ".join(effects)
            + ".",
            f"Add them to DATABASES[{alias!r}]['OPTIONS'] (seconds, same names for "
            "mysqlclient and PyMySQL), e.g. {'connect_timeout': 5, 'read_timeout': 60, "
            "'write_timeout': 60}; read_timeout must exceed your slowest query. If an "
            "option file (read_default_file) sets them, silence this check with "
            "SILENCED_SYSTEM_CHECKS = ['dbkeepalive.W006'].",
        )
    ]


def middleware_messages() -> list[checks.CheckMessage]:
    """``W007``: the middleware is installed without the app."""
    if not _middleware_installed() or apps.is_installed(APP_NAME):
        return []
    return [
        _message(
            "dbkeepalive.W007",
            f"{MIDDLEWARE_PATH!r} is in MIDDLEWARE but {APP_NAME!r} is not in "
            "INSTALLED_APPS: the connection guard is not installed at startup, "
            "DBKEEPALIVE is not validated, forked processes do not drop inherited "
            "connections, and management commands, shells and background threads are "
            "not guarded.",
            f"Add {APP_NAME!r} to INSTALLED_APPS.",
        )
    ]


def check_configuration(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """``W006``, ``W007``, ``W008``, ``I001``: configuration that needs no connection."""
    found = middleware_messages()
    for alias in connections:
        found += configuration_messages(alias)
    return found


# --------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerVariables:
    """What the server says about one connection (timeouts in seconds, sizes in bytes)."""

    version: str
    wait_timeout: float  # @@SESSION.wait_timeout: what applies to this connection
    global_wait_timeout: float
    interactive_timeout: float  # @@GLOBAL.interactive_timeout
    net_read_timeout: float
    net_write_timeout: float
    max_allowed_packet: int  # @@SESSION.max_allowed_packet
    global_max_allowed_packet: int


_VARIABLES_SQL = (
    "SELECT VERSION(), @@SESSION.wait_timeout, @@GLOBAL.wait_timeout, "
    "@@GLOBAL.interactive_timeout, @@SESSION.net_read_timeout, @@SESSION.net_write_timeout, "
    "@@SESSION.max_allowed_packet, @@GLOBAL.max_allowed_packet"
)


def _number(value: Any) -> float:
    # int from both drivers, Decimal or str through some proxies; ints stay ints.
    if isinstance(value, bytes):
        value = value.decode()
    number = float(value)
    return int(number) if number.is_integer() else number


def read_server_variables(alias: str) -> ServerVariables:
    """Read the server's timeouts over ``alias``'s connection in this thread (opened for
    the query and closed again when there was none, as ``temporary_connection()`` does).

    A connection that was already open and turns out to be dead (killed, or closed by
    the server a moment ago) is replaced once: that is a stale connection, not an
    unreachable server. Raises whatever connecting or querying raised.
    """
    db = connections[alias]
    was_open = db.connection is not None
    try:
        return _read_variables(db)
    except Exception as exc:
        if not was_open or db.in_atomic_block or not is_disconnect(exc):
            raise
    if db.connection is not None:
        from . import guard

        if guard.is_installed():
            guard.close_connection(db)
        else:
            with contextlib.suppress(Exception):
                db.close()
    return _read_variables(db)


def _read_variables(db: Any) -> ServerVariables:
    with db.temporary_connection() as cursor:
        cursor.execute(_VARIABLES_SQL)
        row = cursor.fetchone()
    version = row[0].decode() if isinstance(row[0], bytes) else str(row[0])
    return ServerVariables(
        version=version,
        wait_timeout=_number(row[1]),
        global_wait_timeout=_number(row[2]),
        interactive_timeout=_number(row[3]),
        net_read_timeout=_number(row[4]),
        net_write_timeout=_number(row[5]),
        max_allowed_packet=int(_number(row[6])),
        global_max_allowed_packet=int(_number(row[7])),
    )


def server_messages(
    alias: str, variables: ServerVariables, cfg: AliasSettings | None = None
) -> list[checks.CheckMessage]:
    """``W001`` ... ``W004`` for one MySQL alias, given what its server said."""
    from .guard import _limit_for

    cfg = alias_settings(alias) if cfg is None else cfg
    settings_dict = connections[alias].settings_dict
    wait = variables.wait_timeout
    where = (
        f"session wait_timeout {_seconds(wait)}; GLOBAL wait_timeout "
        f"{_seconds(variables.global_wait_timeout)}, interactive_timeout "
        f"{_seconds(variables.interactive_timeout)}"
    )
    found: list[checks.CheckMessage] = []
    max_age = settings_dict.get("CONN_MAX_AGE", 0)
    if max_age is None or (max_age and max_age >= wait):
        age = "None (connections are reused without limit)" if max_age is None else f"{max_age} s"
        good = max(1, int(_limit_for(wait, cfg or _DEFAULT_CFG)))
        found.append(
            _message(
                "dbkeepalive.W001",
                f"Database {alias!r}: CONN_MAX_AGE is {age}, not below the server's "
                f"wait_timeout of {_seconds(wait)} ({where}). Django reuses a connection "
                "the server may already have closed; the guard reconnects it before use, "
                "but code it does not cover (AUTO_GUARD off outside the middleware) fails "
                "with 'server has gone away'.",
                f"Set DATABASES[{alias!r}]['CONN_MAX_AGE'] below {_seconds(wait)} "
                f"(e.g. {good}, the wait_timeout minus the guard's margin), or raise "
                "wait_timeout and interactive_timeout on the server.",
            )
        )
    if cfg is not None:
        found += _guard_setting_messages(alias, variables, cfg, where)
    if variables.max_allowed_packet < MIN_MAX_ALLOWED_PACKET:
        found.append(
            _message(
                "dbkeepalive.W004",
                f"Database {alias!r}: the server's max_allowed_packet is "
                f"{_size(variables.max_allowed_packet)} ({variables.max_allowed_packet} "
                f"bytes), below {_size(MIN_MAX_ALLOWED_PACKET)}. A statement larger than "
                "that (a bulk_create, a large text, JSON or binary value) makes the server "
                "close the connection (error 1153 or 2006): the statement fails and is not "
                "re-run, since it would fail again.",
                "Raise it on the server, e.g. max_allowed_packet = 64M in its configuration "
                "file and SET GLOBAL max_allowed_packet = 67108864 (MariaDB defaults to "
                "16 MiB, MySQL 8 to 64 MiB), or send smaller statements (bulk_create's "
                "batch_size).",
            )
        )
    return found


def _guard_setting_messages(
    alias: str, variables: ServerVariables, cfg: AliasSettings, where: str
) -> list[checks.CheckMessage]:
    """``W002`` and ``W003``: the guard's settings against the server's real timeout."""
    from .guard import _limit_for

    wait = variables.wait_timeout
    found: list[checks.CheckMessage] = []
    guard_wait = cfg.wait_timeout if cfg.wait_timeout is not None else wait
    if cfg.margin >= guard_wait:
        source = "DBKEEPALIVE WAIT_TIMEOUT" if cfg.wait_timeout is not None else "wait_timeout"
        found.append(
            _message(
                "dbkeepalive.W002",
                f"Database {alias!r}: the guard's MARGIN ({_seconds(cfg.margin)}) is not "
                f"below the {source} ({_seconds(guard_wait)}), which leaves no usable idle "
                "window; the guard falls back to half the timeout (idle limit "
                f"{_seconds(_limit_for(guard_wait, cfg))}), so connections idle longer "
                "than that are replaced.",
                f"Lower {_alias_key(alias, 'MARGIN')} to a few seconds, well below "
                f"{_seconds(guard_wait)}, or raise wait_timeout on the server.",
            )
        )
    if cfg.wait_timeout is not None and cfg.wait_timeout > wait:
        found.append(
            _message(
                "dbkeepalive.W003",
                f"Database {alias!r}: {_alias_key(alias, 'WAIT_TIMEOUT')} is "
                f"{_seconds(cfg.wait_timeout)} but the server closes idle connections after "
                f"{_seconds(wait)} ({where}). The guard trusts the setting, so it keeps "
                f"using connections idle up to {_seconds(_limit_for(cfg.wait_timeout, cfg))} "
                "that the server has already closed.",
                f"Set it to {_seconds(wait)} or less, or remove it so the guard reads "
                "wait_timeout from the server on every new connection.",
            )
        )
    return found


def error_text(alias: str, exc: BaseException) -> str:
    """``"OperationalError: (2003, ...)"`` for an error on ``alias``, password masked."""
    return mask_secrets(f"{type(exc).__name__}: {exc}", connections[alias].settings_dict)


def unreachable_message(alias: str, exc: BaseException) -> checks.CheckMessage:
    """``W005``: the server of ``alias`` could not be asked; never shows the password."""
    settings_dict = connections[alias].settings_dict
    error = error_text(alias, exc)
    return _message(
        "dbkeepalive.W005",
        f"Database {alias!r}: could not connect to the server at "
        f"{describe_server(settings_dict)} to check its timeouts ({error}).",
        "Check that the server is running and reachable from here and that HOST, PORT, "
        f"USER and PASSWORD are right; then run `manage.py dbkeepalive --database {alias}` "
        "again.",
    )


def check_alias_server(
    alias: str,
) -> tuple[ServerVariables | None, BaseException | None, list[checks.CheckMessage]]:
    """Read one MySQL alias's server and check it: ``(variables, error, messages)``."""
    try:
        variables = read_server_variables(alias)
    except Exception as exc:
        return None, exc, [unreachable_message(alias, exc)]
    return variables, None, server_messages(alias, variables)


def check_servers(
    app_configs: Sequence[Any] | None = None,
    databases: Iterable[str] | None = None,
    **kwargs: Any,
) -> list[checks.CheckMessage]:
    """``W001`` ... ``W005`` for the MySQL aliases among ``databases`` (a database-tagged
    check: Django passes ``databases=None`` unless asked, and then it does nothing)."""
    if databases is None:
        return []
    mysql, _other = split_aliases(databases)
    found: list[checks.CheckMessage] = []
    for alias in mysql:
        found += check_alias_server(alias)[2]
    return found
