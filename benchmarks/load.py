"""A load run against a real application server, under faults: the scenario, the fault
schedule and the verdict read back from the database (the clients are
:mod:`benchmarks.load_clients`). Used by ``tests/test_app_servers.py`` and
``benchmarks/load_bench.py`` (``make bench``).

:func:`run` starts one application server (:mod:`benchmarks.appservers`) on a private
MariaDB (``tests/mariadb.py``), in one of three modes:

- ``app``: django-dbkeepalive installed, ``CONN_MAX_AGE = None`` (persistent);
- ``persistent``: plain Django, ``CONN_MAX_AGE = None``;
- ``max_age_0``: plain Django, ``CONN_MAX_AGE = 0`` (a connection per request).

``clients`` threads send requests over keep-alive HTTP connections: a write of a new,
unique key (``/w``, one ``INSERT`` in autocommit; ``write_share`` of them) or a read of
the client's last key. Meanwhile, from the main thread (the server must be restarted by
the thread that started it), with GLOBAL ``wait_timeout`` lowered to a few seconds:

    load ─ KILL every app connection ─ load ─ KILL again ─ load ─ clients quiet for
    longer than wait_timeout (the server closes the idle connections) ─ load ─
    server restart (clean shutdown, start) ─ load

Each request is recorded (kind, key, start, end, HTTP status, cause of a failure, from the
app's JSON 500 body: :mod:`benchmarks.loadapp`). After the run, the rows are counted per
key over a separate connection: duplicates (a key twice), acknowledged writes whose row is
missing, failed writes whose row exists anyway. A failure is *in flight at a fault* when
it is a write the app reports as possibly applied (``write_unknown``) and the request was
open while a ``KILL`` or the server's shutdown ran (plus ``GRACE`` seconds, the time the
server takes to close a killed socket).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.appservers import DEFAULT_PATHS, PATHS, ROOT, AppServer
from benchmarks.load_clients import Clients, Request, clock
from tests.mariadb import MariaDBServer

DB = "dbk_load"
TABLE = "load_row"  # benchmarks.loadapp.LoadRow; no unique key, so duplicates show
TABLE_SQL = (
    f"CREATE TABLE {TABLE} (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
    "`key` VARCHAR(100) NOT NULL, created DATETIME(6) NOT NULL, "
    f"KEY {TABLE}_key (`key`)) ENGINE=InnoDB"
)
#: mode -> (DBK_APP, DBK_CONN_MAX_AGE)
MODES = {"app": ("1", "None"), "persistent": ("0", "None"), "max_age_0": ("0", "0")}
#: Seconds after a KILL (or the server's exit) during which a write can still meet the
#: killed session: the server closes the socket a little after KILL returns.
GRACE = 0.25


@dataclass
class Scenario:
    server: str
    mode: str
    driver: str
    clients: int = 8
    #: Seconds of load before, between and after the faults.
    phase: float = 2.0
    #: Seconds a client waits between two requests (0: as fast as the server answers).
    think: float = 0.0
    wait_timeout: int = 2
    kills: int = 2
    idle: bool = True
    restart: bool = True
    write_share: float = 0.7

    @property
    def quiet(self) -> float:
        """The quiet period: past wait_timeout, with time for the server to notice."""
        return self.wait_timeout + 1.5


@dataclass
class Fault:
    what: str
    start: float
    end: float
    victims: int


@dataclass
class Result:
    scenario: Scenario
    requests: int = 0
    ok: int = 0
    failed: int = 0
    #: "kind cause" -> count, every failed request.
    failures: dict[str, int] = field(default_factory=dict)
    #: Failed writes the app reported as possibly applied, open during a KILL/shutdown.
    in_flight: int = 0
    #: Failed requests that are not ``in_flight``, as "kind cause at +t s".
    unexpected: list[str] = field(default_factory=list)
    applied_anyway: int = 0
    duplicates: int = 0
    missing: int = 0
    strays: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    #: Requests answered per second: over the whole run (the quiet period left out), and
    #: over the first phase, before any fault.
    rps: float = 0.0
    rps_steady: float = 0.0
    #: Connections KILLed per round; open before and after the quiet period and when
    #: the server was stopped; connections the server accepted from the app.
    killed: list[int] = field(default_factory=list)
    open_before_quiet: int = 0
    open_after_quiet: int = 0
    open_at_restart: int = 0
    connects: int = 0
    #: Requests that succeeded after the quiet period and after the restart.
    ok_after_quiet: int = 0
    ok_after_restart: int = 0
    seconds: float = 0.0
    #: What happened when, in seconds from the start of the load.
    timeline: list[tuple[str, float]] = field(default_factory=list)

    @property
    def allowed(self) -> int:
        """At most this many writes can be in flight at the faults: one per connection."""
        return sum(self.killed) + self.open_at_restart

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "allowed": self.allowed}


def _app_connections(server: MariaDBServer) -> list[int]:
    return [p["id"] for p in server.processlist(user=server.user) if p["db"] == DB]


def _set_timeouts(server: MariaDBServer, seconds: int) -> None:
    for name in ("wait_timeout", "interactive_timeout"):
        server.set_global(name, seconds)


def _kill_all(server: MariaDBServer) -> Fault:
    """KILL every app connection, over one admin connection (so the KILLs land within
    milliseconds of each other, and the server counts this connection as the admin's)."""
    admin = server._admin_connect()
    try:
        with admin.cursor() as cursor:
            start = clock()
            cursor.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s", (DB,))
            victims = 0
            for (thread_id,) in cursor.fetchall():
                try:
                    cursor.execute("KILL %s", (int(thread_id),))
                    victims += 1
                except Exception as exc:  # 1094: it ended by itself in between
                    if not (exc.args and exc.args[0] == 1094):
                        raise
            end = clock()
    finally:
        admin.close()
    return Fault("kill", start, end + GRACE, victims)


def server_env(server: MariaDBServer, scenario: Scenario) -> dict[str, str]:
    app, max_age = MODES[scenario.mode]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "benchmarks.load_settings",
        "DBK_DRIVER": scenario.driver,
        "DBK_APP": app,
        "DBK_CONN_MAX_AGE": max_age,
        "DBK_BACKEND": "patch",
        "DBK_DB_HOST": server.host,
        "DBK_DB_PORT": str(server.port),
        "DBK_DB_USER": server.user,
        "DBK_DB_PASSWORD": server.password,
        "DBK_DB_NAME": DB,
        "PYTHONPATH": path,
    }
    for name in ("DBK_DB_READER_USER", "DBK_DB_READER_PASSWORD"):
        env.pop(name, None)
    return env


