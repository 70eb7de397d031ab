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

Every ID is listed in :data:`REGISTRY` and documented in ``docs/checks.md``. IDs are
stable: a check that goes away leaves its ID unused, it is never given to another.
Silence one with ``SILENCED_SYSTEM_CHECKS = ["dbkeepalive.W006"]``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.db import connections

from . import conf as conf_module
from .conf import TIMEOUT_NAMES, AliasSettings, conf, type_text
from .guard import classify, limit_for

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
#: Vendors with no server that could close a connection: nothing for the guard to do.
_SERVERLESS_VENDORS = ("sqlite",)
_DUMMY_ENGINE = "django.db.backends.dummy"
#: MySQL's ``CLIENT_INTERACTIVE`` flag: the session gets ``interactive_timeout``.
_CLIENT_INTERACTIVE = 1024
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


def _settings_dict(alias: str) -> Mapping[str, Any]:
    """``DATABASES[alias]`` as Django resolved it (the dict its wrappers share), also
    when the alias's backend cannot be loaded."""
    settings_dict: Mapping[str, Any] = connections.settings[alias]
    return settings_dict


def _options(settings_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    options = settings_dict.get("OPTIONS")
    return options if isinstance(options, Mapping) else {}


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


_SECRET_KEYS = ("password", "passwd")
_MASK = "********"
_WORD = "A-Za-z0-9_"
#: Secrets shorter than this are masked only where they stand as a value (quoted, in a
#: DSN, after ``=``): masking every "a" or "1" would garble the text and, by what it
#: leaves out, show the password.
_SHORT_SECRET = 4


def _secrets(settings_dict: Mapping[str, Any]) -> list[str]:
    found = [settings_dict.get("PASSWORD")]
    found += [v for k, v in _options(settings_dict).items() if str(k).lower() in _SECRET_KEYS]
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
    socket = _options(settings_dict).get("unix_socket")
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


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _size(value: int) -> str:
    if value % (1024 * 1024) == 0:
        return f"{value // (1024 * 1024)} MiB"
    if value % 1024 == 0:
        return f"{value // 1024} KiB"
    return f"{value} bytes"


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def limit_formula(wait: float, margin: float) -> str:
    """How the guard's idle limit follows from ``wait`` and ``margin``, as
    ``guard.limit_for`` computes it: ``"295 s = 300 s - margin 5 s"``, or with the
    half-timeout fallback ``"30 s = 60 s - min(margin 60 s, half)"``."""
    limit = limit_for(wait, margin)
    rule = (
        f"margin {_seconds(margin)}"
        if margin <= wait / 2
        else f"min(margin {_seconds(margin)}, half)"
    )
    return f"{_seconds(round(limit, 3))} = {_seconds(wait)} - {rule}"


def _middleware_installed() -> bool:
    return MIDDLEWARE_PATH in (getattr(settings, "MIDDLEWARE", None) or ())


def _driver_name(db: Any) -> str:
    return "PyMySQL" if getattr(db.Database, "__name__", "") == "pymysql" else "mysqlclient"


# ------------------------------------------------------------------- settings


def check_settings(**kwargs: Any) -> list[checks.CheckMessage]:
    """``dbkeepalive.E001`` ... ``E004``: the problems ``conf.validate()`` raises at
    startup, for settings changed later (``override_settings``) and ``manage.py check``."""
    return [_message(p.id, p.message, p.hint) for p in conf.problems()]


# -------------------------------------------------------------- client timeouts


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
        return _is_real(self.value) and self.value > 0


def client_timeouts(alias: str) -> dict[str, ClientTimeout]:
    """``connect_timeout``, ``read_timeout``, ``write_timeout`` of ``alias``: what the
    guard passes to the driver (``OPTIONS`` wins; otherwise ``CLIENT_TIMEOUTS``, unless
    ``OPTIONS`` has ``read_default_file``)."""
    options = _options(_settings_dict(alias))
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


# -------------------------------------------------------------- configuration


def configuration_messages(alias: str) -> list[checks.CheckMessage]:
    """The checks of one alias that need no connection (``E005``, ``W006``, ``W008``,
    ``I001``)."""
    error = backend_error(alias)
    if error is not None:
        return [_backend_message(alias, error)]
    db = connections[alias]
    found: list[checks.CheckMessage] = []
    if db.vendor == "mysql":
        found += _timeout_messages(alias, db)
    elif db.vendor == "postgresql":
        found.append(
            _message(
                "dbkeepalive.I002",
                f"Database {alias!r} uses PostgreSQL: django-dbkeepalive reads the "
                "server's idle_session_timeout and idle_in_transaction_session_timeout "
                "when a connection opens, closes a connection idle past them or older "
                "than CONN_MAX_AGE before its next statement, checks the socket after "
                "an idle period and before each write (a session the server terminated "
                "is replaced before anything is sent), never reconnects inside a "
                "transaction, and re-runs a failed read once. Unlike MySQL, idle "
                "connections are not pinged and the database checks do not run.",
                "Set idle_session_timeout (or keep CONN_MAX_AGE below every idle timeout "
                "between the application and the server: pooler, load balancer), and "
                "TCP keepalives (OPTIONS 'keepalives_idle', or DBKEEPALIVE "
                "TCP_KEEPALIVE) so a flow the network dropped is noticed.",
            )
        )
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _backend_message(alias: str, exc: BaseException) -> checks.CheckMessage:
    """``E005``: ``alias``'s backend cannot be loaded (a missing driver, a typo in ENGINE)."""
    settings_dict = _settings_dict(alias)
    engine = str(settings_dict.get("ENGINE") or "")
    error = mask_secrets(f"{type(exc).__name__}: {_one_line(exc)}", settings_dict)
    if "mysql" in engine.lower():
        fix = (
            "Install a MySQL driver in this environment: `pip install mysqlclient` (or "
            "`pip install PyMySQL` and call pymysql.install_as_MySQLdb() at the top of "
            "settings.py)"
        )
    else:
        fix = "Install the driver this backend needs"
    return _message(
        "dbkeepalive.E005",
        f"Database {alias!r}: its database backend {engine!r} cannot be loaded ({error}), "
        "so Django cannot connect to it and django-dbkeepalive cannot guard it or check "
        "its server.",
        f"{fix}, or fix DATABASES[{alias!r}]['ENGINE'].",
    )


def _timeout_messages(alias: str, db: Any) -> list[checks.CheckMessage]:
    timeouts = client_timeouts(alias)
    pymysql = _driver_name(db) == "PyMySQL"
    missing: list[str] = []
    notes: list[str] = []
    for name in ("connect_timeout", "read_timeout"):
        timeout = timeouts[name]
        if timeout.effective:
            continue
        if timeout.source == "options":
            # Present but no timeout: None, or 0 (libmariadb's "no timeout").
            missing.append(name)
            notes.append(f"{name} is {timeout.value!r} there, which sets no timeout")
        elif not (pymysql and name == "connect_timeout"):
            # PyMySQL's own default connect_timeout (10 s) bounds the TCP connect.
            missing.append(name)
    if not missing:
        return []
    effects = []
    if "connect_timeout" in missing:
        if pymysql:
            effects.append(
                "without connect_timeout, connecting to a server that does not answer "
                "waits for the operating system's TCP connect timeout (about 2 minutes on "
                "Linux) instead of PyMySQL's default 10 s"
            )
        else:
            effects.append(
                "without connect_timeout, connecting to a server that does not answer "
                "waits for the operating system's TCP connect timeout (about 2 minutes on "
                "Linux), and connecting to one that accepts the connection but never "
                "answers (a hung server or proxy) waits with no limit at all"
            )
    if "read_timeout" in missing:
        effect = (
            "without read_timeout, a query on a connection that a firewall, NAT or load "
            "balancer dropped silently waits until TCP retransmission gives up (about 15 "
            "minutes on Linux), hanging the worker all that time"
        )
        if pymysql:
            effect += (
                "; and since PyMySQL's connect_timeout bounds only the TCP connect, "
                "connecting to a server that accepts the connection but never answers "
                "waits with no limit at all"
            )
        effects.append(effect)
    where = f" ({'; '.join(notes)})" if notes else ""
    return [
        _message(
            "dbkeepalive.W006",
            f"Database {alias!r} has no {' or '.join(missing)} in OPTIONS{where}: "
            + "; ".join(effects)
            + ".",
            f"Add them to DATABASES[{alias!r}]['OPTIONS'] (seconds, same names for "
            "mysqlclient and PyMySQL), e.g. {'connect_timeout': 5, 'read_timeout': 60, "
            "'write_timeout': 60}, or set DBKEEPALIVE['CLIENT_TIMEOUTS'] = True; "
            "read_timeout must exceed your slowest query. If an option file "
            "(read_default_file) sets them, silence this check with "
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
    """``E005``, ``W006``, ``W007``, ``W008``, ``I001``: configuration that needs no
    connection."""
    found = middleware_messages()
    for alias in connections:
        found += configuration_messages(alias)
    return found


# ------------------------------------------------------- diagnostic connections


def _capped(value: Any, cap: int) -> Any:
    """``value`` as a timeout of at most ``cap`` seconds: kept when it is a number in
    ``(0, cap]``; ``cap`` when it is missing, ``None``, ``0`` (no timeout), negative or
    larger (a float stays a float, so mysqlclient still rejects it as it would in
    production); anything else is kept for the driver to reject."""
    if value is None:
        return cap
    if not _is_real(value):
        return value
    if 0 < value <= cap:
        return value
    return float(cap) if isinstance(value, float) else cap


def diagnostic_settings(
    settings_dict: Mapping[str, Any],
    extra: Mapping[str, int] | None = None,
    cap: int | None = None,
) -> dict[str, Any]:
    """A copy of ``settings_dict`` whose ``OPTIONS`` ``connect_timeout``,
    ``read_timeout`` and ``write_timeout`` are at most ``cap`` seconds (default
    :data:`DIAGNOSTIC_TIMEOUT`); the alias's smaller values (from ``OPTIONS``, else from
    ``extra``, its ``CLIENT_TIMEOUTS``) are kept. ``settings_dict`` is not changed."""
    cap = DIAGNOSTIC_TIMEOUT if cap is None else cap
    options = dict(_options(settings_dict))
    extra = {} if "read_default_file" in options else (extra or {})
    for name in TIMEOUT_NAMES:
        options[name] = _capped(options[name] if name in options else extra.get(name), cap)
    return {**settings_dict, "OPTIONS": options}


@contextlib.contextmanager
def diagnostic_connection(alias: str) -> Iterator[Any]:
    """A new ``DatabaseWrapper`` for ``alias`` (not connected yet) made with
    :func:`diagnostic_settings`, closed again when the block ends. The connections of
    ``django.db.connections`` (this thread's and the others') are left alone."""
    from . import guard

    wrapper_class = type(connections[alias])
    bounded = diagnostic_settings(_settings_dict(alias), conf.client_timeouts_for(alias))
    db = wrapper_class(bounded, alias)
    try:
        yield db
    finally:
        if guard.is_installed():
            guard.close_connection(db)
        else:
            with contextlib.suppress(Exception):
                db.close()


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
    """Read the server's timeouts for ``alias`` over a :func:`diagnostic_connection`:
    what a new connection of the alias gets (after ``init_command``), bounded in time,
    without touching the alias's connections. Raises whatever connecting or querying
    raised."""
    with diagnostic_connection(alias) as db, db.cursor() as cursor:
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


def _session_source(alias: str, variables: ServerVariables) -> str | None:
    """Why the session ``wait_timeout`` differs from the global one, if the alias's
    settings say: ``init_command`` sets it, or ``client_flag`` asks for
    ``interactive_timeout``."""
    if variables.wait_timeout == variables.global_wait_timeout:
        return None
    settings_dict = _settings_dict(alias)
    options = _options(settings_dict)
    init = options.get("init_command")
    if isinstance(init, str) and "wait_timeout" in init.lower():
        shown = mask_secrets(repr(init), settings_dict)
        return f"DATABASES[{alias!r}]['OPTIONS']['init_command'] ({shown})"
    flag = options.get("client_flag")
    if (
        isinstance(flag, int)
        and flag & _CLIENT_INTERACTIVE
        and variables.wait_timeout == variables.interactive_timeout
    ):
        return (
            f"DATABASES[{alias!r}]['OPTIONS']['client_flag'], which includes "
            "CLIENT.INTERACTIVE (the session gets interactive_timeout)"
        )
    return None


def server_messages(
    alias: str, variables: ServerVariables, cfg: AliasSettings | None = None
) -> list[checks.CheckMessage]:
    """``W001`` ... ``W004`` for one MySQL alias, given what its server said."""
    cfg = alias_settings(alias) if cfg is None else cfg
    settings_dict = _settings_dict(alias)
    wait = variables.wait_timeout
    where = (
        f"session wait_timeout {_seconds(wait)}; GLOBAL wait_timeout "
        f"{_seconds(variables.global_wait_timeout)}, interactive_timeout "
        f"{_seconds(variables.interactive_timeout)}"
    )
    session_source = _session_source(alias, variables)
    found: list[checks.CheckMessage] = []
    max_age = settings_dict.get("CONN_MAX_AGE", 0)
    unlimited = max_age is None or (_is_real(max_age) and max_age == math.inf)
    # A CONN_MAX_AGE that is not a number breaks every connect: E006 reports it.
    if unlimited or (_is_real(max_age) and max_age > 0 and max_age >= wait):
        age = (
            f"{max_age!r} (connections are reused without limit)" if unlimited else f"{max_age:g} s"
        )
        good = int(limit_for(wait, (cfg or _DEFAULT_CFG).margin))
        if 1 <= good < wait:
            fix = (
                f"Set DATABASES[{alias!r}]['CONN_MAX_AGE'] below {_seconds(wait)} "
                f"(e.g. {good}, the wait_timeout minus the guard's margin)"
            )
        else:
            fix = (
                f"A wait_timeout of {_seconds(wait)} leaves no room to reuse connections: "
                f"set DATABASES[{alias!r}]['CONN_MAX_AGE'] = 0 (a new connection for each "
                "request)"
            )
        if session_source is not None:
            fix += (
                f", or raise the wait_timeout that {session_source} sets: this session's "
                f"value comes from there, not from the server's GLOBAL wait_timeout "
                f"({_seconds(variables.global_wait_timeout)})."
            )
        else:
            fix += ", or raise wait_timeout and interactive_timeout on the server."
        found.append(
            _message(
                "dbkeepalive.W001",
                f"Database {alias!r}: CONN_MAX_AGE is {age}, not below the server's "
                f"wait_timeout of {_seconds(wait)} ({where}). Django reuses a connection "
                "the server may already have closed; the guard reconnects it before use, "
                "but code it does not cover (AUTO_GUARD off outside the middleware) fails "
                "with 'server has gone away'.",
                fix,
            )
        )
    if cfg is not None:
        found += _guard_setting_messages(alias, variables, cfg, where, session_source)
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
    alias: str,
    variables: ServerVariables,
    cfg: AliasSettings,
    where: str,
    session_source: str | None = None,
) -> list[checks.CheckMessage]:
    """``W002`` and ``W003``: the guard's settings against the server's real timeout."""
    wait = variables.wait_timeout
    found: list[checks.CheckMessage] = []
    from_setting = cfg.wait_timeout is not None
    guard_wait = cfg.wait_timeout if cfg.wait_timeout is not None else wait
    margin_key = _alias_key(alias, "MARGIN")
    wait_key = _alias_key(alias, "WAIT_TIMEOUT")
    if cfg.margin >= guard_wait:
        source = wait_key if from_setting else "server's wait_timeout"
        example = min(5.0, guard_wait / 4)
        fix = f"Lower {margin_key} below {_seconds(guard_wait)} (e.g. {_seconds(example)})"
        if not from_setting:
            if session_source is not None:
                fix += f", or raise the wait_timeout that {session_source} sets"
            else:
                fix += ", or raise wait_timeout on the server"
        elif guard_wait < wait:
            fix += (
                f", or raise {wait_key} up to the server's wait_timeout of {_seconds(wait)} "
                "(or remove it so the guard reads the server's)"
            )
        found.append(
            _message(
                "dbkeepalive.W002",
                f"Database {alias!r}: {margin_key} ({_seconds(cfg.margin)}) is not below "
                f"the {source} ({_seconds(guard_wait)}), which leaves no usable idle "
                "window; the guard falls back to half the timeout (idle limit "
                f"{limit_formula(guard_wait, cfg.margin)}), so connections idle longer "
                "than that are replaced.",
                fix + ".",
            )
        )
    if cfg.wait_timeout is not None and cfg.wait_timeout > wait:
        limit = limit_for(cfg.wait_timeout, cfg.margin)
        if limit >= wait:
            found.append(
                _message(
                    "dbkeepalive.W003",
                    f"Database {alias!r}: {wait_key} is {_seconds(cfg.wait_timeout)} but "
                    f"the server closes idle connections after {_seconds(wait)} ({where}). "
                    "The guard trusts the setting: its idle limit is "
                    f"{limit_formula(cfg.wait_timeout, cfg.margin)}, not below the server's "
                    f"{_seconds(wait)}, so it keeps using connections idle up to "
                    f"{_seconds(round(limit, 3))} that the server closes after "
                    f"{_seconds(wait)}.",
                    f"Set it to {_seconds(wait)} or less, or remove it so the guard reads "
                    "wait_timeout from the server on every new connection.",
                )
            )
    return found


# ------------------------------------------------------------- connect errors


#: Error codes that mean the server was not reached, or not usable right now, on top of
#: what :func:`~django_dbkeepalive.errors.classify` counts as a lost connection.
_UNREACHABLE_CODES = frozenset(
    {
        1040,  # ER_CON_COUNT_ERROR: too many connections
        2001,  # CR_SOCKET_CREATE_ERROR
        2004,  # CR_IPSOCK_ERROR
        2005,  # CR_UNKNOWN_HOST
        2012,  # CR_SERVER_HANDSHAKE_ERR
    }
)
_ACCESS_DENIED_CODES = frozenset(
    {
        1044,  # ER_DBACCESS_DENIED_ERROR
        1045,  # ER_ACCESS_DENIED_ERROR
        1129,  # ER_HOST_IS_BLOCKED
        1130,  # ER_HOST_NOT_PRIVILEGED
        1251,  # ER_NOT_SUPPORTED_AUTH_MODE
        1698,  # ER_ACCESS_DENIED_NO_PASSWORD_ERROR
        1862,  # ER_MUST_CHANGE_PASSWORD_LOGIN
    }
)
_UNKNOWN_DATABASE = 1049


def _chain(exc: BaseException) -> Iterator[BaseException]:
    current: BaseException | None = exc
    for _ in range(6):
        if current is None:
            return
        yield current
        current = current.__cause__


def _code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def connect_error_kind(exc: BaseException) -> str:
    """What an error from connecting to check a server means:

    - ``"unreachable"``: the network or the server (refused, unknown host, timed out,
      lost during the handshake, too many connections): try again later;
    - ``"access_denied"``: the server refused ``USER``/``PASSWORD`` (1045, 1044, 1130...);
    - ``"unknown_database"``: the server has no database ``NAME`` (1049);
    - ``"sql"``: the server rejected a statement run while connecting (``init_command``);
    - ``"configuration"``: the alias's settings are wrong before anything reaches the
      server (a ``TypeError`` from bad ``OPTIONS`` or ``CONN_MAX_AGE``, a client error).
    """
    if classify(exc) is not None:
        return "unreachable"
    for current in _chain(exc):
        code = _code(current)
        if code in _UNREACHABLE_CODES:
            return "unreachable"
        if code in _ACCESS_DENIED_CODES:
            return "access_denied"
        if code == _UNKNOWN_DATABASE:
            return "unknown_database"
        if code is not None and code > 0 and not 2000 <= code < 3000:
            return "sql"  # a server error (client errors are 2000-2999)
        if isinstance(current, OSError):  # TimeoutError, socket errors let through
            return "unreachable"
    return "configuration"


def error_text(alias: str, exc: BaseException) -> str:
    """``"OperationalError: (2003, ...)"`` for an error on ``alias``, password masked."""
    return mask_secrets(f"{type(exc).__name__}: {_one_line(exc)}", _settings_dict(alias))


def unreachable_message(alias: str, exc: BaseException) -> checks.CheckMessage:
    """``W005``: the server of ``alias`` could not be reached; never shows the password."""
    settings_dict = _settings_dict(alias)
    error = error_text(alias, exc)
    found = classify(exc)
    lost = (
        " The connection was accepted, then lost or not answered in time during the "
        "login: a hung or overloaded server, or a proxy or load balancer whose server "
        "is down."
        if found is not None and found.kind == "lost"
        else ""
    )
    return _message(
        "dbkeepalive.W005",
        f"Database {alias!r}: could not connect to the server at "
        f"{describe_server(settings_dict)} to check its timeouts ({error}).{lost}",
        "Check that the server is running and reachable from here and that HOST and PORT "
        f"are right; then run `manage.py dbkeepalive --database {alias}` again.",
    )


def _configuration_fix(alias: str, exc: BaseException) -> str:
    settings_dict = _settings_dict(alias)
    options = _options(settings_dict)
    text = str(exc)
    fixes: list[str] = []
    max_age = settings_dict.get("CONN_MAX_AGE")
    if max_age is not None and not _is_real(max_age):
        fixes.append(
            f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is {max_age!r} ({type_text(max_age)}): "
            "it must be a number of seconds (0: close connections at the end of each "
            "request) or None (no limit)."
        )
    named = [str(key) for key in options if f"'{key}'" in text]
    backend_loaded = backend_error(alias) is None
    driver = _driver_name(connections[alias]) if backend_loaded else "the driver"
    if named:
        fixes.append(
            f"DATABASES[{alias!r}]['OPTIONS'] has {', '.join(map(repr, named))}, which "
            f"{driver} does not accept as it is: fix or remove it."
        )
    if driver == "mysqlclient":
        floats = [n for n in TIMEOUT_NAMES if isinstance(options.get(n), float)]
        if floats:
            fixes.append(
                "mysqlclient takes whole seconds only: "
                + ", ".join(f"{n} is {options[n]!r}" for n in floats)
                + f" in DATABASES[{alias!r}]['OPTIONS']."
            )
    if not fixes:
        fixes.append(
            f"Check DATABASES[{alias!r}] (OPTIONS, CONN_MAX_AGE and the other connection "
            f"settings) against what Django and {driver} accept."
        )
    return " ".join(fixes)


def connect_error_message(alias: str, exc: BaseException) -> checks.CheckMessage:
    """The message for an error from connecting to check ``alias``'s server:
    ``W005`` when the server could not be reached, ``E006`` when the alias's settings,
    credentials, database name or ``init_command`` are at fault. Never shows the
    password."""
    kind = connect_error_kind(exc)
    if kind == "unreachable":
        return unreachable_message(alias, exc)
    settings_dict = _settings_dict(alias)
    server = describe_server(settings_dict)
    error = error_text(alias, exc)
    again = f" Then run `manage.py dbkeepalive --database {alias}` again."
    if kind == "access_denied":
        user = settings_dict.get("USER")
        msg = f"Database {alias!r}: the server at {server} refused the login ({error})."
        hint = (
            f"Check DATABASES[{alias!r}]['USER'] ({user!r}) and DATABASES[{alias!r}]"
            "['PASSWORD'] (or OPTIONS 'user'/'password'/'read_default_file' if they are "
            f"set there), and that this user may connect from this host (GRANT ... TO "
            f"{user!r}@'host')."
        )
    elif kind == "unknown_database":
        name = settings_dict.get("NAME")
        msg = f"Database {alias!r}: the server at {server} has no database {name!r} ({error})."
        hint = (
            f"Check DATABASES[{alias!r}]['NAME'] ({name!r}), or create the database on the "
            "server (CREATE DATABASE ...; migrate does not create it)."
        )
    elif kind == "sql":
        init = _options(settings_dict).get("init_command")
        msg = (
            f"Database {alias!r}: the server at {server} rejected a statement run while "
            f"connecting ({error}), so every new connection of this alias fails."
        )
        if init:
            shown = mask_secrets(repr(init), settings_dict)
            hint = f"Fix DATABASES[{alias!r}]['OPTIONS']['init_command'] ({shown})."
        else:
            hint = (
                f"Check DATABASES[{alias!r}]['OPTIONS'] (isolation_level, charset, sql_mode) "
                "and the user's privileges."
            )
    else:
        msg = (
            f"Database {alias!r}: connecting to the server at {server} fails because of "
            f"the alias's settings, not the network ({error})."
        )
        hint = _configuration_fix(alias, exc)
    return _message("dbkeepalive.E006", msg, hint + again)


def check_alias_server(
    alias: str,
) -> tuple[ServerVariables | None, BaseException | None, list[checks.CheckMessage]]:
    """Read one MySQL alias's server and check it: ``(variables, error, messages)``."""
    try:
        variables = read_server_variables(alias)
    except Exception as exc:
        return None, exc, [connect_error_message(alias, exc)]
    return variables, None, server_messages(alias, variables)


def check_servers(
    app_configs: Sequence[Any] | None = None,
    databases: Iterable[str] | None = None,
    **kwargs: Any,
) -> list[checks.CheckMessage]:
    """``W001`` ... ``W005`` and ``E006`` for the MySQL aliases among ``databases`` (a
    database-tagged check: Django passes ``databases=None`` unless asked, and then it
    does nothing)."""
    if databases is None:
        return []
    mysql, _other = split_aliases(databases)
    found: list[checks.CheckMessage] = []
    for alias in mysql:
        found += check_alias_server(alias)[2]
    return found
