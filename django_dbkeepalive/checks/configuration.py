"""The checks that need no connection: ``DBKEEPALIVE`` (``E001``-``E004``), backends that
cannot load (``E005``), client timeouts (``W006``), middleware without the app
(``W007``), requests nothing guards (``W008``), other vendors (``I001``, ``I002``).
Must never import: :mod:`.server`, :mod:`.connection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import apps
from django.core import checks
from django.db import connections

from .. import guard
from ..conf import conf
from .aliases import (
    alias_settings,
    backend_error,
    client_timeouts,
    driver_name,
    middleware_installed,
    settings_dict_of,
)
from .registry import APP_NAME, MIDDLEWARE_PATH, message
from .text import alias_key, mask_secrets, one_line

#: Vendors with no server that could close a connection: nothing for the guard to do.
_SERVERLESS_VENDORS = ("sqlite",)
_DUMMY_ENGINE = "django.db.backends.dummy"


def check_settings(**kwargs: Any) -> list[checks.CheckMessage]:
    """``dbkeepalive.E001`` ... ``E004``: the problems ``conf.validate()`` raises at
    startup, for settings changed later (``override_settings``) and ``manage.py check``."""
    return [message(p.id, p.message, p.hint) for p in conf.problems()]


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
            message(
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
            message(
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
    found += _unpatched_messages(alias, db)
    found += _unguarded_messages(alias, db)
    cfg = alias_settings(alias)
    if cfg is not None and not cfg.auto_guard and not middleware_installed():
        found.append(
            message(
                "dbkeepalive.W008",
                f"{alias_key(alias, 'AUTO_GUARD')} is False for database {alias!r} and "
                f"MIDDLEWARE does not include {MIDDLEWARE_PATH!r}: nothing guards this "
                "connection during requests, so a request whose connection idled past the "
                "server's wait_timeout fails with 'server has gone away' (2006/2013).",
                f"Add {MIDDLEWARE_PATH!r} to MIDDLEWARE, or set AUTO_GUARD back to True. "
                "Code run inside fresh_connection() or @keepalive_job stays guarded either way.",
            )
        )
    return found


def _unguarded_messages(alias: str, db: Any) -> list[checks.CheckMessage]:
    """``W011``: a MySQL or PostgreSQL backend whose driver the guard does not know or
    no longer supports: it is left alone, never shown as guarded."""
    reason = guard.unguarded(db)
    if reason is None:
        return []
    engine = db.settings_dict.get("ENGINE")
    drivers = (
        "mysqlclient, PyMySQL or MySQL Connector/Python >= 8.3"
        if db.vendor == "mysql"
        else "psycopg (3) or psycopg2"
    )
    return [
        message(
            "dbkeepalive.W011",
            f"Database {alias!r} is not guarded: {reason} (ENGINE {engine!r}). "
            "django-dbkeepalive leaves its connections alone; they fail with 'server "
            "has gone away' after an idle period, a KILL or a restart, as without the app.",
            f"Use a backend on {drivers} for DATABASES[{alias!r}], or keep CONN_MAX_AGE "
            "below the server's idle timeout and set CONN_HEALTH_CHECKS = True.",
        )
    ]


def _unpatched_messages(alias: str, db: Any) -> list[checks.CheckMessage]:
    """``W009``: ``PATCH`` is off and the alias's backend has no guard of its own."""
    if conf.patch or getattr(db, "dbkeepalive_native", False):
        return []
    if db.vendor in _SERVERLESS_VENDORS or db.settings_dict.get("ENGINE") == _DUMMY_ENGINE:
        return []
    engine = db.settings_dict.get("ENGINE")
    ours = f"django_dbkeepalive.backends.{db.vendor}"
    fix = (
        f"Set DATABASES[{alias!r}]['ENGINE'] = {ours!r}"
        if db.vendor in ("mysql", "postgresql") and engine == f"django.db.backends.{db.vendor}"
        else (
            "Build its backend on django_dbkeepalive.backends.mixin.KeepaliveWrapperMixin "
            "(class DatabaseWrapper(KeepaliveWrapperMixin, <its DatabaseWrapper>))"
        )
    )
    return [
        message(
            "dbkeepalive.W009",
            f"Database {alias!r} is not guarded: DBKEEPALIVE['PATCH'] is False, so "
            "django-dbkeepalive patches nothing of Django's, and its ENGINE "
            f"({engine!r}) has no guard of its own. Its connections fail with 'server "
            "has gone away' after an idle period, a KILL or a restart, as without the app.",
            f"{fix}, or set DBKEEPALIVE['PATCH'] = True (the default).",
        )
    ]


def _backend_message(alias: str, exc: BaseException) -> checks.CheckMessage:
    """``E005``: ``alias``'s backend cannot be loaded (a missing driver, a typo in ENGINE)."""
    settings_dict = settings_dict_of(alias)
    engine = str(settings_dict.get("ENGINE") or "")
    error = mask_secrets(f"{type(exc).__name__}: {one_line(exc)}", settings_dict)
    if "mysql" in engine.lower():
        fix = (
            "Install a MySQL driver in this environment: `pip install mysqlclient` (or "
            "`pip install PyMySQL` and call pymysql.install_as_MySQLdb() at the top of "
            "settings.py)"
        )
    else:
        fix = "Install the driver this backend needs"
    return message(
        "dbkeepalive.E005",
        f"Database {alias!r}: its database backend {engine!r} cannot be loaded ({error}), "
        "so Django cannot connect to it and django-dbkeepalive cannot guard it or check "
        "its server.",
        f"{fix}, or fix DATABASES[{alias!r}]['ENGINE'].",
    )


def _timeout_messages(alias: str, db: Any) -> list[checks.CheckMessage]:
    timeouts = client_timeouts(alias)
    pymysql = driver_name(db) == "PyMySQL"
    accepts = guard.driver_of(db).accepts_option
    missing: list[str] = []
    notes: list[str] = []
    for name in ("connect_timeout", "read_timeout"):
        timeout = timeouts[name]
        if timeout.effective or not accepts(name):
            continue  # (Connector/Python before 9.x has no read_timeout: never ask for it)
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
    example = (
        "{'connect_timeout': 5, 'read_timeout': 60, 'write_timeout': 60}"
        if accepts("read_timeout")
        else "{'connect_timeout': 5}"
    )
    return [
        message(
            "dbkeepalive.W006",
            f"Database {alias!r} has no {' or '.join(missing)} in OPTIONS{where}: "
            + "; ".join(effects)
            + ".",
            f"Add them to DATABASES[{alias!r}]['OPTIONS'] (seconds, same names for "
            f"mysqlclient and PyMySQL), e.g. {example}, or set "
            "DBKEEPALIVE['CLIENT_TIMEOUTS'] = True; read_timeout must exceed your "
            "slowest query. If an option file "
            "(read_default_file) sets them, silence this check with "
            "SILENCED_SYSTEM_CHECKS = ['dbkeepalive.W006'].",
        )
    ]


def middleware_messages() -> list[checks.CheckMessage]:
    """``W007``: the middleware is installed without the app."""
    if not middleware_installed() or apps.is_installed(APP_NAME):
        return []
    return [
        message(
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
