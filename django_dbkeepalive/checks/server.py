"""The checks that ask the server (``W001``-``W004``), tagged ``database``: run by
``check --database``, ``migrate`` and ``manage.py dbkeepalive``, never by a plain
``check`` (they return ``[]`` when ``databases`` is ``None``, as django-mysql's do).
Must never import: :mod:`.configuration`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from django.core import checks

from ..conf import DEFAULTS, AliasSettings
from ..guard import limit_for
from .aliases import alias_settings, is_real, options_of, settings_dict_of, split_aliases
from .connect_errors import connect_error_message
from .connection import ServerVariables, read_server_variables
from .registry import MIN_MAX_ALLOWED_PACKET, message
from .text import alias_key, describe_server, limit_formula, mask_secrets, seconds, size

#: MySQL's ``CLIENT_INTERACTIVE`` flag: the session gets ``interactive_timeout``.
_CLIENT_INTERACTIVE = 1024
_DEFAULT_CFG = AliasSettings(
    auto_guard=bool(DEFAULTS["AUTO_GUARD"]),
    margin=float(DEFAULTS["MARGIN"]),
    wait_timeout=None,
    peek_after=float(DEFAULTS["PEEK_AFTER"]),
    ping_after=float(DEFAULTS["PING_AFTER"]),
    retry_reads=bool(DEFAULTS["RETRY_READS"]),
)


def _session_source(alias: str, variables: ServerVariables) -> str | None:
    """Why the session ``wait_timeout`` differs from the global one, if the alias's
    settings say: ``init_command`` sets it, or ``client_flag`` asks for
    ``interactive_timeout``."""
    if variables.wait_timeout == variables.global_wait_timeout:
        return None
    settings_dict = settings_dict_of(alias)
    options = options_of(settings_dict)
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
    settings_dict = settings_dict_of(alias)
    wait = variables.wait_timeout
    where = (
        f"session wait_timeout {seconds(wait)}; GLOBAL wait_timeout "
        f"{seconds(variables.global_wait_timeout)}, interactive_timeout "
        f"{seconds(variables.interactive_timeout)}"
    )
    session_source = _session_source(alias, variables)
    found: list[checks.CheckMessage] = []
    max_age = settings_dict.get("CONN_MAX_AGE", 0)
    unlimited = max_age is None or (is_real(max_age) and max_age == math.inf)
    # A CONN_MAX_AGE that is not a number breaks every connect: E006 reports it.
    if unlimited or (is_real(max_age) and max_age > 0 and max_age >= wait):
        age = (
            f"{max_age!r} (connections are reused without limit)" if unlimited else f"{max_age:g} s"
        )
        good = int(limit_for(wait, (cfg or _DEFAULT_CFG).margin))
        if 1 <= good < wait:
            fix = (
                f"Set DATABASES[{alias!r}]['CONN_MAX_AGE'] below {seconds(wait)} "
                f"(e.g. {good}, the wait_timeout minus the guard's margin)"
            )
        else:
            fix = (
                f"A wait_timeout of {seconds(wait)} leaves no room to reuse connections: "
                f"set DATABASES[{alias!r}]['CONN_MAX_AGE'] = 0 (a new connection for each "
                "request)"
            )
        if session_source is not None:
            fix += (
                f", or raise the wait_timeout that {session_source} sets: this session's "
                f"value comes from there, not from the server's GLOBAL wait_timeout "
                f"({seconds(variables.global_wait_timeout)})."
            )
        else:
            fix += ", or raise wait_timeout and interactive_timeout on the server."
        found.append(
            message(
                "dbkeepalive.W001",
                f"Database {alias!r}: CONN_MAX_AGE is {age}, not below the server's "
                f"wait_timeout of {seconds(wait)} ({where}). Django reuses a connection "
                "the server may already have closed; the guard reconnects it before use, "
                "but code it does not cover (AUTO_GUARD off outside the middleware) fails "
                "with 'server has gone away'.",
                fix,
            )
        )
    if cfg is not None:
        found += _guard_setting_messages(alias, variables, cfg, where, session_source)
    found += _role_messages(alias, variables)
    if variables.max_allowed_packet < MIN_MAX_ALLOWED_PACKET:
        found.append(
            message(
                "dbkeepalive.W004",
                f"Database {alias!r}: the server's max_allowed_packet is "
                f"{size(variables.max_allowed_packet)} ({variables.max_allowed_packet} "
                f"bytes), below {size(MIN_MAX_ALLOWED_PACKET)}. A statement larger than "
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


def write_models(alias: str) -> int:
    """How many installed models the database routers send the writes of to ``alias``
    (``router.db_for_write``: ``default`` when no router decides)."""
    from django.apps import apps
    from django.db import router

    return sum(1 for model in apps.get_models() if router.db_for_write(model) == alias)


def _role_messages(alias: str, variables: ServerVariables) -> list[checks.CheckMessage]:
    """``W010``: an alias that receives writes points at a node that cannot take them."""
    ready = variables.wsrep.get("wsrep_ready")
    if not variables.read_only and ready in (None, "ON"):
        return []
    models = write_models(alias)
    if not models:
        return []
    state = "read-only (read_only=ON)" if variables.read_only else ""
    if ready not in (None, "ON"):
        status = variables.wsrep.get("wsrep_cluster_status")
        state = ", ".join(
            x
            for x in (
                state,
                f"a Galera node not ready (wsrep_ready={ready}, cluster status {status})",
            )
            if x
        )
    where = describe_server(settings_dict_of(alias))
    return [
        message(
            "dbkeepalive.W010",
            f"Database {alias!r} receives writes (the database routers send the writes of "
            f"{models} model{'s' if models != 1 else ''} to it), but its server at {where} is "
            f"{state}: every write there is refused (error 1290 or 1047). The guard "
            "replaces a refusing connection and runs the write once more on a new one, "
            "which comes back to the same node through this HOST.",
            f"Point DATABASES[{alias!r}]['HOST'] at the primary, or at something that follows "
            "failovers (a virtual IP, a DNS name, a proxy checking the node's role), or "
            "route the writes to another alias.",
        )
    ]


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
    margin_key = alias_key(alias, "MARGIN")
    wait_key = alias_key(alias, "WAIT_TIMEOUT")
    if cfg.margin >= guard_wait:
        source = wait_key if from_setting else "server's wait_timeout"
        example = min(5.0, guard_wait / 4)
        fix = f"Lower {margin_key} below {seconds(guard_wait)} (e.g. {seconds(example)})"
        if not from_setting:
            if session_source is not None:
                fix += f", or raise the wait_timeout that {session_source} sets"
            else:
                fix += ", or raise wait_timeout on the server"
        elif guard_wait < wait:
            fix += (
                f", or raise {wait_key} up to the server's wait_timeout of {seconds(wait)} "
                "(or remove it so the guard reads the server's)"
            )
        found.append(
            message(
                "dbkeepalive.W002",
                f"Database {alias!r}: {margin_key} ({seconds(cfg.margin)}) is not below "
                f"the {source} ({seconds(guard_wait)}), which leaves no usable idle "
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
                message(
                    "dbkeepalive.W003",
                    f"Database {alias!r}: {wait_key} is {seconds(cfg.wait_timeout)} but "
                    f"the server closes idle connections after {seconds(wait)} ({where}). "
                    "The guard trusts the setting: its idle limit is "
                    f"{limit_formula(cfg.wait_timeout, cfg.margin)}, not below the server's "
                    f"{seconds(wait)}, so it keeps using connections idle up to "
                    f"{seconds(round(limit, 3))} that the server closes after "
                    f"{seconds(wait)}.",
                    f"Set it to {seconds(wait)} or less, or remove it so the guard reads "
                    "wait_timeout from the server on every new connection.",
                )
            )
    return found


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
