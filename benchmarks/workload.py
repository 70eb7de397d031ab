"""One benchmark process: plain Django or Django with django-dbkeepalive, one driver.

Run by ``benchmarks/run.py`` (wall clock) and ``benchmarks/callgrind.py`` (instructions);
configures Django itself from ``DBK_DB_*`` environment variables, so each mode gets a
clean process.

    python benchmarks/workload.py MODE DRIVER CASE N   ->  prints one JSON line

MODE: plain | app | health (plain Django with CONN_HEALTH_CHECKS=True)
CASE: select1 | insert1 | orm_get | orm_insert | request | recovery
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

RECOVERY_CONNECTS: list[int] = []


def setup(mode: str, driver: str) -> None:
    if driver == "pymysql":
        import pymysql

        pymysql.install_as_MySQLdb()
    import django
    from django.conf import settings

    apps = ["django.contrib.contenttypes", "django.contrib.auth", "testproject.testapp"]
    if mode == "app":
        apps.append("django_dbkeepalive")
    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench",
        ALLOWED_HOSTS=["*"],
        USE_TZ=True,
        INSTALLED_APPS=apps,
        ROOT_URLCONF="benchmarks.urls",
        MIDDLEWARE=[],
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        DBKEEPALIVE=json.loads(os.environ.get("DBK_BENCH_SETTINGS", "{}")),
        DATABASES={
            "default": {
                # Connector/Python: its own backend, pure Python (as in the tests).
                "ENGINE": "mysql.connector.django"
                if driver == "connector"
                else "django.db.backends.mysql",
                "HOST": os.environ["DBK_DB_HOST"],
                "PORT": int(os.environ["DBK_DB_PORT"]),
                "USER": os.environ["DBK_DB_USER"],
                "PASSWORD": os.environ["DBK_DB_PASSWORD"],
                "NAME": os.environ["DBK_DB_NAME"],
                "CONN_MAX_AGE": None,
                "CONN_HEALTH_CHECKS": mode == "health",
                "OPTIONS": {
                    "charset": "utf8mb4",
                    **({"use_pure": True} if driver == "connector" else {}),
                },
            }
        },
    )
    django.setup()


def run(case: str, n: int) -> list[float]:
    from django.db import close_old_connections, connection

    from testproject.testapp.models import Item

    timings: list[float] = []
    clock = time.perf_counter
    if case == "select1":
        cursor = connection.cursor()
        cursor.execute("SELECT 1")
        for _ in range(n):
            start = clock()
            cursor.execute("SELECT 1")
            cursor.fetchone()
            timings.append(clock() - start)
    elif case == "insert1":
        cursor = connection.cursor()
        prefix = f"{os.getpid()}-{time.time_ns()}"
        sql = "INSERT INTO testapp_item (`key`, value, created) VALUES (%s, 0, NOW())"
        for i in range(n):
            start = clock()
            cursor.execute(sql, [f"{prefix}-{i}"])
            timings.append(clock() - start)
    elif case == "orm_get":
        pk = Item.objects.get_or_create(key="bench-get")[0].pk
        for _ in range(n):
            start = clock()
            Item.objects.get(pk=pk)
            timings.append(clock() - start)
    elif case == "orm_insert":
        prefix = f"{os.getpid()}-{time.time_ns()}"
        for i in range(n):
            start = clock()
            Item.objects.create(key=f"{prefix}-{i}")
            timings.append(clock() - start)
    elif case == "request":
        from django.test import Client

        client = Client()
        client.get("/three/")
        for _ in range(n):
            start = clock()
            client.get("/three/")
            timings.append(clock() - start)
    elif case == "memory":
        import tracemalloc

        cursor = connection.cursor()
        for _ in range(10_000):  # warm up: caches, interned strings, the guard's state
            cursor.execute("SELECT 1")
            cursor.fetchone()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for _ in range(n):
            cursor.execute("SELECT 1")
            cursor.fetchone()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        timings.append(growth / n)  # bytes per query, reported as "median_us" * 1e-6
    elif case == "recovery":
        import pymysql
        from django.db.backends.signals import connection_created

        opened = []
        connection_created.connect(lambda **kw: opened.append(1), weak=False)

        admin = dict(
            host=os.environ["DBK_DB_HOST"],
            port=int(os.environ["DBK_DB_PORT"]),
            user=os.environ["DBK_DB_USER"],
            password=os.environ["DBK_DB_PASSWORD"],
        )
        for _ in range(n):
            close_old_connections()
            connection.ensure_connection()
            cursor = connection.cursor()
            cursor.execute("SELECT 1")
            killer = pymysql.connect(**admin)
            killer.cursor().execute(f"KILL {connection.connection.thread_id()}")
            killer.close()
            time.sleep(0.2)
            opened.clear()
            start = clock()
            try:
                cursor = connection.cursor()
                cursor.execute("SELECT 1")
                cursor.fetchone()
                timings.append(clock() - start)
                RECOVERY_CONNECTS.append(len(opened))
            except Exception:
                timings.append(float("nan"))  # plain Django: the query fails
                connection.close()
    else:
        raise SystemExit(f"unknown case {case!r}")
    return timings


def main() -> None:
    mode, driver, case, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    setup(mode, driver)
    if os.environ.get("DBK_BENCH_NO_GC"):
        # Instruction counts: a full collection of Django's heap costs millions of
        # instructions and lands at different points in each run; per-query garbage is
        # freed by reference counting anyway.
        import gc

        gc.collect()
        gc.disable()
    timings = run(case, n)
    ok = [t for t in timings if t == t]
    result: dict[str, object] = {"mode": mode, "driver": driver, "case": case, "n": n}
    if case == "memory":
        result["bytes_per_query"] = timings[0]
    else:
        result["failed"] = len(timings) - len(ok)
        result["median_us"] = statistics.median(ok) * 1e6 if ok else None
    if case == "recovery":
        result["max_connects_per_recovery"] = max(RECOVERY_CONNECTS, default=None)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
