"""The test project under ``gevent.monkey.patch_all()`` (gunicorn's gevent worker), for
tests/test_gevent.py. ``python -m tests.gevent_probe``; the test project's environment
applies (``DBK_DB_*``, ``DBK_DRIVER``). Every session sets ``wait_timeout`` to WAIT.

GREENLETS greenlets, each with its own Django connection (gevent's ``threading.local``),
each writes ``g<n>-first``, idles (past the guard's idle limit; the odd ones past WAIT)
and writes ``g<n>-after-idle``; then the
probe prints ``{"kill": [connection ids]}`` and waits for a line on stdin (the test KILLs
them meanwhile); each writes ``g<n>-after-kill``. Then the main greenlet forks (gevent's
``os.fork``): the child writes ``child`` through the ``long`` alias (no short
wait_timeout) the parent used just before, the parent writes ``main-after`` on it. Last,
a ``SELECT SLEEP(SLEEP)`` (the control: what a blocked hub looks like to the ticker).

A ticker greenlet measures the longest gap between its ticks (every 10 ms). Prints one
JSON line of everything observed.

``DBK_GREEN=eventlet``: the same under ``eventlet.monkey_patch()`` (gunicorn's eventlet
worker), which deletes ``select.poll``.
"""

import os

GREEN = os.environ.get("DBK_GREEN", "gevent")
if GREEN == "eventlet":
    import eventlet

    eventlet.monkey_patch()
    spawn, green_sleep = eventlet.spawn, eventlet.sleep
else:
    from gevent import monkey

    monkey.patch_all()
    import gevent

    spawn, green_sleep = gevent.spawn, gevent.sleep

import json  # noqa: E402
import select  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from threading import Event  # noqa: E402  (green under both)
from typing import Any  # noqa: E402

GREENLETS = 20
WAIT = 6  # the sessions' wait_timeout; the guard's idle limit is WAIT - MARGIN
MARGIN = 2
#: Even greenlets idle past the guard's limit but not the server's timeout, odd ones
#: past the server's timeout too (the server closes their sessions first).
IDLE = (WAIT - MARGIN / 2, WAIT + 1.0)
SLEEP = 2


def join(green: Any) -> None:
    (green.wait if GREEN == "eventlet" else green.join)()


def patched() -> bool:
    modules = ("select", "socket", "thread" if GREEN == "eventlet" else "threading")
    if GREEN == "eventlet":
        return all(eventlet.patcher.is_monkey_patched(m) for m in modules)
    return all(monkey.is_module_patched(m) for m in modules)


class Ticker:
    def __init__(self) -> None:
        self.max_gap = 0.0
        self.running = True

    def run(self) -> None:
        last = time.monotonic()
        while self.running:
            green_sleep(0.01)
            t = time.monotonic()
            self.max_gap = max(self.max_gap, t - last)
            last = t

    def measure(self, func: Any) -> float:
        self.max_gap, self.running = 0.0, True
        ticker = spawn(self.run)
        green_sleep(0.05)
        try:
            func()
        finally:
            self.running = False
            join(ticker)
        return round(self.max_gap, 3)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    from django.conf import settings

    default = settings.DATABASES["default"]
    settings.DATABASES["long"] = {**default, "OPTIONS": dict(default["OPTIONS"])}
    init = f"SET SESSION wait_timeout={WAIT}"
    default["OPTIONS"] = {**default["OPTIONS"], "init_command": init}
    settings.DBKEEPALIVE = {**settings.DBKEEPALIVE, "MARGIN": MARGIN}

    import django

    django.setup()
    from django.db import connections

    from django_dbkeepalive.signals import connection_recycled
    from testproject.testapp.models import Item

    mine = threading.local()  # per greenlet under patch_all

    def recycled(sender: str, reason: str, **kwargs: Any) -> None:
        getattr(mine, "log", []).append([sender, reason])

    connection_recycled.connect(recycled, weak=False)

    def write(key: str, alias: str = "default") -> int:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT CONNECTION_ID()")
            ident = int(cursor.fetchone()[0])
        Item.objects.using(alias).create(key=key, value=ident)
        return ident

    killed, done = Event(), Event()
    reached = [Event() for _ in range(GREENLETS)]
    results: list[dict[str, Any]] = [{} for _ in range(GREENLETS)]

    def worker(n: int) -> None:
        mine.log = out = results[n]["recycled"] = []
        try:
            results[n]["wrapper"] = id(connections["default"])
            results[n]["first"] = write(f"g{n}-first")
            out.append("first")
            green_sleep(IDLE[n % 2])
            results[n]["idle"] = write(f"g{n}-after-idle")
            out.append("idle")
            reached[n].set()
            killed.wait()
            results[n]["kill"] = write(f"g{n}-after-kill")
            out.append("kill")
        except Exception as exc:
            results[n]["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            reached[n].set()
            done.wait()
            connections.close_all()

    def wait_for_test() -> None:
        select.select([sys.stdin], [], [])  # the green one: the hub keeps running
        sys.stdin.readline()

    fork: dict[str, Any] = {}

    def guarded_phases() -> None:
        write("main-before", "long")
        greenlets = [spawn(worker, n) for n in range(GREENLETS)]
        for event in reached:
            event.wait()
        ids = [r.get("idle") for r in results]
        print(json.dumps({"kill": ids}), flush=True)
        wait_for_test()
        killed.set()
        for event in reached:
            event.wait()
        while not all("kill" in r or "error" in r for r in results):
            green_sleep(0.01)
        # All greenlets hold their connections (idle) while the main one forks.
        fork["parent"] = write("main-fork", "long")
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if write("child", "long") != fork["parent"] else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        fork["child_exit"] = os.waitstatus_to_exitcode(status)
        fork["after"] = write("main-after", "long")
        with connections["long"].cursor() as cursor:
            cursor.execute("SELECT ID FROM information_schema.PROCESSLIST")
            live = {int(row[0]) for row in cursor.fetchall()}
        fork["seconds"] = round(time.monotonic() - started, 3)
        fork["greenlets_alive"] = sum(r.get("kill") in live for r in results)
        done.set()
        for green in greenlets:
            join(green)

    def sleep_control() -> None:
        with connections["long"].cursor() as cursor:
            cursor.execute(f"SELECT SLEEP({SLEEP})")

    ticker = Ticker()
    guard_gap = ticker.measure(guarded_phases)
    sleep_gap = ticker.measure(sleep_control)
    connections.close_all()
    print(
        json.dumps(
            {
                "patched": patched(),
                "green": GREEN,
                "poll": (
                    f"{select.poll.__module__}.{select.poll.__name__}"
                    if hasattr(select, "poll")
                    else None
                ),
                "greenlets": results,
                "fork": fork,
                "max_gap": guard_gap,
                "sleep_gap": sleep_gap,
                "wait": WAIT,
                "limit": WAIT - MARGIN,
                "idle": IDLE,
                "sleep": SLEEP,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
