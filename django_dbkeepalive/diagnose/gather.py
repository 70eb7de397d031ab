"""Gathering what ``manage.py dbkeepalive`` reports, without printing anything.

Owns: :func:`diagnose`, which builds a :class:`~.report.Report` per alias from the
system checks (so the command and ``manage.py check --database`` always agree), the
guard's own view of each alias and, with ``--probe``, :func:`~.probe.run_probe`.
Nothing here ever holds a password: options are masked and error texts pass through
:func:`~django_dbkeepalive.checks.mask_secrets`.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from django.conf import settings
from django.core import checks as django_checks
from django.db import connections

from .. import checks, guard
from ..conf import TIMEOUT_NAMES
from .probe import run_probe
from .report import AliasReport, Issue, ProbeResult, Report, json_safe

MASK = "********"
_SECRET_OPTIONS = ("password", "passwd")

Progress = Callable[[str], None]


def mask_options(
    options: Mapping[str, Any], settings_dict: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``OPTIONS`` with ``password``/``passwd`` masked and values made JSON-friendly;
    with ``settings_dict``, the alias's password is also masked inside text values
    (:func:`~django_dbkeepalive.checks.mask_secrets`)."""
    masked: dict[str, Any] = {}
    for key, value in options.items():
        if str(key).lower() in _SECRET_OPTIONS:
            masked[str(key)] = MASK
        elif isinstance(value, Mapping):
            masked[str(key)] = mask_options(value, settings_dict)
        elif isinstance(value, str) and settings_dict is not None:
            masked[str(key)] = checks.mask_secrets(value, settings_dict)
        elif value is None or isinstance(value, (bool, int, float, str)):
            masked[str(key)] = json_safe(value)
        else:
            masked[str(key)] = repr(value)
    return masked


def _silenced() -> set[str]:
    return set(getattr(settings, "SILENCED_SYSTEM_CHECKS", None) or ())


def _issues(messages: Sequence[django_checks.CheckMessage]) -> list[Issue]:
    silenced = _silenced()
    return [Issue.from_check(m) for m in messages if m.id not in silenced]


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver(db: Any) -> dict[str, Any]:
    """The driver the alias really uses: its backend's DB-API module, through the
    guard's adapter for it (never a driver that is merely importable)."""
    module: Any = getattr(db, "Database", None)
    driver = guard.driver_of(db)
    if driver.distribution is not None:
        version = _dist_version(driver.distribution) or getattr(module, "__version__", None)
        return {
            "name": driver.name,
            "version": version,
            "client_library": driver.client_library(module),
        }
    module_name = getattr(module, "__name__", "") or ""
    version = getattr(module, "sqlite_version", None) or getattr(module, "__version__", None)
    return {"name": module_name or None, "version": version, "client_library": None}


