"""What ``manage.py dbkeepalive`` reports, gathered without printing anything.

:func:`diagnose` returns a :class:`Report` whose :meth:`Report.as_dict` is the command's
``--json`` document (schema in ``docs/diagnose.md``; bump :data:`SCHEMA_VERSION` on any
incompatible change). The verdicts come from the system checks in
:mod:`django_dbkeepalive.checks`, so the command and ``manage.py check --database``
always agree. Nothing here ever holds a password: options are masked and error texts
pass through :func:`~django_dbkeepalive.checks.mask_secrets`.
"""

from __future__ import annotations

import importlib.metadata
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import django
from django.conf import settings
from django.core import checks as django_checks
from django.db import connections

from . import __version__, checks, guard
from .conf import TIMEOUT_NAMES
from .signals import connection_recycled

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_UNREACHABLE",
    "SCHEMA_VERSION",
    "AliasReport",
    "Issue",
    "ProbeResult",
    "Report",
    "diagnose",
    "mask_options",
    "run_probe",
]

#: Version of the ``--json`` document; bumped on any incompatible change.
SCHEMA_VERSION = 1
EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_UNREACHABLE = 2

MASK = "********"
_SECRET_OPTIONS = ("password", "passwd")
PROBE_WAIT_TIMEOUT = 1
PROBE_IDLE = 2.0

Progress = Callable[[str], None]


@dataclass
class Issue:
    """One system check message, as plain data."""

    id: str
    level: str  # "error", "warning" or "info"
    message: str
    hint: str

    @classmethod
    def from_check(cls, message: django_checks.CheckMessage) -> Issue:
        if message.level >= django_checks.ERROR:
            level = "error"
        elif message.level >= django_checks.WARNING:
            level = "warning"
        else:
            level = "info"
        return cls(str(message.id), level, str(message.msg), str(message.hint or ""))

    @property
    def is_problem(self) -> bool:
        return self.level != "info"


@dataclass
class ProbeResult:
    """The live idle-and-reconnect test of one alias (``--probe``)."""

    ran: bool
    outcome: str  # "recovered", "not_closed", "failed" or "skipped"
    detail: str
    recovered: bool = False
    forced_guard: bool = False  # AUTO_GUARD is off: the probe turned the guard on itself
    session_wait_timeout: int = PROBE_WAIT_TIMEOUT
    idle_seconds: float | None = None
    reasons: list[str] = field(default_factory=list)
    query_seconds: float | None = None
    connection_id_before: int | None = None
    connection_id_after: int | None = None
    server_connections_before: int | None = None
    server_connections_after: int | None = None
    error: str | None = None


@dataclass
class AliasReport:
    """Everything the command shows about one alias."""

    alias: str
    engine: str
    vendor: str | None  # None: the backend cannot be loaded (E005)
    mysql: bool
    note: str | None
    host: str | None
    port: int | None
    socket: str | None
    user: str | None
    name: str | None
    driver: dict[str, Any]
    server: dict[str, Any] | None
    client: dict[str, Any]
    django: dict[str, Any]
    guard: dict[str, Any]
    issues: list[Issue]
    verdict: str  # "ok", "problem" or "unreachable"
    hint: str
    probe: ProbeResult | None = None