def run(server: MariaDBServer, scenario: Scenario, keep_log: Path | None = None) -> Result:
    """One load run (see the module docstring); the server is running afterwards, with
    its GLOBAL timeouts as before. ``keep_log``: copy the app server's output there."""
    if scenario.restart and server.external:
        raise RuntimeError("a restart needs the private server (unset DBKEEPALIVE_TEST_SERVER)")
    saved = {n: server.get_global(n) for n in ("wait_timeout", "interactive_timeout")}
    server.query(f"DROP DATABASE IF EXISTS {DB}")
    server.query(f"CREATE DATABASE {DB} CHARACTER SET utf8mb4")
    server.query(TABLE_SQL, db=DB)
    _set_timeouts(server, scenario.wait_timeout)
    workdir = Path(tempfile.mkdtemp(prefix="dbkeepalive-load-"))
    app = AppServer(scenario.server, server_env(server, scenario), workdir / "server.log")
    result = Result(scenario)
    faults: list[Fault] = []
    clients: Clients | None = None
    try:
        app.start()
        connects_before = server.connections_total()
        run_id = f"{scenario.server}-{scenario.mode}-{time.time_ns()}"
        paths = PATHS.get(scenario.server, DEFAULT_PATHS)
        clients = Clients(
            app.port, paths, run_id, scenario.clients, scenario.write_share, scenario.think
        )
        begin = clock()

        def mark(what: str) -> None:
            result.timeline.append((what, round(clock() - begin, 2)))

        clients.start()
        time.sleep(scenario.phase)
        steady_end = clock()
        for _ in range(scenario.kills):
            faults.append(_kill_all(server))
            mark(f"killed {faults[-1].victims}")
            time.sleep(scenario.phase)
        quiet_end = restart_end = begin
        if scenario.idle:
            clients.pause()
            mark("clients quiet")
            result.open_before_quiet = len(_app_connections(server))
            time.sleep(scenario.quiet)
            result.open_after_quiet = len(_app_connections(server))
            quiet_end = clock()
            mark("clients resume")
            clients.resume()
            time.sleep(scenario.phase)
        if scenario.restart:
            result.open_at_restart = len(_app_connections(server))
            connects = server.connections_total() - connects_before
            start = clock()
            mark("server stopping")
            server.stop()  # a clean shutdown: SIGTERM, mariadbd ends every session
            mark("server stopped")
            faults.append(Fault("shutdown", start, clock() + GRACE, result.open_at_restart))
            # The status counter starts again from 0; connections_total() goes on
            # subtracting every admin connection since the first start.
            connects_before = -server._admin_connects - connects
            server.restarts += 1
            server.start()
            _set_timeouts(server, scenario.wait_timeout)  # a restart forgot SET GLOBAL
            restart_end = clock()
            mark("server started")
            time.sleep(scenario.phase)
        requests = clients.finish()
        clients = None
        mark("clients done")
        end = clock()
        result.connects = server.connections_total() - connects_before
        result.seconds = end - begin
        active = result.seconds - (scenario.quiet if scenario.idle else 0.0)
        _verdict(server, result, requests, faults, begin, active)
        steady = [r for r in requests if r.status == 200 and r.end <= steady_end]
        result.rps_steady = len(steady) / (steady_end - begin)
        result.ok_after_quiet = sum(
            1 for r in requests if r.status == 200 and scenario.idle and r.start > quiet_end
        )
        result.ok_after_restart = sum(
            1 for r in requests if r.status == 200 and scenario.restart and r.start > restart_end
        )
        result.killed = [f.victims for f in faults if f.what == "kill"]
        return result
    finally:
        if clients is not None:
            clients.finish()
        app.stop()
        if keep_log is not None and app.log.exists():
            shutil.copyfile(app.log, keep_log)
        if not server.running:
            server.start_again()
        for name, value in saved.items():
            with contextlib.suppress(Exception):
                server.set_global(name, value)
        with contextlib.suppress(Exception):
            server.query(f"DROP DATABASE IF EXISTS {DB}")
        shutil.rmtree(workdir, ignore_errors=True)


