"""Soak run: writers in four shapes against a server and a network that keep failing.

    python -m soak.run [--seconds 150] [--seed N]      (DBK_DRIVER=mysqlclient|pymysql)

A private MariaDB (tests/mariadb.py) and the fault proxy (tests/proxy.py) in front of
it; Django (testproject settings, django_dbkeepalive installed) connects through the
proxy with persistent connections, CLIENT_TIMEOUTS (read_timeout 3 s, so a blackholed
flow ends) and TCP_KEEPALIVE. Four writers, each in its own thread with its own
connection, write uniquely keyed rows:

- web: HTTP requests to a real WSGI server thread (wsgiref): a read, a pause, then two
  rows in one transaction; acknowledged when the response is 200;
- sched: an APScheduler BackgroundScheduler interval job (plain thread pool executor),
  sometimes working 0.5-2.5 s before its write;
- command: a BaseKeepaliveCommand loop with pauses up to 3 s;
- busy: a thread writing every 10-30 ms (the hot path).

A chaos thread meanwhile KILLs connections, restarts or crashes the server, resets,
cuts and blackholes proxy flows, adds latency and lowers wait_timeout to 2 s.

Every write attempted and every acknowledged one is recorded with its keys; at the end
the rows on the server are counted. Exit status 1 when a row is duplicated or an
acknowledged row is missing.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import logging
import os
import queue
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tests.mariadb import MariaDBServer
from tests.proxy import FaultProxy

DB_NAME = "soak"


class Ledger:
    """Writes attempted and acknowledged (with their keys), errors, the longest stall."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempted: collections.Counter[str] = collections.Counter()
        self.acknowledged: collections.Counter[str] = collections.Counter()
        self.keys_attempted: set[str] = set()
        self.keys_acked: set[str] = set()
        self.errors: collections.Counter[str] = collections.Counter()
        self.ambiguous = 0  # errors whose message says the write may have been applied
        self.unexplained: list[str] = []  # lost-connection errors without a message
        self.stall = (0.0, "")

    def write(
        self, writer: str, keys: list[str], fn: Callable[[], Any], pause: float = 0.0
    ) -> bool:
        """Run ``fn`` (one write of ``keys``) and record it; ``pause``: seconds of it
        that are deliberate work, not counted in the stall."""
        with self.lock:
            self.attempted[writer] += 1
            self.keys_attempted.update(keys)
        start = time.monotonic()
        ok = False
        try:
            ok = fn() is not False
        except Exception as exc:
            self.error(exc)
        finally:
            took = time.monotonic() - start - pause
            with self.lock:
                if ok:
                    self.acknowledged[writer] += 1
                    self.keys_acked.update(keys)
                if took > self.stall[0]:
                    self.stall = (took, writer)
        return ok

    def error(self, exc: BaseException) -> None:
        from django_dbkeepalive import ConnectionLostInTransaction, is_disconnect

        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        notes = " ".join(getattr(exc, "__notes__", []))
        kind = f"{type(exc).__name__}({code})" if code is not None else type(exc).__name__
        text = notes
        if isinstance(exc, ConnectionLostInTransaction):
            kind += f" cause={exc.cause}"
            text = str(exc)
        elif "django-dbkeepalive" in notes:
            kind += " " + _cause_of(notes)
        with self.lock:
            self.errors[kind] += 1
            if "may have applied" in text or "UNKNOWN" in text:
                self.ambiguous += 1
            if is_disconnect(exc) and "django-dbkeepalive" not in text:
                where = (
                    "".join(traceback.format_exception(exc)[-12:]) if not self.unexplained else ""
                )
                self.unexplained.append(f"{kind}: {exc}\n{where}")


def _cause_of(note: str) -> str:
    for needle, name in (
        ("could not connect", "unreachable"),
        ("being opened", "setup"),
        ("read_timeout", "timeout"),
        ("max_allowed_packet", "too_large"),
        ("was run again once", "failed_again"),
        ("was reset", "reset"),
        ("in flight", "lost"),
    ):
        if needle in note:
            return name
    return "noted"


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    driver = os.environ.get("DBK_DRIVER", "mysqlclient")

    server = MariaDBServer()
    server.start()
    proxy = FaultProxy(server.port).start()
    try:
        return run(server, proxy, args.seconds, seed, driver)
    finally:
        proxy.close()
        server.close()


