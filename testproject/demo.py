"""``make demo``: each classic "server has gone away" failure, with plain Django and with
django-dbkeepalive, against a private MariaDB whose ``wait_timeout`` is 2 seconds.

Every scenario runs in a fresh process (``DBK_APP=0`` leaves the app out of
INSTALLED_APPS, ``DBK_APP=1`` puts it in), does what real code does, and reports what
happened. The table at the end is the summary. The Celery scenario also starts a private
redis-server (the broker) and a real ``celery worker``; without redis-server it is skipped.

    python -m testproject.demo             # all scenarios
    python -m testproject.demo --only kill # one of them
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WAIT_TIMEOUT = 2
PAUSE = 3.5  # longer than wait_timeout: the server closes idle connections meanwhile

# ------------------------------------------------------------ the scenarios (child side)


def _setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    import django

    django.setup()


def _admin() -> object:
    import pymysql

    return pymysql.connect(
        host=os.environ["DBK_DB_HOST"],
        port=int(os.environ["DBK_DB_PORT"]),
        user=os.environ["DBK_DB_USER"],
        password=os.environ["DBK_DB_PASSWORD"],
        autocommit=True,
    )


def _rows(prefix: str) -> int:
    admin = _admin()
    with admin.cursor() as cursor:  # type: ignore[attr-defined]
        cursor.execute(
            f"SELECT COUNT(*) FROM {os.environ['DBK_DB_NAME']}.testapp_item WHERE `key` LIKE %s",
            (prefix + "%",),
        )
        (count,) = cursor.fetchone()
    admin.close()  # type: ignore[attr-defined]
    return int(count)


def scenario_shell() -> str:
    """An idle `manage.py shell`: a query, a coffee break, then a save."""
    from testproject.testapp.models import Item

    Item.objects.count()
    time.sleep(PAUSE)
    Item.objects.create(key=f"shell-{os.getpid()}")
    return f"saved ({_rows('shell-')} row)"


def scenario_request() -> str:
    """A long request: read, minutes of work without the database, then save."""
    from django.test import Client

    response = Client(raise_request_exception=True).get(
        "/long/", {"sleep": PAUSE, "key": f"request-{os.getpid()}"}
    )
    return f"HTTP {response.status_code}, {_rows('request-')} row"


def scenario_atomic() -> str:
    """transaction.atomic() as the first thing after a pause (sends SET autocommit=0)."""
    from django.db import transaction

    from testproject.testapp.models import Item

    Item.objects.count()
    time.sleep(PAUSE)
    with transaction.atomic():
        Item.objects.create(key=f"atomic-{os.getpid()}")
    return f"committed ({_rows('atomic-')} row)"


def scenario_kill() -> str:
    """A DBA (or a failover) KILLs the connection; the next statement is a write."""
    from django.db import connection

    from testproject.testapp.models import Item

    Item.objects.count()
    admin = _admin()
    admin.cursor().execute(f"KILL {connection.connection.thread_id()}")  # type: ignore[attr-defined]
    time.sleep(0.5)
    Item.objects.create(key=f"kill-{os.getpid()}")
    return f"saved ({_rows('kill-')} row)"


def scenario_scheduler() -> str:
    """An APScheduler interval job whose runs are further apart than wait_timeout."""
    from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
    from apscheduler.schedulers.background import BackgroundScheduler

    from testproject.testapp.models import Item

    outcomes: list[str] = []

    def job() -> None:
        Item.objects.create(key=f"job-{os.getpid()}-{len(outcomes)}")

    def listener(event: object) -> None:
        exc = getattr(event, "exception", None)
        outcomes.append("ok" if exc is None else f"{type(exc).__name__}: {exc}")

    scheduler = BackgroundScheduler(executors={"default": {"type": "threadpool", "max_workers": 1}})
    scheduler.add_listener(listener, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    first = datetime.datetime.now(datetime.timezone.utc)
    scheduler.add_job(job, "interval", seconds=PAUSE, next_run_time=first)
    scheduler.start()
    deadline = time.monotonic() + PAUSE * 2 + 3
    while len(outcomes) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    scheduler.shutdown()
    failed = [o for o in outcomes if o != "ok"]
    if failed:
        raise RuntimeError(f"run {outcomes.index(failed[0]) + 1} failed: {failed[0]}")
    return f"{len(outcomes)} runs ok, {_rows(f'job-{os.getpid()}')} rows"


def scenario_fork() -> str:
    """A forked worker closes "its" connections, as commonly advised."""
    from django.db import connection, connections

    from testproject.testapp.models import Item

    Item.objects.count()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            Item.objects.count()
            connections.close_all()
        except Exception:
            code = 1
        os._exit(code)
    os.waitpid(pid, 0)
    Item.objects.create(key=f"fork-{os.getpid()}")
    connection.close()
    return f"parent saved ({_rows('fork-')} row)"


def scenario_restart() -> str:
    """The server restarts (a deploy, a failover) between two statements."""
    from testproject.testapp.models import Item

    Item.objects.count()
    Path(os.environ["DBK_DEMO_RESTART"]).write_text("restart")
    deadline = time.monotonic() + 30
    while Path(os.environ["DBK_DEMO_RESTART"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    Item.objects.create(key=f"restart-{os.getpid()}")
    return f"saved ({_rows('restart-')} row)"


def scenario_celery() -> str:
    """A real Celery worker (solo pool) gets two tasks that write a row, the second one
    after a quiet gap. Plain: Celery's Django fix-up with CELERY_DB_REUSE_MAX, so the
    worker keeps its connection across tasks; with the app: ``install(app)`` as well
    (testproject/celery.py)."""
    # The test suite's private redis-server and worker helpers (the demo, like the
    # tests, runs from a checkout of the repository).
    from tests.celery_worker import CeleryWorker, Client
    from tests.redis_server import RedisServer

    prefix = f"celery-{os.getpid()}-"
    env = {
        **os.environ,
        "DBK_CELERY_INTEGRATION": os.environ["DBK_APP"],  # install(app), or plain Celery
        "DBK_CELERY_DB_REUSE_MAX": "100",  # both sides: keep the connection across tasks
    }
    redis = RedisServer()
    worker: CeleryWorker | None = None
    client: Client | None = None
    try:
        redis.start()
        worker = CeleryWorker(redis.url, pool="solo", concurrency=1, env=env).start()
        client = Client(redis.url)
        try:
            client.write([prefix + "1"], timeout=30)
        except Exception as exc:
            raise RuntimeError(f"task 1 failed: {type(exc).__name__}: {exc}") from exc
        time.sleep(PAUSE)
        client.write([prefix + "2"], timeout=30)  # plain: its error, as the worker got it
    finally:
        if client is not None:
            client.close()
        if worker is not None:
            worker.close()
        redis.close()
    return f"2 tasks ok, {_rows(prefix)} rows"


SCENARIOS: dict[str, tuple[str, Callable[[], str]]] = {
    "shell": ("idle shell, then save", scenario_shell),
    "request": ("long request (read, work, save)", scenario_request),
    "atomic": ("atomic() first after a pause", scenario_atomic),
    "kill": ("connection KILLed, then write", scenario_kill),
    "scheduler": ("APScheduler job, quiet gaps", scenario_scheduler),
    "fork": ("fork, child closes all", scenario_fork),
    "restart": ("server restart between queries", scenario_restart),
    "celery": ("Celery task after a quiet gap", scenario_celery),
}

# What a scenario needs from the system: (program, how to get it).
REQUIRES: dict[str, tuple[str, str]] = {
    "celery": ("redis-server", "sudo apt-get install redis-server, or make deps"),
}


def run_child(name: str) -> None:
    _setup()
    try:
        outcome = {"ok": True, "text": SCENARIOS[name][1]()}
    except Exception as exc:  # the point of the demo: show the real error
        text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        outcome = {"ok": False, "text": text}
    print("DEMO-RESULT " + json.dumps(outcome), flush=True)


# ------------------------------------------------------------------- the runner side


def _mark(result: dict[str, object]) -> str:
    if result.get("skipped"):
        return "SKIP " + str(result["text"])
    return ("OK   " if result["ok"] else "FAIL ") + str(result["text"])


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short_timeouts(server: Any) -> None:
    server.set_global("wait_timeout", WAIT_TIMEOUT)
    server.set_global("interactive_timeout", WAIT_TIMEOUT)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--child", choices=sorted(SCENARIOS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child)
        return 0

    sys.path.insert(0, str(ROOT))
    from tests.mariadb import MariaDBServer

    names = args.only or list(SCENARIOS)
    print("Starting a private MariaDB (its own data directory and port)...", flush=True)
    server = MariaDBServer()
    server.start()
    results: dict[tuple[str, str], dict[str, object]] = {}
    try:
        server.query("CREATE DATABASE demo CHARACTER SET utf8mb4")
        env = {
            **os.environ,
            "DBK_DB_HOST": server.host,
            "DBK_DB_PORT": str(server.port),
            "DBK_DB_USER": server.user,
            "DBK_DB_PASSWORD": server.password,
            "DBK_DB_NAME": "demo",
            "PYTHONPATH": str(ROOT),
        }
        subprocess.run(
            [sys.executable, str(ROOT / "testproject" / "manage.py"), "migrate", "-v0"],
            env=env,
            check=True,
        )
        _short_timeouts(server)
        print(f"Server on port {server.port}; wait_timeout = {WAIT_TIMEOUT} s.\n", flush=True)
        flag = Path(server.tmpdir or "/tmp") / "restart-request"
        for name in names:
            program, how = REQUIRES.get(name, ("", ""))
            if program and shutil.which(program) is None:
                print(f"  {SCENARIOS[name][0]:<36} SKIP: {program} not found ({how})")
                skip = {"ok": True, "skipped": True, "text": f"{program} not installed"}
                results[(name, "0")] = results[(name, "1")] = skip
                continue
            for app in ("0", "1"):
                label = "django-dbkeepalive" if app == "1" else "plain Django"
                print(f"  {SCENARIOS[name][0]:<36} {label:<20} ", end="", flush=True)
                child_env = {**env, "DBK_APP": app, "DBK_DEMO_RESTART": str(flag)}
                proc = subprocess.Popen(
                    [sys.executable, "-m", "testproject.demo", "--child", name],
                    env=child_env,
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                started = time.monotonic()
                while proc.poll() is None:
                    if flag.exists():
                        server.restart()
                        _short_timeouts(server)  # a restart forgets SET GLOBAL
                        flag.unlink()
                    time.sleep(0.25)
                    if int((time.monotonic() - started) * 4) % 4 == 0:
                        print(".", end="", flush=True)
                output = proc.stdout.read() if proc.stdout else ""
                line = next(
                    (ln for ln in output.splitlines() if ln.startswith("DEMO-RESULT ")), None
                )
                if line:
                    result = json.loads(line[len("DEMO-RESULT ") :])
                else:
                    last = output.strip().splitlines()[-1] if output.strip() else "no output"
                    result = {"ok": False, "text": last}
                results[(name, app)] = result
                print(" ok" if result["ok"] else " FAILED", flush=True)
    finally:
        server.close()

    width = 48
    print()
    print(f"{'scenario':<36} | {'plain Django':<{width}} | with django-dbkeepalive")
    print(f"{'-' * 36}-+-{'-' * width}-+-{'-' * width}")
    all_fixed = True
    for name in names:
        plain, app = results[(name, "0")], results[(name, "1")]
        all_fixed = all_fixed and bool(app["ok"])
        print(
            f"{SCENARIOS[name][0]:<36} | {_short(_mark(plain), width):<{width}} | "
            f"{_short(_mark(app), width)}"
        )
    print()
    skipped = [name for name in names if results[(name, "1")].get("skipped")]
    for name in skipped:
        program, how = REQUIRES[name]
        print(f"Skipped {SCENARIOS[name][0]!r}: {program} not found ({how}).")
    if all_fixed:
        print(f"Every scenario {'that ran ' if skipped else ''}works with django-dbkeepalive.")
    else:
        print("Some scenarios still fail with django-dbkeepalive: see above.")
    return 0 if all_fixed else 1


if __name__ == "__main__":
    sys.exit(main())
