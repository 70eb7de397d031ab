"""One instrumentation tool and the test project in a fresh process, for
tests/test_coexistence.py: the guard is installed in ``AppConfig.ready()``, so only a
new process can set the tool up before it (as a ``settings.py`` does) or after it.

    python -m tests.coexistence_probe TOOL ORDER

TOOL: ``sentry``, ``otel``, ``toolbar`` or ``prometheus``; ORDER: ``before`` (the tool
is set up before ``django.setup()``, as in ``settings.py``) or ``after`` (once the guard
is installed). The test project's environment applies (``DBK_DB_*``, ``DBK_DRIVER``,
``DBK_APP=0`` for plain Django). Runs the same statements for every tool:

- ``opening``: ``SELECT 1``, ``SELECT 2`` and ``executemany("SELECT %s", 2 rows)``
  on a closed connection, which opens for the first one;
- ``workload``: the same again on the open connection;
- ``after_kill``: the connection is KILLed on the server (through a second connection,
  then its socket shows the close), then ``SELECT 3`` and ``SELECT CONNECTION_ID()``,
  with no pause that would let the guard notice first (``PEEK_AFTER`` 1000 s): the
  read is sent on the dead connection, as when a KILL lands while it is on its way.

Prints one JSON line: what the tool recorded for each part, and what the reads returned.
"""

from __future__ import annotations

import json
import os
import select
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any


def workload(db: Any) -> None:
    with db.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.execute("SELECT 2")
        cursor.executemany("SELECT %s", [(1,), (2,)])


def connection_id(db: Any) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


def kill(db: Any, victim: int) -> None:
    """A real KILL of ``victim`` through a second connection, then wait until the
    victim's socket (through any proxy object around the driver's connection) shows it."""
    conn = db.connection
    killer = db.get_new_connection(db.get_connection_params())
    try:
        cursor = killer.cursor()
        cursor.execute(f"KILL {victim:d}")
        cursor.close()
    finally:
        killer.close()
    sock = getattr(conn, "_sock", None)  # PyMySQL; mysqlclient has fileno()
    fd = sock.fileno() if sock is not None else conn.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(5000), f"connection {victim} was not closed within 5 s of KILL"


def after_kill(db: Any, victim: int) -> dict[str, Any]:
    try:
        with db.cursor() as cursor:
            cursor.execute("SELECT 3")
            value = cursor.fetchone()[0]
        return {"value": value, "victim": victim, "after": connection_id(db), "error": None}
    except Exception as exc:
        return {"value": None, "victim": victim, "after": None, "error": type(exc).__name__}


def run(part: Callable[[], AbstractContextManager[Any]], db: Any) -> dict[str, Any]:
    """The workload on a new connection (``opening``: it opens inside the part), again on
    the open connection (``workload``), then the KILL (``after_kill``), each inside
    ``part()``: what the tool recorded for it, filled in on exit."""
    db.close()
    with part() as opening:
        workload(db)
    with part() as recorded:
        workload(db)
    victim = connection_id(db)
    kill(db, victim)
    with part() as recorded_after:
        result = after_kill(db, victim)
    return {"opening": opening, "workload": recorded, "after_kill": recorded_after, **result}


def guard_view(db: Any) -> dict[str, Any]:
    """What the guard knows of ``db``'s connection: its driver adapter (found from the
    backend's DB-API module) and the server's wait_timeout it read (``None``: unguarded)."""
    from django_dbkeepalive import guard

    try:
        wait = guard.idle_limits(db)[1]
    except LookupError:
        wait = None
    return {"installed": guard.is_installed(), "driver": guard.driver_of(db).name, "wait": wait}


# -- the tools --------------------------------------------------------------------------


def sentry(order: str, setup: Callable[[], Any]) -> dict[str, Any]:
    import sentry_sdk
    from sentry_sdk.integrations.django import DjangoIntegration
    from sentry_sdk.transport import Transport

    envelopes: list[Any] = []

    class InMemory(Transport):
        def capture_envelope(self, envelope: Any) -> None:
            envelopes.append(envelope)

    def init() -> None:
        sentry_sdk.init(
            dsn="http://key@localhost/1",
            traces_sample_rate=1.0,
            integrations=[DjangoIntegration()],
            transport=InMemory,
        )

    if order == "before":
        init()
    db = setup()
    if order == "after":
        init()

    @contextmanager
    def transaction() -> Iterator[list[dict[str, Any]]]:
        spans: list[dict[str, Any]] = []
        with sentry_sdk.start_transaction(name="probe", op="task"):
            yield spans
        sentry_sdk.flush()
        [payload] = [
            item.payload.json
            for envelope in envelopes
            for item in envelope.items
            if item.type == "transaction"
        ]
        envelopes.clear()
        spans.extend(
            {
                "op": span.get("op"),
                "description": span.get("description"),
                "status": span.get("status"),
                "origin": span.get("origin"),
                "db.system": span.get("data", {}).get("db.system"),
            }
            for span in payload["spans"]
            if str(span.get("op", "")).startswith("db")
        )

    return run(transaction, db)