def _verdict(
    server: MariaDBServer,
    result: Result,
    requests: list[Request],
    faults: list[Fault],
    begin: float,
    active: float,
) -> None:
    rows = server.query(f"SELECT `key`, COUNT(*) FROM {TABLE} GROUP BY `key`", db=DB)
    found = {str(key): int(count) for key, count in rows}
    writes = [r for r in requests if r.kind == "write"]
    acked = {r.key for r in writes if r.status == 200}
    failed = [r for r in requests if r.status != 200]
    result.requests = len(requests)
    result.failed = len(failed)
    result.ok = result.requests - result.failed
    result.failures = dict(Counter(f"{r.kind} {r.cause}" for r in failed).most_common())
    result.duplicates = sum(1 for count in found.values() if count > 1)
    result.missing = len(acked - found.keys())
    result.strays = len(found.keys() - {r.key for r in writes})
    result.applied_anyway = sum(1 for r in failed if r.kind == "write" and r.key in found)
    for r in failed:
        open_at_fault = any(r.start <= f.end and r.end >= f.start for f in faults)
        if r.kind == "write" and r.cause == "write_unknown" and open_at_fault:
            result.in_flight += 1
        else:
            result.unexpected.append(f"{r.kind} {r.cause} at +{r.start - begin:.2f} s")
    latencies = sorted(r.end - r.start for r in requests if r.status == 200)
    if latencies:
        result.p50_ms = statistics.median(latencies) * 1000
        result.p99_ms = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    result.rps = result.ok / active if active > 0 else 0.0