def run(server: MariaDBServer, proxy: FaultProxy, seconds: float, seed: int, driver: str) -> int:
    server.query(f"CREATE DATABASE {DB_NAME}")
    os.environ.update(
        DJANGO_SETTINGS_MODULE="testproject.settings",
        DBK_DB_HOST="127.0.0.1",
        DBK_DB_PORT=str(proxy.port),
        DBK_DB_USER=server.user,
        DBK_DB_PASSWORD=server.password,
        DBK_DB_NAME=DB_NAME,
        DBK_CONN_MAX_AGE="None",
    )
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.core.signals import got_request_exception
    from django.core.wsgi import get_wsgi_application
    from django.db import connection, connections

    from django_dbkeepalive.signals import connection_recycled

    from .app import TABLE_SQL, SoakCommand, SoakRow

    server.query(TABLE_SQL, db=DB_NAME)
    options = settings.DATABASES["default"]["OPTIONS"]
    for name in ("connect_timeout", "read_timeout", "write_timeout"):
        options.pop(name, None)  # CLIENT_TIMEOUTS adds them
    settings.DBKEEPALIVE = {
        "CLIENT_TIMEOUTS": {"connect_timeout": 3, "read_timeout": 3, "write_timeout": 3},
        "TCP_KEEPALIVE": 30,
    }
    settings.ROOT_URLCONF = "soak.app"

    ledger = Ledger()
    stop = threading.Event()
    recycles: collections.Counter[str] = collections.Counter()
    faults: collections.Counter[str] = collections.Counter()

    def on_recycle(sender: str, reason: str, **kwargs: Any) -> None:
        recycles[reason] += 1

    def on_request_exception(sender: Any, request: Any = None, **kwargs: Any) -> None:
        ledger.error(sys.exc_info()[1] or RuntimeError("unknown"))

    connection_recycled.connect(on_recycle, weak=False)
    got_request_exception.connect(on_request_exception, weak=False)

    # -- writers -----------------------------------------------------------------
    httpd: WSGIServer = make_server(
        "127.0.0.1", 0, get_wsgi_application(), handler_class=QuietHandler
    )
    web_port = httpd.server_address[1]
    # get_wsgi_application() ran django.setup() again, which configured logging again.
    logging.getLogger("django_dbkeepalive").setLevel(logging.WARNING)
    logging.getLogger("django.request").setLevel(logging.CRITICAL)
    logging.getLogger("apscheduler").setLevel(logging.CRITICAL)
    threads = [threading.Thread(target=httpd.serve_forever, name="wsgi", daemon=True)]

    def web_client() -> None:
        rng = random.Random(seed + 1)
        n = 0
        while not stop.is_set():
            key = f"web-{n}"
            pause = rng.choice([0, 0, 0, 0.3, 1.0, 2.5])

            def request(key: str = key, pause: float = pause) -> bool:
                conn = http.client.HTTPConnection("127.0.0.1", web_port, timeout=60)
                try:
                    conn.request("GET", f"/write?key={key}&pause={pause}")
                    return conn.getresponse().status == 200
                finally:
                    conn.close()

            if not ledger.write("web", [f"{key}-a", f"{key}-b"], request, pause):
                stop.wait(0.25)  # a client backs off after an error (the server may be down)
            n += 1

    sched_numbers = iter(range(10**9))
    sched_rng = random.Random(seed + 2)

    def sched_job() -> None:
        key = f"sched-{next(sched_numbers)}"
        if sched_rng.random() < 0.3:
            time.sleep(sched_rng.choice([0.5, 1.5, 2.5]))  # work before the write
        ledger.write("sched", [key], lambda: SoakRow.objects.create(key=key, writer="sched"))

    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1)})
    scheduler.add_job(
        sched_job,
        "interval",
        seconds=0.4,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )

    def command() -> None:
        call_command(SoakCommand(stop, ledger.write, random.Random(seed + 3)))

    def busy() -> None:
        rng = random.Random(seed + 4)
        n = 0
        try:
            while not stop.is_set():
                key = f"busy-{n}"
                if not ledger.write(
                    "busy", [key], lambda key=key: SoakRow.objects.create(key=key, writer="busy")
                ):
                    stop.wait(0.25)
                n += 1
                if n % 10 == 0:
                    try:
                        SoakRow.objects.filter(writer="busy").count()  # a read now and then
                    except Exception as exc:
                        ledger.error(exc)
                time.sleep(rng.uniform(0.01, 0.03))
        finally:
            connections.close_all()

    threads += [
        threading.Thread(target=web_client, name="web-client"),
        threading.Thread(target=command, name="command"),
        threading.Thread(target=busy, name="busy"),
    ]

    # -- chaos -------------------------------------------------------------------
    def chaos() -> None:
        rng = random.Random(seed)
        low_wait_until = 0.0
        last_restart = time.monotonic()
        latency_until = 0.0
        actions = ["kill", "kill", "reset", "cut", "cut", "blackhole", "wait", "latency", "restart"]
        while not stop.wait(rng.uniform(0.3, 1.5)):
            now = time.monotonic()
            if low_wait_until and now > low_wait_until:
                for name in ("wait_timeout", "interactive_timeout"):
                    server.set_global(name, 28800)
                low_wait_until = 0.0
            if latency_until and now > latency_until:
                proxy.set_latency(0)
                latency_until = 0.0
            action = rng.choice(actions)
            try:
                if action == "kill":
                    victims = [p["id"] for p in server.processlist(user=server.user)]
                    if not victims:
                        continue
                    server.kill(rng.choice(victims))
                elif action == "reset":
                    proxy.reset_all()
                elif action == "cut":
                    proxy.cut_after_next_client_write()
                elif action == "blackhole":
                    proxy.blackhole()
                elif action == "wait":
                    for name in ("wait_timeout", "interactive_timeout"):
                        server.set_global(name, 2)
                    low_wait_until = now + 10
                elif action == "latency":
                    proxy.set_latency(0.05)
                    latency_until = now + 3
                elif action == "restart":
                    if now - last_restart < 25:
                        continue
                    last_restart = now
                    if rng.random() >= 0.5:
                        action = "crash"
                    done = threading.Event()
                    restarts.put((action, done))
                    done.wait(120)
                    low_wait_until = 0.0  # a restart brings the configured value back
                faults[action] += 1
            except Exception as exc:  # the server may be restarting: the next tick retries
                faults[f"{action} failed ({type(exc).__name__})"] += 1
        # Heal: every flow back to normal before the writers' last statements.
        proxy.disarm()
        proxy.set_latency(0)
        for name in ("wait_timeout", "interactive_timeout"):
            server.set_global(name, 28800)
        proxy.reset_all()

    # Restarts run in the main thread: the server dies with the thread that started it
    # (PR_SET_PDEATHSIG in tests/mariadb.py), and the chaos thread ends before the count.
    restarts: queue.Queue[tuple[str, threading.Event]] = queue.Queue()

    def restart(how: str) -> None:
        if how == "restart":
            server.restart()
        else:
            server.crash()  # SIGKILL, as an OOM kill would
            time.sleep(0.5)
            server.start_again()

    chaos_thread = threading.Thread(target=chaos, name="chaos")
    started = time.monotonic()
    print(
        f"soak: {driver}, {seconds:g} s, seed {seed}; server 127.0.0.1:{server.port}, "
        f"proxy 127.0.0.1:{proxy.port}",
        flush=True,
    )
    for thread in threads:
        thread.start()
    scheduler.start()
    chaos_thread.start()
    while time.monotonic() - started < seconds:
        try:
            how, done = restarts.get(timeout=0.2)
        except queue.Empty:
            continue
        try:
            restart(how)
        finally:
            done.set()
    stop.set()
    while chaos_thread.is_alive():
        try:
            how, done = restarts.get(timeout=0.2)
        except queue.Empty:
            continue
        restart(how)
        done.set()
    chaos_thread.join()
    scheduler.shutdown(wait=True)
    for thread in threads[1:]:
        thread.join(60)
    httpd.shutdown()
    connection.close()
    ran = time.monotonic() - started

    # -- verdict -----------------------------------------------------------------
    rows = server.query("SELECT `key`, COUNT(*) FROM soak_row GROUP BY `key`", db=DB_NAME)
    found = {key: count for key, count in rows}
    duplicates = sorted(key for key, count in found.items() if count > 1)
    missing = sorted(ledger.keys_acked - set(found))
    unacked = sorted(set(found) - ledger.keys_acked)
    strays = sorted(set(found) - ledger.keys_attempted)
    width = 9
    print(f"\nsoak: {driver}, ran {ran:.0f} s, seed {seed}")
    print(f"{'writer':<{width}} {'attempted':>10} {'acknowledged':>13}")
    for writer in ("web", "sched", "command", "busy"):
        print(f"{writer:<{width}} {ledger.attempted[writer]:>10} {ledger.acknowledged[writer]:>13}")
    print(
        f"{'total':<{width}} {sum(ledger.attempted.values()):>10} "
        f"{sum(ledger.acknowledged.values()):>13}"
    )
    print(
        f"rows: keys attempted {len(ledger.keys_attempted)}, acknowledged "
        f"{len(ledger.keys_acked)}, found {sum(found.values())} ({len(found)} keys)"
    )
    print(f"duplicates: {len(duplicates)} {duplicates[:5] if duplicates else ''}")
    print(f"acknowledged but missing: {len(missing)} {missing[:5] if missing else ''}")
    print(
        f"found but not acknowledged: {len(unacked)} (errors that said the write may have "
        f"been applied: {ledger.ambiguous})"
    )
    if strays:
        print(f"rows never attempted: {len(strays)} {strays[:5]}")
    print("errors that reached user code:")
    for kind, count in ledger.errors.most_common():
        print(f"  {count:>6}  {kind}")
    if ledger.unexplained:
        print(
            "lost-connection errors without a django-dbkeepalive message:",
            len(ledger.unexplained),
        )
        for line in ledger.unexplained[:5]:
            print(f"    {line}")
    print(f"longest stall: {ledger.stall[0]:.2f} s ({ledger.stall[1]})")
    print("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    print("recycles: " + ", ".join(f"{k} {v}" for k, v in sorted(recycles.items())))
    failed = bool(duplicates or missing or strays)
    print("verdict: " + ("FAILED" if failed else "OK (no duplicate, no acknowledged row missing)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
