"""What ``manage.py dbkeepalive`` reports, gathered without printing anything.

:func:`diagnose` returns a :class:`Report` whose :meth:`Report.as_dict` is the command's
``--json`` document (schema in ``docs/diagnose.md``; bump :data:`SCHEMA_VERSION` on any
incompatible change). The verdicts come from the system checks in
:mod:`django_dbkeepalive.checks`, so the command and ``manage.py check --database``
always agree. Nothing here ever holds a password: options are masked and error texts
pass through :func:`~django_dbkeepalive.checks.mask_secrets`.
"""

from __future__ import annotations

from .gather import diagnose, mask_options
from .probe import run_probe
from .report import (
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_UNREACHABLE,
    SCHEMA_VERSION,
    AliasReport,
    Issue,
    ProbeResult,
    Report,
    json_safe,
)

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
    "json_safe",
    "mask_options",
    "run_probe",
]
