"""Recovery speed, per driver, with django-dbkeepalive and with plain Django.

Against a private MariaDB on loopback (no TLS) started here, each (driver, mode) in a
process of its own, three measurements:

1. ``KILL``: from a server-side ``KILL`` of the process's connection (noticed 0.15 s
   later, as after any idle pause) to the first successful statement;
2. ``restart``: from the end of a server restart (the server accepting again) to the
   first successful statement;
3. ``threads``: N threads (1, 16, 64), each with its connection, all ``KILL``-ed; the
   CPU time (``time.process_time()``, every thread of the process) and the wall time
   until every thread has run a statement.

"First successful statement" is what a request loop sees: each try starts like a Django
request (``close_old_connections()``) and runs ``SELECT 1``; a try that raises counts as
a failed request (plain Django fails one, then its next request reconnects; the app
reconnects underneath). Medians; run by ``make bench`` (``benchmarks/run.py``) or alone:

    python benchmarks/recovery.py [--drivers mysqlclient,pymysql] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

KILL_REPS = 10
RESTART_REPS = 5
THREAD_COUNTS = (1, 16, 64)
THREAD_REPS = 3
#: How long after a KILL the statement comes (the client has seen the close).
NOTICE_AFTER = 0.15
MODES = ("plain", "app")
ENGINES = {"connector": "mysql.connector.django"}


# -- the child: one driver, one mode ------------------------------------------------------


def setup(mode: str, driver: str) -> None:
    if driver == "pymysql":
        import pymysql

        pymysql.install_as_MySQLdb()
    import django
    from django.conf import settings

    apps = ["django.contrib.contenttypes"]
    if mode == "app":
        apps.append("django_dbkeepalive")
    settings.configure(
        SECRET_KEY="bench",
        USE_TZ=True,
        INSTALLED_APPS=apps,
        DATABASES={
            "default": {
                "ENGINE": ENGINES.get(driver, "django.db.backends.mysql"),
                "HOST": os.environ["DBK_DB_HOST"],
                "PORT": int(os.environ["DBK_DB_PORT"]),
                "USER": os.environ["DBK_DB_USER"],
                "PASSWORD": os.environ["DBK_DB_PASSWORD"],
                "NAME": "mysql",
                "CONN_MAX_AGE": None,
                "OPTIONS": {"use_pure": True} if driver == "connector" else {},
            }
        },
    )
    django.setup()


def statement() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        return int(cursor.fetchone()[0])


def until_ok(started: float) -> tuple[float, int]:
    """Requests until one succeeds: (seconds since ``started``, failed requests)."""
    from django.db import DatabaseError, close_old_connections

    failed = 0
    while True:
        close_old_connections()
        try:
            statement()
        except DatabaseError:
            failed += 1
            if failed > 50:
                raise
            continue
        return time.perf_counter() - started, failed


class Admin:
    """A PyMySQL connection of its own (never Django's) that sends the KILLs."""

    def __init__(self) -> None:
        self.conn: Any = None

    def kill(self, *ids: int) -> None:
        import pymysql

        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = pymysql.connect(
                        host=os.environ["DBK_DB_HOST"],
                        port=int(os.environ["DBK_DB_PORT"]),
                        user=os.environ["DBK_DB_USER"],
                        password=os.environ["DBK_DB_PASSWORD"],
                        autocommit=True,
                        ssl_disabled=True,
                    )
                with self.conn.cursor() as cursor:
                    for ident in ids:
                        cursor.execute(f"KILL {int(ident)}")
                return
            except pymysql.OperationalError:  # lost in a restart: connect again
                self.conn = None
        raise RuntimeError("cannot KILL")


def after_kill(admin: Admin) -> tuple[float, int]:
    admin.kill(statement())
    time.sleep(NOTICE_AFTER)
    return until_ok(time.perf_counter())


def after_restart() -> tuple[float, int]:
    statement()
    print("restart", flush=True)
    if sys.stdin.readline().strip() != "accepting":
        raise RuntimeError("the parent did not restart the server")
    return until_ok(time.perf_counter())


def threads_at_once(admin: Admin, count: int) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, failed requests) to recover ``count`` threads."""
    from django.db import connection

    ids: list[int] = []
    failures: list[int] = []
    connected = threading.Barrier(count + 1)
    go = threading.Barrier(count + 1)
    lock = threading.Lock()

    def worker() -> None:
        try:
            ident = statement()
            with lock:
                ids.append(ident)
            connected.wait()
            go.wait()
            _, failed = until_ok(time.perf_counter())
            with lock:
                failures.append(failed)
        finally:
            connection.close()

    workers = [threading.Thread(target=worker) for _ in range(count)]
    for thread in workers:
        thread.start()
    connected.wait()
    admin.kill(*ids)
    time.sleep(NOTICE_AFTER)
    cpu, wall = time.process_time(), time.perf_counter()
    go.wait()
    for thread in workers:
        thread.join()
    return time.process_time() - cpu, time.perf_counter() - wall, sum(failures)


def child(mode: str, driver: str) -> None:
    setup(mode, driver)
    admin = Admin()
    statement()
    kills = [after_kill(admin) for _ in range(KILL_REPS)]
    restarts = [after_restart() for _ in range(RESTART_REPS)]
    threads = {}
    for count in THREAD_COUNTS:
        runs = [threads_at_once(admin, count) for _ in range(THREAD_REPS)]
        threads[str(count)] = {
            "cpu_ms": statistics.median(r[0] for r in runs) * 1e3,
            "wall_ms": statistics.median(r[1] for r in runs) * 1e3,
            "failed": max(r[2] for r in runs),
        }
    result = {
        "kill_ms": statistics.median(k[0] for k in kills) * 1e3,
        "kill_failed": max(k[1] for k in kills),
        "restart_ms": statistics.median(r[0] for r in restarts) * 1e3,
        "restart_failed": max(r[1] for r in restarts),
        "threads": threads,
    }
    print(json.dumps(result), flush=True)


# -- the parent: the server, a child per (driver, mode), the table ------------------------


def run_child(server: Any, env: dict[str, str], mode: str, driver: str) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, driver],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.strip() == "restart":
                server.restart()  # returns once the server accepts connections again
                proc.stdin.write("accepting\n")
                proc.stdin.flush()
            elif line.startswith("{"):
                data: dict[str, Any] = json.loads(line)
                return data
    finally:
        proc.stdin.close()
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"{driver} {mode}: the benchmark process failed")
    raise RuntimeError(f"{driver} {mode}: no result")


def available(driver: str) -> bool:
    module = {"mysqlclient": "MySQLdb", "pymysql": "pymysql", "connector": "mysql.connector"}
    try:
        __import__(module[driver])
    except ImportError:
        return False
    return True


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| driver | mode | KILL → statement | restart → statement | "
        + " | ".join(f"{n} thread{'s' if n > 1 else ''}: CPU / wall" for n in THREAD_COUNTS)
        + " |"
    )
    lines = [head, "| --- | --- |" + " ---: |" * (2 + len(THREAD_COUNTS))]
    for row in results:

        def failed(count: int) -> str:
            return f" ({count} failed)" if count else ""

        cells = [
            row["driver"],
            "plain Django" if row["mode"] == "plain" else "with the app",
            f"{row['kill_ms']:.1f} ms{failed(row['kill_failed'])}",
            f"{row['restart_ms']:.1f} ms{failed(row['restart_failed'])}",
        ]
        for count in THREAD_COUNTS:
            t = row["threads"][str(count)]
            cells.append(f"{t['cpu_ms']:.0f} / {t['wall_ms']:.0f} ms{failed(t['failed'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drivers", default="mysqlclient,pymysql")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "recovery.json")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DRIVER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from tests.mariadb import MariaDBServer

    started = time.perf_counter()
    server = MariaDBServer()
    server.start()
    env = {
        **os.environ,
        "DBK_DB_HOST": server.host,
        "DBK_DB_PORT": str(server.port),
        "DBK_DB_USER": server.user,
        "DBK_DB_PASSWORD": server.password,
        "PYTHONPATH": str(ROOT),
    }
    results = []
    try:
        for driver in args.drivers.split(","):
            if not available(driver):
                print(f"{driver}: not installed, skipped", flush=True)
                continue
            for mode in MODES:
                print(f"recovery: {driver}, {mode}", flush=True)
                results.append(
                    {"driver": driver, "mode": mode, **run_child(server, env, mode, driver)}
                )
    finally:
        server.close()
    print()
    print(table(results))
    took = time.perf_counter() - started
    print(f"\n(medians: KILL of {KILL_REPS}, restart of {RESTART_REPS}, threads of {THREAD_REPS};")
    print(f" 'failed': requests that raised before one succeeded; {took:.0f} s in all)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"when": time.strftime("%Y-%m-%d"), "recovery": results}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