def otel(order: str, setup: Callable[[], Any], driver: str) -> dict[str, Any]:
    from opentelemetry import trace
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("coexistence-probe")

    def instrument() -> None:
        DjangoInstrumentor().instrument()
        if driver == "pymysql":
            from opentelemetry.instrumentation.pymysql import PyMySQLInstrumentor

            PyMySQLInstrumentor().instrument()
        else:
            from opentelemetry.instrumentation.mysqlclient import MySQLClientInstrumentor

            MySQLClientInstrumentor().instrument()

    if order == "before":
        instrument()
    db = setup()
    if order == "after":
        instrument()

    @contextmanager
    def root() -> Iterator[list[dict[str, Any]]]:
        spans: list[dict[str, Any]] = []
        exporter.clear()
        with tracer.start_as_current_span("probe") as parent:
            trace_id = parent.get_span_context().trace_id
            yield spans
        spans.extend(
            {
                "name": span.name,
                "statement": span.attributes.get("db.statement"),
                "status": span.status.status_code.name,
                "system": span.attributes.get("db.system"),
                "kind": span.kind.name,
            }
            for span in exporter.get_finished_spans()
            if span.context.trace_id == trace_id and span.name != "probe"
        )

    result = run(root, db)
    result["proxied"] = type(db.connection).__module__.startswith("opentelemetry")
    return result


def toolbar(order: str, setup: Callable[[], Any]) -> dict[str, Any]:
    db = setup()
    from debug_toolbar.toolbar import DebugToolbar
    from django.http import HttpResponse
    from django.test import RequestFactory

    @contextmanager
    def sql_panel() -> Iterator[list[dict[str, Any]]]:
        request = RequestFactory().get("/")
        response = HttpResponse()
        panel = DebugToolbar(request, lambda request: response).get_panel_by_id("SQLPanel")
        queries: list[dict[str, Any]] = []
        panel.enable_instrumentation()
        try:
            yield queries
        finally:
            panel.disable_instrumentation()
        panel.generate_stats(request, response)
        for query in panel.get_stats()["queries"]:
            params = query["params"]
            # Before 4.4 the panel kept the parameters as JSON text and the statement
            # as formatted HTML; compare the statement as sent, and the parameters.
            queries.append(
                {
                    "alias": query["alias"],
                    "vendor": query["vendor"],
                    "raw_sql": query["raw_sql"],
                    "sql": query["sql"] if "<" not in query["sql"] else query["raw_sql"],
                    "params": json.loads(params) if isinstance(params, str) else params,
                }
            )

    return run(sql_panel, db)


def prometheus(order: str, setup: Callable[[], Any]) -> dict[str, Any]:
    db = setup()
    from prometheus_client import REGISTRY

    def counters() -> dict[str, float]:
        return {
            sample.name: sample.value
            for metric in REGISTRY.collect()
            if metric.name.startswith("django_db_") and metric.type == "counter"
            for sample in metric.samples
            if sample.name.endswith("_total")
        }

    @contextmanager
    def counted() -> Iterator[dict[str, float]]:
        deltas: dict[str, float] = {}
        before = counters()
        yield deltas
        after = counters()
        deltas.update(
            {name: after[name] - before.get(name, 0.0) for name in after}
            # (an error counter appears on its first error)
        )

    result = run(counted, db)
    result["engine"] = type(db).__module__
    return result


# -- the process ------------------------------------------------------------------------


def main(tool: str, order: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    from django.conf import settings

    # Read the test project's settings (as a settings.py would be read), then add the tool.
    settings.DBKEEPALIVE = {**settings.DBKEEPALIVE, "PEEK_AFTER": 1000}
    if tool == "toolbar":
        settings.DEBUG = True
        settings.STATIC_URL = "/static/"
        settings.INSTALLED_APPS = [*settings.INSTALLED_APPS, "debug_toolbar"]
    if tool == "prometheus":
        settings.INSTALLED_APPS = [*settings.INSTALLED_APPS, "django_prometheus"]
        settings.DATABASES["default"]["ENGINE"] = "django_prometheus.db.backends.mysql"

    def setup() -> Any:
        import django
        from django.db import connections

        django.setup()
        return connections["default"]

    if tool == "sentry":
        result = sentry(order, setup)
    elif tool == "otel":
        result = otel(order, setup, os.environ.get("DBK_DRIVER", "mysqlclient"))
    elif tool == "toolbar":
        result = toolbar(order, setup)
    elif tool == "prometheus":
        result = prometheus(order, setup)
    else:
        raise SystemExit(f"unknown tool {tool!r}")
    from django.db import connections

    result["guard"] = guard_view(connections["default"])
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:3])
