"""``manage.py dbkeepalive``: what the server and the settings mean for idle connections.

Examples::

    manage.py dbkeepalive                      # every alias, as a table
    manage.py dbkeepalive --database default   # one alias (repeatable)
    manage.py dbkeepalive --json               # the same as one JSON document
    manage.py dbkeepalive --probe              # plus a live idle-and-reconnect test (~2 s)

Exit status: 0 when everything is fine, 1 when a problem was found, 2 when a server
could not be reached. Passwords are never printed.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from django_dbkeepalive.checks import limit_formula
from django_dbkeepalive.diagnose import EXIT_OK, AliasReport, Issue, Report, diagnose


def _secs(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g} s" if isinstance(value, (int, float)) else str(value)


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    mib = value / (1024 * 1024)
    return f"{mib:g} MiB ({value} bytes)"


def _client_timeout(client: dict[str, Any], name: str, driver: str | None) -> str:
    """One client timeout as the driver gets it, and where it comes from."""
    source = client.get(f"{name}_source")
    value = client.get(name)
    if source == "options":
        raw = client["options"].get(name)
        if raw is None or raw == 0:
            return f"{raw!r} in OPTIONS (no timeout)"
        return f"{_secs(raw)} (OPTIONS)"
    if source == "client_timeouts":
        return f"{_secs(value)} (DBKEEPALIVE['CLIENT_TIMEOUTS'])"
    if source == "option_file":
        return "not in OPTIONS (read_default_file may set it; CLIENT_TIMEOUTS is not applied)"
    if name == "connect_timeout" and driver == "PyMySQL":
        return "not set (PyMySQL default: 10 s, for the TCP connect only)"
    return "not set (no timeout)"


_CANNOT_CONNECT = {
    "unreachable": "UNREACHABLE",
    "access_denied": "ACCESS DENIED",
    "unknown_database": "UNKNOWN DATABASE",
    "sql": "CONNECTION SETUP FAILED",
    "configuration": "SETTINGS ERROR",
    "backend": "BACKEND CANNOT BE LOADED",
    "not_checked": "NOT CHECKED",
}


def _role(server: dict[str, Any]) -> str:
    """The node's role: read-only or writable, and a Galera node's state."""
    role = "read-only (read_only=ON)" if server.get("read_only") else "writable (read_only=OFF)"
    if server.get("wsrep_ready") is not None:
        role += (
            f"; Galera: wsrep_ready={server['wsrep_ready']}, cluster "
            f"{server.get('wsrep_cluster_status')}, {server.get('wsrep_local_state')}"
        )
    return role


def _conn_max_age(value: Any) -> str:
    if value is None:
        return "None (reused without limit)"
    if value == 0:
        return "0 (closed at the end of each request)"
    return _secs(value)


class Command(BaseCommand):
    help = (
        "Show, per database alias, the server's idle timeouts, the client timeouts, "
        "CONN_MAX_AGE and the connection guard's limits, with a verdict and a hint. "
        "Exit status: 0 fine, 1 a problem found, 2 a server unreachable."
    )
    # It runs and reports the checks itself (with the server's side, which plain
    # system checks only do for `check --database`).
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--database",
            action="append",
            dest="databases",
            metavar="ALIAS",
            help="Only this database alias (repeatable). Default: every alias.",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="Print one JSON document (schema: docs/diagnose.md) instead of a table.",
        )
        parser.add_argument(
            "--probe",
            action="store_true",
            help=(
                "Also run a live test per MySQL alias: a new connection idles past a "
                "SESSION wait_timeout of 1 s, then a query runs through the guard (~2 s)."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        as_json = bool(options["json"])
        out = self.stderr if as_json else self.stdout

        def progress(text: str) -> None:
            out.write(text, ending="")
            out.flush()

        try:
            report = diagnose(options["databases"], probe=options["probe"], progress=progress)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            self.stdout.write(json.dumps(report.as_dict(), indent=2, allow_nan=False))
        else:
            self.stdout.write(self.render(report))
        if report.exit_code != EXIT_OK:
            sys.exit(report.exit_code)

    # ------------------------------------------------------------------ table

    def render(self, report: Report) -> str:
        lines: list[str] = []
        if report.issues:
            lines.append("Settings")
            lines += self._issues(report.issues)
            lines.append("")
        for db in report.databases:
            lines += self._alias(db)
            lines.append("")
        summary = {
            "ok": "Everything looks fine.",
            "problem": "Problems found: see the hints above.",
            "unreachable": "A server could not be reached: see above.",
        }[report.status]
        style = self.style.SUCCESS if report.status == "ok" else self.style.WARNING
        lines.append(style(summary))
        return "\n".join(lines)

    def _issues(self, issues: list[Issue]) -> list[str]:
        lines = []
        for issue in issues:
            style = self.style.ERROR if issue.level == "error" else self.style.WARNING
            if issue.level == "info":
                style = self.style.NOTICE
            lines.append("  " + style(f"({issue.id}) {issue.message}"))
            if issue.hint:
                lines.append(f"      HINT: {issue.hint}")
        return lines

    def _alias(self, db: AliasReport) -> list[str]:
        where = db.socket or (
            f"{db.host or 'localhost'}:{db.port or 3306}" if db.mysql else (db.host or "")
        )
        head = f"Database {db.alias!r} ({db.engine}"
        head += f", {where}" if where else ""
        head += f", user {db.user!r}" if db.user else ""
        head += ")"
        rows: list[tuple[str, str]] = []
        driver = db.driver
        driver_text = " ".join(str(x) for x in (driver["name"], driver["version"]) if x)
        if driver.get("client_library"):
            driver_text += f" (client library {driver['client_library']})"
        rows.append(("driver", driver_text or "-"))
        server = db.server
        if not db.mysql:
            rows.append(("vendor", db.vendor or "-"))
            rows.append(("note", db.note or ""))
        elif server is not None and not server["reachable"]:
            label = _CANNOT_CONNECT.get(server.get("error_kind") or "", "CANNOT CONNECT")
            rows.append(("server", f"{label}: {server['error']}"))
        elif server is not None:
            rows += [
                ("server", f"{server['product']} {server['version']}"),
                (
                    "wait_timeout",
                    f"{_secs(server['wait_timeout'])} (session), "
                    f"{_secs(server['wait_timeout_global'])} (global)",
                ),
                ("interactive_timeout", _secs(server["interactive_timeout"])),
                ("net_read_timeout", _secs(server["net_read_timeout"])),
                ("net_write_timeout", _secs(server["net_write_timeout"])),
                ("max_allowed_packet", _bytes(server["max_allowed_packet"])),
                ("role", _role(server)),
            ]
        if db.mysql:
            for name in ("connect_timeout", "read_timeout", "write_timeout"):
                rows.append((f"client {name}", _client_timeout(db.client, name, driver["name"])))
        rows.append(("CONN_MAX_AGE", _conn_max_age(db.django["conn_max_age"])))
        rows.append(("CONN_HEALTH_CHECKS", str(db.django["conn_health_checks"])))
        g = db.guard
        mode = {
            "auto": "on (AUTO_GUARD)",
            "middleware": "requests only (KeepaliveMiddleware; AUTO_GUARD is off)",
            "off": "OFF"
            + (
                f" (not guarded: {g['unguarded']})"
                if g.get("unguarded")
                else " (not installed)"
                if not g["installed"]
                else " (DBKEEPALIVE['PATCH'] is False and this ENGINE has no guard)"
                if g.get("installed_by") is None
                else ""
            ),
            "invalid": "unknown: DBKEEPALIVE is invalid (see Settings above)",
        }[g["mode"]]
        rows.append(("guard", mode))
        if db.mysql and g["mode"] != "invalid" and not g.get("unguarded"):
            if g["idle_limit"] is None:
                limit = "unknown (wait_timeout not known)"
            else:
                source = {"server": "the server", "setting": "DBKEEPALIVE['WAIT_TIMEOUT']"}
                limit = (
                    f"{limit_formula(g['wait_timeout'], g['margin'])} (wait_timeout from "
                    f"{source.get(g['wait_timeout_source'], 'unknown')})"
                )
            rows.append(("guard idle limit", limit))
            ping = "never" if g["ping_after"] is None else f"after {_secs(g['ping_after'])} idle"
            rows.append(("guard ping", ping))
            rows.append(("guard peek", f"after {_secs(g['peek_after'])} idle"))
        probe = db.probe
        if probe is not None:
            text = f"{probe.outcome}: {probe.detail}"
            if probe.forced_guard:
                text += (
                    " (AUTO_GUARD is off: the probe turned the guard on, as the middleware does)"
                )
            if probe.ran and probe.server_connections_before is not None:
                text += (
                    f"; server connections {probe.server_connections_before} -> "
                    f"{probe.server_connections_after}"
                )
            rows.append(("probe", text))
        style = {
            "ok": self.style.SUCCESS,
            "problem": self.style.WARNING,
            "unreachable": self.style.ERROR,
        }[db.verdict]
        rows.append(("verdict", style(db.verdict)))
        width = max(len(label) for label, _ in rows)
        lines = [self.style.MIGRATE_HEADING(head)]
        lines += [f"  {label.ljust(width)}  {value}" for label, value in rows]
        lines += self._issues(db.issues)
        return lines