@dataclass
class Report:
    """The whole diagnosis: settings-wide issues and one :class:`AliasReport` per alias."""

    issues: list[Issue]
    databases: list[AliasReport]

    @property
    def exit_code(self) -> int:
        if any(d.verdict == "unreachable" for d in self.databases):
            return EXIT_UNREACHABLE
        if any(i.is_problem for i in self.issues) or any(
            d.verdict == "problem" for d in self.databases
        ):
            return EXIT_PROBLEM
        return EXIT_OK

    @property
    def status(self) -> str:
        return {EXIT_OK: "ok", EXIT_PROBLEM: "problem", EXIT_UNREACHABLE: "unreachable"}[
            self.exit_code
        ]

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` document (see ``docs/diagnose.md``): strict JSON data, so
        ``json.dumps(..., allow_nan=False)`` always succeeds (``inf`` and ``nan``, which
        only a setting Django does not validate can hold, become ``None``)."""
        doc: dict[str, Any] = json_safe(
            {
                "schema_version": SCHEMA_VERSION,
                "package_version": __version__,
                "django_version": django.get_version(),
                "status": self.status,
                "exit_code": self.exit_code,
                "issues": [asdict(i) for i in self.issues],
                "databases": [asdict(d) for d in self.databases],
            }
        )
        return doc


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON data: non-finite floats become ``None``, tuples lists,
    keys strings, and anything else that JSON cannot hold its ``repr()``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return repr(value)


# ---------------------------------------------------------------------- helpers


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
    module: Any = getattr(db, "Database", None)
    module_name = getattr(module, "__name__", "") or ""
    if db.vendor == "mysql":
        if module_name == "pymysql":
            version = _dist_version("PyMySQL") or getattr(module, "VERSION_STRING", None)
            return {"name": "PyMySQL", "version": version, "client_library": None}
        client = None
        try:
            client = str(module._mysql.get_client_info())
        except Exception:
            client = None
        return {
            "name": "mysqlclient",
            "version": _dist_version("mysqlclient"),
            "client_library": client,
        }
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
            "enabled": False,
            "mode": "invalid",
            "wait_timeout": None,
            "wait_timeout_source": None,
            "margin": None,
            "idle_limit": None,
            "ping_after": None,
            "peek_after": None,
            "retry_reads": None,
        }
    middleware = checks.MIDDLEWARE_PATH in (getattr(settings, "MIDDLEWARE", None) or ())
    if not installed:
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
        "enabled": mode != "off",
        "mode": mode,  # "auto", "middleware" (requests only) or "off"
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


# ----------------------------------------------------------------------- gather


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
                "the server is unreachable"
                if kind == "unreachable"
                else "connecting fails (see the issues)",
            )
        else:
            probe_result = run_probe(alias, progress=progress)
    verdict, hint = _verdict(issues, kind == "unreachable", probe_result, failed=error is not None)
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


# ------------------------------------------------------------------------ probe


def _one(cursor: Any, sql: str) -> Any:
    cursor.execute(sql)
    row = cursor.fetchone()
    return None if row is None else row[-1]


def run_probe(
    alias: str,
    *,
    wait_timeout: int = PROBE_WAIT_TIMEOUT,
    idle: float = PROBE_IDLE,
    progress: Progress | None = None,
) -> ProbeResult:
    """A live test: idle past the server's wait_timeout, then query through the guard.

    Opens a new connection for ``alias`` (a separate ``DatabaseWrapper`` in this thread,
    so the thread's own connection is left alone, with the capped client timeouts of
    :func:`~django_dbkeepalive.checks.diagnostic_connection`), sets its SESSION ``wait_timeout``
    to ``wait_timeout`` seconds, sleeps ``idle`` seconds so the server closes it, runs
    ``SELECT 1`` and reports what the guard did (``connection_recycled`` reasons), how
    long that query took, and the connection ids and server connection counts around it.
    """
    reasons: list[str] = []
    me = threading.get_ident()

    def on_recycled(sender: str, reason: str, **kwargs: Any) -> None:
        if sender == alias and threading.get_ident() == me:
            reasons.append(reason)

    cfg = checks.alias_settings(alias)
    installed = guard.is_installed()
    forced = installed and cfg is not None and not cfg.auto_guard
    result = ProbeResult(True, "failed", "", forced_guard=forced, session_wait_timeout=wait_timeout)
    with checks.diagnostic_connection(alias) as db:
        _probe(db, alias, result, reasons, on_recycled, wait_timeout, idle, progress)
    result.reasons = list(reasons)
    return result


def _probe(
    db: Any,
    alias: str,
    result: ProbeResult,
    reasons: list[str],
    on_recycled: Callable[..., None],
    wait_timeout: int,
    idle: float,
    progress: Progress | None,
) -> None:
    installed = guard.is_installed()
    forced = result.forced_guard
    connection_recycled.connect(on_recycled, weak=False)
    try:
        db.ensure_connection()
        if forced:
            guard.enable(db)
        with db.cursor() as cursor:
            result.connection_id_before = int(_one(cursor, "SELECT CONNECTION_ID()"))
            result.server_connections_before = int(
                _one(cursor, "SHOW GLOBAL STATUS LIKE 'Connections'")
            )
            cursor.execute(f"SET SESSION wait_timeout = {int(wait_timeout)}")
        started = time.monotonic()
        if progress:
            progress(
                f"probe {alias!r}: connection {result.connection_id_before} idle for "
                f"{idle:g} s past its session wait_timeout of {wait_timeout} s "
            )
        step = 0.5
        while (left := idle - (time.monotonic() - started)) > 0:
            time.sleep(min(step, left))
            if progress:
                progress(".")
        result.idle_seconds = round(time.monotonic() - started, 3)
        if progress:
            progress(" querying\n")
        t0 = time.monotonic()
        try:
            with db.cursor() as cursor:
                value = _one(cursor, "SELECT 1")
                result.query_seconds = round(time.monotonic() - t0, 4)
                result.connection_id_after = int(_one(cursor, "SELECT CONNECTION_ID()"))
                result.server_connections_after = int(
                    _one(cursor, "SHOW GLOBAL STATUS LIKE 'Connections'")
                )
        except Exception as exc:
            result.query_seconds = round(time.monotonic() - t0, 4)
            result.error = checks.error_text(alias, exc)
            result.outcome = "failed"
            result.detail = (
                f"the query after the idle period failed ({result.error}); the guard did not "
                "recover the connection"
                + (
                    ""
                    if installed
                    else " (the guard is not installed: add 'django_dbkeepalive' to INSTALLED_APPS)"
                )
                + "."
            )
            return
        result.reasons = list(reasons)
        if int(value) != 1:  # pragma: no cover - a server that cannot add
            result.detail = f"SELECT 1 returned {value!r}"
            return
        if result.connection_id_after != result.connection_id_before:
            result.outcome, result.recovered = "recovered", True
            why = ", ".join(reasons) or "no signal"
            result.detail = (
                f"the server closed connection {result.connection_id_before} after "
                f"{wait_timeout} s idle; the guard replaced it ({why}) and the query ran on "
                f"connection {result.connection_id_after} in {result.query_seconds * 1000:.1f} ms"
            )
        else:
            result.outcome, result.recovered = "not_closed", True
            result.detail = (
                f"connection {result.connection_id_before} was still open after "
                f"{result.idle_seconds:g} s idle with wait_timeout {wait_timeout} s (a proxy "
                "between the application and the server?); nothing to recover"
            )
        return
    except Exception as exc:
        result.error = checks.error_text(alias, exc)
        result.detail = f"the probe could not run: {result.error}"
        return
    finally:
        connection_recycled.disconnect(on_recycled)
        if forced:
            guard.disable(db)
        result.reasons = list(reasons)
