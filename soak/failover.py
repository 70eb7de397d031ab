"""Failover soak: writers and readers through Django while the primary fails over, again
and again, the way operators do it.

    python -m soak.failover [--failovers 5] [--interval 6] [--mode app|plain]
                            [--endpoint proxy|haproxy] [--json FILE]
    (DBK_DRIVER=mysqlclient|pymysql selects the driver)

This module owns the topology, the load and the failover schedule; the figures are
:mod:`soak.failover_report`'s. It starts the topology the ``ha`` tests use
(:class:`tests.replication.ReplicatedPair`: two private MariaDB servers, GTID
replication primary -> replica, the application user without ``SUPER`` or
``READ_ONLY ADMIN``), the endpoint being the fault proxy (``--endpoint proxy``: new flows
go to the new primary, open ones stay) or HAProxy (``--endpoint haproxy``). Django
(testproject settings, ``CONN_MAX_AGE = None``) connects through the endpoint as the
application user, with django_dbkeepalive installed (``--mode app``) or not
(``--mode plain``: ``DBK_APP=0``, plain Django).

Load, each in its own thread with its own connection, every write a unique
client-generated key into a table without a unique index (a write that ran twice shows
as two rows):

- busy-1, busy-2: one-row autocommit writes every 10-30 ms (50 ms pause after an error);
- txn: a read then two rows in one ``transaction.atomic()`` block, every 50-150 ms;
- web: HTTP requests to a real WSGI server thread (``soak.app.write_view``: a read, then
  two rows in one transaction; acknowledged when the response is 200);
- reader: a read every 10-30 ms.

After ``--warmup`` seconds, every ``--interval`` seconds, the main thread fails over: the
old primary ``SET GLOBAL read_only = 1`` (the moment the figures count from), the
replica catches up and is promoted (``STOP SLAVE``, ``RESET SLAVE ALL``,
``read_only = 0``), the endpoint moves, then the old primary becomes a replica of the new
one (so the next failover goes back). Persistent connections are not killed.

At the end replication catches up and the rows are read back as root over separate
connections from both nodes. Exit status 1 when a row is duplicated, an acknowledged row
is missing or a row nobody attempted appears, on either node.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from tests.replication import APP_DATABASE, APP_USER, ReplicatedPair

from .failover_report import Failover, Ledger, Op, Verdict, kind_of, print_report, verdict
from .run import QuietHandler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--failovers", type=int, default=5)
    parser.add_argument(
        "--interval", type=float, default=6.0, help="seconds between failovers (and after the last)"
    )
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--mode",
        choices=("app", "plain"),
        default="plain" if os.environ.get("DBK_APP") == "0" else "app",
        help="django_dbkeepalive installed, or plain Django (DBK_APP=0)",
    )
    parser.add_argument("--endpoint", choices=("proxy", "haproxy"), default="proxy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", default=None, help="append the figures to this file")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    driver = os.environ.get("DBK_DRIVER", "mysqlclient")
    os.environ["DBK_APP"] = "1" if args.mode == "app" else "0"

    # The servers die with the thread that started them (PR_SET_PDEATHSIG): the main
    # thread starts them and runs every failover.
    pair = ReplicatedPair(endpoint=args.endpoint)
    pair.start()
    try:
        return run(pair, args, seed, driver)
    finally:
        pair.close()


class Load:
    """The writer and reader threads; ``ledger`` gets every operation."""

    def __init__(self, ledger: Ledger, seed: int, web_port: int) -> None:
        self.ledger = ledger
        self.seed = seed
        self.web_port = web_port
        self.stop = threading.Event()

    def op(self, who: str, keys: tuple[str, ...], fn: Callable[[], Any]) -> bool:
        """Run one operation (a write when it has ``keys``) and record it."""
        start = time.monotonic()
        error, note = None, ""
        try:
            result = fn()
            if isinstance(result, str):  # the web client: an error seen by the server
                error = result
        except Exception as exc:  # whatever reached the application is the figure
            error = kind_of(exc)
            notes = [n for n in getattr(exc, "__notes__", []) if "django-dbkeepalive" in n]
            note = notes[0] if notes else ""
        self.ledger.add(Op(who, bool(keys), keys, start, time.monotonic(), error, note))
        return error is None

    def threads(self) -> list[threading.Thread]:
        targets: list[tuple[str, Callable[[], None]]] = [
            ("busy-1", lambda: self.busy("busy-1", 11)),
            ("busy-2", lambda: self.busy("busy-2", 12)),
            ("txn", self.txn),
            ("web", self.web),
            ("reader", self.reader),
        ]
        return [threading.Thread(target=self._run, args=(fn,), name=n) for n, fn in targets]

    def _run(self, fn: Callable[[], None]) -> None:
        from django.db import connections

        try:
            fn()
        finally:
            connections.close_all()

    def busy(self, who: str, salt: int) -> None:
        from .app import SoakRow

        rng = random.Random(self.seed + salt)
        n = 0
        while not self.stop.is_set():
            key = f"{who}-{n}"
            n += 1
            ok = self.op(who, (key,), lambda key=key: SoakRow.objects.create(key=key, writer=who))
            self.stop.wait(rng.uniform(0.01, 0.03) if ok else 0.05)

    def txn(self) -> None:
        from django.db import transaction

        from .app import SoakRow

        rng = random.Random(self.seed + 13)
        n = 0
        while not self.stop.is_set():
            key = f"txn-{n}"
            n += 1

            def pair(key: str = key) -> None:
                with transaction.atomic():
                    SoakRow.objects.filter(writer="txn").exists()
                    SoakRow.objects.create(key=f"{key}-a", writer="txn")
                    SoakRow.objects.create(key=f"{key}-b", writer="txn")

            self.op("txn", (f"{key}-a", f"{key}-b"), pair)
            self.stop.wait(rng.uniform(0.05, 0.15))

    def web(self) -> None:
        n = 0
        while not self.stop.is_set():
            key = f"web-{n}"
            n += 1

            def request(key: str = key) -> str | None:
                conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=60)
                try:
                    conn.request("GET", f"/write?key={key}&pause=0")
                    status = conn.getresponse().status
                finally:
                    conn.close()
                if status == 200:
                    return None
                with self.ledger.lock:
                    return self.ledger.web_errors.pop(key, f"HTTP {status}")

            ok = self.op("web", (f"{key}-a", f"{key}-b"), request)
            self.stop.wait(0.03 if ok else 0.05)

    def reader(self) -> None:
        from .app import SoakRow

        rng = random.Random(self.seed + 14)
        while not self.stop.is_set():
            self.op("reader", (), lambda: SoakRow.objects.order_by("-id").first())
            self.stop.wait(rng.uniform(0.01, 0.03))


def fail_over(pair: ReplicatedPair, number: int) -> Failover:
    """Demote, promote, move the endpoint (``ReplicatedPair.failover``), then make the
    demoted node a replica of the new primary (``rejoin``)."""
    old, new = pair.primary, pair.replica
    old.set_global("read_only", 1)  # failover() sets it again: a no-op by then
    read_only_at = time.monotonic()
    pair.failover()
    moved_at = time.monotonic()
    pair.rejoin()
    return Failover(number, old.name, new.name, read_only_at, moved_at, time.monotonic() - moved_at)


def run(pair: ReplicatedPair, args: argparse.Namespace, seed: int, driver: str) -> int:
    os.environ.update(
        DJANGO_SETTINGS_MODULE="testproject.settings",
        DBK_DB_HOST=pair.host,
        DBK_DB_PORT=str(pair.port),
        DBK_DB_USER=APP_USER,
        DBK_DB_PASSWORD=pair.app_password,
        DBK_DB_NAME=APP_DATABASE,
        DBK_CONN_MAX_AGE="None",
    )
    import django

    django.setup()
    from django.conf import settings
    from django.core.signals import got_request_exception
    from django.core.wsgi import get_wsgi_application

    from django_dbkeepalive.guard import is_installed

    from .app import TABLE_SQL

    pair.primary.query(TABLE_SQL, db=APP_DATABASE)
    pair.wait_caught_up()
    app = args.mode == "app"
    if is_installed() != app:
        raise SystemExit(f"the guard is {'not ' if app else ''}installed in mode {args.mode}")
    settings.ROOT_URLCONF = "soak.app"
    ledger = Ledger()
    recycles: dict[str, int] | None = None
    if app:
        from django_dbkeepalive.signals import connection_recycled

        recycles = {}

        def on_recycle(sender: str, reason: str, **kwargs: Any) -> None:
            recycles[reason] = recycles.get(reason, 0) + 1

        connection_recycled.connect(on_recycle, weak=False)

    def on_request_exception(sender: Any, request: Any = None, **kwargs: Any) -> None:
        exc = sys.exc_info()[1]
        key = request.GET.get("key") if request is not None else None
        if key and exc is not None:
            with ledger.lock:
                ledger.web_errors[key] = kind_of(exc)

    got_request_exception.connect(on_request_exception, weak=False)
    httpd: WSGIServer = make_server(
        "127.0.0.1", 0, get_wsgi_application(), handler_class=QuietHandler
    )
    # get_wsgi_application() ran django.setup() again, which configured logging again.
    logging.getLogger("django_dbkeepalive").setLevel(logging.WARNING)
    logging.getLogger("django.request").setLevel(logging.CRITICAL)
    web = threading.Thread(target=httpd.serve_forever, name="wsgi", daemon=True)
    load = Load(ledger, seed, httpd.server_address[1])
    threads = load.threads()

    title = (
        f"failover soak: {driver}, {'django_dbkeepalive' if app else 'plain Django'}, "
        f"endpoint {args.endpoint}, {args.failovers} failovers every {args.interval:g} s, "
        f"seed {seed}"
    )
    print(title, flush=True)
    started = time.monotonic()
    web.start()
    for thread in threads:
        thread.start()
    failovers: list[Failover] = []
    try:
        time.sleep(args.warmup)
        for number in range(1, args.failovers + 1):
            failovers.append(fail_over(pair, number))
            f = failovers[-1]
            print(
                f"  failover {number}: {f.old} -> {f.new}, endpoint moved after "
                f"{f.moved_at - f.read_only_at:.2f} s, rejoined in {f.rejoin_seconds:.2f} s",
                flush=True,
            )
            time.sleep(max(0.0, f.read_only_at + args.interval - time.monotonic()))
    finally:
        stopped = time.monotonic()
        load.stop.set()
        for thread in threads:
            thread.join(60)
        httpd.shutdown()
    from django.db import connections

    connections.close_all()

    # -- verdict: both nodes, as root over connections of their own -------------------
    pair.wait_caught_up()
    verdicts: list[Verdict] = []
    for role, node in (("primary", pair.primary), ("replica", pair.replica)):
        found = dict(
            node.query("SELECT `key`, COUNT(*) FROM soak_row GROUP BY `key`", db=APP_DATABASE)
        )
        verdicts.append(verdict(f"{node.name} ({role})", found, ledger))
    failed = print_report(title, ledger, failovers, stopped, started, verdicts, recycles, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
