"""What ``manage.py dbkeepalive`` reports, as data: the ``--json`` document's parts.

Owns: :class:`Report` (with the exit status), :class:`AliasReport`, :class:`Issue`,
:class:`ProbeResult` and :func:`json_safe`. Bump :data:`SCHEMA_VERSION` on any
incompatible change of the document (schema in ``docs/diagnose.md``).
Must never import: :mod:`.gather`, :mod:`.probe`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import django
from django.core import checks as django_checks

from .. import __version__

#: Version of the ``--json`` document; bumped on any incompatible change.
SCHEMA_VERSION = 1
EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_UNREACHABLE = 2


PROBE_WAIT_TIMEOUT = 1
PROBE_IDLE = 2.0


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