# What the guard does on a backend that is not MySQL (see checks I001 and I002).
_OTHER_NOTE: dict[str | None, str] = {
    None: "not MySQL: only CONN_MAX_AGE is enforced",
    "postgresql": (
        "PostgreSQL: guarded (idle_session_timeout, peek, reads re-run); no pings, "
        "no server checks (dbkeepalive.I002)"
    ),
}


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _number_or_none(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _client_info(alias: str, options: Mapping[str, Any], mysql: bool) -> dict[str, Any]:
    """The ``client`` section: the timeouts the driver gets (``OPTIONS`` wins, else
    ``CLIENT_TIMEOUTS``, which applies to MySQL aliases only) and where each comes from,
    then ``OPTIONS`` masked."""
    if mysql:
        timeouts = checks.client_timeouts(alias)
    else:
        timeouts = {
            name: checks.ClientTimeout(
                name, options.get(name), "options" if name in options else None
            )
            for name in TIMEOUT_NAMES
        }
    info: dict[str, Any] = {name: _number_or_none(t.value) for name, t in timeouts.items()}
    info.update({f"{name}_source": t.source for name, t in timeouts.items()})
    info["options"] = mask_options(options, connections.settings[alias])
    return info


def _conn_max_age(value: Any) -> Any:
    # JSON: a number, None (null: unlimited, as inf is), or what the setting holds.
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return None
    return json_safe(value)


def _server_product(version: str) -> str:
    return "MariaDB" if "mariadb" in version.lower() else "MySQL"


def _guard_info(
    alias: str, variables: checks.ServerVariables | None, mysql: bool
) -> dict[str, Any]:
    cfg = checks.alias_settings(alias)
    installed = guard.is_installed()
    if cfg is None:  # DBKEEPALIVE is invalid (see the settings issues)
        return {
            "installed": installed,
            "installed_by": None,
            "enabled": False,
            "mode": "invalid",
            "unguarded": None,
            "wait_timeout": None,
            "wait_timeout_source": None,
            "margin": None,
            "idle_limit": None,
            "ping_after": None,
            "peek_after": None,
            "retry_reads": None,
        }
    middleware = checks.MIDDLEWARE_PATH in (getattr(settings, "MIDDLEWARE", None) or ())
    native = checks.backend_error(alias) is None and bool(
        getattr(connections[alias], "dbkeepalive_native", False)
    )
    by = None if not installed else "patch" if guard.is_patched() else "engine" if native else None
    unguarded = guard.unguarded(connections[alias]) if checks.backend_error(alias) is None else None
    if by is None or unguarded is not None:
        mode = "off"
    elif cfg.auto_guard:
        mode = "auto"
    elif middleware:
        mode = "middleware"
    else:
        mode = "off"
    wait: float | None = cfg.wait_timeout
    source: str | None = "setting" if wait is not None else None
    if wait is None and variables is not None:
        wait, source = variables.wait_timeout, "server"
    if not mysql:
        wait, source = None, None
    return {
        "installed": installed,
        "installed_by": by,  # "patch" (Django's classes), "engine" (the backend) or None
        "enabled": mode != "off",
        "mode": mode,  # "auto", "middleware" (requests only) or "off"
        "unguarded": unguarded,  # why the guard cannot protect it (its driver), or None
        "wait_timeout": wait,
        "wait_timeout_source": source,  # "setting", "server" or None (unknown)
        "margin": cfg.margin,
        "idle_limit": None if wait is None else guard.limit_for(wait, cfg.margin),
        "ping_after": cfg.ping_after,
        "peek_after": cfg.peek_after,
        "retry_reads": cfg.retry_reads,
    }


def _verdict(
    issues: list[Issue], unreachable: bool, probe: ProbeResult | None, failed: bool = False
) -> tuple[str, str]:
    if unreachable:
        verdict = "unreachable"
    elif (
        failed
        or any(i.is_problem for i in issues)
        or (probe is not None and probe.outcome == "failed")
    ):
        verdict = "problem"
    else:
        verdict = "ok"
    hints = [f"{i.id}: {i.hint}" for i in issues if i.is_problem]
    if probe is not None and probe.outcome == "failed":
        hints.append(f"probe: {probe.detail}")
    return verdict, " ".join(hints)


def _alias_report(alias: str, mysql: bool, probe: bool, progress: Progress | None) -> AliasReport:
    sd = connections.settings[alias]
    options = sd.get("OPTIONS") or {}
    if not isinstance(options, Mapping):
        options = {}
    engine = str(sd.get("ENGINE") or "")
    messages = checks.configuration_messages(alias)
    backend_error = checks.backend_error(alias)
    db: Any = None if backend_error is not None else connections[alias]
    if backend_error is not None:
        # E005: no wrapper, no driver; "mysql" from the ENGINE's name.
        mysql = "mysql" in engine.lower()
    variables: checks.ServerVariables | None = None
    error: BaseException | None = backend_error
    kind: str | None = None if backend_error is None else "backend"
    if mysql and db is not None:
        variables, error, server_found = checks.check_alias_server(alias)
        messages = messages + server_found
        kind = None if error is None else checks.connect_error_kind(error)
    issues = _issues(messages)
    server: dict[str, Any] | None = None
    if mysql:
        server = {
            "reachable": error is None,
            "error": None if error is None else checks.error_text(alias, error),
            "error_kind": kind,
            "product": None,
            "version": None,
            "wait_timeout": None,
            "wait_timeout_global": None,
            "interactive_timeout": None,
            "net_read_timeout": None,
            "net_write_timeout": None,
            "max_allowed_packet": None,
            "max_allowed_packet_global": None,
            "read_only": None,
            "wsrep_ready": None,
            "wsrep_cluster_status": None,
            "wsrep_local_state": None,
        }
        if variables is not None:
            server.update(
                product=_server_product(variables.version),
                version=variables.version,
                wait_timeout=variables.wait_timeout,
                wait_timeout_global=variables.global_wait_timeout,
                interactive_timeout=variables.interactive_timeout,
                net_read_timeout=variables.net_read_timeout,
                net_write_timeout=variables.net_write_timeout,
                max_allowed_packet=variables.max_allowed_packet,
                max_allowed_packet_global=variables.global_max_allowed_packet,
                read_only=variables.read_only,
                wsrep_ready=variables.wsrep.get("wsrep_ready"),
                wsrep_cluster_status=variables.wsrep.get("wsrep_cluster_status"),
                wsrep_local_state=variables.wsrep.get("wsrep_local_state_comment"),
            )
    probe_result: ProbeResult | None = None
    if probe:
        if kind == "backend":
            probe_result = ProbeResult(False, "skipped", "the database backend cannot be loaded")
        elif not mysql:
            probe_result = ProbeResult(False, "skipped", "not MySQL: nothing to probe")
        elif error is not None:
            probe_result = ProbeResult(
                False,
                "skipped",
                {
                    "unreachable": "the server is unreachable",
                    "not_checked": "the caller's context forbade connecting (see the issues)",
                }.get(kind or "", "connecting fails (see the issues)"),
            )
        else:
            probe_result = run_probe(alias, progress=progress)
    failed = error is not None and kind != "not_checked"
    verdict, hint = _verdict(issues, kind == "unreachable", probe_result, failed=failed)
    socket = checks.socket_path(sd)
    host = str(sd.get("HOST") or "") or None
    if host is not None and host.startswith("/"):
        host = None
    note: str | None
    if kind == "backend":
        note = "the database backend cannot be loaded (see the issues)"
    else:
        note = None if mysql else _OTHER_NOTE.get(getattr(db, "vendor", None), _OTHER_NOTE[None])
    return AliasReport(
        alias=alias,
        engine=engine,
        vendor=None if db is None else db.vendor,
        mysql=mysql,
        note=note,
        host=host,
        port=None if socket else _int_or_none(sd.get("PORT")),
        socket=socket,
        user=str(sd.get("USER") or "") or None,
        name=str(sd.get("NAME") or "") or None,
        driver=(
            {"name": None, "version": None, "client_library": None} if db is None else _driver(db)
        ),
        server=server,
        client=_client_info(alias, options, mysql),
        django={
            "conn_max_age": _conn_max_age(sd.get("CONN_MAX_AGE", 0)),
            "conn_health_checks": bool(sd.get("CONN_HEALTH_CHECKS", False)),
        },
        guard=_guard_info(alias, variables, mysql),
        issues=issues,
        verdict=verdict,
        hint=hint,
        probe=probe_result,
    )


def diagnose(
    aliases: Sequence[str] | None = None, *, probe: bool = False, progress: Progress | None = None
) -> Report:
    """Diagnose ``aliases`` (default: every configured alias, in settings order), in the
    order given (duplicates dropped).

    Connects to each MySQL alias's server over a connection of its own with capped
    timeouts (:func:`~django_dbkeepalive.checks.diagnostic_connection`, as the system
    checks do); ``probe=True`` also runs :func:`run_probe`. Unknown aliases raise
    ``ValueError`` naming the configured ones.
    """
    configured = list(connections)
    wanted = configured if aliases is None else list(dict.fromkeys(aliases))
    unknown = [a for a in wanted if a not in configured]
    if unknown:
        raise ValueError(
            f"Unknown database alias{'es' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}. Configured aliases: {', '.join(configured)}."
        )
    mysql, _other = checks.split_aliases(wanted)
    reports = [_alias_report(alias, alias in mysql, probe, progress) for alias in wanted]
    return Report(issues=_issues(_settings_messages()), databases=reports)


def _settings_messages() -> list[django_checks.CheckMessage]:
    # The per-alias configuration checks are in the alias reports.
    return checks.check_settings() + checks.middleware_messages()
